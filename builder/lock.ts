/** scion.lock: the exact packages (version, file, SHA-256) each set of roots resolved to. */
import { readFile } from 'node:fs/promises';
import { BuildError } from '../common/errors.ts';
import { atomicWrite } from '../common/safe-fs.ts';

export interface LockedPackage {
  name: string;
  version: string;
  filename: string;
  sha256: string;
  size: number;
}
export interface LockSet {
  roots: string[];
  packages: LockedPackage[];
}
export interface Lockfile {
  lockVersion: 1;
  suite: string;
  codename?: string;
  architecture: string;
  sets: Record<string, LockSet>;
}

export async function readLock(path: string): Promise<Lockfile | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
  try {
    const l = JSON.parse(text);
    if (l.lockVersion !== 1 || typeof l.sets !== 'object') throw new Error('unknown lock version');
    return l as Lockfile;
  } catch (e) {
    throw new BuildError('E_LOCK_INVALID', `${path}: not a valid scion.lock (${(e as Error).message})`, { hint: 'delete it or rebuild with --update-lock' });
  }
}

export function serialiseLock(l: Lockfile): string {
  const sets: Record<string, LockSet> = {};
  for (const k of Object.keys(l.sets).sort()) sets[k] = l.sets[k];
  return JSON.stringify({ ...l, sets }, null, 2) + '\n';
}

export async function writeLock(path: string, l: Lockfile): Promise<void> {
  await atomicWrite(path, serialiseLock(l), 0o644, { makeDirs: true });
}

export const sameRoots = (a: string[], b: string[]) => a.length === b.length && [...a].sort().every((x, i) => x === [...b].sort()[i]);
