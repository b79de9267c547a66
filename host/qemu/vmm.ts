/**
 * The VMM scion runs (vmm-plan.ts says why it is pinned): the closure the
 * lock names, as builder/vmm.ts fetched and extracted it (`scion vmm
 * fetch`), or, on request, the host's QEMU.
 */
import { spawnSync } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { access, readFile, stat } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { config } from '../../common/config.ts';
import { VmError } from '../../common/errors.ts';
import { atomicWrite, ensureTrustedDir, readNoFollow } from '../../common/safe-fs.ts';
import { packageRoot } from '../../common/version.ts';
import { run } from '../../common/run.ts';
import { CLOSURE, closureDigest, closureDir, closurePackages, parseVmmLock, pinnedCommand, type Vmm, type VmmLock } from './vmm-plan.ts';

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
  const id = await remembered(join(dir, CLOSURE.qemu), async () => ({
    version: await versionOf(c.command, c.env),
    machine: await machineAlias(c.command, c.env),
    digest, // the closure's, from the lock: the cache holds it only beside the rest
  }));
  return { kind: 'pinned', ...c, version: id.version, digest, dir, machine: id.machine };
}

/** The host's QEMU: identified by the SHA-256 of its binary. */
async function systemVmm(): Promise<Vmm> {
  const qemu = config().qemu;
  const path = qemu.includes('/') ? qemu : spawnSync('sh', ['-c', `command -v "$0"`, qemu], { encoding: 'utf8' }).stdout.trim() || qemu;
  const id = await remembered(path, async () => {
    const version = await versionOf([qemu], {}); // first: a missing QEMU is E_COMMAND_MISSING, naming its package
    const h = createHash('sha256');
    for await (const c of createReadStream(path)) h.update(c as Buffer);
    return { version, machine: await machineAlias([qemu], {}), digest: `sha256:${h.digest('hex')}` };
  });
  return { kind: 'system', command: [qemu], args: [], env: {}, ...id };
}

const versionOf = async (command: string[], env: Record<string, string>) =>
  (await run(command[0], [...command.slice(1), '--version'], { what: `${command.at(-1)} --version`, env })).stdout.split('\n')[0].trim();

interface VmmIdentity {
  version: string;
  machine: string;
  digest: string;
}

/**
 * A VMM's identity, worked out once per binary: spawning QEMU twice (and
 * hashing the host's binary) costs 60-120 ms here, in every new process (each
 * pod's shim), on the way to its VM. Kept in the cache, keyed by the binary's
 * path, inode, size and times: a replaced or changed binary is identified again.
 */
async function remembered(binary: string, identify: () => Promise<VmmIdentity>): Promise<VmmIdentity> {
  const st = await stat(binary).catch(() => undefined);
  if (!st) return identify(); // not there: identify() says so with the command's own error
  const key = `${binary}:${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
  let dir: string;
  try {
    // what the compatibility check trusts: only from a directory nobody else can write
    dir = ensureTrustedDir(join(config().cacheDir, 'vmm-identity'), { what: 'VMM identity cache', env: 'XDG_CACHE_HOME' });
  } catch {
    return identify();
  }
  const file = join(dir, `${createHash('sha256').update(key).digest('hex').slice(0, 24)}.json`);
  try {
    const j = JSON.parse(await readNoFollow(file)) as Partial<VmmIdentity> & { key?: string };
    if (j.key === key && typeof j.version === 'string' && typeof j.machine === 'string' && typeof j.digest === 'string')
      return { version: j.version, machine: j.machine, digest: j.digest };
  } catch {
    /* not there yet, or unreadable: identified again below */
  }
  const id = await identify();
  await atomicWrite(file, JSON.stringify({ key, ...id }), 0o644).catch(() => undefined); // a cache: the answer stands without it
  return id;
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
