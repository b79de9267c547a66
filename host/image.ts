/** A built image directory (out/<image>), read and validated before anything boots from it. */
import { readFile } from 'node:fs/promises';
import { resolve as resolvePath } from 'node:path';
import { createHash } from 'node:crypto';
import { VmError } from '../common/errors.ts';
import type { ValidName } from '../common/names.ts';
import { imagePaths, parseImageManifest } from '../common/image-layout.ts';

/** A built image as scion boots it: its directory, kernel, initramfs, command line, RAM size, ports, manifest digest. */
export interface ImageArtifacts {
  name: ValidName;
  dir: string;
  vmlinuz: string;
  initrd: string;
  cmdline: string;
  ramMB: number;
  ports: number[];
  manifestSha256: string;
}

/** A built image directory, its manifest validated and its files checked: what `Machine.boot` and `bootTemplate` take. */
export async function loadImage(dir: string): Promise<ImageArtifacts> {
  const d = resolvePath(dir);
  const files = imagePaths(d);
  let text: string;
  try {
    text = await readFile(files['manifest.json'], 'utf8');
  } catch (e) {
    throw new VmError('E_IMAGE_MISSING', `${dir} holds no built image (manifest.json missing)`, {
      hint: 'run `scion build images/<name>.yaml` first',
      cause: e,
    });
  }
  const r = parseImageManifest(text);
  if (!r.ok) throw new VmError('E_IMAGE_INVALID', `${files['manifest.json']} is ${r.why}`, { hint: 'build the image again with this scion' });
  const m = r.manifest;
  return {
    name: m.name as ValidName,
    dir: d,
    vmlinuz: files.vmlinuz,
    initrd: files['initrd.img'],
    cmdline: m.kernel.cmdline,
    ramMB: m.guestRamMB,
    ports: m.ports,
    manifestSha256: createHash('sha256').update(text).digest('hex'),
  };
}
