/**
 * Packages installed as a tree on the build host (the agent's runtime, the
 * pinned VMM): each .deb's files extracted beside the tree's place, then
 * renamed into place whole, so a concurrent caller or a crash never sees
 * half a tree; a caller that loses the rename race keeps the winner's copy
 * (the same bytes, by the lock's hashes).
 */
import { access, mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { DebianArchive } from './debian/archive.ts';
import { extractDeb, type TarEntry } from './debian/deb.ts';

export interface TreeOptions {
  /** a file inside the tree whose presence says it is complete */
  marker: string;
  /** mode of directories made */
  dirMode?: number;
  /** a file's mode from its entry */
  fileMode: (e: TarEntry) => number;
  /** a symlink's target from its entry (e.g. kept inside the tree) */
  linkTarget?: (e: TarEntry) => string;
  /** more to write into the tree before it goes into place */
  finish?: (tmp: string) => Promise<void>;
  log?: (m: string) => void;
}

export const treeComplete = (dir: string, marker: string): Promise<boolean> =>
  access(join(dir, marker)).then(
    () => true,
    () => false,
  );

/** Install `packages` (each checked by the archive against its SHA-256) as the tree `dir`. */
export async function installTree(
  dir: string,
  packages: { name: string; version: string; filename: string; sha256: string }[],
  archive: DebianArchive,
  o: TreeOptions,
): Promise<void> {
  const mode = o.dirMode === undefined ? {} : { mode: o.dirMode };
  await mkdir(dirname(dir), { recursive: true });
  const tmp = await mkdtemp(`${dir}.tmp-`);
  try {
    for (const p of packages) {
      o.log?.(`${p.name} ${p.version}`);
      for (const e of await extractDeb(await archive.deb(p), `${p.name} ${p.version}`)) {
        const to = tmp + e.path;
        if (e.type === 'directory') await mkdir(to, { recursive: true, ...mode });
        else if (e.type === 'file') {
          await mkdir(dirname(to), { recursive: true, ...mode });
          await writeFile(to, e.data!, { mode: o.fileMode(e) });
        } else if (e.type === 'symlink') {
          await mkdir(dirname(to), { recursive: true, ...mode });
          await rm(to, { force: true });
          await symlink(o.linkTarget ? o.linkTarget(e) : e.linkname!, to);
        }
      }
    }
    await o.finish?.(tmp);
    await rename(tmp, dir).catch(async (e) => {
      if (!(await treeComplete(dir, o.marker))) throw e;
    });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
