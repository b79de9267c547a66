/**
 * A built image, as every part of scion sees it: the files of out/<name>/,
 * their OCI media types, and manifest.json (the full type, validated when
 * read). The builder writes this layout, the registry moves it, the host
 * boots from it; none of them spells a file name or a manifest field alone.
 */
import { join } from 'node:path';
import { z } from 'zod';
import { NAME_PATTERN } from './names.ts';
import { describeIssues } from './validation.ts';

/** Output files, in the order listings show them. */
export const IMAGE_FILES = ['vmlinuz', 'initrd.img', 'manifest.json', 'sbom.cdx.json', 'provenance.intoto.json'] as const;
export type ImageFile = (typeof IMAGE_FILES)[number];
/** Files a usable image must have (the SBOM and provenance are optional: images of older builds lack them). */
export const REQUIRED_IMAGE_FILES: readonly ImageFile[] = ['vmlinuz', 'initrd.img', 'manifest.json'];

/** file name -> OCI layer media type: the only files an artifact may hold */
export const LAYER_MEDIA_TYPES: Record<ImageFile, string> = {
  vmlinuz: 'application/vnd.scion.image.kernel.v1',
  'initrd.img': 'application/vnd.scion.image.initramfs.v1',
  'manifest.json': 'application/vnd.scion.image.manifest.v1+json',
  'sbom.cdx.json': 'application/vnd.cyclonedx+json',
  'provenance.intoto.json': 'application/vnd.in-toto+json',
};
export const ARTIFACT_TYPE = 'application/vnd.scion.image.v1';

export const isImageFile = (n: string): n is ImageFile => (IMAGE_FILES as readonly string[]).includes(n);

/** The paths of an image directory's files. */
export function imagePaths(dir: string): Record<ImageFile, string> {
  return Object.fromEntries(IMAGE_FILES.map((f) => [f, join(dir, f)])) as Record<ImageFile, string>;
}

const sha256Hex = z.string().regex(/^[0-9a-f]{64}$/, 'not a SHA-256 (64 hex digits)');
const size = z.number().int().min(0);

export const ImageManifestSchema = z
  .object({
    manifestVersion: z.literal(1),
    name: z.string().regex(NAME_PATTERN, 'not a valid image name'),
    definition: z.object({ path: z.string(), sha256: sha256Hex }).strict(),
    debian: z.object({ mirror: z.string(), suite: z.string(), codename: z.string().optional(), architecture: z.string() }).strict(),
    sourceDateEpoch: z.number().int().min(0),
    kernel: z.object({ version: z.string(), modules: z.array(z.string()), cmdline: z.string().max(4096) }).strict(),
    guestRamMB: z
      .number()
      .int()
      .min(16)
      .max(1 << 20),
    /** guest ports the image's containers serve (forwarded per clone in user-mode networking) */
    ports: z.array(z.number().int().min(1).max(65535)),
    compression: z.enum(['none', 'gzip', 'zstd']),
    /** the agent bundle, and the Debian package (from the lock) whose interpreter runs it */
    agent: z.object({ sha256: sha256Hex, runtime: z.object({ package: z.string(), version: z.string(), sha256: sha256Hex }).strict() }).strict(),
    packages: z.array(z.object({ set: z.string(), name: z.string(), version: z.string(), sha256: sha256Hex }).strict()),
    outputs: z
      .object({
        vmlinuz: z.object({ sha256: sha256Hex, size }).strict(),
        'initrd.img': z.object({ sha256: sha256Hex, size, uncompressedSize: size }).strict(),
      })
      .strict(),
  })
  .strict();

/** manifest.json of a built image. */
export type ImageManifest = z.infer<typeof ImageManifestSchema>;

export type ManifestProblem = { ok: false; why: string } | { ok: true; manifest: ImageManifest };

/** Parse manifest.json's text. Pure: the caller turns a problem into its own typed error, naming the file. */
export function parseImageManifest(text: string): ManifestProblem {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    return { ok: false, why: `not valid JSON (${(e as Error).message})` };
  }
  const r = ImageManifestSchema.safeParse(raw);
  return r.success ? { ok: true, manifest: r.data } : { ok: false, why: `not a manifest this scion reads: ${describeIssues(r.error)}` };
}
