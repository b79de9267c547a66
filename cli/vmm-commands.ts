/**
 * `scion vmm`: which QEMU scion runs, and `scion vmm fetch` to get the
 * pinned one (scripts/setup.sh runs it).
 */
import { EXIT, ScionError } from '../common/errors.ts';
import { currentVmm, fetchPinnedVmm } from '../host/index.ts';
import { fmtBytes } from './format.ts';
import { str, type CommandSpec } from './options.ts';

export const VMM_COMMANDS: CommandSpec[] = [
  {
    name: 'vmm',
    args: '[fetch]',
    summary:
      "the QEMU scion runs: its kind (pinned: the closure vmm/qemu.scion.lock names; system: the host's), version, digest and place; `fetch` gets and verifies the pinned one",
    options: { mirror: { type: 'string', value: 'URL', help: "Debian mirror for fetch (default: the host's apt sources)" } },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      if (pos.length > 1 || (pos[0] !== undefined && pos[0] !== 'fetch'))
        throw new ScionError('E_USAGE', `scion vmm: unknown argument ${JSON.stringify(pos.join(' '))}`, { hint: 'scion vmm, or scion vmm fetch' });
      if (pos[0] === 'fetch') {
        let last = 0;
        const f = await fetchPinnedVmm({
          mirror: str(v, 'mirror'),
          log: ctx.json ? undefined : (m) => ctx.err(`[vmm] ${m}`),
          onProgress: ctx.json
            ? undefined
            : (ev) => {
                if (ev.done || ev.ms - last > 1000)
                  ctx.err(`[fetch] ${ev.url.split('/').pop()} ${fmtBytes(ev.received)}${ev.total ? `/${fmtBytes(ev.total)}` : ''}`);
                last = ev.ms;
              },
        });
        if (!ctx.json) ctx.err(`[vmm] ${f.fetched ? 'fetched and extracted' : 'already here'}: ${f.dir}`);
      }
      const vmm = await currentVmm();
      const info = { kind: vmm.kind, version: vmm.version, digest: vmm.digest, machine: vmm.machine, dir: vmm.dir, command: [...vmm.command, ...vmm.args] };
      if (ctx.json) ctx.out(JSON.stringify({ ok: true, ...info }, null, 2));
      else {
        ctx.out(`${vmm.kind} ${vmm.version}`);
        ctx.out(`  digest   ${vmm.digest}`);
        ctx.out(`  machine  q35 = ${vmm.machine}`);
        if (vmm.dir) ctx.out(`  closure  ${vmm.dir} (SBOM: ${vmm.dir}/sbom.cdx.json)`);
        else ctx.out(`  binary   ${vmm.command[0]}`);
      }
      return EXIT.ok;
    },
  },
];
