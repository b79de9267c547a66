/**
 * A frozen template as one OCI artifact (image-spec 1.1) of its own
 * artifactType: its compatibility record as the config; its device state
 * (gzip), kernel stub and RAM index as titled layers; its RAM as fixed-size,
 * content-addressed chunks, each gzip-compressed, all-zero chunks left out.
 * A chunk's digest is that of its compressed bytes, so an unchanged chunk is
 * the same blob in every push (zlib at one level is deterministic; gzip's
 * header carries no time from Node): the registry already has it, and a
 * re-frozen template sends only the chunks that changed.
 * Pure: building the manifest and index, and checking what a registry sent
 * (untrusted: known titles and media types, sha256 digests, sizes bounded,
 * every chunk inside the memory and named by a layer).
 */
import { ScionError } from '../common/errors.ts';
import type { Descriptor } from './artifact.ts';
import { MANIFEST_MEDIA_TYPE, TITLE } from './artifact.ts';

export const SNAPSHOT_ARTIFACT_TYPE = 'application/vnd.scion.template.v1';
export const SNAPSHOT_CONFIG_TYPE = 'application/vnd.scion.template.record.v1+json';
export const SNAPSHOT_LAYER_TYPES = {
  state: 'application/vnd.scion.template.state.v1.tar+gzip',
  'kernel-stub': 'application/vnd.scion.template.kernel-stub.v1',
  'ram-index': 'application/vnd.scion.template.ram-index.v1+json',
} as const;
export const CHUNK_MEDIA_TYPE = 'application/vnd.scion.template.ram-chunk.v1+gzip';
export type SnapshotFile = keyof typeof SNAPSHOT_LAYER_TYPES;

/** RAM chunk size: 2 MiB (a huge page); small enough that a re-freeze resends little, large enough to keep requests few. */
export const CHUNK_BYTES = 2 * 1024 * 1024;
/** Bounds on what a registry may claim: a compressed chunk (gzip's worst case is a little over its input), a file layer, the index. */
export const MAX_CHUNK_BLOB = CHUNK_BYTES + 64 * 1024;
export const MAX_FILE_LAYER = 256 * 1024 * 1024;
export const MAX_INDEX_BYTES = 16 * 1024 * 1024;
/** Guest RAM a pulled snapshot may have (the template record's own limit is higher; a pull is bounded here). */
export const MAX_SNAPSHOT_RAM_BYTES = 64 * 1024 ** 3;

export class SnapshotError extends ScionError {}

/** Where each non-zero chunk of guest RAM is: chunk number n covers bytes [n*chunkSize, (n+1)*chunkSize). */
export interface RamIndex {
  chunkSize: number;
  memBytes: number;
  chunks: { n: number; digest: string; size: number }[];
}

/** The manifest: record config, the three files, each distinct chunk blob once. Pure. */
export function snapshotManifest(o: {
  config: { digest: string; size: number };
  files: { name: SnapshotFile; digest: string; size: number }[];
  index: RamIndex;
  annotations: Record<string, string>;
}): object {
  const seen = new Set<string>();
  const chunks: Descriptor[] = [];
  for (const c of o.index.chunks) {
    if (seen.has(c.digest)) continue;
    seen.add(c.digest);
    chunks.push({ mediaType: CHUNK_MEDIA_TYPE, digest: c.digest, size: c.size });
  }
  return {
    schemaVersion: 2,
    mediaType: MANIFEST_MEDIA_TYPE,
    artifactType: SNAPSHOT_ARTIFACT_TYPE,
    config: { mediaType: SNAPSHOT_CONFIG_TYPE, digest: o.config.digest, size: o.config.size },
    layers: [...o.files.map((f) => ({ mediaType: SNAPSHOT_LAYER_TYPES[f.name], digest: f.digest, size: f.size, annotations: { [TITLE]: f.name } })), ...chunks],
    annotations: o.annotations,
  };
}

const DIGEST = /^sha256:[a-f0-9]{64}$/;

/** A snapshot manifest a registry sent, checked: ours, the three files once each, chunks bounded. Pure. */
export function checkSnapshotManifest(
  ref: string,
  raw: unknown,
): { config: Descriptor; files: Record<SnapshotFile, Descriptor>; chunks: Map<string, number>; annotations: Record<string, string> } {
  const bad = (why: string) => new SnapshotError('E_NOT_SCION_SNAPSHOT', `${ref}: ${why}`, { hint: 'push it with `scion push <template> <ref>`' });
  const m = raw as { schemaVersion?: number; artifactType?: string; config?: Descriptor; layers?: Descriptor[]; annotations?: Record<string, string> };
  if (!m || typeof m !== 'object' || m.schemaVersion !== 2 || !Array.isArray(m.layers)) throw bad('not an OCI image manifest');
  if (m.artifactType !== SNAPSHOT_ARTIFACT_TYPE) throw bad(`artifactType is ${JSON.stringify(m.artifactType)}, not ${SNAPSHOT_ARTIFACT_TYPE}`);
  const sized = (d: Descriptor | undefined, max: number, what: string) => {
    if (!d || typeof d.digest !== 'string' || !DIGEST.test(d.digest)) throw bad(`${what}: digest ${JSON.stringify(d?.digest)} is not sha256:<hex>`);
    if (!Number.isSafeInteger(d.size) || d.size < 0 || d.size > max) throw bad(`${what}: size ${JSON.stringify(d.size)} is over ${max} bytes`);
    return d;
  };
  if (m.config?.mediaType !== SNAPSHOT_CONFIG_TYPE) throw bad(`its config is ${JSON.stringify(m.config?.mediaType)}, not ${SNAPSHOT_CONFIG_TYPE}`);
  const config = sized(m.config, 1024 * 1024, 'config');
  const files: Partial<Record<SnapshotFile, Descriptor>> = {};
  const chunks = new Map<string, number>();
  for (const l of m.layers) {
    if (l?.mediaType === CHUNK_MEDIA_TYPE) {
      sized(l, MAX_CHUNK_BLOB, 'a RAM chunk');
      chunks.set(l.digest, l.size);
      continue;
    }
    const title = l?.annotations?.[TITLE] as SnapshotFile | undefined;
    if (!title || !Object.hasOwn(SNAPSHOT_LAYER_TYPES, title))
      throw bad(`a layer is titled ${JSON.stringify(title)}; only ${Object.keys(SNAPSHOT_LAYER_TYPES).join(', ')} and RAM chunks are allowed`);
    if (files[title]) throw bad(`two layers are titled ${title}`);
    if (l.mediaType !== SNAPSHOT_LAYER_TYPES[title]) throw bad(`${title} has media type ${JSON.stringify(l.mediaType)}`);
    files[title] = sized(l, title === 'ram-index' ? MAX_INDEX_BYTES : MAX_FILE_LAYER, title);
  }
  for (const f of Object.keys(SNAPSHOT_LAYER_TYPES) as SnapshotFile[]) if (!files[f]) throw bad(`it has no ${f}`);
  return { config, files: files as Record<SnapshotFile, Descriptor>, chunks, annotations: m.annotations ?? {} };
}

/** The RAM index a registry sent, checked against the record's memory size and the manifest's chunk layers. Pure. */
export function parseRamIndex(ref: string, text: string, memBytes: number, chunkBlobs: Map<string, number>): RamIndex {
  const bad = (why: string) => new SnapshotError('E_NOT_SCION_SNAPSHOT', `${ref}: its RAM index ${why}`, { hint: 'push the template again' });
  let x: RamIndex;
  try {
    x = JSON.parse(text);
  } catch {
    throw bad('is not JSON');
  }
  if (x?.chunkSize !== CHUNK_BYTES) throw bad(`has chunk size ${JSON.stringify(x?.chunkSize)}, this scion reads ${CHUNK_BYTES}`);
  if (x.memBytes !== memBytes) throw bad(`covers ${JSON.stringify(x.memBytes)} bytes, the record says ${memBytes}`);
  if (!Array.isArray(x.chunks)) throw bad('has no chunk list');
  const count = Math.ceil(memBytes / CHUNK_BYTES);
  const seen = new Set<number>();
  for (const c of x.chunks) {
    if (!Number.isSafeInteger(c?.n) || c.n < 0 || c.n >= count)
      throw bad(`places a chunk at ${JSON.stringify(c?.n)}, outside the ${count} chunks of the memory`);
    if (seen.has(c.n)) throw bad(`places two chunks at ${c.n}`);
    seen.add(c.n);
    if (chunkBlobs.get(c.digest) !== c.size) throw bad(`names chunk ${String(c.digest).slice(0, 19)}… (${c.size} bytes), which the manifest does not list so`);
  }
  return { chunkSize: x.chunkSize, memBytes: x.memBytes, chunks: x.chunks.map((c) => ({ n: c.n, digest: c.digest, size: c.size })) };
}

let zeros = Buffer.alloc(0);
/** Whether a buffer is all zero bytes (such a chunk is left out: the memory file is sparse there). memcmp against zeros. */
export function isZero(b: Buffer): boolean {
  if (zeros.length < b.length) zeros = Buffer.alloc(b.length);
  return b.equals(zeros.subarray(0, b.length));
}
