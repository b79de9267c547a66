/**
 * The write stage: the initramfs bytes, manifest.json (the typed
 * ImageManifest of common/image-layout.ts), the SBOM and the provenance,
 * written into a temporary directory and swapped in whole, so a failed build
 * leaves the previous artifacts untouched; then the lock.
 */
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { removeOnInterrupt } from '../common/interrupt.ts';
import { replaceDirectory } from '../common/safe-fs.ts';
import { runBuffer } from '../common/run.ts';
import { SCION_VERSION } from '../common/version.ts';
import { IMAGE_FILES, imagePaths, type ImageFile, type ImageManifest } from '../common/image-layout.ts';
import { sha256 } from '../common/digest.ts';
import type { ImageDefinition } from './schema.ts';
import { serialiseLock, writeLock, type Lockfile, type LockedPackage } from './lock.ts';
import { cpioChunks } from './cpio.ts';
import { AGENT_DIR } from './init.ts';
import { sbomJson, debArchitecture, resolvedDepends, type SbomPackage } from './sbom.ts';
import { provenanceJson } from './provenance.ts';
import type { GuestTree } from './guest.ts';

/** The initramfs compression: none (fastest boot under TCG), gzip or zstd. */
export type Compression = 'none' | 'gzip' | 'zstd';

/** One file of the output directory. */
export interface BuildOutput {
  name: ImageFile;
  path: string;
  size: number;
  sha256: string;
}

export interface WriteInput {
  def: ImageDefinition;
  definitionPath: string;
  defPath: string;
  definitionText: string;
  lockPath: string;
  lock: Lockfile;
  packages: LockedPackage[];
  controls: Map<string, Record<string, string>>;
  guest: GuestTree;
  /** the agent's runtime package, as locked */
  runtime: { package: string; version: string; sha256: string };
  mirror: string;
  compression: Compression;
  sourceDateEpoch: number;
  outRoot: string;
  log: (m: string) => void;
}

export interface Written {
  dir: string;
  outputs: BuildOutput[];
  manifest: ImageManifest;
  lockChanged: boolean;
  sizes: { vmlinuz: number; initrd: number; initrdUncompressed: number };
}

/** manifest.json of this build. Pure. */
export function imageManifest(i: WriteInput, initrd: Buffer, rawSize: number): ImageManifest {
  const { def, guest } = i;
  return {
    manifestVersion: 1,
    name: def.name,
    definition: { path: i.definitionPath, sha256: sha256(i.definitionText) },
    debian: { mirror: i.mirror, suite: def.debian.suite, codename: i.lock.codename, architecture: def.debian.architecture },
    sourceDateEpoch: i.sourceDateEpoch,
    kernel: { version: guest.kernel.version, modules: guest.kernel.modules, cmdline: def.kernel.cmdline },
    guestRamMB: def.network.guestRamMB,
    ports: [...new Set(def.containers.flatMap((c) => c.ports))].sort((a, b) => a - b),
    compression: i.compression,
    agent: { sha256: sha256((guest.tree.nodes.get(`${AGENT_DIR}/agent.mjs`) as { data: Buffer }).data), runtime: i.runtime },
    packages: Object.entries(i.lock.sets).flatMap(([set, s]) => s.packages.map((p) => ({ set, name: p.name, version: p.version, sha256: p.sha256 }))),
    outputs: {
      vmlinuz: { sha256: sha256(guest.kernel.vmlinuz), size: guest.kernel.vmlinuz.length },
      'initrd.img': { sha256: sha256(initrd), size: initrd.length, uncompressedSize: rawSize },
    },
  };
}

/** The SBOM's package sets: each package with what its Depends resolved to within its set. Pure. */
function sbomSets(lock: Lockfile, controls: Map<string, Record<string, string>>): Record<string, { roots: string[]; packages: SbomPackage[] }> {
  const out: Record<string, { roots: string[]; packages: SbomPackage[] }> = {};
  for (const [name, set] of Object.entries(lock.sets)) {
    const available = new Map(
      set.packages.map((p) => [
        p.name,
        (controls.get(p.sha256)?.['Provides'] ?? '')
          .split(',')
          .map((x) => x.trim().split(/[\s(]/)[0])
          .filter(Boolean),
      ]),
    );
    out[name] = {
      roots: set.roots,
      packages: set.packages.map((p) => ({
        name: p.name,
        version: p.version,
        architecture: debArchitecture(p.filename),
        sha256: p.sha256,
        depends: resolvedDepends(controls.get(p.sha256) ?? {}, available).filter((d) => d !== p.name),
      })),
    };
  }
  return out;
}

async function compress(raw: Buffer, c: Compression): Promise<Buffer> {
  if (c === 'gzip') return gzipSync(raw, { level: 6 });
  if (c === 'zstd') return runBuffer('zstd', ['-q', '-c', '-9', '-T1', '--no-check'], raw, { code: 'E_COMPRESS', what: 'zstd (initramfs compression)' });
  return raw;
}

/** Every output's bytes, in IMAGE_FILES order. */
async function outputBytes(i: WriteInput): Promise<{ files: Record<ImageFile, Buffer | string>; manifest: ImageManifest; rawSize: number; lockText: string }> {
  const { def, guest } = i;
  const raw = Buffer.concat(cpioChunks(guest.tree, i.sourceDateEpoch));
  const initrd = await compress(raw, i.compression);
  const manifest = imageManifest(i, initrd, raw.length);
  const manifestText = JSON.stringify(manifest, null, 2) + '\n';
  const sbomText = sbomJson({
    image: def.name,
    scionVersion: SCION_VERSION,
    codename: i.lock.codename ?? def.debian.suite,
    sourceDateEpoch: i.sourceDateEpoch,
    sets: sbomSets(i.lock, i.controls),
    runtime: { package: i.runtime.package, version: i.runtime.version },
    agentBundleSha256: sha256(guest.agentBundle),
    containers: def.containers.map((c) => ({
      name: c.name,
      set: 'packages' in c.image ? `container:${c.name}` : undefined,
      layers: guest.containerImages.find((x) => x.name === c.name)?.layers,
    })),
  });
  const lockText = serialiseLock(i.lock);
  const subjects: [string, Buffer | string][] = [
    ['vmlinuz', guest.kernel.vmlinuz],
    ['initrd.img', initrd],
    ['manifest.json', manifestText],
    ['sbom.cdx.json', sbomText],
  ];
  const provenanceText = provenanceJson({
    image: def.name,
    scionVersion: SCION_VERSION,
    outputs: subjects.map(([name, data]) => ({ name, sha256: sha256(data) })),
    definition: { path: basename(i.defPath), sha256: sha256(i.definitionText) },
    lock: { path: basename(i.lockPath), sha256: sha256(lockText) },
    compression: i.compression,
    sourceDateEpoch: i.sourceDateEpoch,
    mirror: i.mirror,
    suite: def.debian.suite,
    codename: i.lock.codename ?? def.debian.suite,
    architecture: def.debian.architecture,
    packages: i.packages,
    containerImages: guest.containerImages,
    userFiles: guest.userFiles,
  });
  const files = {
    vmlinuz: guest.kernel.vmlinuz,
    'initrd.img': initrd,
    'manifest.json': manifestText,
    'sbom.cdx.json': sbomText,
    'provenance.intoto.json': provenanceText,
  };
  return { files, manifest, rawSize: raw.length, lockText };
}

/** Write every output into a temporary directory, swap it in as outRoot/<name>, then the lock if it changed. */
export async function writeOutputs(i: WriteInput): Promise<Written> {
  const { files, manifest, rawSize, lockText } = await outputBytes(i);
  const finalDir = join(i.outRoot, i.def.name);
  const tmpDir = join(i.outRoot, `.${i.def.name}.tmp-${process.pid}-${randomBytes(3).toString('hex')}`);
  await mkdir(tmpDir, { recursive: true });
  const forget = removeOnInterrupt(tmpDir);
  try {
    const tmpPaths = imagePaths(tmpDir);
    for (const f of IMAGE_FILES) await writeFile(tmpPaths[f], files[f]);
    i.log(`wrote vmlinuz and initrd.img (${Buffer.byteLength(files['initrd.img'])} bytes), the manifest, SBOM and provenance; swapping them in`);
    const finalPaths = imagePaths(finalDir);
    const outputs = IMAGE_FILES.map((name) => ({ name, path: finalPaths[name], size: Buffer.byteLength(files[name]), sha256: sha256(files[name]) }));
    await replaceDirectory(tmpDir, finalDir);
    const lockChanged = lockText !== (await readFile(i.lockPath, 'utf8').catch(() => ''));
    if (lockChanged) await writeLock(i.lockPath, i.lock);
    return {
      dir: finalDir,
      outputs,
      manifest,
      lockChanged,
      sizes: { vmlinuz: i.guest.kernel.vmlinuz.length, initrd: Buffer.byteLength(files['initrd.img']), initrdUncompressed: rawSize },
    };
  } catch (e) {
    await rm(tmpDir, { recursive: true, force: true });
    throw e;
  } finally {
    forget();
  }
}
