/**
 * `scion build`: definition -> lock -> packages -> guest tree -> artifacts,
 * one stage each: read the definition (here), resolve the lock and fetch and
 * extract the packages (packages.ts), assemble the guest (guest.ts), write the
 * outputs (outputs.ts). The effects (network, cache, disk) are in those
 * stages; every decision is made by the pure modules they call. Outputs are
 * swapped in whole: a failed build leaves the previous artifacts untouched.
 */
import { readFile } from 'node:fs/promises';
import { dirname, join, resolve as resolvePath, basename } from 'node:path';
import { BuildError } from '../common/errors.ts';
import { config } from '../common/config.ts';
import type { ImageManifest } from '../common/image-layout.ts';
import { BlobCache } from './cache.ts';
import { DebianArchive, chooseMirror } from './debian/archive.ts';
import { parseDefinition, type ImageDefinition } from './schema.ts';
import { readLock, type Lockfile } from './lock.ts';
import type { Progress } from './fetch.ts';
import { bundleAgent } from './agent-bundle.ts';
import { packageSets, resolveLock, lockedPackages, fetchAndExtract, agentRuntime } from './packages.ts';
import { assembleGuest, type PackageContribution } from './guest.ts';
import { writeOutputs, type BuildOutput, type Compression } from './outputs.ts';

export type { BuildOutput, Compression };
export { packageSets } from './packages.ts';
export { bundleAgent, bundleAgentFromSource, prebuiltAgentPath } from './agent-bundle.ts';

/** A build's progress event (a step started or ended, a download's bytes), for `onEvent`. */
export type BuildEvent =
  | { type: 'step'; step: string; ms: number }
  | { type: 'download'; url: string; received: number; total?: number; done: boolean; ms: number }
  | { type: 'log'; message: string };

/** What `build` takes: the definition, where outputs go, the lock policy, the initramfs compression, a progress callback. */
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

/** What `build` made: the image directory, its outputs (path, size, SHA-256), the largest files, what stripping saved. */
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
  /** files the exclude globs left out (defaults: static libraries, headers; and the definition's) */
  excluded: { files: number; bytes: number };
  /** what each package contributes to the initramfs (bytes, files), largest first */
  packageSizes: PackageContribution[];
  lock: string;
  lockChanged: boolean;
  sha256: { vmlinuz: string; initrd: string };
  sizes: { vmlinuz: number; initrd: number; initrdUncompressed: number };
  packages: number;
  stepsMs: Record<string, number>;
}

/** ./out of the working directory (a pipeline's workspace, the user's project), as `scion build --out` defaults. */
export function defaultOutDir(): string {
  return resolvePath('out');
}

interface Definition {
  defPath: string;
  text: string;
  def: ImageDefinition;
  lockPath: string;
  oldLock?: Lockfile;
}

/** Stage 0: the definition, parsed, and its lock (none with --update-lock; required with --locked). */
async function readDefinition(opts: BuildOptions): Promise<Definition> {
  if (opts.locked && opts.updateLock) throw new BuildError('E_USAGE', '--locked and --update-lock contradict each other');
  const defPath = resolvePath(opts.definitionPath);
  let text: string;
  try {
    text = await readFile(defPath, 'utf8');
  } catch (e) {
    throw new BuildError('E_DEFINITION_MISSING', `cannot read ${opts.definitionPath}: ${(e as NodeJS.ErrnoException).code}`, {
      hint: 'pass the path of an image definition, e.g. images/minimal.yaml',
    });
  }
  const def = parseDefinition(text, opts.definitionPath);
  const lockPath = join(dirname(defPath), basename(defPath).replace(/\.ya?ml$/, '') + '.scion.lock');
  const oldLock = opts.updateLock ? undefined : await readLock(lockPath);
  if (opts.locked && !oldLock)
    throw new BuildError('E_LOCK_CHANGED', `${opts.definitionPath}: --locked, but there is no lock file ${basename(lockPath)}`, {
      hint: 'build once without --locked and commit the lock',
    });
  return { defPath, text, def, lockPath, oldLock };
}

/** Build an image definition into `outDir/<name>/` (kernel, initramfs, manifest, SBOM, provenance) from signed Debian packages; byte-for-byte reproducible, lock written or checked. */
export async function build(opts: BuildOptions): Promise<BuildResult> {
  const emit = opts.onEvent ?? (() => undefined);
  const log = (message: string) => emit({ type: 'log', message });
  const steps: Record<string, number> = {};
  let t = performance.now();
  const step = (name: string) => {
    const now = performance.now();
    steps[name] = Math.round(now - t);
    emit({ type: 'step', step: name, ms: steps[name] });
    t = now;
  };

  const { defPath, text, def, lockPath, oldLock } = await readDefinition(opts);
  const cache = new BlobCache(opts.cacheDir);
  const mirror = await chooseMirror(opts.definitionPath, opts.mirror, def.debian.mirror);
  const onProgress: Progress = (p) => emit({ type: 'download', ...p });
  const archive = new DebianArchive({
    mirror,
    suite: oldLock?.codename ?? def.debian.suite,
    components: def.debian.components,
    architecture: def.debian.architecture,
    cache,
    onProgress,
    log,
  });

  const sets = packageSets(def);
  const lock = await resolveLock({ def, sets, oldLock, archive, locked: opts.locked, definitionPath: opts.definitionPath, lockPath });
  step('resolve');

  const packages = [...lockedPackages(lock).values()];
  const { files, controls } = await fetchAndExtract(archive, cache, packages, (s) => {
    if (s === 'download') for (const h of cache.corrupt) log(`cached blob ${h} did not match its SHA-256: discarded and fetched again`);
    step(s);
  });

  const guest = await assembleGuest({ def, sets, lock, files, agentBundle: await bundleAgent(), definitionPath: opts.definitionPath, defPath, log });
  files.clear();
  step('assemble');

  const w = await writeOutputs({
    def,
    definitionPath: opts.definitionPath,
    defPath,
    definitionText: text,
    lockPath,
    lock,
    packages,
    controls,
    guest,
    runtime: agentRuntime(lock, def.agent.runtime),
    mirror,
    compression: opts.compression ?? 'none',
    sourceDateEpoch: opts.sourceDateEpoch ?? config().sourceDateEpoch,
    outRoot: opts.outDir ?? defaultOutDir(),
    log,
  });
  step('write');
  return buildResult(w.manifest, w.dir, w, {
    lockPath,
    packages: packages.length,
    stepsMs: steps,
    largest: guest.largest,
    stripped: guest.stripped,
    excluded: guest.excluded,
    packageSizes: guest.packages,
  });
}

function buildResult(
  m: ImageManifest,
  dir: string,
  w: Awaited<ReturnType<typeof writeOutputs>>,
  more: {
    lockPath: string;
    packages: number;
    stepsMs: Record<string, number>;
    largest: BuildResult['largest'];
    stripped: BuildResult['stripped'];
    excluded: BuildResult['excluded'];
    packageSizes: BuildResult['packageSizes'];
  },
): BuildResult {
  const path = (name: string) => join(dir, name);
  return {
    name: m.name,
    dir,
    vmlinuz: path('vmlinuz'),
    initrd: path('initrd.img'),
    manifest: path('manifest.json'),
    sbom: path('sbom.cdx.json'),
    provenance: path('provenance.intoto.json'),
    outputs: w.outputs,
    largest: more.largest,
    stripped: more.stripped,
    excluded: more.excluded,
    packageSizes: more.packageSizes,
    lock: more.lockPath,
    lockChanged: w.lockChanged,
    sha256: { vmlinuz: m.outputs.vmlinuz.sha256, initrd: m.outputs['initrd.img'].sha256 },
    sizes: w.sizes,
    packages: more.packages,
    stepsMs: more.stepsMs,
  };
}
