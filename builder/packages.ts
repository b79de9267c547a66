/**
 * The package stages of a build: which package sets the definition asks
 * for, their resolution into the lock (reused where the roots are unchanged),
 * download (or the cache), and extraction.
 */
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { BuildError } from '../common/errors.ts';
import type { BlobCache } from './cache.ts';
import { atomicWrite } from '../common/safe-fs.ts';
import type { DebianArchive } from './debian/archive.ts';
import { debDataTar, dataTarEntries, readControl, type TarEntry } from './debian/deb.ts';
import { resolve as resolveDeps, type PackageIndex } from './debian/resolver.ts';
import type { ImageDefinition } from './schema.ts';
import { sameRoots, serialiseLock, type Lockfile, type LockedPackage } from './lock.ts';

/**
 * Packages the agent needs a few files of, and those files: QuickJS's
 * interpreter (not its compiler, qjsc, nor its examples); linuxptp's phc_ctl
 * for the agent's relative clock steps (clock_adjtime ADJ_SETOFFSET; busybox
 * sets whole seconds only). The rest of such a package stays out unless the
 * definition lists it in `packages:`; the libraries they link come in by
 * the guest's library closure.
 */
export const AGENT_TOOLS: Record<string, string[]> = { quickjs: ['/usr/bin/qjs'], linuxptp: ['/usr/sbin/phc_ctl'] };
const AGENT_TOOL_PACKAGES = Object.keys(AGENT_TOOLS);

export type PackageSets = Record<string, { roots: string[]; follow?: (n: string) => boolean }>;

/** The package sets the definition asks for: name -> roots. Pure. */
export function packageSets(def: ImageDefinition): PackageSets {
  const guest = new Set(['busybox-static', def.agent.runtime, ...AGENT_TOOL_PACKAGES, ...def.packages]);
  if (def.containers.length) guest.add('crun');
  const sets: PackageSets = {
    guest: { roots: [...guest].sort() },
    // the kernel metapackage points at the real image package; its other
    // Depends (kmod, initramfs-tools) are for dpkg installs, not for us
    kernel: { roots: [def.kernel.package], follow: (n) => n.startsWith('linux-image-') },
  };
  for (const c of def.containers) if ('packages' in c.image) sets[`container:${c.name}`] = { roots: [...c.image.packages].sort() };
  return sets;
}

/** Resolve each set (from the old lock when its roots are unchanged); --locked refuses any change. */
export async function resolveLock(o: {
  def: ImageDefinition;
  sets: PackageSets;
  oldLock?: Lockfile;
  archive: DebianArchive;
  locked?: boolean;
  definitionPath: string;
  lockPath: string;
}): Promise<Lockfile> {
  const { def, oldLock } = o;
  // the mirror is not locked: packages are named by hash, any mirror serves them
  const lock: Lockfile = { lockVersion: 1, suite: def.debian.suite, codename: oldLock?.codename, architecture: def.debian.architecture, sets: {} };
  let index: PackageIndex | undefined;
  for (const [name, s] of Object.entries(o.sets)) {
    const locked = oldLock?.sets[name];
    if (locked && sameRoots(locked.roots, s.roots)) {
      lock.sets[name] = locked;
      continue;
    }
    index ??= await o.archive.index();
    lock.codename ??= o.archive.codename;
    const pins = new Map<string, string>();
    for (const ls of Object.values(oldLock?.sets ?? {})) for (const p of ls.packages) pins.set(p.name, p.version);
    // a pin the archive no longer has fails here; --update-lock resolves afresh
    const chosen = resolveDeps(index, s.roots, { pins, follow: s.follow });
    lock.sets[name] = {
      roots: s.roots,
      packages: chosen.map((p) => ({ name: p.name, version: p.version, filename: p.filename, sha256: p.sha256, size: p.size })),
    };
  }
  if (o.locked && serialiseLock(lock) !== serialiseLock(oldLock!)) {
    const changed = Object.keys({ ...lock.sets, ...oldLock!.sets }).filter((k) => JSON.stringify(lock.sets[k]) !== JSON.stringify(oldLock!.sets[k]));
    throw new BuildError(
      'E_LOCK_CHANGED',
      `${o.definitionPath}: --locked, but the definition no longer matches ${basename(o.lockPath)} (package sets ${changed.join(', ')})`,
      { hint: 'update the lock (scion build without --locked, or --update-lock) and commit it' },
    );
  }
  return lock;
}

/** Every package of the lock once, by SHA-256. */
export function lockedPackages(lock: Lockfile): Map<string, LockedPackage> {
  const all = new Map<string, LockedPackage>();
  for (const s of Object.values(lock.sets)) for (const p of s.packages) all.set(p.sha256, p);
  return all;
}

export async function mapLimit<T, R>(items: T[], limit: number, fn: (t: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let i = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (i < items.length) {
        const k = i++;
        out[k] = await fn(items[k]);
      }
    }),
  );
  return out;
}

/** A .deb this large (the kernel's) keeps its decompressed data.tar in the cache: xz costs seconds per build. */
const DATA_TAR_CACHE_MIN_BYTES = 8 * 1024 * 1024;

/** The decompressed data.tar of a .deb, from the cache when this .deb was decompressed before (content-addressed: a damaged copy is never used). */
async function cachedDataTar(cache: BlobCache, p: LockedPackage, deb: Buffer): Promise<Buffer> {
  const label = `${p.name} ${p.version}`;
  if (deb.length < DATA_TAR_CACHE_MIN_BYTES) return debDataTar(deb, label);
  const ref = cache.refPath(`data-tar-${p.sha256}`);
  const hash = await readFile(ref, 'utf8').then(
    (t) => t.trim(),
    () => undefined,
  );
  const hit = hash && /^[0-9a-f]{64}$/.test(hash) ? await cache.get(hash) : undefined;
  if (hit) return hit;
  const tar = await debDataTar(deb, label);
  await atomicWrite(ref, await cache.put(tar), 0o644, { makeDirs: true });
  return tar;
}

export interface Extracted {
  files: Map<string, TarEntry[]>;
  controls: Map<string, Record<string, string>>;
}

/** Download (or take from the cache) and extract every package: files and control fields, by SHA-256. */
export async function fetchAndExtract(archive: DebianArchive, cache: BlobCache, packages: LockedPackage[], step: (name: string) => void): Promise<Extracted> {
  const debs = new Map<string, Buffer>();
  await mapLimit(packages, 4, async (p) => {
    debs.set(p.sha256, await archive.deb(p));
  });
  step('download');
  const files = new Map<string, TarEntry[]>();
  const controls = new Map<string, Record<string, string>>();
  await mapLimit(packages, 2, async (p) => {
    const deb = debs.get(p.sha256)!;
    files.set(p.sha256, await dataTarEntries(await cachedDataTar(cache, p, deb)));
    controls.set(p.sha256, await readControl(deb, `${p.name} ${p.version}`));
  });
  debs.clear();
  step('extract');
  return { files, controls };
}

/** The agent's runtime package as the guest set locked it. */
export function agentRuntime(lock: Lockfile, name: string): { package: string; version: string; sha256: string } {
  const p = lock.sets.guest?.packages.find((x) => x.name === name);
  if (!p)
    throw new BuildError('E_LOCK_STALE', `the lock's guest set has no ${name}, the agent's runtime`, {
      hint: 'build without --locked to resolve the guest set again',
    });
  return { package: p.name, version: p.version, sha256: p.sha256 };
}
