/**
 * The guest's file tree, held in memory while it is assembled. Paths use the
 * merged-/usr layout (/bin, /sbin, /lib, /lib64 are symlinks into /usr), so
 * packages from bookworm (unmerged) and trixie (merged) land in one place.
 */
import { normalisePath } from './debian/deb.ts';

export type TreeNode =
  | { type: 'file'; mode: number; data: Buffer }
  | { type: 'directory'; mode: number }
  | { type: 'symlink'; target: string }
  | { type: 'chardev'; mode: number; major: number; minor: number };

const MERGED: [string, string][] = [
  ['/bin', '/usr/bin'],
  ['/sbin', '/usr/sbin'],
  ['/lib64', '/usr/lib64'],
  ['/lib', '/usr/lib'],
];

export function canonical(path: string): string {
  const p = normalisePath(path);
  for (const [from, to] of MERGED) {
    if (p === from) return p;
    if (p.startsWith(from + '/')) return to + p.slice(from.length);
  }
  return p;
}

export class FileTree {
  readonly nodes = new Map<string, TreeNode>();

  constructor() {
    this.nodes.set('/', { type: 'directory', mode: 0o755 });
    for (const [from, to] of MERGED) {
      this.mkdirp(to);
      this.nodes.set(from, { type: 'symlink', target: to.slice(1) });
    }
  }

  mkdirp(path: string, mode = 0o755): void {
    const p = canonical(path);
    if (p === '/') return;
    const parent = p.slice(0, p.lastIndexOf('/')) || '/';
    this.mkdirp(parent);
    const cur = this.nodes.get(p);
    if (!cur) this.nodes.set(p, { type: 'directory', mode });
  }

  private put(path: string, node: TreeNode): string {
    const p = canonical(path);
    const parent = p.slice(0, p.lastIndexOf('/')) || '/';
    this.mkdirp(parent);
    this.nodes.set(p, node);
    return p;
  }

  file(path: string, data: Buffer | string, mode = 0o644): string {
    return this.put(path, { type: 'file', mode, data: Buffer.isBuffer(data) ? data : Buffer.from(data) });
  }
  symlink(path: string, target: string): string {
    return this.put(path, { type: 'symlink', target });
  }
  chardev(path: string, major: number, minor: number, mode = 0o600): string {
    return this.put(path, { type: 'chardev', mode, major, minor });
  }

  /** Follow symlinks (absolute or relative) to a node, as the guest would. */
  resolve(path: string, depth = 0): { path: string; node: TreeNode } | undefined {
    if (depth > 16) return undefined;
    const p = canonical(path);
    const n = this.nodes.get(p);
    if (!n) return undefined;
    if (n.type !== 'symlink') return { path: p, node: n };
    const target = n.target.startsWith('/') ? n.target : `${p.slice(0, p.lastIndexOf('/'))}/${n.target}`;
    return this.resolve(target, depth + 1);
  }

  /** Sorted paths: parents before children, the same order every build. */
  sortedPaths(): string[] {
    return [...this.nodes.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  }
}
