/**
 * What `up` and `boot` accept as an image: a definition (built, cached), a
 * built image directory, or an OCI reference (pulled and verified into the
 * cache, one directory per manifest digest; downloaded once).
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { build, type BuildEvent } from '../builder/build.ts';
import { config } from '../common/config.ts';
import { ScionError } from '../common/errors.ts';
import { looksLikeReference } from '../registry/reference.ts';
import { pullCached } from '../registry/transfer.ts';

/** Where `resolveImage` keeps pulled images, whether a registry may be plain HTTP, and its progress log. */
export interface ImageSourceOptions {
  onBuildEvent?: (e: BuildEvent) => void;
  log?: (m: string) => void;
  insecure?: boolean;
  cacheDir?: string /** where a definition is built (default ./out) */;
  outDir?: string;
}

/** What an image argument named: a definition file, a built directory, or a registry reference. */
export type ImageSourceKind = 'definition' | 'directory' | 'reference';

/** Which kind of source an argument names. Pure but for the one stat the caller passes in. */
export function sourceKind(arg: string, exists: boolean): ImageSourceKind | undefined {
  if (/\.ya?ml$/.test(arg)) return 'definition';
  if (exists) return 'directory';
  if (looksLikeReference(arg)) return 'reference';
  return undefined;
}

/** A definition (built, cached), a built directory or an OCI reference (pulled, every digest checked) -> the image directory to load. */
export async function resolveImage(arg: string, opts: ImageSourceOptions = {}): Promise<{ dir: string; kind: ImageSourceKind }> {
  const exists = await stat(arg).then(
    () => true,
    () => false,
  );
  const kind = sourceKind(arg, exists);
  if (kind === 'definition') return { dir: (await build({ definitionPath: arg, outDir: opts.outDir, onEvent: opts.onBuildEvent })).dir, kind };
  if (kind === 'directory') return { dir: arg, kind };
  if (kind === 'reference') {
    const r = await pullCached(arg, join(opts.cacheDir ?? config().cacheDir, 'images'), { insecure: opts.insecure, log: opts.log });
    opts.log?.(r.cached ? `${arg}: ${r.name} (${r.digest}) is in the cache, every digest checked` : `pulled ${r.name} (${r.digest})`);
    return { dir: r.dir, kind };
  }
  throw new ScionError('E_IMAGE_MISSING', `${arg}: neither an image definition (.yaml), a built image directory, nor a registry reference`, {
    hint: 'e.g. images/web.yaml, out/web, or 127.0.0.1:5000/scion/web:1.0',
  });
}
