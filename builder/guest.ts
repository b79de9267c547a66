/**
 * The assemble stage: the guest's file tree from the extracted packages, the
 * agent and its runtime, the kernel's modules in load order, the base files
 * and init, one OCI bundle per container, the user's files last; then ELF
 * stripping. Each piece is one function over the tree; nothing here touches
 * the network or the output directory.
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve as resolvePath } from 'node:path';
import { BuildError } from '../common/errors.ts';
import { GUEST_IMAGE_CONFIG, type GuestImageConfig, type ContainerSpec } from '../common/contracts.ts';
import { sha256 } from '../common/digest.ts';
import { decompress, type TarEntry } from './debian/deb.ts';
import type { ImageDefinition } from './schema.ts';
import type { Lockfile, LockedPackage } from './lock.ts';
import { FileTree, canonical } from './tree.ts';
import { DEFAULT_EXCLUDES, globToRegExp, matchingPaths } from './globs.ts';
import { addPackageFiles, libraryClosure, findModules } from './assemble.ts';
import { moduleDepends } from './elf.ts';
import { moduleLoadOrder } from './modules.ts';
import { initScript, AGENT_DIR, AGENT_COMMAND, MODULE_DIR, UDHCPC_SCRIPT } from './init.ts';
import { runtimeConfig, readOciImage, type LayerDescriptor } from './oci.ts';
import { stripElf } from './strip.ts';
import { AGENT_TOOLS, type PackageSets } from './packages.ts';

export interface ContainerImageRef {
  name: string;
  path: string;
  layers: LayerDescriptor[];
}
export interface UserFile {
  path: string;
  source?: string;
  sha256: string;
}
export interface KernelParts {
  vmlinuz: Buffer;
  version: string;
  modules: string[];
}

/** What each package (or scion itself) puts in the image, in bytes, largest first. */
export interface PackageContribution {
  name: string;
  bytes: number;
  files: number;
}

export interface GuestTree {
  tree: FileTree;
  /** bytes of files each package contributes to the initramfs, after exclusion and stripping */
  packages: PackageContribution[];
  /** files the exclude globs left out (the defaults and the definition's) */
  excluded: { files: number; bytes: number };
  kernel: KernelParts;
  agentBundle: Buffer;
  containerImages: ContainerImageRef[];
  userFiles: UserFile[];
  stripped: { files: number; bytes: number };
  largest: { path: string; size: number }[];
}

const packageFiles = (files: Map<string, TarEntry[]>, p: LockedPackage) => files.get(p.sha256)!;

/** path in the guest tree -> the package its bytes came from */
type Owners = Map<string, string>;
const own = (owners: Owners, entries: TarEntry[], name: string, prefix = '') => {
  for (const e of entries) if (e.type === 'file') owners.set(prefix + canonical(e.path), name);
};

/** The guest packages the definition names (dependencies only where a library needs them), the agent and its runtime (a package: QuickJS). */
function addGuestPackages(
  tree: FileTree,
  owners: Owners,
  def: ImageDefinition,
  sets: PackageSets,
  lock: Lockfile,
  files: Map<string, TarEntry[]>,
  agentBundle: Buffer,
): void {
  const guestRoots = new Set(sets.guest.roots);
  const staging = new FileTree();
  for (const p of lock.sets.guest.packages) {
    const f = packageFiles(files, p);
    addPackageFiles(staging, f);
    own(owners, f, p.name);
    if (guestRoots.has(p.name)) addPackageFiles(tree, f);
  }
  tree.file(`${AGENT_DIR}/agent.mjs`, agentBundle, 0o644);
  // of a package only the agent needs, only the files it uses (their libraries follow below)
  for (const [pkg, keep] of Object.entries(AGENT_TOOLS)) {
    if (def.packages.includes(pkg)) continue;
    for (const [path, owner] of owners) if (owner === pkg && !keep.includes(path) && tree.nodes.get(path)?.type === 'file') tree.nodes.delete(path);
  }
  const closure = libraryClosure(tree, staging);
  if (closure.missing.length) {
    const m = closure.missing[0];
    throw new BuildError('E_LIBRARY_MISSING', `${m.file} needs ${m.soname}, which no package in the guest set provides`, {
      hint: 'add the package that ships it to `packages:`',
    });
  }
}

/** The kernel image and the modules the definition asks for, with their dependencies, in load order. */
async function addKernel(tree: FileTree, owners: Owners, def: ImageDefinition, lock: Lockfile, files: Map<string, TarEntry[]>): Promise<KernelParts> {
  const kernelPkgs = lock.sets.kernel.packages;
  const km = findModules(kernelPkgs.flatMap((p) => packageFiles(files, p)));
  const kernelOwners: Owners = new Map();
  for (const p of kernelPkgs) own(kernelOwners, packageFiles(files, p), p.name);
  if (!km.vmlinuz)
    throw new BuildError(
      'E_KERNEL_MISSING',
      `kernel.package ${def.kernel.package} resolved to ${kernelPkgs.map((p) => p.name).join(', ')}, which ship no /boot/vmlinuz-*`,
    );
  const depMap = new Map<string, string[]>();
  const koBytes = new Map<string, Buffer>();
  const queue = [...def.kernel.modules.map((m) => m.replace(/-/g, '_'))];
  while (queue.length) {
    const m = queue.shift()!;
    if (depMap.has(m) || km.builtin.has(m)) continue;
    const f = km.files.get(m);
    if (!f) continue; // moduleLoadOrder reports it with context
    const ko = await decompress(f.path, f.data!);
    koBytes.set(m, ko);
    const deps = moduleDepends(ko).map((d) => d.replace(/-/g, '_'));
    depMap.set(m, deps);
    queue.push(...deps);
  }
  const order = moduleLoadOrder(def.kernel.modules, depMap, km.builtin);
  for (const [i, m] of order.entries()) {
    owners.set(
      tree.file(`${MODULE_DIR}/${String(i).padStart(2, '0')}-${m}.ko`, koBytes.get(m)!, 0o644),
      kernelOwners.get(canonical(km.files.get(m)!.path)) ?? def.kernel.package,
    );
  }
  return { vmlinuz: km.vmlinuz.data!, version: km.version!, modules: order }; // set with vmlinuz, from its file name
}

/** Directories, devices, identity files and the init. */
function addBaseFiles(tree: FileTree, def: ImageDefinition, modules: string[]): void {
  for (const d of ['/proc', '/sys', '/dev', '/run', '/root', '/var/lib/scion', '/etc/scion']) tree.mkdirp(d);
  tree.mkdirp('/tmp', 0o1777);
  tree.chardev('/dev/console', 5, 1, 0o600);
  tree.chardev('/dev/null', 1, 3, 0o666);
  tree.file('/etc/passwd', 'root:x:0:0:root:/root:/bin/sh\n');
  tree.file('/etc/group', 'root:x:0:\n');
  tree.file('/etc/hostname', `${def.name}\n`);
  tree.file('/etc/hosts', `127.0.0.1 localhost\n127.0.1.1 ${def.name}\n`);
  tree.file('/etc/resolv.conf', '');
  tree.file('/etc/machine-id', '');
  tree.file('/init', initScript({ modules, hostname: def.name }), 0o755);
  tree.file(`${AGENT_DIR}/udhcpc.script`, UDHCPC_SCRIPT, 0o755);
}

/** One container's root file system: its packages (with the libraries they need), or an OCI image's layers. */
async function containerRootfs(
  c: ImageDefinition['containers'][number],
  owners: Owners,
  lock: Lockfile,
  files: Map<string, TarEntry[]>,
  defDir: string,
): Promise<{ rootfs: FileTree; image?: ContainerImageRef }> {
  const rootfs = new FileTree();
  if ('packages' in c.image) {
    const staging = new FileTree();
    const roots = new Set(c.image.packages);
    for (const p of lock.sets[`container:${c.name}`].packages) {
      const f = packageFiles(files, p);
      own(owners, f, `${p.name} (container ${c.name})`, `/var/lib/scion/containers/${c.name}/rootfs`);
      addPackageFiles(staging, f);
      if (roots.has(p.name)) addPackageFiles(rootfs, f);
    }
    const cc = libraryClosure(rootfs, staging);
    if (cc.missing.length) throw new BuildError('E_LIBRARY_MISSING', `container ${c.name}: ${cc.missing[0].file} needs ${cc.missing[0].soname}`);
    return { rootfs };
  }
  const img = await readOciImage(resolvePath(defDir, c.image.oci));
  for (const [p, e] of [...img.files].sort(([a], [b]) => (a < b ? -1 : 1))) {
    if (e.type === 'directory') rootfs.mkdirp(p, e.mode);
    else if (e.type === 'file' && e.data) rootfs.file(p, e.data, e.mode);
    else if (e.type === 'symlink') rootfs.symlink(p, e.linkname!);
  }
  return { rootfs, image: { name: c.name, path: c.image.oci, layers: img.layers } };
}

/** Containers: one OCI runtime bundle each, and the agent's config naming them. */
async function addContainers(
  tree: FileTree,
  owners: Owners,
  def: ImageDefinition,
  lock: Lockfile,
  files: Map<string, TarEntry[]>,
  defDir: string,
): Promise<ContainerImageRef[]> {
  const images: ContainerImageRef[] = [];
  for (const c of def.containers) {
    const root = `/var/lib/scion/containers/${c.name}`;
    const { rootfs, image } = await containerRootfs(c, owners, lock, files, defDir);
    if (image) {
      images.push(image);
      for (const [p, n] of rootfs.nodes) if (n.type === 'file') owners.set(`${root}/rootfs${p}`, `OCI image ${image.path} (container ${c.name})`);
    }
    for (const d of ['/proc', '/dev', '/sys', '/tmp', '/etc']) rootfs.mkdirp(d);
    rootfs.file('/etc/resolv.conf', '');
    rootfs.file('/etc/hosts', '');
    for (const [p, n] of rootfs.nodes) if (p !== '/') tree.nodes.set(`${root}/rootfs${p}`, n);
    tree.mkdirp(`${root}/rootfs`);
    tree.file(`${root}/config.json`, JSON.stringify(runtimeConfig(c, def.name), null, 2) + '\n');
  }
  const guestConfig: GuestImageConfig & { network: unknown; containers: (ContainerSpec & { network: unknown })[] } = {
    name: def.name,
    exec: def.agent.exec,
    network: def.network,
    containers: def.containers.map((c) => ({
      name: c.name,
      restart: c.restart,
      onFork: c.onFork,
      healthcheck: c.healthcheck as ContainerSpec['healthcheck'],
      ports: c.ports,
      network: c.network,
      bundle: `/var/lib/scion/containers/${c.name}`,
    })),
  };
  tree.file(GUEST_IMAGE_CONFIG, JSON.stringify(guestConfig, null, 2) + '\n');
  return images;
}

/** The definition's own files, last: they may override anything above. */
async function addUserFiles(tree: FileTree, def: ImageDefinition, definitionPath: string, defDir: string): Promise<UserFile[]> {
  const out: UserFile[] = [];
  for (const f of def.files) {
    const data =
      f.contents !== undefined
        ? Buffer.from(f.contents)
        : await readFile(resolvePath(defDir, f.source!)).catch(() => {
            throw new BuildError('E_FILE_SOURCE', `${definitionPath}: files: source ${f.source} cannot be read`);
          });
    tree.file(f.path, data, f.mode);
    out.push({ path: f.path, source: f.source, sha256: sha256(data) });
  }
  return out;
}

/** Debug sections and symbol tables out of every ELF file: the guest never reads them (the Node binary alone carries 16 MB). */
function stripTree(tree: FileTree): { files: number; bytes: number } {
  const stripped = { files: 0, bytes: 0 };
  for (const [path, n] of tree.nodes) {
    if (n.type !== 'file') continue;
    const s = stripElf(n.data);
    if (!s) continue;
    stripped.files++;
    stripped.bytes += n.data.length - s.length;
    tree.nodes.set(path, { ...n, data: s });
  }
  return stripped;
}

/** Paths the exclude globs match, taken out (a directory with everything under it); refused if the guest could not boot without them. */
function excludeFiles(tree: FileTree, globs: string[], mustKeep: string[]): { files: number; bytes: number } {
  const hit = new Set(matchingPaths(tree.nodes.keys(), globs));
  for (const p of [...hit]) if (tree.nodes.get(p)?.type === 'directory') for (const q of tree.nodes.keys()) if (q.startsWith(`${p}/`)) hit.add(q);
  for (const k of mustKeep) {
    if (hit.has(k))
      throw new BuildError(
        'E_DEFINITION',
        `exclude: ${globs.find((g) => globToRegExp(g).test(k)) ?? 'a pattern'} would leave out ${k}, which the guest needs`,
        { hint: 'narrow the pattern' },
      );
  }
  const out = { files: 0, bytes: 0 };
  for (const p of hit) {
    const n = tree.nodes.get(p);
    if (p === '/' || !n) continue;
    if (n.type === 'file') {
      out.files++;
      out.bytes += n.data.length;
    }
    tree.nodes.delete(p);
  }
  return out;
}

/** Bytes per owning package of the final tree's files; scion's own files (init, config, agent) as "scion". Pure. */
export function contributions(tree: FileTree, owners: Map<string, string>): PackageContribution[] {
  const by = new Map<string, PackageContribution>();
  for (const [p, n] of tree.nodes) {
    if (n.type !== 'file') continue;
    const name = owners.get(p) ?? 'scion (init, agent, config, files:)';
    const c = by.get(name) ?? { name, bytes: 0, files: 0 };
    c.bytes += n.data.length;
    c.files++;
    by.set(name, c);
  }
  return [...by.values()].sort((a, b) => b.bytes - a.bytes || (a.name < b.name ? -1 : 1));
}

/** The ten largest files, largest first. Pure. */
export function largestFiles(tree: FileTree, n = 10): { path: string; size: number }[] {
  return [...tree.nodes]
    .flatMap(([path, node]) => (node.type === 'file' ? [{ path, size: node.data.length }] : []))
    .sort((a, b) => b.size - a.size || (a.path < b.path ? -1 : 1))
    .slice(0, n);
}

/** The whole guest tree. */
export async function assembleGuest(o: {
  def: ImageDefinition;
  sets: PackageSets;
  lock: Lockfile;
  files: Map<string, TarEntry[]>;
  agentBundle: Buffer;
  definitionPath: string;
  defPath: string;
  log: (m: string) => void;
}): Promise<GuestTree> {
  const tree = new FileTree();
  const owners: Owners = new Map();
  const defDir = dirname(o.defPath);
  addGuestPackages(tree, owners, o.def, o.sets, o.lock, o.files, o.agentBundle);
  const kernel = await addKernel(tree, owners, o.def, o.lock, o.files);
  addBaseFiles(tree, o.def, kernel.modules);
  const containerImages = await addContainers(tree, owners, o.def, o.lock, o.files, defDir);
  // the defaults and the definition's globs; then the user's own files, which may put anything back
  const excluded = excludeFiles(
    tree,
    [...DEFAULT_EXCLUDES, ...o.def.exclude],
    ['/init', GUEST_IMAGE_CONFIG, `${AGENT_DIR}/agent.mjs`, AGENT_COMMAND.split(' ')[0]],
  );
  if (excluded.files) o.log(`left out ${excluded.files} file(s), ${excluded.bytes} bytes (exclude globs)`);
  const userFiles = await addUserFiles(tree, o.def, o.definitionPath, defDir);
  const stripped = stripTree(tree);
  if (stripped.files) o.log(`stripped ${stripped.files} ELF file(s) of debug sections and symbol tables: ${stripped.bytes} bytes`);
  return {
    tree,
    kernel,
    agentBundle: o.agentBundle,
    containerImages,
    userFiles,
    stripped,
    excluded,
    largest: largestFiles(tree),
    packages: contributions(tree, owners),
  };
}
