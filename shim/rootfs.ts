/**
 * A container's rootfs, as containerd prepared it (its snapshot mounts),
 * packed into a read-only erofs image the pod's VM takes as a hot-plugged
 * disk. erofs because the guest mounts it read-only and shares its page
 * cache, it is made in one pass by a Debian tool (mkfs.erofs), and it is
 * compact; 9p would put every file access on a slow path through QEMU.
 */
import { mkdir, mkdtemp, rm, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { run } from '../common/run.ts';

export interface Mount {
  type: string;
  source: string;
  target?: string;
  options: string[];
}

/** mount(8) argv for one of containerd's mounts at `target`. Pure. */
export function mountArgv(m: Mount, target: string): string[] {
  const opts = m.options.filter(Boolean);
  return ['mount', '-t', m.type === 'bind' ? 'none' : m.type, ...(opts.length ? ['-o', opts.join(',')] : []), m.source, target];
}

/** mkfs.erofs argv: every file owned as it is, times fixed (the same rootfs gives the same image). Pure. */
export function mkfsArgv(image: string, dir: string): string[] {
  return ['mkfs.erofs', '--quiet', '-T0', image, dir];
}

/** Mount the snapshot, pack it, unmount: the image path (in `workDir`). */
export async function packRootfs(mounts: Mount[], workDir: string): Promise<string> {
  if (!mounts.length) throw new Error('no rootfs mounts: containerd gave the task no snapshot');
  await mkdir(workDir, { recursive: true });
  const target = await mkdtemp(join(workDir, 'rootfs-'));
  // named after its unique mountpoint: containers packed at once never share an image file
  const image = `${target}.erofs`;
  const mounted: string[] = [];
  try {
    for (const m of mounts) {
      const [cmd, ...args] = mountArgv(m, target);
      await run(cmd, args, { what: `mounting the task's rootfs (${m.type})` });
      mounted.push(target);
    }
    const [cmd, ...args] = mkfsArgv(image, target);
    await run(cmd, args, { what: 'mkfs.erofs (the task rootfs image)' });
    return image;
  } catch (e) {
    await rm(image, { force: true });
    throw e;
  } finally {
    for (const t of mounted.reverse()) await run('umount', [t], { what: 'unmounting the task rootfs' }).catch(() => undefined);
    // never recursive: were an unmount to fail, the snapshot's files would be under it
    await rmdir(target).catch(() => undefined);
  }
}
