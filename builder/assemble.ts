/**
 * Assembly helpers: package files into trees, the shared-library closure,
 * kernel modules. Pure over in-memory trees (given extracted package files).
 */
import type { TarEntry } from './debian/deb.ts';
import { elfDeps, isElf } from './elf.ts';
import { type FileTree, canonical } from './tree.ts';

const DOC_PREFIXES = ['/usr/share/doc/', '/usr/share/man/', '/usr/share/info/', '/usr/share/locale/', '/usr/share/lintian/', '/usr/share/bug/'];
export const LIB_DIRS = ['/usr/lib/x86_64-linux-gnu', '/usr/lib64', '/usr/lib', '/usr/local/lib'];

export function addPackageFiles(tree: FileTree, entries: TarEntry[], opts: { skipDocs?: boolean } = {}): void {
  for (const e of entries) {
    const p = canonical(e.path);
    if (opts.skipDocs !== false && DOC_PREFIXES.some((d) => p.startsWith(d))) continue;
    if (e.type === 'directory') tree.mkdirp(p, e.mode);
    else if (e.type === 'file') tree.file(p, e.data!, e.mode);
    else if (e.type === 'symlink') {
      // absolute links into /bin etc. are canonicalised like paths
      tree.symlink(p, e.linkname!.startsWith('/') ? canonical(e.linkname!) : e.linkname!);
    }
  }
}

/** Copy a path (and every symlink hop to its final file) from staging into the tree. */
function copyWithLinks(staging: FileTree, tree: FileTree, path: string): string | undefined {
  let p = canonical(path);
  for (let hop = 0; hop < 16; hop++) {
    const n = staging.nodes.get(p);
    if (!n) return undefined;
    if (n.type === 'symlink') {
      tree.symlink(p, n.target);
      p = canonical(n.target.startsWith('/') ? n.target : `${p.slice(0, p.lastIndexOf('/'))}/${n.target}`);
      continue;
    }
    if (n.type === 'file') tree.file(p, n.data, n.mode);
    return p;
  }
  return undefined;
}

/**
 * Bring in every shared library (DT_NEEDED, transitively) and the dynamic
 * loader that the ELF files in `tree` need, taking them from `staging`.
 * Returns the sonames that could not be found (the caller decides if fatal).
 */
export function libraryClosure(tree: FileTree, staging: FileTree): { added: string[]; missing: { file: string; soname: string }[] } {
  const added: string[] = [];
  const missing: { file: string; soname: string }[] = [];
  const done = new Set<string>();
  let work = [...tree.nodes.keys()];
  while (work.length) {
    const next: string[] = [];
    for (const path of work) {
      if (done.has(path)) continue;
      done.add(path);
      const n = tree.nodes.get(path);
      if (n?.type !== 'file' || !isElf(n.data)) continue;
      const deps = elfDeps(n.data);
      const wants: { spec: string; direct: boolean }[] = deps.needed.map((s) => ({ spec: s, direct: false }));
      if (deps.interp) wants.push({ spec: deps.interp, direct: true });
      for (const w of wants) {
        const candidates = w.direct ? [w.spec] : LIB_DIRS.map((d) => `${d}/${w.spec}`);
        if (candidates.some((c) => tree.resolve(c))) continue;
        let found: string | undefined;
        for (const c of candidates) if ((found = copyWithLinks(staging, tree, c))) break;
        if (!found) missing.push({ file: path, soname: w.spec });
        else {
          added.push(found);
          next.push(found);
        }
      }
    }
    work = next;
  }
  return { added: added.sort(), missing };
}

/** Kernel module files in a kernel package: name -> path (.ko or .ko.xz/.zst/.gz). */
export function findModules(entries: TarEntry[]): { version?: string; files: Map<string, TarEntry>; builtin: Set<string>; vmlinuz?: TarEntry } {
  const files = new Map<string, TarEntry>();
  const builtin = new Set<string>();
  let version: string | undefined;
  let vmlinuz: TarEntry | undefined;
  for (const e of entries) {
    const p = canonical(e.path);
    if (/^\/boot\/vmlinuz-/.test(p) && e.type === 'file') {
      vmlinuz = e;
      version = p.slice('/boot/vmlinuz-'.length);
    }
    const m = /^\/usr\/lib\/modules\/[^/]+\/kernel\/.*\/([^/]+)\.ko(\.xz|\.zst|\.gz)?$/.exec(p);
    if (m && e.type === 'file') files.set(m[1].replace(/-/g, '_'), e);
    if (/^\/usr\/lib\/modules\/[^/]+\/modules\.builtin$/.test(p) && e.data) {
      for (const line of e.data.toString('utf8').split('\n')) {
        const b = /([^/]+)\.ko$/.exec(line.trim());
        if (b) builtin.add(b[1].replace(/-/g, '_'));
      }
    }
  }
  return { version, files, builtin, vmlinuz };
}
