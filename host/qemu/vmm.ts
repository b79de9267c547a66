/**
 * The VMM scion runs (vmm-plan.ts says why it is pinned): the closure the
 * lock names, as builder/vmm.ts fetched and extracted it (`scion vmm
 * fetch`), or, on request, the host's QEMU.
 */
import { spawnSync } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { access, readFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { config } from '../../common/config.ts';
import { VmError } from '../../common/errors.ts';
import { ensureTrustedDir } from '../../common/safe-fs.ts';
import { packageRoot } from '../../common/version.ts';
import { run } from '../../common/run.ts';
import { closureDigest, closureDir, closurePackages, parseVmmLock, pinnedCommand, type Vmm, type VmmLock } from './vmm-plan.ts';

export type { Vmm } from './vmm-plan.ts';

/** The lock that pins the VMM, shipped with scion. */
export const vmmLockPath = (): string => join(packageRoot(), 'vmm', 'qemu.scion.lock');
/** The VMM lock, read and checked (vmm-plan.ts parseVmmLock). */
export async function readVmmLock(): Promise<VmmLock> {
  const path = vmmLockPath();
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new VmError('E_VMM_LOCK', `${path}: ${(e as Error).message}`, { hint: 'npm run lock:vmm writes it; it ships with scion' });
  }
  try {
    return parseVmmLock(text);
  } catch (e) {
    throw new VmError('E_VMM_LOCK', `${path}: ${(e as Error).message}`, { hint: 'npm run lock:vmm writes it again' });
  }
}

/** The VMM root: 0755 for root, so the unprivileged uids VMs run as can start the loader in it. */
export function vmmRoot(): string {
  return ensureTrustedDir(config().vmmDir, { what: 'VMM directory', env: 'SCION_VMM_DIR', mode: process.getuid?.() === 0 ? 0o755 : 0o700 });
}

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

/** The pinned closure as it is on disk, or E_VMM_MISSING. */
async function pinnedVmm(): Promise<Vmm> {
  const lock = await readVmmLock();
  const digest = closureDigest(closurePackages(lock));
  const dir = closureDir(vmmRoot(), digest);
  if (!(await exists(join(dir, 'closure.json'))))
    throw new VmError('E_VMM_MISSING', `scion's pinned QEMU (${digest.slice(0, 19)}…) is not in ${config().vmmDir}`, {
      hint: 'scion vmm fetch gets it (scripts/setup.sh runs it); SCION_VMM=system runs the host QEMU instead',
    });
  const c = pinnedCommand(dir);
  const r = await run(c.command[0], [...c.command.slice(1), '--version'], { what: 'the pinned QEMU --version', env: c.env });
  return { kind: 'pinned', ...c, version: r.stdout.split('\n')[0].trim(), digest, dir, machine: await machineAlias(c.command, c.env) };
}

/** The host's QEMU: identified by the SHA-256 of its binary. */
async function systemVmm(): Promise<Vmm> {
  const qemu = config().qemu;
  const r = await run(qemu, ['--version'], { what: `${qemu} --version` });
  const path = qemu.includes('/') ? qemu : spawnSync('sh', ['-c', `command -v "$0"`, qemu], { encoding: 'utf8' }).stdout.trim() || qemu;
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return {
    kind: 'system',
    command: [qemu],
    args: [],
    env: {},
    version: r.stdout.split('\n')[0].trim(),
    digest: `sha256:${h.digest('hex')}`,
    machine: await machineAlias([qemu], {}),
  };
}

/** The versioned machine type `q35` stands for in this QEMU (pc-q35-10.0): what a template records and its clones ask for by name. */
async function machineAlias(command: string[], env: Record<string, string>): Promise<string> {
  const r = await run(command[0], [...command.slice(1), '-machine', 'help'], { what: 'QEMU -machine help', env });
  const m = /^q35\s+.*\(alias of ([\w.-]+)\)/m.exec(r.stdout);
  return m ? m[1] : 'q35';
}

const cache = new Map<string, Promise<Vmm>>();
/** The VMM this process runs (SCION_VMM, SCION_QEMU, SCION_VMM_DIR: read at each call, each answer cached). */
export function currentVmm(): Promise<Vmm> {
  const c = config();
  const key = c.vmm === 'system' ? `system:${c.qemu}` : `pinned:${c.vmmDir}`;
  let v = cache.get(key);
  if (!v) {
    v = (c.vmm === 'system' ? systemVmm() : pinnedVmm()).catch((e) => {
      cache.delete(key);
      throw e;
    });
    cache.set(key, v);
  }
  return v;
}
