/**
 * npm run bench:snapshot [-- --runs N]
 *
 * The first clone answering HTTP on a fresh node (its own empty run,
 * template and cache roots), three ways, interleaved in one run:
 *   (a) image:    pull the image from the registry, boot, freeze, fork (today's DaemonSet path)
 *   (b) snapshot: pull the template snapshot, fork
 *   (c) build:    build the image from Debian packages (empty cache), boot, freeze, fork
 * what the snapshot costs on the wire: the artifact against guest RAM,
 * a second push of the same template against the first; and a hibernated
 * idle web clone: its size on disk, resume to HTTP against fork to HTTP
 * (interleaved on one node).
 * The registry is Debian's docker-registry on loopback (test/support).
 * Writes bench/results/snapshot-latest.json.
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tmpdir, cpus } from 'node:os';
import { summarise } from './stats.ts';
import { startRegistry } from '../test/support/registry.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '2' } } });
const runs = Number(values.runs);
const ROOT = resolve(import.meta.dirname, '..');
const vm = await import('../host/index.ts');
const log = (m: string) => process.stderr.write(`[bench:snapshot] ${m}\n`);

/** A fresh node: its own roots, set in the environment the library reads at each call. */
function freshNode(tag: string): () => Promise<void> {
  const keep = { run: process.env.SCION_RUN_DIR, tpl: process.env.SCION_TEMPLATE_DIR, cache: process.env.XDG_CACHE_HOME };
  const run = mkdtempSync(join(tmpdir(), `scion-bench-${tag}-run-`));
  const tpl = mkdtempSync(join('/dev/shm', `scion-bench-${tag}-tpl-`));
  const cache = mkdtempSync(join(tmpdir(), `scion-bench-${tag}-cache-`));
  Object.assign(process.env, { SCION_RUN_DIR: run, SCION_TEMPLATE_DIR: tpl, XDG_CACHE_HOME: cache });
  return async () => {
    for (const v of await vm.list()) await vm.removeVm(v.name, { force: true });
    for (const d of [run, tpl, cache]) rmSync(d, { recursive: true, force: true });
    for (const [k, v] of [
      ['SCION_RUN_DIR', keep.run],
      ['SCION_TEMPLATE_DIR', keep.tpl],
      ['XDG_CACHE_HOME', keep.cache],
    ] as const)
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
  };
}

/** Fork one clone of `template` and wait for its HTTP answer: ms from `t0`. */
async function firstAnswer(template: string, t0: number): Promise<number> {
  const [c] = await vm.fork(template, { n: 1 });
  for (;;) {
    const ok = await fetch(`http://127.0.0.1:${c.ports['8080']}/`).then(
      (r) => r.ok,
      () => false,
    );
    if (ok) return performance.now() - t0;
    await new Promise((r) => setTimeout(r, 20));
  }
}

// the accelerator is known here (TCG): a fresh node's one-off KVM probe would only add to (a) and (c)
process.env.SCION_ACCEL ??= 'tcg';
/** On one node: fork to HTTP, and a hibernated idle clone's bytes on disk and resume to HTTP, `n` of each interleaved. */
async function hibernateFigures(n: number) {
  const done = freshNode('hib');
  const out = mkdtempSync(join(tmpdir(), 'scion-bench-hib-'));
  process.env.SCION_STATE_DIR = mkdtempSync(join(tmpdir(), 'scion-bench-state-'));
  try {
    const img = await vm.loadImage((await vm.build({ definitionPath: join(ROOT, 'images/web.yaml'), outDir: out })).dir);
    await vm.freeze(await vm.bootTemplate(img, { name: 'web-tpl' }), img);
    const fork: number[] = [];
    const resume: number[] = [];
    const bytes: number[] = [];
    for (let i = 0; i < n; i++) {
      fork.push(await firstAnswer('web-tpl', performance.now()));
      const [c] = await vm.fork('web-tpl', { n: 1 });
      await new Promise((r) => setTimeout(r, 3000)); // idle
      const h = await (await vm.Machine.open(c.name)).hibernate();
      bytes.push(h.stateBytes);
      const t0 = performance.now();
      (await vm.Machine.resumeHibernated(c.name)).close();
      while (
        !(await fetch(`http://127.0.0.1:${c.ports['8080']}/`).then(
          (r) => r.ok,
          () => false,
        ))
      )
        await new Promise((r) => setTimeout(r, 20));
      resume.push(performance.now() - t0);
    }
    return { stateBytes: summarise(bytes), resumeToHttpMs: summarise(resume), forkToHttpMs: summarise(fork) };
  } finally {
    rmSync(out, { recursive: true, force: true });
    await done();
    rmSync(process.env.SCION_STATE_DIR!, { recursive: true, force: true });
    delete process.env.SCION_STATE_DIR;
  }
}

const registry = await startRegistry();
const imageRef = `${registry.host}/bench/web:1`;
const snapRef = `${registry.host}/bench/web-tpl:1`;
const results: Record<string, unknown> = { at: new Date().toISOString(), machine: { cpu: cpus()[0]?.model, cores: cpus().length } };
try {
  // node A: build, push the image; boot, freeze, push the template
  const a = freshNode('a');
  const out = mkdtempSync(join(tmpdir(), 'scion-bench-out-'));
  try {
    const built = await vm.build({ definitionPath: join(ROOT, 'images/web.yaml'), outDir: out });
    await vm.push(built.dir, imageRef);
    const img = await vm.loadImage(built.dir);
    await vm.freeze(await vm.bootTemplate(img, { name: 'web-tpl' }), img);
    const first = await vm.pushTemplate('web-tpl', snapRef);
    const second = await vm.pushTemplate('web-tpl', snapRef);
    const ram = img.ramMB * 1024 * 1024;
    results.wire = {
      guestRamBytes: ram,
      artifactBytes: first.artifactBytes,
      artifactShareOfRam: first.artifactBytes / ram,
      chunks: first.chunks,
      firstPushBytes: first.bytesSent,
      secondPushBytes: second.bytesSent,
      secondShareOfFirst: second.bytesSent / first.bytesSent,
    };
    log(`wire: ${JSON.stringify(results.wire)}`);
  } finally {
    rmSync(out, { recursive: true, force: true });
    await a();
  }
  const t: Record<'image' | 'snapshot' | 'build', number[]> = { image: [], snapshot: [], build: [] };
  for (let i = 0; i < runs; i++) {
    for (const way of ['snapshot', 'image', 'build'] as const) {
      const done = freshNode(way);
      const dir = mkdtempSync(join(tmpdir(), 'scion-bench-img-'));
      try {
        const t0 = performance.now();
        if (way === 'snapshot') await vm.pullTemplate(snapRef);
        else {
          const imgDir =
            way === 'image' ? (await vm.pull(imageRef, dir)).dir : (await vm.build({ definitionPath: join(ROOT, 'images/web.yaml'), outDir: dir })).dir;
          const img = await vm.loadImage(imgDir);
          await vm.freeze(await vm.bootTemplate(img, { name: 'web-tpl' }), img);
        }
        const ms = await firstAnswer('web-tpl', t0);
        t[way].push(ms);
        log(`run ${i + 1} ${way}: first clone answered HTTP after ${ms.toFixed(0)} ms`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
        await done();
      }
    }
  }
  results.hibernate = await hibernateFigures(runs);
  log(`hibernate: ${JSON.stringify(results.hibernate)}`);
  results.firstHttpMs = { image: summarise(t.image), snapshot: summarise(t.snapshot), build: summarise(t.build) };
  results.snapshotSpeedup = summarise(t.image).p50 / summarise(t.snapshot).p50;
  log(`first HTTP: ${JSON.stringify(results.firstHttpMs)}; (a)/(b) = ${(results.snapshotSpeedup as number).toFixed(1)}x`);
} finally {
  await registry.stop();
}
mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
writeFileSync(join(ROOT, 'bench/results/snapshot-latest.json'), `${JSON.stringify(results, null, 2)}\n`);
console.log(JSON.stringify(results, null, 2));
