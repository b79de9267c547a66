/** A built image directory (out/<image>), read and validated before anything boots from it. */
import { readFile } from 'node:fs/promises';
import { join, resolve as resolvePath } from 'node:path';
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { VmError } from '../common/errors.ts';
import { NAME_PATTERN, type ValidName } from '../common/names.ts';
import type { ManifestForHost } from '../common/contracts.ts';
import { describeIssues } from '../common/validation.ts';

export interface ImageArtifacts { name: ValidName; dir: string; vmlinuz: string; initrd: string; cmdline: string; ramMB: number; ports: number[]; manifestSha256: string }

const ManifestSchema: z.ZodType<ManifestForHost> = z.object({
  manifestVersion: z.literal(1),
  name: z.string().regex(NAME_PATTERN, 'not a valid image name'),
  kernel: z.object({ cmdline: z.string().max(4096) }).passthrough(),
  guestRamMB: z.number().int().min(16).max(1 << 20),
  ports: z.array(z.number().int().min(1).max(65535)),
}).passthrough() as any;

export async function loadImage(dir: string): Promise<ImageArtifacts> {
  const d = resolvePath(dir);
  const file = join(d, 'manifest.json');
  let text: string;
  try { text = await readFile(file, 'utf8'); } catch (e) {
    throw new VmError('E_IMAGE_MISSING', `${dir} holds no built image (manifest.json missing)`, { hint: 'run `scion build images/<name>.yaml` first', cause: e });
  }
  let raw: unknown;
  try { raw = JSON.parse(text); } catch (e) {
    throw new VmError('E_IMAGE_INVALID', `${file} is not valid JSON: ${(e as Error).message}`, { hint: 'build the image again' });
  }
  const r = ManifestSchema.safeParse(raw);
  if (!r.success) throw new VmError('E_IMAGE_INVALID', `${file} is not a manifest this scion reads: ${describeIssues(r.error)}`, { hint: 'build the image again with this scion' });
  const m = r.data;
  return {
    name: m.name as ValidName, dir: d, vmlinuz: join(d, 'vmlinuz'), initrd: join(d, 'initrd.img'),
    cmdline: m.kernel.cmdline, ramMB: m.guestRamMB, ports: m.ports,
    manifestSha256: createHash('sha256').update(text).digest('hex'),
  };
}
