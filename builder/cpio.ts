/** newc cpio writer, deterministic: sorted entries, fixed mtime, owner 0:0, sequential inodes. Pure. */
import type { FileTree } from './tree.ts';

const S_IFREG = 0o100000,
  S_IFDIR = 0o040000,
  S_IFLNK = 0o120000,
  S_IFCHR = 0o020000;
const hex8 = (n: number) => n.toString(16).padStart(8, '0');
const pad4 = (n: number) => (4 - (n % 4)) % 4;

function header(ino: number, mode: number, nlink: number, mtime: number, size: number, name: string, rdev = [0, 0]): Buffer {
  const nameBuf = Buffer.from(name + '\0');
  const h = '070701' + [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], nameBuf.length, 0].map(hex8).join('');
  return Buffer.concat([Buffer.from(h, 'latin1'), nameBuf, Buffer.alloc(pad4(110 + nameBuf.length))]);
}

/** The archive as a list of chunks (avoids one copy of a 100+ MB initramfs). */
export function cpioChunks(tree: FileTree, mtime: number): Buffer[] {
  const out: Buffer[] = [];
  let ino = 1;
  for (const path of tree.sortedPaths()) {
    if (path === '/') continue;
    const n = tree.nodes.get(path)!;
    const name = path.slice(1);
    if (n.type === 'directory') out.push(header(ino++, S_IFDIR | n.mode, 2, mtime, 0, name));
    else if (n.type === 'chardev') out.push(header(ino++, S_IFCHR | n.mode, 1, mtime, 0, name, [n.major, n.minor]));
    else {
      const data = n.type === 'file' ? n.data : Buffer.from(n.target);
      const mode = n.type === 'file' ? S_IFREG | n.mode : S_IFLNK | 0o777;
      out.push(header(ino++, mode, 1, mtime, data.length, name), data, Buffer.alloc(pad4(data.length)));
    }
  }
  out.push(header(0, 0, 1, 0, 0, 'TRAILER!!!'));
  return out;
}
