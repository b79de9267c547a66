/**
 * `npm run bench`: fork against cold boot and an ordinary full restore,
 * measured side by side in one run (interleaved, since shared machines drift),
 * plus fork phases, memory per clone, freeze and build times.
 * Writes a markdown table to stdout, bench/results/<date>.json, latest.json and latest.svg.
 * Options: --runs N (default 10), --density "1,10,30", --skip-build.
 */
import { readFileSync, writeFileSync, mkdirSync, rmSync, mkdtempSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { build } from '../host/index.ts';
import * as vm from '../host/index.ts';
import { qemuVersion } from '../host/machine/inspect.ts';
import { percentile, summarise, renderSvg, type Summary } from './stats.ts';

const ROOT = resolve(import.meta.dirname, '..');
const { values } = parseArgs({
  options: { runs: { type: 'string', default: '10' }, density: { type: 'string', default: '1,10,30' }, 'skip-build': { type: 'boolean' } },
});
const RUNS = Number(values.runs);
const DENSITY = values.density!.split(',').map(Number);
process.env.SCION_RUN_DIR = mkdtempSync(join(tmpdir(), 'scion-bench-run-'));
process.env.SCION_TEMPLATE_DIR = mkdtempSync(join('/dev/shm', 'scion-bench-tpl-'));
const log = (m: string) => process.stderr.write(`[bench] ${m}\n`);
const scratch: string[] = [process.env.SCION_RUN_DIR!, process.env.SCION_TEMPLATE_DIR!];
const scratchDir = (prefix: string) => {
  const d = mkdtempSync(join(tmpdir(), prefix));
  scratch.push(d);
  return d;
};
const cleanScratch = () => {
  for (const d of scratch) rmSync(d, { recursive: true, force: true });
};

/**
 * Private_Dirty overstates a clone's own memory: tmpfs pages are always
 * "dirty", so template pages that only this clone has touched count as its
 * Private_Dirty although they are the template's page cache. Anonymous counts
 * what is really the clone's: its copy-on-write copies and QEMU's own memory.
 */
function smaps(pid: number): { rssMB: number; pssMB: number; privateDirtyMB: number; anonMB: number } {
  const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(t)?.[1] ?? 0);
  return { rssMB: kb('Rss') / 1024, pssMB: kb('Pss') / 1024, privateDirtyMB: kb('Private_Dirty') / 1024, anonMB: kb('Anonymous') / 1024 };
}

async function removeAllClones() {
  for (const v of await vm.list()) if (v.role === 'clone') await vm.removeVm(v.name);
}

/** 4a: the build with a cold and a warm cache, the artifact sizes; then the templates (shared-file for fork, RAM-in-stream for restore, container kept). */
async function buildAndTemplates(results: any): Promise<vm.ImageArtifacts> {
  // 4a. build, cold and warm cache
  const def = join(ROOT, 'images/web.yaml');
  if (!values['skip-build']) {
    const cache = scratchDir('scion-bench-cache-');
    let t = performance.now();
    await build({ definitionPath: def, cacheDir: cache, outDir: scratchDir('scion-bench-out-') });
    const cold = performance.now() - t;
    t = performance.now();
    await build({ definitionPath: def, cacheDir: cache, outDir: scratchDir('scion-bench-out-') });
    results.buildMs = { coldCache: Math.round(cold), warmCache: Math.round(performance.now() - t) };
    log(`build: cold ${results.buildMs.coldCache} ms, warm ${results.buildMs.warmCache} ms`);
  }
  const b = await build({ definitionPath: def });
  results.sizes = { vmlinuz: b.sizes.vmlinuz, initrd: b.sizes.initrd, initrdUncompressed: b.sizes.initrdUncompressed };
  const img = await vm.loadImage(b.dir);

  // templates: shared-file (for fork) and RAM-in-stream (for ordinary restore)
  const t = performance.now();
  const h = await vm.bootTemplate(img, { name: 'bench-tpl' });
  results.templateBootMs = Math.round(performance.now() - t);
  results.accelerator = h.info().accel;
  const meta = await vm.freeze(h, img);
  results.freezeMs = meta.freezeMs;
  const hs = await vm.bootTemplate(img, { name: 'bench-stream', memory: 'ram' });
  const metaStream = await vm.freeze(hs, img);
  results.freezeStreamMs = metaStream.freezeMs;
  log(`template boot ${results.templateBootMs} ms, freeze ${results.freezeMs} ms (full-RAM stream freeze ${results.freezeStreamMs} ms)`);
  // the same container with on_fork: keep (images/web-keep.yaml): not restarted after a fork
  const imgKeep = await vm.loadImage((await build({ definitionPath: join(ROOT, 'images/web-keep.yaml') })).dir);
  await vm.freeze(await vm.bootTemplate(imgKeep, { name: 'bench-keep-tpl' }), imgKeep);

  return img;
}

/** 1: time to ready, four ways, interleaved. */
async function timeToReady(img: vm.ImageArtifacts, results: any): Promise<Record<string, number[]>> {
  let t: number;
  // 1. time to ready, three ways, interleaved
  const ready = { cold: [] as number[], restore: [] as number[], fork: [] as number[], keep: [] as number[] };
  const agentReady = { fork: [] as number[], restore: [] as number[] };
  for (let i = 0; i < RUNS; i++) {
    t = performance.now();
    const c = await vm.bootTemplate(img, { name: `bench-cold-${i}`, skipIdentity: true });
    ready.cold.push(c.info().timings.bootReadyMs ?? performance.now() - t);
    c.close();
    await vm.removeVm(`bench-cold-${i}`);
    const [r] = await vm.fork('bench-stream', { n: 1 });
    ready.restore.push(r.timings.ready);
    agentReady.restore.push(r.timings.ready - r.timings.containers);
    await removeAllClones();
    const [f] = await vm.fork('bench-tpl', { n: 1 });
    ready.fork.push(f.timings.ready);
    agentReady.fork.push(f.timings.ready - f.timings.containers);
    await removeAllClones();
    const [k] = await vm.fork('bench-keep-tpl', { n: 1 });
    ready.keep.push(k.timings.ready);
    await removeAllClones();
    log(
      `run ${i + 1}/${RUNS}: cold ${ready.cold.at(-1)!.toFixed(0)} ms, restore ${r.timings.ready.toFixed(0)} ms, fork ${f.timings.ready.toFixed(0)} ms, fork (container kept) ${k.timings.ready.toFixed(0)} ms`,
    );
  }
  const rs = { cold: summarise(ready.cold), restore: summarise(ready.restore), fork: summarise(ready.fork), keep: summarise(ready.keep) };
  results.readyMs = rs;
  results.agentReadyMs = { fork: summarise(agentReady.fork), restore: summarise(agentReady.restore) };
  results.ratios = { coldOverFork: +(rs.cold.p50 / rs.fork.p50).toFixed(1), restoreOverFork: +(rs.restore.p50 / rs.fork.p50).toFixed(1) };
  results.samples = ready;

  return ready;
}

/** 2: fork phases, 20 one after another and 10 at once. */
async function forkPhases(results: any): Promise<void> {
  // 2. fork phases: 20 one after another, 10 at once
  const phases = (cs: vm.CloneResult[]) =>
    Object.fromEntries(['spawn', 'restore', 'resume', 'agentSync', 'identity', 'containers', 'ready'].map((k) => [k, summarise(cs.map((c) => c.timings[k]))]));
  const seq: vm.CloneResult[] = [];
  for (let i = 0; i < 20; i++) seq.push(...(await vm.fork('bench-tpl', { n: 1 })));
  await removeAllClones();
  const par = await vm.fork('bench-tpl', { n: 10, parallel: 10 });
  await removeAllClones();
  results.forkPhasesMs = { sequential20: phases(seq), parallel10: phases(par) };
}

/** 3: memory per idle clone, forked and restored, at each density. */
async function memoryPerClone(results: any): Promise<void> {
  // 3. memory per idle clone
  results.memoryMB = { fork: {} as any, restore: {} as any };
  for (const [kind, tpl, counts] of [
    ['fork', 'bench-tpl', DENSITY],
    ['restore', 'bench-stream', DENSITY.filter((n) => n <= 10)],
  ] as const) {
    for (const n of counts) {
      const cs = await vm.fork(tpl, { n, parallel: 1 });
      await new Promise((r) => setTimeout(r, 3000)); // let them settle idle
      const m = cs.map((c) => smaps(c.pid));
      const sum = (k: keyof ReturnType<typeof smaps>) => m.reduce((a, x) => a + x[k], 0);
      results.memoryMB[kind][n] = {
        rssPerClone: +(sum('rssMB') / n).toFixed(1),
        pssPerClone: +(sum('pssMB') / n).toFixed(1),
        privateDirtyPerClone: +(sum('privateDirtyMB') / n).toFixed(1),
        uniquePerClone: +(sum('anonMB') / n).toFixed(1),
        totalPss: +sum('pssMB').toFixed(0),
      };
      log(`${kind} x${n}: ${JSON.stringify(results.memoryMB[kind][n])}`);
      await removeAllClones();
    }
  }
  const largest = (k: 'fork' | 'restore') =>
    results.memoryMB[k][
      Math.max(
        ...Object.keys(results.memoryMB[k])
          .filter((n) => /^\d+$/.test(n))
          .map(Number),
      )
    ];
  const [lf, lr] = [largest('fork'), largest('restore')];
  results.memoryMB.fork.privateDirtyPerClone = lf.privateDirtyPerClone;
  results.memoryMB.restore.privateDirtyPerClone = lr.privateDirtyPerClone;
  results.memoryMB.fork.uniquePerClone = lf.uniquePerClone;
  results.memoryMB.restore.uniquePerClone = lr.uniquePerClone;
  results.clonesIn20GiB = { fork: Math.floor((20 * 1024) / lf.pssPerClone), restore: Math.floor((20 * 1024) / lr.pssPerClone) };
}

/** The targets, each with what was measured and whether it was met. */
function targetsOf(results: any): Record<string, { target: number; actual: number; met: boolean }> {
  const rs = results.readyMs;
  const lf =
    results.memoryMB.fork[
      Math.max(
        ...Object.keys(results.memoryMB.fork)
          .filter((n) => /^\d+$/.test(n))
          .map(Number),
      )
    ];
  return {
    agentReadyP50Ms: { target: 150, actual: results.agentReadyMs.fork.p50, met: results.agentReadyMs.fork.p50 <= 150 },
    httpReadyP50Ms: { target: 600, actual: rs.fork.p50, met: rs.fork.p50 <= 600 },
    coldOverFork: { target: 20, actual: results.ratios.coldOverFork, met: results.ratios.coldOverFork >= 20 },
    privateDirtyPerCloneMB: { target: 40, actual: results.memoryMB.fork.privateDirtyPerClone, met: results.memoryMB.fork.privateDirtyPerClone <= 40 },
    uniquePerCloneMB: { target: 40, actual: lf.uniquePerClone, met: lf.uniquePerClone <= 40 },
    privateDirtyVsRestore: {
      target: 0.25,
      actual: +(results.memoryMB.fork.privateDirtyPerClone / results.memoryMB.restore.privateDirtyPerClone).toFixed(2),
      met: results.memoryMB.fork.privateDirtyPerClone <= results.memoryMB.restore.privateDirtyPerClone / 4,
    },
  };
}

async function main() {
  const results: any = {
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model, cores: cpus().length, qemu: await qemuVersion(), node: process.version },
  };
  const img = await buildAndTemplates(results);
  const ready = await timeToReady(img, results);
  await forkPhases(results);
  await memoryPerClone(results);
  results.targets = targetsOf(results);
  for (const n of ['bench-tpl', 'bench-stream']) await vm.removeVm(n);
  cleanScratch();

  const out = join(ROOT, 'bench/results');
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, `${results.date.slice(0, 10)}.json`), JSON.stringify(results, null, 2) + '\n');
  writeFileSync(join(out, 'latest.json'), JSON.stringify(results, null, 2) + '\n');
  writeFileSync(join(out, 'latest.svg'), renderSvg(ready));
  console.log(markdown(results));
}

function markdown(r: any): string {
  const row = (name: string, s: Summary) => `| ${name} | ${s.p50.toFixed(0)} | ${s.p95.toFixed(0)} | ${s.n} |`;
  const t = r.targets;
  const mark = (x: any, unit: string) =>
    `${x.actual}${unit} (target ${x.target}${unit}: ${x.met ? 'met' : `missed by ${(Math.abs(x.actual - x.target)).toFixed(1)}${unit}`})`;
  return [
    `## scion bench, ${r.date.slice(0, 10)}: ${r.machine.cpu}, ${r.machine.cores} cores, ${r.accelerator.toUpperCase()}, ${r.machine.qemu}`,
    '',
    '| time to ready (images/web.yaml, HTTP serving) | p50 ms | p95 ms | runs |',
    '|---|---|---|---|',
    row('cold boot', r.readyMs.cold),
    row('ordinary restore (RAM in the stream)', r.readyMs.restore),
    row('scion fork', r.readyMs.fork),
    ...(r.readyMs.keep ? [row('scion fork, container kept (on_fork: keep, web-keep.yaml)', r.readyMs.keep)] : []),
    '',
    `cold/fork ${r.ratios.coldOverFork}x, restore/fork ${r.ratios.restoreOverFork}x; fork to agent ready (identity applied) p50 ${r.agentReadyMs.fork.p50.toFixed(0)} ms, p95 ${r.agentReadyMs.fork.p95.toFixed(0)} ms`,
    '',
    '| fork phase (ms) | 20 sequential p50 | p95 | 10 at once p50 | p95 |',
    '|---|---|---|---|---|',
    ...Object.keys(r.forkPhasesMs.sequential20).map(
      (k) =>
        `| ${k} | ${r.forkPhasesMs.sequential20[k].p50.toFixed(0)} | ${r.forkPhasesMs.sequential20[k].p95.toFixed(0)} | ${r.forkPhasesMs.parallel10[k].p50.toFixed(0)} | ${r.forkPhasesMs.parallel10[k].p95.toFixed(0)} |`,
    ),
    '',
    '| idle clones | kind | RSS/clone MB | PSS/clone MB | Private_Dirty/clone MB | unique (Anonymous)/clone MB | total PSS MB |',
    '|---|---|---|---|---|---|---|',
    ...(['fork', 'restore'] as const).flatMap((k) =>
      Object.entries(r.memoryMB[k])
        .filter(([n]) => /^\d+$/.test(n))
        .map(([n, m]: any) => `| ${n} | ${k} | ${m.rssPerClone} | ${m.pssPerClone} | ${m.privateDirtyPerClone} | ${m.uniquePerClone} | ${m.totalPss} |`),
    ),
    '',
    `idle clones in 20 GiB (by PSS): fork ${r.clonesIn20GiB.fork}, restore ${r.clonesIn20GiB.restore}`,
    `template boot ${r.templateBootMs} ms; freeze ${r.freezeMs} ms (full-RAM freeze ${r.freezeStreamMs} ms)` +
      (r.buildMs ? `; build cold cache ${r.buildMs.coldCache} ms, warm ${r.buildMs.warmCache} ms` : ''),
    `artifacts: vmlinuz ${(r.sizes.vmlinuz / 1048576).toFixed(1)} MiB, initrd.img ${(r.sizes.initrd / 1048576).toFixed(1)} MiB`,
    '',
    'targets:',
    `- fork to agent ready p50: ${mark(t.agentReadyP50Ms, ' ms')}`,
    `- fork to HTTP serving p50: ${mark(t.httpReadyP50Ms, ' ms')}`,
    `- cold boot / fork: ${mark(t.coldOverFork, 'x')}`,
    `- Private_Dirty per idle clone: ${mark(t.privateDirtyPerCloneMB, ' MB')}`,
    `- unique memory (Anonymous) per idle clone: ${mark(t.uniquePerCloneMB, ' MB')}`,
    `- fork / restore Private_Dirty: ${mark(t.privateDirtyVsRestore, '')}`,
  ].join('\n');
}

void percentile;
main().catch(async (e) => {
  console.error(e);
  for (const v of await vm.list().catch(() => [])) await vm.removeVm(v.name).catch((e) => console.error(`cleanup: ${v.name}: ${e.message}`));
  cleanScratch();
  process.exit(1);
});
