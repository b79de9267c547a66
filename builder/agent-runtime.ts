/**
 * The guest's own agent runtime, runnable on the build host: the very qjs
 * and C library an image gets (the lock's packages, checked by SHA-256),
 * extracted under the cache and started through that C library's loader, so
 * a trixie qjs runs on a bookworm host without touching the host's libraries.
 * The agent's tests run the bundled agent this way; children the agent
 * starts (sh, ip, busybox) are the host's, since the loader is given by
 * argument, not by environment.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BuildError } from '../common/errors.ts';
import { BlobCache } from './cache.ts';
import { config } from '../common/config.ts';
import { DebianArchive, chooseMirror } from './debian/archive.ts';
import { installTree, treeComplete } from './install-tree.ts';
import { readLock } from './lock.ts';
import { parseDefinition } from './schema.ts';

/** Packages whose files the interpreter needs: itself, and the C library with its loader. */
const NEEDS = (runtime: string) => [runtime, 'libc6'];
const LOADER = '/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2';
const LIBS = '/usr/lib/x86_64-linux-gnu';
const QJS = '/usr/bin/qjs';

export interface HostAgentRuntime {
  /** argv that runs qjs: loader, --library-path, the interpreter */
  argv: string[];
  /** where the packages were extracted */
  dir: string;
}

/**
 * Extract the agent runtime of the image defined at `definitionPath` (its
 * lock next to it) once per set of package hashes; later calls reuse it.
 */
export async function hostAgentRuntime(definitionPath: string, opts: { cacheDir?: string; mirror?: string } = {}): Promise<HostAgentRuntime> {
  const def = parseDefinition(await readFile(definitionPath, 'utf8'), definitionPath);
  const lockPath = definitionPath.replace(/\.ya?ml$/, '.scion.lock');
  const lock = await readLock(lockPath);
  if (!lock) throw new BuildError('E_LOCK_STALE', `${lockPath}: no lock; build the image once to write it`);
  const wanted = NEEDS(def.agent.runtime).map((n) => {
    const p = lock.sets.guest?.packages.find((x) => x.name === n);
    if (!p) throw new BuildError('E_LOCK_STALE', `${lockPath}: the guest set has no ${n}`, { hint: 'build the image once without --locked to resolve it' });
    return p;
  });
  const cacheDir = opts.cacheDir ?? config().cacheDir;
  const dir = join(cacheDir, 'agent-runtime', wanted.map((p) => p.sha256.slice(0, 16)).join('-'));
  const runtime = { dir, argv: [dir + LOADER, '--library-path', dir + LIBS, dir + QJS] };
  if (await treeComplete(dir, QJS)) return runtime;

  const mirror = await chooseMirror(definitionPath, opts.mirror, def.debian.mirror);
  const archive = new DebianArchive({
    mirror,
    suite: lock.codename ?? def.debian.suite,
    components: def.debian.components,
    architecture: def.debian.architecture,
    cache: new BlobCache(cacheDir),
  });
  await installTree(dir, wanted, archive, { marker: QJS, fileMode: (e) => e.mode & 0o755 });
  return runtime;
}
