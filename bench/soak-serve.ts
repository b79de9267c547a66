/**
 * `npm run soak:serve`: the front door over a long life. 20,000 requests
 * (autocannon, against 127.0.0.1) through a shared-mode front door with a
 * pool, in rounds separated by idle gaps long enough that its clones are
 * removed and new ones forked: the heap of this (the serve) process after a
 * full GC at the start and at the end, and what leaked. Not in `npm test`.
 *
 *   npm run soak:serve -- [--requests 20000] [--rounds 10] [--json]
 * Writes bench/results/soak-serve-latest.json.
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, mkdirSync, writeFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tmpdir } from 'node:os';
import autocannon from 'autocannon';

const { values } = parseArgs({
  options: { requests: { type: 'string', default: '20000' }, rounds: { type: 'string', default: '10' }, json: { type: 'boolean' } },
});
const REQUESTS = Number(values.requests),
  ROUNDS = Number(values.rounds);
const ROOT = resolve(import.meta.dirname, '..');
const runDir = mkdtempSync(join(tmpdir(), 'scion-soak-serve-run-'));
const tplDir = mkdtempSync('/dev/shm/scion-soak-serve-tpl-');
process.env.SCION_RUN_DIR = runDir;
process.env.SCION_TEMPLATE_DIR = tplDir;
const vm = await import('../host/index.ts');
const log = (m: string) => {
  if (!values.json) console.error(`[soak:serve] ${m}`);
};
import { setTimeout as sleep } from 'node:timers/promises';
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error('run with node --expose-gc (npm run soak:serve does)');
const heapMB = () => {
  gc();
  gc();
  return +(process.memoryUsage().heapUsed / 1024 / 1024).toFixed(1);
};
/** Processes whose working directory is under this soak's run root: its QEMUs (each runs in its VM's jail). */
const qemuCount = () =>
  readdirSync('/proc').filter((d) => {
    if (!/^\d+$/.test(d)) return false;
    try {
      return readlinkSync(`/proc/${d}/cwd`).startsWith(runDir);
    } catch {
      return false;
    }
  }).length;

const results: Record<string, unknown> = { date: new Date().toISOString(), requests: REQUESTS, rounds: ROUNDS };
try {
  const img = await vm.loadImage((await vm.build({ definitionPath: join(ROOT, 'images/web.yaml') })).dir);
  await vm.freeze(await vm.bootTemplate(img, { name: 'soak-tpl' }), img);
  const h = await vm.serve(
    vm.serveOptions('soak-tpl', {
      port: '8080',
      listen: '127.0.0.1:0',
      mode: 'shared',
      pool: '1',
      max: '3',
      concurrency: '10',
      idle: '2s',
      queue: '200',
      'queue-timeout': '30s',
    }),
  );
  await sleep(1000);
  const heapStart = heapMB();
  log(`serving on ${h.address.port}; heap after GC at the start ${heapStart} MB`);
  const statuses: Record<string, number> = {};
  let errors = 0,
    timeouts = 0;
  const t0 = Date.now();
  for (let round = 0; round < ROUNDS; round++) {
    const r = await autocannon({ url: `http://127.0.0.1:${h.address.port}/`, connections: 10, amount: Math.round(REQUESTS / ROUNDS), timeout: 30 });
    for (const [k, v] of Object.entries(r.statusCodeStats ?? {})) statuses[k] = (statuses[k] ?? 0) + (v as { count: number }).count;
    errors += r.errors;
    timeouts += r.timeouts;
    // an idle gap: shared clones are removed after 2 s idle (down to --min 0); the pool refills
    const end = Date.now() + 30_000;
    while (Date.now() < end && h.stats().clones.ready + h.stats().clones.busy > 0) await sleep(200);
    const s = h.stats();
    log(
      `round ${round + 1}/${ROUNDS}: ${JSON.stringify(statuses)}, errors ${errors}, timeouts ${timeouts}; clones ${JSON.stringify(s.clones)}; heap ${heapMB()} MB`,
    );
  }
  const seconds = (Date.now() - t0) / 1000;
  const s = h.stats();
  const heapEnd = heapMB();
  Object.assign(results, {
    seconds,
    statuses,
    errors,
    timeouts,
    frontDoorOutcomes: s.requests,
    forks: s.forkMs.length,
    heapStartMB: heapStart,
    heapEndMB: heapEnd,
    rssEndMB: Math.round(process.memoryUsage().rss / 1024 / 1024),
  });
  await h.close();
  results.afterClose = { qemus: qemuCount(), runDirs: readdirSync(join(runDir, 'vms')).filter((n) => n !== 'soak-tpl').length };
  log(`done in ${seconds.toFixed(0)} s: heap ${heapStart} MB -> ${heapEnd} MB; ${JSON.stringify(results.afterClose)}`);
} finally {
  for (const v of await vm.list()) await vm.removeVm(v.name).catch(() => undefined);
  rmSync(runDir, { recursive: true, force: true });
  rmSync(tplDir, { recursive: true, force: true });
}
mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
writeFileSync(join(ROOT, 'bench/results/soak-serve-latest.json'), JSON.stringify(results, null, 2) + '\n');
console.log(JSON.stringify(results, null, 2));
