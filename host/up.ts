/**
 * `up`: from an image definition to running clones. The policy of when a
 * frozen template is reused lives here, in the library, so every caller
 * (CLI, tests, the front door) gets the same answer: reused when it was
 * frozen from this very build (same manifest hash) with the same networking
 * and disk kind, re-made otherwise. Another process making the same
 * template is waited for, not raced.
 */
import type { BuildEvent } from '../builder/build.ts';
import { existsSync } from 'node:fs';
import { resolveImage, sourceKind } from './image-source.ts';
import { ensureSnapshotTemplate, snapshotKindOf } from './machine/snapshot.ts';
import { ScionError } from '../common/errors.ts';
import { validName, templateName, type ValidName } from '../common/names.ts';
import { loadImage, type ImageArtifacts } from './image.ts';
import { bootTemplate, freeze, checkTemplate, type TemplateMeta } from './template.ts';
import { fork, type CloneResult } from './clone.ts';
import { removeVm } from './lifecycle.ts';
import { Machine, RecordError } from './machine/machine.ts';
import type { NetMode } from './machine/machine.ts';

/** The template's options (its name is always <image>-tpl here) and the clones'. */
export interface UpOptions extends Omit<TemplateOptions, 'name'> {
  clones: number;
  parallel?: number;
}

export type TemplateDecision = { reuse: true } | { reuse: false; why: string };

/** Whether a frozen template can serve this build. Pure. */
export function templateDecision(
  meta: TemplateMeta | undefined,
  img: Pick<ImageArtifacts, 'manifestSha256'>,
  want: { net?: NetMode; disk?: string },
): TemplateDecision {
  if (!meta) return { reuse: false, why: 'no frozen template' };
  if (meta.manifestSha256 !== img.manifestSha256) return { reuse: false, why: 'it is from another build of the image' };
  if (JSON.stringify(meta.net) !== JSON.stringify(want.net ?? { mode: 'user' })) return { reuse: false, why: 'it has other networking' };
  if (!!meta.disk !== !!want.disk) return { reuse: false, why: want.disk ? 'it has no disk' : 'it has a disk' };
  return { reuse: true };
}

/** Wait while another live scion process is making `name`; its handle once it is done (or gone). */
async function waitForOtherMaker(name: ValidName, log?: (m: string) => void, timeoutMs = 600_000): Promise<Machine | undefined> {
  const end = Date.now() + timeoutMs;
  let said = false;
  for (;;) {
    const m = await Machine.find(name);
    if (!m?.beingMadeElsewhere()) return m;
    const maker = m.info().making!.ownerPid;
    if (!said) {
      log?.(`template ${name} is being made by scion process ${maker}; waiting for it`);
      said = true;
    }
    if (Date.now() > end) throw new ScionError('E_VM_BUSY', `template ${name} is still being made by scion process ${maker}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** What `up` made: the template (made or reused), the running clones, the time it all took. */
export interface UpResult {
  template: TemplateResult;
  clones: CloneResult[];
  totalMs: number;
}

/** What `ensureTemplate` takes: the template's name (or how to name it from the image), networking, disk, progress log. */
export interface TemplateOptions {
  /** the template's name, or how to name it from the image (default <image>-tpl) */
  name?: string | ((img: ImageArtifacts) => string);
  disk?: string;
  net?: NetMode;
  log?: (m: string) => void;
  onBuildEvent?: (e: BuildEvent) => void;
  /** plain HTTP to a registry that is not on loopback (an OCI reference as the image) */
  insecure?: boolean;
  /** where pulled images are kept (default the user's cache) */
  cacheDir?: string;
}

/** The frozen template `ensureTemplate` made or reused, and whether it was reused. */
export interface TemplateResult {
  name: ValidName;
  image: string;
  accel: string;
  generation: number;
  freezeMs: number;
  reused: boolean;
}

/**
 * A frozen template of the image from `source` (a definition, a built image
 * directory or an OCI reference, pulled into the cache): the one named so if
 * it was frozen from this very image with the same networking and disk kind,
 * else made (booted and frozen) now. Another process making it is waited for.
 */
export async function ensureTemplate(source: string, opts: TemplateOptions = {}): Promise<TemplateResult> {
  const log = opts.log ?? (() => undefined);
  const { dir } = await resolveImage(source, { onBuildEvent: opts.onBuildEvent, log, insecure: opts.insecure, cacheDir: opts.cacheDir });
  const img = await loadImage(dir);
  const tplName =
    typeof opts.name === 'function'
      ? validName(opts.name(img), 'template')
      : opts.name !== undefined
        ? validName(opts.name, 'template')
        : templateName(img.name);
  let existing: Machine | undefined;
  try {
    existing = await waitForOtherMaker(tplName, log);
  } catch (e) {
    if (!(e instanceof RecordError)) throw e;
    // a record this scion cannot trust (damaged, or from an older scion): removed by name, then made anew
    log(`template ${tplName}: ${e.message}; removing it`);
    await removeVm(tplName);
  }
  let meta: TemplateMeta | undefined;
  if (existing?.info().frozen) {
    let found: TemplateMeta | undefined;
    try {
      found = (await checkTemplate(tplName)).meta;
    } catch (e) {
      log(`template ${tplName} cannot be used (${(e as Error).message})`);
    }
    const d = templateDecision(found, img, opts);
    if (d.reuse) meta = found;
    else log(`template ${tplName}: ${d.why}; re-making it`);
  }
  let reused = !!meta;
  if (!meta) {
    if (existing) await removeVm(tplName);
    log(`booting template ${tplName} (${img.name})…`);
    const tBoot = performance.now();
    try {
      const h = await bootTemplate(img, { name: tplName, disk: opts.disk, net: opts.net, log });
      log(`template ready in ${((performance.now() - tBoot) / 1000).toFixed(1)} s; freezing`);
      meta = await freeze(h, img, log);
    } catch (e) {
      if ((e as ScionError).code !== 'E_VM_EXISTS') throw e;
      // another process started the same template between our look and our boot: use theirs
      await waitForOtherMaker(tplName, log);
      meta = (await checkTemplate(tplName)).meta;
      reused = true;
    }
  } else log(`reusing frozen template ${tplName}`);
  return { name: tplName, image: img.dir, accel: meta.accel, generation: meta.generation, freezeMs: meta.freezeMs, reused };
}

/** From an image definition, a built image directory, an image's OCI reference or a template snapshot's (pulled, not booted) to running clones. */
export async function up(source: string, opts: UpOptions): Promise<UpResult> {
  const log = opts.log ?? (() => undefined);
  const t0 = performance.now();
  const template = (await snapshotTemplateFor(source, opts)) ?? (await ensureTemplate(source, opts));
  log(`forking ${opts.clones} clone(s)…`);
  const clones = await fork(template.name, { n: opts.clones, parallel: opts.parallel ?? 2, log });
  return { template, clones, totalMs: Math.round(performance.now() - t0) };
}

/** The frozen template a template snapshot reference stands for (pulled once per node), or undefined when `source` is not one. */
async function snapshotTemplateFor(source: string, opts: UpOptions): Promise<TemplateResult | undefined> {
  if (sourceKind(source, existsSync(source)) !== 'reference') return undefined;
  if ((await snapshotKindOf(source, { insecure: opts.insecure })) !== 'template') return undefined;
  if (opts.disk || opts.net)
    throw new ScionError('E_USAGE', `${source} is a template snapshot: it brings its own networking and has no disk`, {
      hint: 'drop --disk, --bridge and --tap, or up the image the template was made from',
    });
  const t = await ensureSnapshotTemplate(source, { insecure: opts.insecure, log: opts.log });
  const { meta } = await checkTemplate(t.name);
  opts.log?.(t.pulled ? `pulled template snapshot ${source} as ${t.name}` : `reusing ${t.name}, pulled from ${source} before`);
  return { name: t.name, image: meta.image, accel: meta.accel, generation: meta.generation, freezeMs: meta.freezeMs, reused: !t.pulled };
}
