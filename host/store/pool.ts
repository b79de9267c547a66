/**
 * Pools of paused, ready forks of a template, waiting to be claimed: a pod's
 * VM then costs a resume and a new identity, not a QEMU start and a restore.
 * On disk, beside the run directories, with no daemon and no global lock:
 * - pool/<template>/<vm>: a ready entry, written once the clone stands paused;
 * - claiming one is renaming it to pool/<template>/.claim-<pid>-<vm>
 *   (exactly one process wins a rename), dropped once the VM's record names
 *   its new owner;
 * - pool/<template>/.fill holds the one process filling that pool (its
 *   pid), so a pool never grows past its size however many fill it at once.
 * A pooled VM's record has the owner kind `pool`: it is kept while an entry
 * or a live claimer names it (inventory.ts, gc).
 */
import { readdir, readFile, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { ensureTrustedDir, writeExclusive } from '../../common/safe-fs.ts';
import { nameProblem, validName, type ValidName } from '../../common/names.ts';
import { runRoot, trustedSub } from './dirs.ts';

/** The owner kind of a pooled VM's record. */
export const POOL_OWNER = 'pool';

const CLAIM = /^\.claim-(\d+)-(.+)$/;
const FILL = '.fill';

/** The checked pool/ directory of the run root. */
function poolRoot(): string {
  const root = ensureTrustedDir(runRoot(), { what: 'run root', env: 'SCION_RUN_DIR' });
  return trustedSub(root, 'pool', 'pool directory', 'SCION_RUN_DIR');
}

/** The checked directory of one template's pool (the name is checked first: it becomes a path). */
function poolDir(template: string): string {
  return trustedSub(poolRoot(), validName(template, 'template'), 'pool directory', 'SCION_RUN_DIR');
}

const isValidName = (s: string): boolean => nameProblem(s) === undefined;

const missing = (e: unknown): boolean => (e as NodeJS.ErrnoException).code === 'ENOENT';

/** Remove a pool file; one already gone (taken or swept by another process) is not an error. */
async function unlinkIfThere(path: string): Promise<void> {
  await unlink(path).catch((e) => {
    if (!missing(e)) throw e;
  });
}

/** Whether the process a fill lock names still lives (an unreadable lock names none). */
async function fillerAlive(lock: string, alive: (pid: number) => boolean): Promise<boolean> {
  const pid = Number((await readFile(lock, 'utf8').catch(() => '')).trim());
  return Number.isInteger(pid) && pid > 0 && alive(pid);
}

/** The ready entries of a template's pool, oldest first (the longest paused goes first). */
export async function readyEntries(template: string): Promise<ValidName[]> {
  const dir = poolDir(template);
  const names = (await readdir(dir)).filter((f) => !f.startsWith('.') && isValidName(f)) as ValidName[];
  return names.sort();
}

/**
 * Add a ready entry for `vm` (it stands paused now), naming the freeze of the
 * template it was forked from: a template made again under the same name is
 * another template, whose pods must not get this VM.
 */
export async function addEntry(template: string, vm: ValidName, frozenAt: string): Promise<void> {
  await writeExclusive(join(poolDir(template), vm), JSON.stringify({ pid: process.pid, at: new Date().toISOString(), frozenAt }) + '\n');
}

/**
 * Claim `vm` out of the pool: undefined if another process won it (or it was
 * removed); else the freeze its entry names (its claim file names this pid).
 */
export async function takeEntry(template: string, vm: ValidName): Promise<{ frozenAt?: string } | undefined> {
  const dir = poolDir(template);
  const claim = join(dir, `.claim-${process.pid}-${vm}`);
  try {
    await rename(join(dir, vm), claim);
  } catch (e) {
    if (missing(e)) return undefined; // another claimer won it, or it was removed
    throw e;
  }
  try {
    const j = JSON.parse(await readFile(claim, 'utf8')) as { frozenAt?: unknown };
    return { frozenAt: typeof j.frozenAt === 'string' ? j.frozenAt : undefined };
  } catch {
    return {};
  } // unreadable: the caller finds it names no freeze, and drops the VM
}

/** The claim is over: the VM's record names its new owner (or the VM is gone). */
export async function dropClaim(template: string, vm: ValidName): Promise<void> {
  await unlinkIfThere(join(poolDir(template), `.claim-${process.pid}-${vm}`));
}

/** Forget `vm` in its template's pool: its entry and any claim of it (the VM is being removed). */
export async function dropEntries(template: string, vm: string): Promise<void> {
  if (!isValidName(template) || !isValidName(vm)) return;
  const dir = poolDir(template);
  for (const f of await readdir(dir)) {
    if (f === vm || CLAIM.exec(f)?.[2] === vm) await unlinkIfThere(join(dir, f));
  }
}

/** Whether the pool still holds `vm`: its entry is there, or a live process is claiming it. */
export async function poolHolds(template: string, vm: string, alive: (pid: number) => boolean): Promise<boolean> {
  if (!isValidName(template) || !isValidName(vm)) return false;
  for (const f of await readdir(poolDir(template))) {
    if (f === vm) return true;
    const c = CLAIM.exec(f);
    if (c && c[2] === vm && alive(Number(c[1]))) return true;
  }
  return false;
}

/**
 * Become the one filler of a template's pool: a release function, or
 * undefined if a live process fills it now. A lock whose process died is
 * taken over.
 */
export async function takeFillLock(template: string, alive: (pid: number) => boolean): Promise<(() => Promise<void>) | undefined> {
  const file = join(poolDir(template), FILL);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      await writeExclusive(file, `${process.pid}\n`);
      return () => unlinkIfThere(file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      if (await fillerAlive(file, alive)) return undefined;
      await unlinkIfThere(file); // its filler died: take it over
    }
  }
  return undefined; // another process took the stale lock over first
}

/** Every template with a pool directory, and its entries and claims (for gc and listings). */
export async function listPools(): Promise<{ template: string; ready: string[]; claims: { pid: number; vm: string }[] }[]> {
  const root = poolRoot();
  const out: { template: string; ready: string[]; claims: { pid: number; vm: string }[] }[] = [];
  for (const t of await readdir(root)) {
    if (!isValidName(t)) continue;
    const files = await readdir(join(root, t)).catch(() => [] as string[]);
    out.push({
      template: t,
      ready: files.filter((f) => !f.startsWith('.') && isValidName(f)),
      claims: files.flatMap((f) => {
        const c = CLAIM.exec(f);
        return c ? [{ pid: Number(c[1]), vm: c[2] }] : [];
      }),
    });
  }
  return out;
}

/** Remove stale files of one pool: claims of dead processes, entries naming no VM, a dead filler's lock. */
export async function sweepPool(template: string, exists: (vm: string) => boolean, alive: (pid: number) => boolean): Promise<string[]> {
  const dir = poolDir(template);
  const removed: string[] = [];
  for (const f of await readdir(dir)) {
    const c = CLAIM.exec(f);
    let stale = false;
    if (c) stale = !alive(Number(c[1])) || !exists(c[2]);
    else if (f === FILL) stale = !(await fillerAlive(join(dir, f), alive));
    else if (!f.startsWith('.')) stale = !exists(f);
    if (stale) {
      await unlinkIfThere(join(dir, f));
      removed.push(`pool:${template}/${f}`);
    }
  }
  return removed;
}
