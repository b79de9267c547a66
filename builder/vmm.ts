/**
 * Fetching the pinned VMM (host/qemu/vmm-plan.ts says why it is pinned):
 * the closure vmm/qemu.scion.lock names, resolved and fetched by the
 * builder's Debian client (InRelease signature, Packages hash, each .deb's
 * SHA-256), extracted beside its place and renamed in whole, with its SBOM.
 */
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { installTree, treeComplete } from './install-tree.ts';
import { BlobCache } from './cache.ts';
import { DebianArchive, chooseMirror } from './debian/archive.ts';
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
  if (await treeComplete(dir, 'closure.json')) return { dir, digest, fetched: false };
  const archive = new DebianArchive({
    mirror: await chooseMirror(vmmLockPath(), o.mirror),
    suite: lock.codename ?? lock.suite,
    components: ['main'],
    architecture: lock.architecture,
    cache: new BlobCache(),
    onProgress: o.onProgress,
    log: o.log,
  });
  await installTree(dir, packages, archive, {
    marker: 'closure.json',
    dirMode: 0o755,
    // nothing in it is writable or set-id: it is code every VM runs
    fileMode: (e) => (e.mode & 0o111 ? 0o555 : 0o444),
    linkTarget: (e) => containedLink(e.path, e.linkname!),
    log: o.log,
    finish: async (tmp) => {
      await writeFile(join(tmp, 'sbom.cdx.json'), closureSbom(lock, digest), { mode: 0o444 });
      const closure = { digest, suite: lock.codename ?? lock.suite, packages: packages.map((p) => `${p.name} ${p.version}`) };
      await writeFile(join(tmp, 'closure.json'), `${JSON.stringify(closure, null, 1)}\n`, { mode: 0o444 });
      await chmod(tmp, 0o755);
    },
  });
  return { dir, digest, fetched: true };
}
