/** qcow2 overlays: the template writes to one on the user's disk, each clone to one on the template's. */
import { chown } from 'node:fs/promises';
import { run, CommandError } from '../../common/run.ts';
import { VmError } from '../../common/errors.ts';
import type { Credentials } from '../qemu/process.ts';

/** A new overlay on `base` (never written through it), owned by the VM that writes it. */
export async function qcow2Overlay(base: string, overlay: string, owner?: Credentials): Promise<void> {
  try {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', base, overlay], { code: 'E_DISK' });
  } catch (e) {
    if (e instanceof CommandError && e.code === 'E_DISK')
      throw new VmError('E_DISK', `qemu-img could not make an overlay on ${base}: ${e.stderrTail || e.message}`, {
        hint: 'the disk must be a qcow2 image (qemu-img info)',
        cause: e,
      });
    throw e;
  }
  if (owner) await chown(overlay, owner.uid, owner.gid);
}
