/**
 * `npm run bench:tb-size`: QEMU's TCG translation buffer per clone, side by
 * side: fork to HTTP (a restarted container and a kept one), a busy clone's
 * request latency (autocannon, 5 s) and each clone's unique memory after it
 * idled, for each size, interleaved. Writes bench/results/tb-size-latest.json.
 *   --sizes 64,32,16 (MiB)  --runs 3
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, mkdirSync, writeFileSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tmpdir } from 'node:os';
import autocannon from 'autocannon';
import { summarise } from './stats.ts';

const { values } = parseArgs({ options: { sizes: { type: 'string', default: '64,32,16' }, runs: { type: 'string', default: '3' } } });
const SIZES = values.sizes!.split(',').map(Number),
  RUNS = Number(values.runs);
const ROOT = resolve(import.meta.dirname, '..');
process.env.SCION_RUN_DIR = mkdtempSync(join(tmpdir(), 'scion-bench-tb-run-'));
process.env.SCION_TEMPLATE_DIR = mkdtempSync('/dev/shm/scion-bench-tb-tpl-');
const vm = await import('../host/index.ts');
const log = (m: string) => console.error(`[bench:tb-size] ${m}`);
import { setTimeout as sleep } from 'node:timers/promises';
const anonMB = (pid: number) => Number(/^Anonymous:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))![1]) / 1024;

const out: Record<number, { restartMs: number[]; keptMs: number[]; requestP50Ms: number[]; uniqueMB: number[] }> = {};
try {
  for (const [name, file] of [
    ['tb-web-tpl', 'web'],
    ['tb-keep-tpl', 'web-keep'],
  ]) {
    const img = await vm.loadImage((await vm.build({ definitionPath: join(ROOT, `images/${file}.yaml`) })).dir);
    await vm.freeze(await vm.bootTemplate(img, { name }), img);
  }
  for (const s of SIZES) out[s] = { restartMs: [], keptMs: [], requestP50Ms: [], uniqueMB: [] };
  for (let i = 0; i < RUNS; i++) {
    for (const s of SIZES) {
      const [r] = await vm.fork('tb-web-tpl', { n: 1, tbSizeMB: s });
      const [k] = await vm.fork('tb-keep-tpl', { n: 1, tbSizeMB: s });
      out[s].restartMs.push(r.timings.ready);
      out[s].keptMs.push(k.timings.ready);
      const a = await autocannon({ url: `http://127.0.0.1:${r.ports['8080']}/`, connections: 4, duration: 5 });
      out[s].requestP50Ms.push(a.latency.p50);
      await sleep(15_000); // idle: what stays is the clone's own
      out[s].uniqueMB.push(+anonMB(r.pid).toFixed(1));
      await vm.removeVm(r.name);
      await vm.removeVm(k.name);
      log(
        `run ${i + 1}/${RUNS}, tb-size ${s}: fork→HTTP ${r.timings.ready.toFixed(0)} ms restarted, ${k.timings.ready.toFixed(0)} ms kept; request p50 ${a.latency.p50} ms; unique ${out[s].uniqueMB.at(-1)} MB`,
      );
    }
  }
} finally {
  for (const v of await vm.list()) await vm.removeVm(v.name).catch(() => undefined);
  rmSync(process.env.SCION_RUN_DIR!, { recursive: true, force: true });
  rmSync(process.env.SCION_TEMPLATE_DIR!, { recursive: true, force: true });
}
const table = [
  '| tb-size MiB | fork→HTTP restarted p50 | kept p50 | busy clone request p50 ms | unique MB per clone p50 |',
  '|---|---|---|---|---|',
  ...SIZES.map(
    (s) =>
      `| ${s} | ${summarise(out[s].restartMs).p50.toFixed(0)} | ${summarise(out[s].keptMs).p50.toFixed(0)} | ${summarise(out[s].requestP50Ms).p50.toFixed(0)} | ${summarise(out[s].uniqueMB).p50.toFixed(1)} |`,
  ),
].join('\n');
console.log(table);
mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
writeFileSync(join(ROOT, 'bench/results/tb-size-latest.json'), JSON.stringify({ date: new Date().toISOString(), runs: RUNS, results: out }, null, 2) + '\n');
