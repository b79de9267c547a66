/**
 * `scion push` and `scion pull`: a built image directory to and from one OCI
 * artifact. Push checks the directory is a complete, self-consistent build
 * before a byte leaves, skips blobs the registry has, and checks the
 * manifest digest the registry states. Pull checks every byte against the
 * manifest's digests while it writes into a temporary directory, and only
 * then renames it into place: a refused pull leaves nothing behind and the
 * previous copy as it was.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rm, rmdir } from 'node:fs/promises';
import { dirname, join, resolve as resolvePath } from 'node:path';
import { ociDigest } from '../common/digest.ts';
import { validName } from '../common/names.ts';
import { SCION_VERSION } from '../common/version.ts';
import { ScionError } from '../common/errors.ts';
import { removeOnInterrupt } from '../common/interrupt.ts';
import { readBytesNoFollow, replaceDirectory } from '../common/safe-fs.ts';
import { artifactManifest, checkArtifactManifest, ArtifactError, MANIFEST_MEDIA_TYPE, EMPTY_CONFIG, TITLE } from './artifact.ts';
import { IMAGE_FILES, REQUIRED_IMAGE_FILES, parseImageManifest, type ImageFile, type ImageManifest } from '../common/image-layout.ts';
import { RegistryClient, RegistryError, type ClientOptions } from './client.ts';
import { parseReference, formatReference } from './reference.ts';

export const DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024;
const sha256 = ociDigest;

/** What `push` takes: the registry client's options (plain HTTP, credentials, bounds), the upload chunk size, a progress log. */
export interface PushOptions extends ClientOptions {
  chunkBytes?: number;
  log?: (m: string) => void;
}
/** What `push` did: the reference, the manifest digest, the blobs uploaded and those the registry had already, the bytes sent, the requests made. */
export interface PushResult {
  reference: string;
  digest: string;
  uploaded: string[];
  skipped: string[];
  bytesUploaded: number;
  requests: RegistryClient['counts'];
}

/** The files of a build directory, checked against its manifest.json. */
async function readBuildDir(dir: string): Promise<{ name: string; files: { name: ImageFile; data: Buffer; digest: string }[] }> {
  const files: { name: ImageFile; data: Buffer; digest: string }[] = [];
  for (const name of IMAGE_FILES) {
    let data: Buffer;
    try {
      data = await readBytesNoFollow(join(dir, name));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' && !REQUIRED_IMAGE_FILES.includes(name)) continue;
      throw new ScionError('E_IMAGE_DIR', `${dir}: cannot read ${name} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, {
        hint: 'push a directory that `scion build` wrote, e.g. out/web',
      });
    }
    files.push({ name, data, digest: sha256(data) });
  }
  const parsed = parseImageManifest(files.find((f) => f.name === 'manifest.json')!.data.toString('utf8'));
  if (!parsed.ok) throw new ScionError('E_IMAGE_DIR', `${dir}/manifest.json is ${parsed.why}`, { hint: 'push a directory that this scion built' });
  const manifest = parsed.manifest;
  const name = validName(manifest.name, 'image');
  for (const f of ['vmlinuz', 'initrd.img'] as const) {
    const want = manifest.outputs[f].sha256;
    const got = files.find((x) => x.name === f)!.digest.slice(7);
    if (want !== got)
      throw new ScionError(
        'E_DIGEST_MISMATCH',
        `${dir}/${f} does not match the SHA-256 in its manifest.json (${String(want).slice(0, 12)}… vs ${got.slice(0, 12)}…)`,
        { hint: 'rebuild the image; the directory was changed after the build' },
      );
  }
  return { name, files };
}

/** Upload a built image to a registry as one OCI artifact (its blobs, config and manifest). */
export async function push(dir: string, refText: string, opts: PushOptions = {}): Promise<PushResult> {
  const ref = parseReference(refText);
  if (!ref.tag || ref.digest) throw new ScionError('E_USAGE', `scion push ${refText}: push to a tag (registry/repository:tag), not a digest`);
  const { name, files } = await readBuildDir(dir);
  const client = new RegistryClient(ref, opts);
  const chunk = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
  const uploaded: string[] = [];
  const skipped: string[] = [];
  let bytesUploaded = 0;
  const blobs = [{ name: 'config (empty)', data: Buffer.from(EMPTY_CONFIG.data, 'base64'), digest: EMPTY_CONFIG.digest }, ...files];
  for (const b of blobs) {
    if (await client.hasBlob(b.digest)) {
      skipped.push(b.name);
      opts.log?.(`${b.name}: the registry has it (${b.digest.slice(0, 19)}…)`);
      continue;
    }
    opts.log?.(`${b.name}: uploading ${b.data.length} bytes${b.data.length > chunk ? ` in ${Math.ceil(b.data.length / chunk)} chunks` : ''}`);
    await client.uploadBlob(b.data, b.digest, chunk);
    uploaded.push(b.name);
    bytesUploaded += b.data.length;
  }
  const manifest = JSON.stringify(
    artifactManifest(
      name,
      files.map((f) => ({ name: f.name, digest: f.digest, size: f.data.length })),
      { 'dev.scion.version': SCION_VERSION },
    ),
  );
  const digest = await putManifestChecked(client, ref.tag, manifest);
  return { reference: formatReference({ ...ref, digest }), digest, uploaded, skipped, bytesUploaded, requests: client.counts };
}

/** Put a manifest under `reference` (a tag, or its own digest), the digest the registry states checked against the bytes sent; its digest. */
export async function putManifestChecked(client: RegistryClient, reference: string, manifest: string): Promise<string> {
  const digest = sha256(manifest);
  const stated = await client.putManifest(reference, manifest, MANIFEST_MEDIA_TYPE);
  if (stated && stated !== digest)
    throw new RegistryError('E_DIGEST_MISMATCH', `${client.ref.registry}: the registry stored the manifest as ${stated}, scion sent ${digest}`, {
      hint: 'the registry altered the manifest; do not trust this tag',
    });
  return digest;
}

/** What `pull` takes: the registry client's options (plain HTTP, credentials, bounds) and a progress log. */
export interface PullOptions extends ClientOptions {
  log?: (m: string) => void;
}
/** What `pull` laid out: the reference, the manifest digest, the image name and directory, each file with its size and digest. */
export interface PullResult {
  reference: string;
  digest: string;
  name: string;
  dir: string;
  files: { name: string; size: number; digest: string }[];
}

/**
 * A blob's bytes as the registry streams them, never more than the size the
 * manifest states; once whole, its size and digest checked. A mismatch throws,
 * naming `what`; `hint` says what was left behind.
 */
async function* checkedBlob(client: RegistryClient, digest: string, size: number, what: string, streamLabel: string, hint: string): AsyncGenerator<Uint8Array> {
  const res = await client.getBlob(digest);
  const h = createHash('sha256');
  let n = 0;
  for await (const c of client.stream(res, streamLabel)) {
    n += c.length;
    if (n > size)
      throw new RegistryError('E_DIGEST_MISMATCH', `${what} (${digest}): the registry sent more than the ${size} bytes the manifest states`, { hint });
    h.update(c);
    yield c;
  }
  if (n !== size) throw new RegistryError('E_DIGEST_MISMATCH', `${what} (${digest}): received ${n} bytes, the manifest states ${size}`, { hint });
  const got = `sha256:${h.digest('hex')}`;
  if (got !== digest)
    throw new RegistryError('E_DIGEST_MISMATCH', `${what}: the bytes the registry sent hash to ${got}, the manifest names ${digest}`, { hint });
}

/** Stream a blob into `path` (created exclusively), checking size and digest; a mismatch throws and the caller removes the temp dir. */
async function fetchBlobTo(client: RegistryClient, title: string, digest: string, size: number, path: string): Promise<void> {
  const fh = await open(path, 'wx', 0o644);
  try {
    for await (const c of checkedBlob(client, digest, size, title, `blob ${title}`, 'the registry holds damaged or altered data; nothing was written'))
      await fh.write(c);
  } finally {
    await fh.close();
  }
}

/** A blob, whole in memory, bounded by its stated size and checked against its digest (snapshot pulls: their blobs are a few MiB each). */
export async function fetchBlobBytes(client: RegistryClient, digest: string, size: number, what: string): Promise<Buffer> {
  const data = Buffer.allocUnsafe(size);
  let at = 0;
  for await (const c of checkedBlob(client, digest, size, what, what, 'the registry holds damaged or altered data; nothing was laid out')) {
    data.set(c, at); // within `size`: checkedBlob throws before a byte beyond it
    at += c.length;
  }
  return data;
}

/** Upload a blob unless the registry has it already; whether it was sent. */
export async function sendBlobOnce(client: RegistryClient, data: Buffer, digest: string): Promise<boolean> {
  if (await client.hasBlob(digest)) return false;
  await client.uploadBlob(data, digest, DEFAULT_CHUNK_BYTES);
  return true;
}

/** The manifest bytes a reference names (an image's or a template snapshot's), their digest checked against the reference and what the registry states. */
export async function fetchManifestBytes(client: RegistryClient, refText: string): Promise<{ bytes: Buffer; digest: string }> {
  const ref = client.ref;
  const { bytes, statedDigest } = await client.getManifest(ref.digest ?? ref.tag!, MANIFEST_MEDIA_TYPE);
  const digest = sha256(bytes);
  if (ref.digest && digest !== ref.digest)
    throw new RegistryError('E_DIGEST_MISMATCH', `${refText}: the manifest the registry sent hashes to ${digest}`, {
      hint: 'the registry holds damaged or altered data',
    });
  if (statedDigest && statedDigest !== digest)
    throw new RegistryError('E_DIGEST_MISMATCH', `${refText}: the registry states manifest digest ${statedDigest}, the bytes hash to ${digest}`);
  return { bytes, digest };
}

/** The manifest a reference names, its digest checked, parsed and checked by `check` (one that is not JSON: `notJson`'s error). */
export async function fetchCheckedManifest<T>(
  client: RegistryClient,
  refText: string,
  check: (ref: string, raw: unknown) => T,
  notJson: (message: string) => Error,
): Promise<{ digest: string; manifest: T }> {
  const { bytes, digest } = await fetchManifestBytes(client, refText);
  let raw: unknown;
  try {
    raw = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw notJson(`${refText}: the manifest is not JSON`);
  }
  return { digest, manifest: check(refText, raw) };
}

/** The image artifact manifest a reference names, its digest checked. */
const fetchManifest = (client: RegistryClient, refText: string) =>
  fetchCheckedManifest(client, refText, checkArtifactManifest, (m) => new ArtifactError('E_NOT_SCION_IMAGE', m));

/** Download an image from a registry into a directory, every digest checked, bounded in size and time. */
export async function pull(refText: string, outDir: string, opts: PullOptions = {}): Promise<PullResult> {
  const ref = parseReference(refText);
  const client = new RegistryClient(ref, opts);
  const { digest, manifest: m } = await fetchManifest(client, refText);
  // the first directory this pull had to make, if any: a failed pull removes it again (when still empty)
  const created = await mkdir(outDir, { recursive: true });
  const tmp = join(outDir, `.pull-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(tmp, { mode: 0o755 });
  const forget = removeOnInterrupt(tmp);
  try {
    for (const l of m.layers) {
      const title = l.annotations![TITLE];
      opts.log?.(`${title}: ${l.size} bytes`);
      await fetchBlobTo(client, title, l.digest, l.size, join(tmp, title));
    }
    const parsed = parseImageManifest(await readFile(join(tmp, 'manifest.json'), 'utf8'));
    if (!parsed.ok) throw new ArtifactError('E_NOT_SCION_IMAGE', `${refText}: its manifest.json is ${parsed.why}`);
    const inner: ImageManifest = parsed.manifest;
    const name = validName(inner.name, 'image');
    for (const f of ['vmlinuz', 'initrd.img'] as const) {
      const layer = m.layers.find((x) => x.annotations![TITLE] === f)!;
      if (`sha256:${inner.outputs[f].sha256}` !== layer.digest)
        throw new ArtifactError('E_DIGEST_MISMATCH', `${refText}: ${f} is not the one its manifest.json names`, {
          hint: 'the artifact was assembled from different builds; push it again from one build directory',
        });
    }
    const finalDir = join(outDir, name);
    await replaceDirectory(tmp, finalDir);
    return {
      reference: formatReference({ ...ref, digest }),
      digest,
      name,
      dir: finalDir,
      files: m.layers.map((l) => ({ name: l.annotations![TITLE], size: l.size, digest: l.digest })),
    };
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    if (created) await removeEmptyDirs(outDir, created);
    throw e;
  } finally {
    forget();
  }
}

/** Remove `dir` and its parents up to `top` (inclusive) while they are empty: what a failed step made, and nothing another process put there. */
async function removeEmptyDirs(dir: string, top: string): Promise<void> {
  let d = resolvePath(dir);
  const stop = resolvePath(top);
  for (;;) {
    try {
      await rmdir(d);
    } catch {
      return;
    } // not empty (someone else's) or gone: leave it
    if (d === stop || dirname(d) === d) return;
    d = dirname(d);
  }
}

/**
 * Pull into `<cacheDir>/<manifest digest>/`, unless that directory already
 * holds every file of this manifest with its digest (checked, not assumed):
 * `up` and `boot` with a reference download an image once.
 */
export async function pullCached(refText: string, cacheDir: string, opts: PullOptions = {}): Promise<PullResult & { cached: boolean }> {
  const ref = parseReference(refText);
  const client = new RegistryClient(ref, opts);
  const { digest, manifest } = await fetchManifest(client, refText);
  const slot = join(cacheDir, digest.replace(':', '-'));
  const names = await readdir(slot).catch(() => [] as string[]);
  const image = names.find((n) => !n.startsWith('.'));
  if (image) {
    const dir = join(slot, image);
    const same = await Promise.all(
      manifest.layers.map(async (l) => sha256(await readBytesNoFollow(join(dir, l.annotations![TITLE])).catch(() => Buffer.alloc(0))) === l.digest),
    );
    if (same.every(Boolean))
      return {
        reference: formatReference({ ...ref, digest }),
        digest,
        name: image,
        dir,
        files: manifest.layers.map((l) => ({ name: l.annotations![TITLE], size: l.size, digest: l.digest })),
        cached: true,
      };
  }
  return { ...(await pull(formatReference({ ...ref, tag: undefined, digest }), slot, opts)), cached: false };
}
