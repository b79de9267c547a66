/**
 * Where scion keeps state, and the checks before it uses any of it. The run
 * root holds one run directory per VM (vms/<name>) and the reservation
 * files (slots/); the template root, on tmpfs, one directory per frozen
 * template. Both are made 0700 and checked on every use (common/safe-fs).
 */
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { ensureTrustedDir } from '../../common/safe-fs.ts';
import type { ValidName } from '../../common/names.ts';
import { config } from '../../common/config.ts';

export function runRoot(): string {
  return config().runDir;
}

/** Template memory files must be on tmpfs so clones share page cache. */
export function templateRoot(): string {
  return config().templateDir;
}

/** root/sub, made 0700 if missing, then checked like its root (common/safe-fs). */
export function trustedSub(root: string, sub: string, what: string, env: string): string {
  const d = join(root, sub);
  try {
    mkdirSync(d, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e; // an existing one is checked next
  }
  return ensureTrustedDir(d, { what, env });
}

/** The checked run root's vms/ directory (created if missing). */
export function vmsDir(): string {
  const root = ensureTrustedDir(runRoot(), { what: 'run root', env: 'SCION_RUN_DIR' });
  return trustedSub(root, 'vms', 'run directory root', 'SCION_RUN_DIR');
}

/** The checked run root's slots/ directory: reservation files for indices, ports and uids. */
export function slotsDir(): string {
  const root = ensureTrustedDir(runRoot(), { what: 'run root', env: 'SCION_RUN_DIR' });
  return trustedSub(root, 'slots', 'reservation directory', 'SCION_RUN_DIR');
}

/** The checked template root (on tmpfs). */
export function trustedTemplateRoot(): string {
  return ensureTrustedDir(templateRoot(), { what: 'template root', env: 'SCION_TEMPLATE_DIR', tmpfs: true });
}

/**
 * A VM's run directory: vm.json (scion's record, root-only) beside jail/,
 * the only directory the VM's QEMU can write (its sockets and console log).
 * QEMU runs with jail/ as its working directory and names these files
 * relatively, so it needs no access to anything above it.
 */
export function vmPaths(name: ValidName, vms = join(runRoot(), 'vms')) {
  const dir = join(vms, name);
  const jail = join(dir, 'jail');
  return {
    dir,
    jail,
    record: join(dir, 'vm.json'),
    qmp: join(jail, JAIL_FILES.qmp),
    agent: join(jail, JAIL_FILES.agent),
    console: join(jail, JAIL_FILES.console),
    consoleSocket: join(jail, JAIL_FILES.consoleSocket),
  };
}

/** File names inside a jail, as QEMU's argv names them (relative to its working directory). */
export const JAIL_FILES = { qmp: 'qmp.sock', agent: 'agent.sock', console: 'console.log', consoleSocket: 'console.sock' } as const;

export const templatePaths = (tdir: string) => ({
  dir: tdir,
  meta: join(tdir, 'meta.json'),
  mem: join(tdir, 'mem'),
  state: join(tdir, 'state'),
  kernel: join(tdir, 'kernel-stub'),
  disk: join(tdir, 'disk.qcow2'),
});

/** Where a hibernated clone's saved state lives: on disk (not the tmpfs of run directories), root's own, 0700. */
export function hibernationDir(name: ValidName): string {
  return join(ensureTrustedDir(join(config().stateDir, 'hibernated'), { what: 'hibernation directory', env: 'SCION_STATE_DIR' }), name);
}
