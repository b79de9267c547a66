/** Kernel module selection and load order from .modinfo depends=. Pure. */
import { BuildError } from '../common/errors.ts';

/** Module names are compared with '-' and '_' as one, as the kernel does. */
export const modKey = (name: string) => name.replace(/-/g, '_');

/**
 * Given the requested modules and every available module's depends list,
 * return the closure in load order (dependencies first; ties by name, so the
 * order is deterministic). Requested modules that are built in (absent from
 * `available` but listed in `builtin`) are skipped.
 */
export function moduleLoadOrder(requested: string[], available: Map<string, string[]>, builtin: Set<string> = new Set()): string[] {
  const order: string[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (name: string, chain: string[]) => {
    const k = modKey(name);
    if (state.get(k) === 'done') return;
    if (state.get(k) === 'visiting') throw new BuildError('E_MODULE_CYCLE', `kernel module dependency cycle: ${[...chain, k].join(' -> ')}`);
    const deps = available.get(k);
    if (!deps) {
      if (builtin.has(k)) {
        state.set(k, 'done');
        return;
      }
      throw new BuildError(
        'E_MODULE_UNKNOWN',
        `kernel module "${name}" is not in the kernel package${chain.length ? ` (needed by ${chain[chain.length - 1]})` : ''}`,
        {
          hint: 'check the name (see modules.builtin for built-in ones) in kernel.modules',
        },
      );
    }
    state.set(k, 'visiting');
    for (const d of [...deps].sort()) visit(d, [...chain, k]);
    state.set(k, 'done');
    order.push(k);
  };
  for (const r of requested.map(modKey).sort()) visit(r, []);
  return order;
}
