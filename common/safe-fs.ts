/**
 * Files and directories scion trusts. scion runs as root and keeps state in
 * shared places (/run, /dev/shm), so, as OpenSSH does with key directories
 * and systemd with XDG_RUNTIME_DIR, a directory is used only when it is
 * ours: owned by this user, writable by nobody else, not a symlink, and
 * reached through ancestors that nobody else can rename it out of. Files are
 * created exclusively (O_EXCL never follows a planted symlink) and read
 * with O_NOFOLLOW.
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, constants, lstatSync, mkdirSync, realpathSync, statfsSync, type Stats } from 'node:fs';
import { mkdir, open, rename, rm, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ScionError } from './errors.ts';

export class TrustError extends ScionError {}

const TMPFS_MAGIC = 0x01021994;
const uid = () => process.getuid?.() ?? 0;

export interface TrustOptions {
  /** what the directory is, for messages ("run root") */
  what: string;
  /** the environment variable that moves it, for the hint */
  env?: string;
  /** must be on tmpfs (template memory is shared through the page cache) */
  tmpfs?: boolean;
  /** mode of the directories it makes (default 0700; 0755 for what unprivileged VMs must reach, e.g. the VMM) */
  mode?: number;
}

/** Why an existing directory is not trustworthy, or undefined. Pure given its stat. */
export function dirProblem(st: Pick<Stats, 'uid' | 'mode'> & { isSymbolicLink(): boolean; isDirectory(): boolean }, me: number): string | undefined {
  if (st.isSymbolicLink()) return 'is a symbolic link';
  if (!st.isDirectory()) return 'is not a directory';
  if (st.uid !== me) return `is owned by uid ${st.uid}, not by uid ${me} (this user)`;
  if (st.mode & 0o022) return `is writable by ${st.mode & 0o020 ? 'its group' : 'others'} (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')})`;
  return undefined;
}

/** Why an ancestor lets others move our directory, or undefined. Root-owned sticky directories (/tmp, /dev/shm) are fine. */
export function ancestorProblem(st: Pick<Stats, 'uid' | 'mode'>, me: number): string | undefined {
  if (st.uid !== 0 && st.uid !== me) return `is owned by uid ${st.uid}`;
  if (st.mode & 0o022 && !(st.mode & 0o1000 && st.uid === 0))
    return `is writable by others and not sticky (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')})`;
  return undefined;
}

/**
 * Make (mode 0700) or check a directory scion keeps state in, and return its
 * real path. Refuses, with what is wrong and how to fix it, a directory that
 * another user owns or can write, a symlink, or (with `tmpfs`) one not on tmpfs.
 */
export function ensureTrustedDir(path: string, opts: TrustOptions): string {
  const me = uid();
  const fix = (why: string) =>
    new TrustError('E_UNTRUSTED_DIR', `${opts.what} ${path} ${why}`, {
      hint: `scion keeps state only in a directory of its own: remove or fix ${path} (chown ${me} and chmod 700)${opts.env ? `, or point ${opts.env} elsewhere` : ''}`,
    });
  // make what is missing, one level at a time, each 0700 and ours
  const missing: string[] = [];
  let p = path;
  for (;;) {
    try {
      lstatSync(p);
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw fix(`cannot be inspected: ${(e as Error).message}`);
      missing.unshift(p);
      const up = dirname(p);
      if (up === p) break;
      p = up;
    }
  }
  for (const m of missing) {
    try {
      mkdirSync(m, { mode: opts.mode ?? 0o700 });
      if (opts.mode) chmodSync(m, opts.mode); // the umask would take bits away
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw fix(`cannot be created: ${(e as Error).message}`);
      // someone made it meanwhile: it is checked below like any existing one
    }
  }
  // the parent may be reached through root's symlinks (/var/run -> /run); the directory itself may not be one
  const real = join(realpathSync(dirname(path)), basename(path));
  const st = lstatSync(real);
  const problem = dirProblem(st, me);
  if (problem) throw fix(problem);
  for (let a = dirname(real); ; a = dirname(a)) {
    const ap = ancestorProblem(lstatSync(a), me);
    if (ap) throw fix(`is inside ${a}, which ${ap}`);
    if (dirname(a) === a) break;
  }
  if (opts.tmpfs && statfsSync(real).type !== TMPFS_MAGIC) {
    throw new TrustError('E_NOT_TMPFS', `${opts.what} ${path} is not on tmpfs`, {
      hint: `template memory is shared through the page cache: point ${opts.env ?? 'it'} at a directory on tmpfs (e.g. under /dev/shm)`,
    });
  }
  return real;
}

/** Create a file that must not exist yet (O_EXCL: a planted file or symlink makes this fail, never followed). */
export async function writeExclusive(path: string, data: Uint8Array | string, mode = 0o600): Promise<void> {
  const fh = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, mode);
  try {
    await fh.writeFile(data);
  } finally {
    await fh.close();
  }
}

/**
 * Write to a fresh temporary file beside `path`, then rename over it: readers
 * see the old or the new bytes, never half. `makeDirs`: its directory made
 * first (build outputs and the cache live where the user says).
 */
export async function atomicWrite(path: string, data: Uint8Array | string, mode = 0o644, o: { makeDirs?: boolean } = {}): Promise<void> {
  if (o.makeDirs) await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
  try {
    await writeExclusive(tmp, data, mode);
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => undefined); // it may never have been made; the first error is the one to report
    throw e;
  }
}

/** Read a file, refusing a symlink in its place (ELOOP). */
export async function readNoFollow(path: string): Promise<string> {
  return (await readBytesNoFollow(path)).toString('utf8');
}

/** The bytes of a regular file, never through a symlink at the last component. */
export async function readBytesNoFollow(path: string): Promise<Buffer> {
  const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    return await fh.readFile();
  } finally {
    await fh.close();
  }
}

/**
 * Put the complete directory `tmp` in place of `dir`, whole: the old one is
 * renamed aside, the new one renamed in, the old one removed. A reader sees
 * the old or the new directory, never a mix. If another process puts its own
 * copy there in between, one more round replaces it.
 */
export async function replaceDirectory(tmp: string, dir: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    const old = `${dir}.old-${process.pid}-${randomBytes(3).toString('hex')}`;
    const hadOld = await rename(dir, old).then(
      () => true,
      (e) => {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
        throw e;
      },
    );
    try {
      await rename(tmp, dir);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if ((code === 'ENOTEMPTY' || code === 'EEXIST') && attempt === 0) continue;
      throw e;
    } finally {
      if (hadOld) await rm(old, { recursive: true, force: true });
    }
    return;
  }
}
