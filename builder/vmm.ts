/**
 * Fetching the pinned VMM (host/qemu/vmm-plan.ts says why it is pinned):
 * the closure vmm/qemu.scion.lock names, resolved and fetched by the
 * builder's Debian client (InRelease signature, Packages hash, each .deb's
 * SHA-256), extracted beside its place and renamed in whole, with its SBOM.
 */
import { chmod, mkdir, mkdtemp, rename, rm, symlink, writeFile, access } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { BlobCache } from './cache.ts';
import { DebianArchive, chooseMirror } from './debian/archive.ts';
import { extractDeb } from './debian/deb.ts';
import { resolve as resolveDeps } from './debian/resolver.ts';
import { writeLock, type Lockfile } from './lock.ts';
import type { Progress } from './fetch.ts';
import { VMM_ROOTS, VMM_SET, closureDigest, closureDir, closurePackages, closureSbom, containedLink, followRuntime } from '../host/qemu/vmm-plan.ts';
import { readVmmLock, vmmLockPath, vmmRoot } from '../host/qemu/vmm.ts';

/** The suite the closure comes from. */
const SUITE = 'trixie';

/** Resolve the closure afresh from the archive and write the lock (npm run lock:vmm). */
export async function lockVmm(o: { mirror?: string; log?: (m: string) => void } = {}): Promise<Lockfile> {
  const path = vmmLockPath();
  const archive = new DebianArchive({
    mirror: await chooseMirror(path, o.mirror),
    suite: SUITE,
    components: ['main'],
    architecture: 'amd64',
    cache: new BlobCache(),
  });
  const chosen = resolveDeps(await archive.index(), VMM_ROOTS, { follow: followRuntime });
  const lock: Lockfile = {
    lockVersion: 1,
    suite: SUITE,
    codename: archive.codename,
    architecture: 'amd64',
    sets: {
      [VMM_SET]: {
        roots: VMM_ROOTS,
        packages: chosen.map((p) => ({ name: p.name, version: p.version, filename: p.filename, sha256: p.sha256, size: p.size })),
      },
    },
  };
  await writeLock(path, lock);
  o.log?.(`${path}: ${chosen.length} packages, ${closureDigest(closurePackages(lock))}`);
  return lock;
}

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

/**
 * Fetch, verify and extract the pinned closure unless it is there already.
 * Returns its directory. Concurrent callers each extract beside and one
 * rename wins: the others' bytes are the same.
 */
export async function fetchPinnedVmm(
  o: { log?: (m: string) => void; onProgress?: Progress; mirror?: string } = {},
): Promise<{ dir: string; digest: string; fetched: boolean }> {
  const lock = (await readVmmLock()) as Lockfile;
  const packages = closurePackages(lock);
  const digest = closureDigest(packages);
  const dir = closureDir(vmmRoot(), digest);
  if (await exists(join(dir, 'closure.json'))) return { dir, digest, fetched: false };
  const archive = new DebianArchive({
    mirror: await chooseMirror(vmmLockPath(), o.mirror),
    suite: lock.codename ?? lock.suite,
    components: ['main'],
    architecture: lock.architecture,
    cache: new BlobCache(),
    onProgress: o.onProgress,
    log: o.log,
  });
  const tmp = await mkdtemp(`${dir}.tmp-`);
  try {
    for (const p of packages) {
      o.log?.(`${p.name} ${p.version}`);
      for (const e of await extractDeb(await archive.deb(p), `${p.name} ${p.version}`)) {
        const to = tmp + e.path;
        if (e.type === 'directory') await mkdir(to, { recursive: true, mode: 0o755 });
        else if (e.type === 'file') {
          await mkdir(dirname(to), { recursive: true, mode: 0o755 });
          // nothing in it is writable or set-id: it is code every VM runs
          await writeFile(to, e.data!, { mode: e.mode & 0o111 ? 0o555 : 0o444 });
        } else if (e.type === 'symlink') {
          await mkdir(dirname(to), { recursive: true, mode: 0o755 });
          await rm(to, { force: true });
          await symlink(containedLink(e.path, e.linkname!), to);
        }
      }
    }
    await writeFile(join(tmp, 'sbom.cdx.json'), closureSbom(lock, digest), { mode: 0o444 });
    await writeFile(
      join(tmp, 'closure.json'),
      `${JSON.stringify({ digest, suite: lock.codename ?? lock.suite, packages: packages.map((p) => `${p.name} ${p.version}`) }, null, 1)}\n`,
      {
        mode: 0o444,
      },
    );
    await chmod(tmp, 0o755);
    await rename(tmp, dir).catch(async (e) => {
      if (!(await exists(join(dir, 'closure.json')))) throw e; // another process won the race with the same bytes
    });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return { dir, digest, fetched: true };
}
