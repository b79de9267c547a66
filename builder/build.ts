/**
 * `scion build`: definition -> lock -> packages -> guest tree -> artifacts.
 * The effects (network, cache, disk) live here; every decision is made by the
 * pure modules it calls. Outputs are written to a temporary directory and
 * swapped in whole: a failed build leaves the previous artifacts untouched.
 */
import { readFile, rm, mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, resolve as resolvePath, basename } from 'node:path';
import { gzipSync } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { BuildError } from '../common/errors.ts';
import { config } from '../common/config.ts';
import { removeOnInterrupt } from '../common/interrupt.ts';
import { replaceDirectory } from '../common/safe-fs.ts';
import { runBuffer } from '../common/run.ts';
import { GUEST_IMAGE_CONFIG, type GuestImageConfig, type ContainerSpec } from '../common/contracts.ts';
import { BlobCache, sha256, atomicWrite } from './cache.ts';
import { DebianArchive, mirrorFromAptSources } from './debian/archive.ts';
import { debDataTar, dataTarEntries, decompress, type TarEntry } from './debian/deb.ts';
import { resolve as resolveDeps, type PackageIndex } from './debian/resolver.ts';
import { parseDefinition, type ImageDefinition } from './schema.ts';
import { readLock, writeLock, sameRoots, serialiseLock, type Lockfile, type LockedPackage } from './lock.ts';
import { FileTree } from './tree.ts';
import { addPackageFiles, libraryClosure, findModules } from './assemble.ts';
import { moduleDepends } from './elf.ts';
import { moduleLoadOrder } from './modules.ts';
import { cpioChunks } from './cpio.ts';
import { initScript, AGENT_DIR, MODULE_DIR, UDHCPC_SCRIPT } from './init.ts';
import { runtimeConfig, readOciImage } from './oci.ts';
import { fetchRuntime, runtimeUrl } from './runtime.ts';
import type { Progress } from './fetch.ts';
import { stripElf } from './strip.ts';
import { sbomJson, debArchitecture, resolvedDepends, type SbomPackage } from './sbom.ts';
import { provenanceJson } from './provenance.ts';
import { readControl } from './debian/deb.ts';
import { SCION_VERSION, packageRoot } from '../common/version.ts';
import { existsSync } from 'node:fs';

export type Compression = 'none' | 'gzip' | 'zstd';
export type BuildEvent =
  | { type: 'step'; step: string; ms: number }
  | { type: 'download'; url: string; received: number; total?: number; done: boolean; ms: number }
  | { type: 'log'; message: string };

export interface BuildOptions {
  definitionPath: string;
  outDir?: string; // default: ./out
  cacheDir?: string;
  updateLock?: boolean;
  /** CI: the lock must exist and stay as it is (a build that would change it fails with E_LOCK_CHANGED, before writing anything) */
  locked?: boolean;
  mirror?: string;
  compression?: Compression;
  sourceDateEpoch?: number;
  onEvent?: (ev: BuildEvent) => void;
}

/** One file of the output directory. */
export interface BuildOutput { name: string; path: string; size: number; sha256: string }

export interface BuildResult {
  name: string;
  dir: string;
  vmlinuz: string;
  initrd: string;
  manifest: string;
  sbom: string;
  provenance: string;
  /** every file written, in name order */
  outputs: BuildOutput[];
  /** the largest files inside the initramfs, largest first */
  largest: { path: string; size: number }[];
  /** ELF files stripped of debug sections and symbol tables, and the bytes that removed */
  stripped: { files: number; bytes: number };
  lock: string;
  lockChanged: boolean;
  sha256: { vmlinuz: string; initrd: string };
  sizes: { vmlinuz: number; initrd: number; initrdUncompressed: number };
  packages: number;
  stepsMs: Record<string, number>;
}

/** Output file names, in the order a listing shows them. */
export const OUTPUT_FILES = ['vmlinuz', 'initrd.img', 'manifest.json', 'sbom.cdx.json', 'provenance.intoto.json'] as const;
/** Libraries the agent's Node binary links against (see `readelf -d node`). */
const RUNTIME_LIB_PACKAGES = ['libc6', 'libgcc-s1', 'libstdc++6'];
/** linuxptp's phc_ctl: the agent's relative clock steps (clock_adjtime ADJ_SETOFFSET; busybox sets whole seconds only). */
const AGENT_TOOL_PACKAGES = ['linuxptp'];

/** ./out of the working directory (a pipeline's workspace, the user's project), as `scion build --out` defaults. */
export function defaultOutDir(): string {
  return resolvePath('out');
}

/** The package sets the definition asks for: name -> roots. */
export function packageSets(def: ImageDefinition): Record<string, { roots: string[]; follow?: (n: string) => boolean }> {
  const guest = new Set(['busybox-static', ...RUNTIME_LIB_PACKAGES, ...AGENT_TOOL_PACKAGES, ...def.packages]);
  if (def.containers.length) guest.add('crun');
  const sets: Record<string, { roots: string[]; follow?: (n: string) => boolean }> = {
    guest: { roots: [...guest].sort() },
    // the kernel metapackage points at the real image package; its other
    // Depends (kmod, initramfs-tools) are for dpkg installs, not for us
    kernel: { roots: [def.kernel.package], follow: (n) => n.startsWith('linux-image-') },
  };
  for (const c of def.containers) if ('packages' in c.image) sets[`container:${c.name}`] = { roots: [...c.image.packages].sort() };
  return sets;
}

/** Where `npm pack` puts the prebuilt agent (scripts/prepack.mjs); a checkout bundles from source instead. */
export const prebuiltAgentPath = (): string => join(packageRoot(), 'dist', 'guest-agent', 'agent.mjs');

export async function bundleAgent(): Promise<Buffer> {
  if (!existsSync(join(packageRoot(), 'guest-agent', 'main.ts'))) return readFile(prebuiltAgentPath());
  return bundleAgentFromSource();
}

/** esbuild over guest-agent/main.ts: a checkout's builds, and the pack step. */
export async function bundleAgentFromSource(): Promise<Buffer> {
  const esbuild = await import('esbuild');
  const r = await esbuild.build({
    entryPoints: [join(packageRoot(), 'guest-agent', 'main.ts')],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node22',
    write: false,
    minify: false,
    legalComments: 'none',
    banner: { js: '// scion guest agent (bundled)' },
    absWorkingDir: packageRoot(),
  });
  return Buffer.from(r.outputFiles[0].contents);
}

async function mapLimit<T, R>(items: T[], limit: number, fn: (t: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let i = 0;
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (i < items.length) { const k = i++; out[k] = await fn(items[k]); }
  }));
  return out;
}

/** A .deb this large (the kernel's) keeps its decompressed data.tar in the cache: xz costs seconds per build. */
const DATA_TAR_CACHE_MIN_BYTES = 8 * 1024 * 1024;

/** The decompressed data.tar of a .deb, from the cache when this .deb was decompressed before (content-addressed: a damaged copy is never used). */
async function cachedDataTar(cache: BlobCache, p: LockedPackage, deb: Buffer): Promise<Buffer> {
  const label = `${p.name} ${p.version}`;
  if (deb.length < DATA_TAR_CACHE_MIN_BYTES) return debDataTar(deb, label);
  const ref = cache.refPath(`data-tar-${p.sha256}`);
  const hash = await readFile(ref, 'utf8').then((t) => t.trim(), () => undefined);
  const hit = hash && /^[0-9a-f]{64}$/.test(hash) ? await cache.get(hash) : undefined;
  if (hit) return hit;
  const tar = await debDataTar(deb, label);
  await atomicWrite(ref, await cache.put(tar));
  return tar;
}

export async function build(opts: BuildOptions): Promise<BuildResult> {
  const emit = opts.onEvent ?? (() => undefined);
  const steps: Record<string, number> = {};
  let t = performance.now();
  const step = (name: string) => {
    const now = performance.now();
    steps[name] = Math.round(now - t);
    emit({ type: 'step', step: name, ms: steps[name] });
    t = now;
  };

  const defPath = resolvePath(opts.definitionPath);
  let text: string;
  try { text = await readFile(defPath, 'utf8'); } catch (e) {
    throw new BuildError('E_DEFINITION_MISSING', `cannot read ${opts.definitionPath}: ${(e as NodeJS.ErrnoException).code}`, { hint: 'pass the path of an image definition, e.g. images/minimal.yaml' });
  }
  const def = parseDefinition(text, opts.definitionPath);
  const lockPath = join(dirname(defPath), basename(defPath).replace(/\.ya?ml$/, '') + '.scion.lock');
  const cache = new BlobCache(opts.cacheDir);
  const mirror = opts.mirror ?? def.debian.mirror ?? (await mirrorFromAptSources());
  if (!mirror) {
    throw new BuildError('E_NO_MIRROR', `${opts.definitionPath}: debian.mirror is not set and the host's apt sources name no Debian mirror`, { hint: 'add `debian: {mirror: http://deb.debian.org/debian}` to the definition' });
  }
  const onProgress: Progress = (p) => emit({ type: 'download', ...p });
  if (opts.locked && opts.updateLock) throw new BuildError('E_USAGE', '--locked and --update-lock contradict each other');
  const oldLock = opts.updateLock ? undefined : await readLock(lockPath);
  if (opts.locked && !oldLock) throw new BuildError('E_LOCK_CHANGED', `${opts.definitionPath}: --locked, but there is no lock file ${basename(lockPath)}`, { hint: 'build once without --locked and commit the lock' });
  const suite = oldLock?.codename ?? def.debian.suite;
  const archive = new DebianArchive({ mirror, suite, components: def.debian.components, architecture: def.debian.architecture, cache, onProgress, log: (m) => emit({ type: 'log', message: m }) });

  // 1. resolve each package set (from the lock when its roots are unchanged)
  const sets = packageSets(def);
  // the mirror is not locked: packages are named by hash, any mirror serves them
  const lock: Lockfile = { lockVersion: 1, suite: def.debian.suite, codename: oldLock?.codename, architecture: def.debian.architecture, sets: {} };
  let index: PackageIndex | undefined;
  for (const [name, s] of Object.entries(sets)) {
    const locked = oldLock?.sets[name];
    if (locked && sameRoots(locked.roots, s.roots)) { lock.sets[name] = locked; continue; }
    index ??= await archive.index();
    lock.codename ??= archive.codename;
    const pins = new Map<string, string>();
    for (const ls of Object.values(oldLock?.sets ?? {})) for (const p of ls.packages) pins.set(p.name, p.version);
    // a pin the archive no longer has fails here; --update-lock resolves afresh
    const chosen = resolveDeps(index, s.roots, { pins, follow: s.follow });
    lock.sets[name] = { roots: s.roots, packages: chosen.map((p) => ({ name: p.name, version: p.version, filename: p.filename, sha256: p.sha256, size: p.size })) };
  }
  if (opts.locked && serialiseLock(lock) !== serialiseLock(oldLock!)) {
    const changed = Object.keys({ ...lock.sets, ...oldLock!.sets }).filter((k) => JSON.stringify(lock.sets[k]) !== JSON.stringify(oldLock!.sets[k]));
    throw new BuildError('E_LOCK_CHANGED', `${opts.definitionPath}: --locked, but the definition no longer matches ${basename(lockPath)} (package sets ${changed.join(', ')})`, { hint: 'update the lock (scion build without --locked, or --update-lock) and commit it' });
  }
  step('resolve');

  // 2. download (or take from the cache) every .deb and the agent runtime
  const all = new Map<string, LockedPackage>();
  for (const s of Object.values(lock.sets)) for (const p of s.packages) all.set(p.sha256, p);
  const debs = new Map<string, Buffer>();
  await mapLimit([...all.values()], 4, async (p) => { debs.set(p.sha256, await archive.deb(p)); });
  const runtime = await fetchRuntime(def.agent.runtime, cache, onProgress);
  for (const h of cache.corrupt) emit({ type: 'log', message: `cached blob ${h} did not match its SHA-256: discarded and fetched again` });
  step('download');

  // 3. extract
  const extracted = new Map<string, TarEntry[]>();
  const controls = new Map<string, Record<string, string>>();
  await mapLimit([...all.values()], 2, async (p) => {
    const deb = debs.get(p.sha256)!;
    extracted.set(p.sha256, await dataTarEntries(await cachedDataTar(cache, p, deb)));
    controls.set(p.sha256, await readControl(deb, `${p.name} ${p.version}`));
  });
  debs.clear();
  step('extract');

  // 4. assemble the guest tree
  const tree = new FileTree();
  const guestSet = lock.sets.guest.packages;
  const guestRoots = new Set(sets.guest.roots.filter((r) => !RUNTIME_LIB_PACKAGES.includes(r) || def.packages.includes(r)));
  const staging = new FileTree();
  for (const p of guestSet) {
    const files = extracted.get(p.sha256)!;
    addPackageFiles(staging, files);
    if (guestRoots.has(p.name)) addPackageFiles(tree, files);
  }
  tree.file(`${AGENT_DIR}/node`, runtime.node, 0o755);
  const agentBundle = await bundleAgent();
  tree.file(`${AGENT_DIR}/agent.mjs`, agentBundle, 0o644);
  const closure = libraryClosure(tree, staging);
  if (closure.missing.length) {
    const m = closure.missing[0];
    throw new BuildError('E_LIBRARY_MISSING', `${m.file} needs ${m.soname}, which no package in the guest set provides`, { hint: 'add the package that ships it to `packages:`' });
  }

  // kernel + modules
  const kernelPkgs = lock.sets.kernel.packages;
  const kernelFiles = kernelPkgs.flatMap((p) => extracted.get(p.sha256)!);
  const km = findModules(kernelFiles);
  if (!km.vmlinuz) throw new BuildError('E_KERNEL_MISSING', `kernel.package ${def.kernel.package} resolved to ${kernelPkgs.map((p) => p.name).join(', ')}, which ship no /boot/vmlinuz-*`);
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
  order.forEach((m, i) => tree.file(`${MODULE_DIR}/${String(i).padStart(2, '0')}-${m}.ko`, koBytes.get(m)!, 0o644));

  // base files
  for (const d of ['/proc', '/sys', '/dev', '/newroot', '/run', '/root', '/var/lib/scion', '/etc/scion']) tree.mkdirp(d);
  tree.mkdirp('/tmp', 0o1777);
  tree.chardev('/dev/console', 5, 1, 0o600);
  tree.chardev('/dev/null', 1, 3, 0o666);
  tree.file('/etc/passwd', 'root:x:0:0:root:/root:/bin/sh\n');
  tree.file('/etc/group', 'root:x:0:\n');
  tree.file('/etc/hostname', `${def.name}\n`);
  tree.file('/etc/hosts', `127.0.0.1 localhost\n127.0.1.1 ${def.name}\n`);
  tree.file('/etc/resolv.conf', '');
  tree.file('/etc/machine-id', '');
  tree.file('/init', initScript({ modules: order, hostname: def.name }), 0o755);
  tree.file(`${AGENT_DIR}/udhcpc.script`, UDHCPC_SCRIPT, 0o755);

  // containers: one OCI runtime bundle each
  const containerImages: { name: string; path: string; layers: { digest: string; size: number; mediaType: string }[] }[] = [];
  for (const c of def.containers) {
    const root = `/var/lib/scion/containers/${c.name}`;
    const rootfs = new FileTree();
    if ('packages' in c.image) {
      const cstaging = new FileTree();
      const roots = new Set(c.image.packages);
      for (const p of lock.sets[`container:${c.name}`].packages) {
        const files = extracted.get(p.sha256)!;
        addPackageFiles(cstaging, files);
        if (roots.has(p.name)) addPackageFiles(rootfs, files);
      }
      const cc = libraryClosure(rootfs, cstaging);
      if (cc.missing.length) throw new BuildError('E_LIBRARY_MISSING', `container ${c.name}: ${cc.missing[0].file} needs ${cc.missing[0].soname}`);
    } else {
      const img = await readOciImage(resolvePath(dirname(defPath), c.image.oci));
      containerImages.push({ name: c.name, path: c.image.oci, layers: img.layers });
      for (const [p, e] of [...img.files].sort(([a], [b]) => (a < b ? -1 : 1))) {
        if (e.type === 'directory') rootfs.mkdirp(p, e.mode);
        else if (e.type === 'file' && e.data) rootfs.file(p, e.data, e.mode);
        else if (e.type === 'symlink') rootfs.symlink(p, e.linkname!);
      }
    }
    for (const d of ['/proc', '/dev', '/sys', '/tmp', '/etc']) rootfs.mkdirp(d);
    rootfs.file('/etc/resolv.conf', '');
    rootfs.file('/etc/hosts', '');
    for (const [p, n] of rootfs.nodes) {
      if (p === '/') continue;
      const dest = `${root}/rootfs${p}`;
      tree.nodes.set(dest, n);
    }
    tree.mkdirp(`${root}/rootfs`);
    tree.file(`${root}/config.json`, JSON.stringify(runtimeConfig(c, def.name), null, 2) + '\n');
  }
  const guestConfig: GuestImageConfig & { network: unknown; containers: (ContainerSpec & { network: unknown })[] } = {
    name: def.name,
    exec: def.agent.exec,
    network: def.network,
    containers: def.containers.map((c) => ({ name: c.name, restart: c.restart, healthcheck: c.healthcheck as ContainerSpec['healthcheck'], ports: c.ports, network: c.network, bundle: `/var/lib/scion/containers/${c.name}` })),
  };
  tree.file(GUEST_IMAGE_CONFIG, JSON.stringify(guestConfig, null, 2) + '\n');

  // user files last: they may override anything above
  const userFiles: { path: string; source?: string; sha256: string }[] = [];
  for (const f of def.files) {
    const data = f.contents !== undefined ? Buffer.from(f.contents) : await readFile(resolvePath(dirname(defPath), f.source!)).catch(() => {
      throw new BuildError('E_FILE_SOURCE', `${opts.definitionPath}: files: source ${f.source} cannot be read`);
    });
    tree.file(f.path, data, f.mode);
    userFiles.push({ path: f.path, source: f.source, sha256: sha256(data) });
  }
  // debug sections and symbol tables: the guest never reads them (the Node binary alone carries 16 MB)
  const stripped = { files: 0, bytes: 0 };
  for (const [path, n] of tree.nodes) {
    if (n.type !== 'file') continue;
    const s = stripElf(n.data);
    if (!s) continue;
    stripped.files++;
    stripped.bytes += n.data.length - s.length;
    tree.nodes.set(path, { ...n, data: s });
  }
  if (stripped.files) emit({ type: 'log', message: `stripped ${stripped.files} ELF file(s) of debug sections and symbol tables: ${stripped.bytes} bytes` });
  const largest = [...tree.nodes].flatMap(([path, n]) => (n.type === 'file' ? [{ path, size: n.data.length }] : []))
    .sort((a, b) => b.size - a.size || (a.path < b.path ? -1 : 1)).slice(0, 10);
  step('assemble');

  // 5. write artifacts: temp dir, then swap
  const mtime = opts.sourceDateEpoch ?? config().sourceDateEpoch;
  const compression = opts.compression ?? 'none';
  const chunks = cpioChunks(tree, mtime);
  const raw = Buffer.concat(chunks);
  const initrd = compression === 'gzip' ? gzipSync(raw, { level: 6 }) : compression === 'zstd' ? await zstd(raw) : raw;
  const outRoot = opts.outDir ?? defaultOutDir();
  const finalDir = join(outRoot, def.name);
  const tmpDir = join(outRoot, `.${def.name}.tmp-${process.pid}-${randomBytes(3).toString('hex')}`);
  await mkdir(tmpDir, { recursive: true });
  const forget = removeOnInterrupt(tmpDir);
  try {
    await writeFile(join(tmpDir, 'vmlinuz'), km.vmlinuz.data!);
    await writeFile(join(tmpDir, 'initrd.img'), initrd);
    emit({ type: 'log', message: `wrote vmlinuz and initrd.img (${initrd.length} bytes); writing the manifest` });
    const manifest = {
      manifestVersion: 1,
      name: def.name,
      definition: { path: opts.definitionPath, sha256: sha256(text) },
      debian: { mirror, suite: def.debian.suite, codename: lock.codename, architecture: def.debian.architecture },
      sourceDateEpoch: mtime,
      kernel: { version: km.version, modules: order, cmdline: def.kernel.cmdline },
      guestRamMB: def.network.guestRamMB,
      ports: [...new Set(def.containers.flatMap((c) => c.ports))].sort((a, b) => a - b),
      compression,
      agent: { sha256: sha256((tree.nodes.get(`${AGENT_DIR}/agent.mjs`) as any).data), runtime: { ...def.agent.runtime, tarballSha256: runtime.tarballSha256 } },
      packages: Object.entries(lock.sets).flatMap(([set, s]) => s.packages.map((p) => ({ set, name: p.name, version: p.version, sha256: p.sha256 }))),
      outputs: {
        vmlinuz: { sha256: sha256(km.vmlinuz.data!), size: km.vmlinuz.data!.length },
        'initrd.img': { sha256: sha256(initrd), size: initrd.length, uncompressedSize: raw.length },
      },
    };
    const manifestText = JSON.stringify(manifest, null, 2) + '\n';
    await writeFile(join(tmpDir, 'manifest.json'), manifestText);
    const sbomSets: Record<string, { roots: string[]; packages: SbomPackage[] }> = {};
    for (const [name, set] of Object.entries(lock.sets)) {
      const available = new Map(set.packages.map((p) => [p.name, (controls.get(p.sha256)?.['Provides'] ?? '').split(',').map((x) => x.trim().split(/[\s(]/)[0]).filter(Boolean)]));
      sbomSets[name] = { roots: set.roots, packages: set.packages.map((p) => ({ name: p.name, version: p.version, architecture: debArchitecture(p.filename), sha256: p.sha256, depends: resolvedDepends(controls.get(p.sha256) ?? {}, available).filter((d) => d !== p.name) })) };
    }
    const sbomText = sbomJson({
      image: def.name, scionVersion: SCION_VERSION, codename: lock.codename ?? def.debian.suite, sourceDateEpoch: mtime, sets: sbomSets,
      runtime: { ...def.agent.runtime, tarballSha256: runtime.tarballSha256 }, agentBundleSha256: sha256(agentBundle),
      containers: def.containers.map((c) => ({ name: c.name, set: 'packages' in c.image ? `container:${c.name}` : undefined, layers: containerImages.find((x) => x.name === c.name)?.layers })),
    });
    await writeFile(join(tmpDir, 'sbom.cdx.json'), sbomText);
    const lockText = serialiseLock(lock);
    const provenanceText = provenanceJson({
      image: def.name, scionVersion: SCION_VERSION,
      outputs: [['vmlinuz', km.vmlinuz.data!], ['initrd.img', initrd], ['manifest.json', manifestText], ['sbom.cdx.json', sbomText]].map(([name, data]) => ({ name: name as string, sha256: sha256(data as Buffer | string) })),
      definition: { path: basename(defPath), sha256: sha256(text) }, lock: { path: basename(lockPath), sha256: sha256(lockText) },
      compression, sourceDateEpoch: mtime, mirror, suite: def.debian.suite, codename: lock.codename ?? def.debian.suite, architecture: def.debian.architecture,
      packages: [...all.values()], runtime: { ...def.agent.runtime, url: runtimeUrl(def.agent.runtime), sha256: runtime.tarballSha256 },
      containerImages, userFiles,
    });
    await writeFile(join(tmpDir, 'provenance.intoto.json'), provenanceText);
    const outputs: BuildOutput[] = ([['vmlinuz', km.vmlinuz.data!], ['initrd.img', initrd], ['manifest.json', manifestText], ['sbom.cdx.json', sbomText], ['provenance.intoto.json', provenanceText]] as [string, Buffer | string][])
      .map(([name, data]) => ({ name, path: join(finalDir, name), size: Buffer.byteLength(data), sha256: sha256(data) }));
    await replaceDirectory(tmpDir, finalDir);
    const newLockText = lockText;
    const oldLockText = await readFile(lockPath, 'utf8').catch(() => '');
    const lockChanged = newLockText !== oldLockText;
    if (lockChanged) await writeLock(lockPath, lock);
    step('write');
    return {
      name: def.name,
      dir: finalDir,
      vmlinuz: join(finalDir, 'vmlinuz'),
      initrd: join(finalDir, 'initrd.img'),
      manifest: join(finalDir, 'manifest.json'),
      sbom: join(finalDir, 'sbom.cdx.json'),
      provenance: join(finalDir, 'provenance.intoto.json'),
      outputs,
      largest,
      stripped,
      lock: lockPath,
      lockChanged,
      sha256: { vmlinuz: manifest.outputs.vmlinuz.sha256, initrd: manifest.outputs['initrd.img'].sha256 },
      sizes: { vmlinuz: km.vmlinuz.data!.length, initrd: initrd.length, initrdUncompressed: raw.length },
      packages: all.size,
      stepsMs: steps,
    };
  } catch (e) {
    await rm(tmpDir, { recursive: true, force: true });
    throw e;
  } finally {
    forget();
  }
}

async function zstd(data: Buffer): Promise<Buffer> {
  return runBuffer('zstd', ['-q', '-c', '-9', '-T1', '--no-check'], data, { code: 'E_COMPRESS', what: 'zstd (initramfs compression)' });
}
