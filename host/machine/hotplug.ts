/**
 * Disks plugged into a running VM (a pod's container rootfs: shim/), on the
 * PCIe root ports every VM has for it (argv.ts HOTPLUG_PORTS). Stream ports
 * for a process's stdio are stream-ports.ts's.
 */
import { chmod, chown, copyFile, rename, rm } from 'node:fs/promises';
import { constants } from 'node:fs';
import { join } from 'node:path';
import { VmError } from '../../common/errors.ts';
import { HOTPLUG_PORTS } from '../qemu/argv.ts';
import { vmPaths, vmsDir } from '../store/dirs.ts';
import { credOf, internalsOf, type Machine } from './machine.ts';

/**
 * Plug a read-only disk image into a free hotplug port of the running VM
 * (a pod's container rootfs: shim/). The file is moved into the VM's jail,
 * the only place its QEMU can open anything, and given to the VM's uid,
 * read-only; the guest finds the disk by `serial` (/sys/block/vd*\/serial).
 */
export async function attachDisk(m: Machine, file: string, serial: string): Promise<{ port: string }> {
  const b = internalsOf(m);
  if (!/^[a-z0-9][a-z0-9-]{0,19}$/.test(serial))
    throw new VmError('E_DISK_ATTACH', `disk serial ${JSON.stringify(serial)}: 1-20 lowercase letters, digits or -`);
  b.assertRunning('attach a disk to');
  const name = `disk-${serial}.img`;
  const dest = join(vmPaths(m.name, vmsDir()).jail, name);
  await rename(file, dest).catch(async () => {
    await copyFile(file, dest, constants.COPYFILE_EXCL);
    await rm(file, { force: true });
  });
  const cred = credOf(b.record);
  if (cred) await chown(dest, cred.uid, cred.gid);
  await chmod(dest, 0o400);
  const qmp = await m.qmp();
  try {
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': `n-${serial}`,
      'read-only': true,
      file: { driver: 'file', filename: name, 'read-only': true },
    });
  } catch (e) {
    await rm(dest, { force: true });
    throw new VmError('E_DISK_ATTACH', `${m.name}: QEMU refused disk ${serial}: ${(e as Error).message}`);
  }
  const errors: string[] = [];
  for (const p of HOTPLUG_PORTS) {
    try {
      // slot 0 only: a root port's link holds one device (QEMU would take another at a slot the guest never sees)
      await qmp.execute('device_add', { driver: 'virtio-blk-pci', id: `d-${serial}`, drive: `n-${serial}`, bus: p.id, addr: '0', serial });
      return { port: p.id };
    } catch (e) {
      errors.push(`${p.id}: ${(e as Error).message}`);
    } // taken: the next port
  }
  await qmp.execute('blockdev-del', { 'node-name': `n-${serial}` }).catch(() => undefined);
  await rm(dest, { force: true });
  throw new VmError('E_DISK_ATTACH', `${m.name}: no free hotplug port for disk ${serial} (${errors.join('; ')})`, {
    hint: `a VM has ${HOTPLUG_PORTS.length} ports; detach a disk first`,
  });
}

/** Unplug a disk attach() plugged (the guest must have let go of it), and remove its file. */
export async function detachDisk(m: Machine, serial: string, timeoutMs = 20_000): Promise<void> {
  const qmp = await m.qmp();
  const gone = qmp.waitEvent('DEVICE_DELETED', (e) => (e.data as { device?: string })?.device === `d-${serial}`, timeoutMs);
  try {
    await qmp.execute('device_del', { id: `d-${serial}` });
  } catch (e) {
    gone.catch(() => undefined);
    throw new VmError('E_DISK_DETACH', `${m.name}: ${(e as Error).message}`);
  }
  await gone;
  await qmp.execute('blockdev-del', { 'node-name': `n-${serial}` });
  await rm(join(vmPaths(m.name, vmsDir()).jail, `disk-${serial}.img`), { force: true });
}
