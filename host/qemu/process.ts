/**
 * The QEMU process: spawned as the VM's own unprivileged uid (when scion
 * runs as root) inside QEMU's seccomp sandbox, with its working directory in
 * the VM's jail and every outside file handed over as a descriptor; then
 * QMP, restore and migration, all without a shell (no exec: URIs).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync, constants, existsSync, readFileSync, readlinkSync, readdirSync } from 'node:fs';
import { open, rename, unlink, chown } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { VmError, ScionError } from '../../common/errors.ts';
import { missingCommand, tailOf } from '../../common/run.ts';
import { QmpClient } from './qmp.ts';
import { qemuArgv, FD, type VmDescription } from './argv.ts';
import { currentVmm } from './vmm.ts';
import { CLOSURE } from './vmm-plan.ts';
import { processAlive, sleep } from '../../common/proc.ts';

export { processAlive, sleep };
import { config } from '../../common/config.ts';

export interface Credentials {
  uid: number;
  gid: number;
}

/** The uid/gid of slot n: SCION_UID_BASE+n, when scion is root (one per VM, as Firecracker's jailer does). */
export const credentialsFor = (slot: number): Credentials => {
  const base = config().uidBase;
  return { uid: base + slot, gid: base + slot };
};
export const runningAsRoot = () => process.getuid?.() === 0;

/** Files QEMU gets as descriptors (see FD in argv.ts); each opened here, by scion, with the right mode. */
export interface QemuFiles {
  mem?: string;
  kernel: string;
  initrd?: string;
  state?: string;
  diskBase?: string;
  diskTemplate?: string;
  diskClone?: string;
}

export interface QemuProcess {
  pid: number;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  isDead(): boolean;
  stderrTail(lines?: number): string;
  /** which QEMU it is, for messages */
  program: string;
}

/**
 * Spawn QEMU for `desc`. Resolves once the process exists; a QEMU binary
 * that is missing is E_COMMAND_MISSING, naming it.
 */
export async function spawnQemu(desc: VmDescription, o: { jail: string; files: QemuFiles; cred?: Credentials; netns?: string }): Promise<QemuProcess> {
  const fds: number[] = [];
  const openFd = (path: string | undefined, flags: number) => {
    if (!path) return 'ignore' as const;
    const fd = openSync(path, flags | constants.O_NOFOLLOW);
    fds.push(fd);
    return fd;
  };
  const stdio: (number | 'ignore' | 'pipe')[] = ['ignore', 'ignore', 'pipe'];
  let child: ChildProcess;
  const vmm = await currentVmm();
  // the pinned closure runs through its own loader: [loader, --library-path, dir, qemu] + -L firmware dirs
  const qemu = [...vmm.command, ...vmm.args];
  let cmd = qemu[0];
  try {
    const slots: [number, string | undefined, number][] = [
      [FD.mem, o.files.mem, desc.mode === 'template' && desc.memory === 'file' ? constants.O_RDWR : constants.O_RDONLY],
      [FD.kernel, o.files.kernel, constants.O_RDONLY],
      [FD.initrd, o.files.initrd, constants.O_RDONLY],
      [FD.state, o.files.state, constants.O_RDONLY],
      [FD.diskBase, o.files.diskBase, constants.O_RDONLY],
      [FD.diskTemplate, o.files.diskTemplate, desc.mode === 'template' ? constants.O_RDWR : constants.O_RDONLY],
      [FD.diskClone, o.files.diskClone, constants.O_RDWR],
    ];
    for (const [n, path, flags] of slots) stdio[n] = openFd(path, flags);
    for (let i = 0; i < stdio.length; i++) stdio[i] ??= 'ignore';
    const argv = qemuArgv(desc);
    // entering a network namespace needs root, so setpriv drops to the VM's uid after `ip netns exec`
    const [c, args, cred] = o.netns
      ? [
          'ip',
          [
            'netns',
            'exec',
            o.netns,
            ...(o.cred ? ['setpriv', `--reuid=${o.cred.uid}`, `--regid=${o.cred.gid}`, '--clear-groups', '--'] : []),
            ...qemu,
            ...argv,
          ],
          undefined,
        ]
      : [qemu[0], [...qemu.slice(1), ...argv], o.cred];
    if (o.netns) cmd = c;
    child = spawn(c, args, { stdio, detached: true, cwd: o.jail, env: { ...process.env, ...vmm.env }, ...(cred ? { uid: cred.uid, gid: cred.gid } : {}) });
  } finally {
    for (const fd of fds) closeSync(fd); // QEMU holds its own copies now
  }
  let stderr = '';
  child.stderr!.on('data', (c) => {
    stderr = (stderr + c).slice(-8192);
  });
  let dead = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    child.on('exit', (code, signal) => {
      dead = true;
      res({ code, signal });
    }),
  );
  const spawnError = new Promise<Error | undefined>((res) => {
    child.once('error', res);
    child.once('spawn', () => res(undefined));
  });
  const err = await spawnError;
  if (err) {
    dead = true;
    throw (err as NodeJS.ErrnoException).code === 'ENOENT'
      ? missingCommand(cmd, err)
      : new VmError('E_SPAWN', `${desc.name}: cannot start ${cmd}: ${err.message}`, { cause: err });
  }
  child.unref();
  (child.stderr as unknown as { unref?: () => void }).unref?.(); // a pipe's handle: this process may exit while QEMU writes on
  const program = `${vmm.kind} QEMU ${vmm.kind === 'pinned' ? vmm.dir + CLOSURE.qemu : vmm.command[0]}`;
  return { pid: child.pid!, program, exited, isDead: () => dead, stderrTail: (n = 3) => tailOf(stderr, n) };
}

/** A typed error for a QEMU that exited: the command, its exit and the tail of its stderr. */
export function qemuDied(name: string, proc: QemuProcess, doing: string, hint?: string): VmError {
  const t = proc.stderrTail();
  return new VmError('E_QEMU_EXITED', `${name}: QEMU (${proc.program}) exited while ${doing}${t ? `: ${t}` : ''}`, { hint });
}

/** Connect QMP as soon as QEMU listens (the socket file appears a moment before it accepts). */
export async function connectQmp(name: string, path: string, proc: QemuProcess, timeoutMs: number): Promise<QmpClient> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (proc.isDead()) throw qemuDied(name, proc, 'starting');
    if (existsSync(path)) {
      const q = new QmpClient(`${name}/qmp`);
      try {
        await q.connect(path, Math.max(100, end - Date.now()));
        return q;
      } catch (e) {
        q.close();
        if (!/ECONNREFUSED|ENOENT/.test((e as Error).message) || Date.now() > end) throw e;
      }
    }
    if (Date.now() > end) throw new VmError('E_QEMU_TIMEOUT', `${name}: QEMU did not open ${path} within ${timeoutMs} ms`);
    await sleep(5);
  }
}

/** Wait for QEMU to exit (at most `ms`); the child is unref'd, so a timer keeps Node alive meanwhile. */
export function exitOf(proc: QemuProcess, ms = 5000): Promise<unknown> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([proc.exited, new Promise((r) => (t = setTimeout(r, ms)))]).finally(() => clearTimeout(t));
}

/** Restore from the state file handed over as FD.state; typed errors if QEMU dies or hangs. */
export async function restoreFromFd(qmp: QmpClient, name: string, proc: QemuProcess, ignoreShared: boolean): Promise<void> {
  if (ignoreShared) await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  await qmp.execute('migrate-incoming', { uri: `fd:${FD.state}` });
  const corrupt = 'the template state file may be corrupt or truncated; freeze the template again';
  for (;;) {
    if (proc.isDead()) throw new VmError('E_RESTORE_FAILED', `${name}: QEMU exited while loading the template state: ${proc.stderrTail(2)}`, { hint: corrupt });
    let s: { status?: string } | undefined;
    try {
      s = await qmp.execute<{ status?: string }>('query-status', undefined, 10_000);
    } catch (e) {
      // QEMU closing the monitor mid-load means the load failed and it exited
      await exitOf(proc, 2000);
      throw proc.isDead()
        ? new VmError('E_RESTORE_FAILED', `${name}: QEMU exited while loading the template state: ${proc.stderrTail(2)}`, { hint: corrupt })
        : new VmError('E_RESTORE_FAILED', `${name}: QEMU stopped answering while loading the template state (${(e as Error).message})`, {
            hint: corrupt,
            cause: e,
          });
    }
    if (s.status === 'paused' || s.status === 'postmigrate' || s.status === 'prelaunch') {
      const m = await qmp.execute<MigrationInfo>('query-migrate');
      if (m.status === 'completed') return;
      if (m.status === 'failed')
        throw new VmError('E_RESTORE_FAILED', `${name}: loading the template state failed: ${m['error-desc'] ?? ''}`, { hint: corrupt });
    }
    if (s.status === 'running') return;
    await sleep(3);
  }
}

/** What `query-migrate` answers, as far as scion reads it. */
interface MigrationInfo {
  status?: string;
  'error-desc'?: string;
}

export async function waitMigration(q: QmpClient, name: string): Promise<void> {
  for (;;) {
    const m = await q.execute<MigrationInfo>('query-migrate');
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled') throw new VmError('E_FREEZE_FAILED', `${name}: saving state failed: ${m['error-desc'] ?? m.status}`);
    await sleep(5);
  }
}

/**
 * Save the VM's migration stream to `dest` without a shell: scion listens on
 * a fresh socket in the VM's jail (reachable by that VM's uid only), QEMU
 * connects to it by a relative path, and the bytes go to a new temporary
 * file renamed to `dest` once the migration completed.
 */
export async function migrateToFile(qmp: QmpClient, name: string, jail: string, cred: Credentials | undefined, dest: string): Promise<void> {
  const sockName = `mig-${randomBytes(6).toString('hex')}.sock`;
  const sockPath = join(jail, sockName);
  const tmp = `${dest}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  let server: Server | undefined;
  let stream: import('node:fs').WriteStream | undefined;
  try {
    let received: Promise<void> = Promise.resolve();
    let accepted = false;
    server = createServer((c: Socket) => {
      if (accepted) {
        c.destroy();
        return;
      } // one stream only
      accepted = true;
      received = new Promise<void>((res, rej) => {
        // the stream owns the handle from here: it flushes (fsync) and closes it at the end
        const w = fh.createWriteStream({ flush: true } as Parameters<typeof fh.createWriteStream>[0]);
        stream = w;
        c.pipe(w);
        w.on('close', res);
        c.on('error', rej);
        w.on('error', rej);
      });
    });
    await new Promise<void>((res, rej) => {
      server!.once('error', rej);
      server!.listen(sockPath, res);
    });
    if (cred) await chown(sockPath, cred.uid, cred.gid);
    await qmp.execute('migrate', { uri: `unix:${sockName}` });
    await waitMigration(qmp, name);
    if (!accepted) throw new VmError('E_FREEZE_FAILED', `${name}: QEMU completed the migration without connecting to ${sockPath}`);
    await received;
    await rename(tmp, dest);
  } catch (e) {
    // closing the handle waits for a stream on it, so a stream is destroyed instead; the first error matters
    if (stream) stream.destroy();
    else await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw e instanceof ScionError ? e : new VmError('E_FREEZE_FAILED', `${name}: saving state to ${dest} failed: ${(e as Error).message}`, { cause: e });
  } finally {
    server?.close();
    await unlink(sockPath).catch(() => undefined); // gone with the server on most kernels
  }
}

export function killPid(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (!pid) return;
  try {
    process.kill(pid, sig);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e; // already gone is what we wanted
  }
}

export async function waitDead(pid: number | undefined, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (processAlive(pid) && Date.now() < end) await sleep(10);
  killPid(pid);
}

/** The working directory of a live process (QEMU's is its jail), or undefined. */
export function cwdOf(pid: number): string | undefined {
  try {
    return readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    return undefined;
  } // gone, or not ours to read
}

/** Is this pid a live QEMU whose working directory is `jail`? */
export function isQemuIn(pid: number | undefined, jail: string): boolean {
  if (!pid || !processAlive(pid)) return false;
  return cwdOf(pid) === jail && /qemu-system/.test(safeRead(`/proc/${pid}/cmdline`));
}

/** QEMU processes whose working directory is a jail under `vms` (scion's, by construction). */
export function qemuPidsUnder(vms: string): { pid: number; jail: string }[] {
  const out: { pid: number; jail: string }[] = [];
  let entries: string[] = [];
  try {
    entries = readdirSync('/proc');
  } catch {
    return out;
  } // no /proc: nothing to find
  for (const d of entries) {
    if (!/^\d+$/.test(d)) continue;
    const cwd = cwdOf(Number(d));
    if (!cwd?.startsWith(`${vms}/`) || !cwd.endsWith('/jail')) continue;
    if (!/qemu-system/.test(safeRead(`/proc/${d}/cmdline`))) continue;
    out.push({ pid: Number(d), jail: cwd });
  }
  return out;
}

function safeRead(p: string): string {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return '';
  }
} // a process that just exited reads as nothing
