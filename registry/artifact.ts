/**
 * A built image as one OCI artifact (image-spec 1.1): an image manifest with
 * our own artifactType, the empty config, and one layer per output file,
 * each with its own media type and its file name as the title annotation.
 * Pure: building the manifest, and checking one that a registry sent (it is
 * untrusted: only the known file names, sane sizes, sha256 digests).
 */
import { ScionError } from '../common/errors.ts';
import { ARTIFACT_TYPE, LAYER_MEDIA_TYPES, REQUIRED_IMAGE_FILES, isImageFile, type ImageFile } from '../common/image-layout.ts';

export { ARTIFACT_TYPE };
export const MANIFEST_MEDIA_TYPE = 'application/vnd.oci.image.manifest.v1+json';
export const EMPTY_CONFIG = {
  mediaType: 'application/vnd.oci.empty.v1+json',
  digest: 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a',
  size: 2,
  data: 'e30=',
} as const;
export const TITLE = 'org.opencontainers.image.title';

/** a kernel plus an uncompressed initramfs stay far below this; a registry that claims more is refused */
export const MAX_LAYER_BYTES = 4 * 1024 ** 3;

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}
export interface ArtifactManifest {
  schemaVersion: 2;
  mediaType: string;
  artifactType: string;
  config: Descriptor & { data?: string };
  layers: Descriptor[];
  annotations?: Record<string, string>;
}

export class ArtifactError extends ScionError {}

export function artifactManifest(
  image: string,
  files: { name: ImageFile; digest: string; size: number }[],
  annotations: Record<string, string> = {},
): ArtifactManifest {
  return {
    schemaVersion: 2,
    mediaType: MANIFEST_MEDIA_TYPE,
    artifactType: ARTIFACT_TYPE,
    config: { ...EMPTY_CONFIG },
    layers: files.map((f) => ({ mediaType: LAYER_MEDIA_TYPES[f.name], digest: f.digest, size: f.size, annotations: { [TITLE]: f.name } })),
    annotations: { 'org.opencontainers.image.title': image, ...annotations },
  };
}

/** Check a manifest a registry sent: ours, complete, nothing but known file names. */
export function checkArtifactManifest(ref: string, raw: unknown): ArtifactManifest {
  const bad = (why: string) =>
    new ArtifactError('E_NOT_SCION_IMAGE', `${ref}: ${why}`, { hint: 'push it with `scion push`; other artifacts are not scion images' });
  const m = raw as ArtifactManifest;
  if (!m || typeof m !== 'object' || m.schemaVersion !== 2 || !Array.isArray(m.layers)) throw bad('not an OCI image manifest');
  if (m.artifactType !== ARTIFACT_TYPE) throw bad(`artifactType is ${JSON.stringify(m.artifactType)}, not ${ARTIFACT_TYPE}`);
  const seen = new Set<string>();
  for (const l of m.layers) {
    const title = l?.annotations?.[TITLE];
    if (typeof title !== 'string' || !isImageFile(title))
      throw bad(`a layer is titled ${JSON.stringify(title)}; only ${Object.keys(LAYER_MEDIA_TYPES).join(', ')} are allowed`);
    if (seen.has(title)) throw bad(`two layers are titled ${title}`);
    seen.add(title);
    if (l.mediaType !== LAYER_MEDIA_TYPES[title]) throw bad(`${title} has media type ${JSON.stringify(l.mediaType)}, not ${LAYER_MEDIA_TYPES[title]}`);
    if (typeof l.digest !== 'string' || !/^sha256:[a-f0-9]{64}$/.test(l.digest)) throw bad(`${title}: digest ${JSON.stringify(l.digest)} is not sha256:<hex>`);
    if (!Number.isSafeInteger(l.size) || l.size < 0 || l.size > MAX_LAYER_BYTES)
      throw bad(`${title}: size ${JSON.stringify(l.size)} is not a size up to 4 GiB`);
  }
  for (const r of REQUIRED_IMAGE_FILES) if (!seen.has(r)) throw bad(`it has no ${r}`);
  return m;
}
