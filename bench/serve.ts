/**
 * `npm run bench:serve`: the front door, side by side in one run (TCG on
 * the machine it runs on; images/web.yaml). Never asserted in tests.
 *   --runs N (default 8)  --duration 20 (autocannon seconds)  --quick
 * Writes bench/results/serve-latest.json (and a dated copy).
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, mkdirSync, writeFileSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tmpdir, cpus } from 'node:os';
import { request } from 'node:http';
import autocannon from 'autocannon';
import { summarise } from './stats.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '8' }, duration: { type: 'string', default: '20' }, quick: { type: 'boolean' } } });
const RUNS = Number(values.runs),
  DURATION = Number(values.duration);
const ROOT = resolve(import.meta.dirname, '..');
process.env.SCION_RUN_DIR = mkdtempSync(join(tmpdir(), 'scion-bench-serve-run-'));
process.env.SCION_TEMPLATE_DIR = mkdtempSync('/dev/shm/scion-bench-serve-tpl-');
const vm = await import('../host/index.ts');
const { serve, serveOptions } = await import('../host/index.ts');
const { qemuVersion, scionQemuProcesses } = await import('../host/machine/inspect.ts');
const log = (m: string) => console.error(`[bench:serve] ${m}`);
import { setTimeout as sleep } from 'node:timers/promises';
const memAvailableMB = () => Math.round(Number(/^MemAvailable:\s+(\d+)/m.exec(readFileSync('/proc/meminfo', 'utf8'))![1]) / 1024);

/** ms from sending a GET to the first byte of the response. */
function ttfb(port: number, path = '/'): Promise<{ ms: number; status: number }> {
  return new Promise((res, rej) => {
    const t0 = performance.now();
    const r = request({ host: '127.0.0.1', port, path, agent: false }, (resp) => {
      resp.once('data', () => {
        const ms = performance.now() - t0;
        resp.resume();
        resp.on('end', () => res({ ms, status: resp.statusCode ?? 0 }));
      });
    });
    r.on('error', rej);
    r.end();
  });
}
const opts = (v: Record<string, string>) => serveOptions('bench-tpl', { port: '8080', listen: '127.0.0.1:0', ...v });
const results: any = {
  date: new Date().toISOString(),
  machine: { cpu: cpus()[0]?.model, cores: cpus().length, qemu: await qemuVersion(), node: process.version },
  runs: RUNS,
};

try {
  const img = await vm.loadImage((await vm.build({ definitionPath: join(ROOT, 'images/web.yaml') })).dir);
  const h0 = await vm.bootTemplate(img, { name: 'bench-tpl' });
  await vm.freeze(h0, img);
  const memBefore = memAvailableMB();

  // 1. from zero: first byte of a request that must fork, against fork-to-ready in the same run
  {
    const h = await serve(opts({ idle: '1s' }));
    const t: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      t.push((await ttfb(h.address.port)).ms);
      const end = Date.now() + 30_000;
      while (scionQemuProcesses().length && Date.now() < end) await sleep(100);
    }
    results.fromZero = { firstByteMs: summarise(t), forkToReadyMs: summarise(h.stats().forkMs) };
    log(`from zero: first byte ${JSON.stringify(results.fromZero.firstByteMs)}; fork to ready ${JSON.stringify(results.fromZero.forkToReadyMs)}`);
    await h.close();
  }

  // 2. a claimed pool clone (per-request mode, pool 2): first byte, waiting for the refill between requests
  {
    const h = await serve(opts({ mode: 'per-request', pool: '2', max: '4' }));
    const t: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const end = Date.now() + 60_000;
      while (h.stats().clones.pooled < 2 && Date.now() < end) await sleep(50);
      await sleep(300);
      t.push((await ttfb(h.address.port)).ms);
    }
    results.poolClaim = { firstByteMs: summarise(t) };
    log(`pool claim: first byte ${JSON.stringify(results.poolClaim.firstByteMs)}`);
    await h.close();
  }

  // 3. through the front door to a warm clone vs straight to that clone's port (autocannon, 50 connections)
  {
    const h = await serve(opts({ concurrency: '1000', min: '1', max: '1' }));
    while (h.stats().clones.ready < 1) await sleep(100);
    const [clone] = (await vm.list()).filter((v) => v.role === 'clone');
    const run = (url: string) => autocannon({ url, connections: 50, duration: DURATION });
    await run(`http://127.0.0.1:${h.address.port}/`); // warm both paths once (TCG translates httpd's code)
    const direct = await run(`http://127.0.0.1:${clone.ports['8080']}/`);
    const door = await run(`http://127.0.0.1:${h.address.port}/`);
    const pick = (r: any) => ({ rps: r.requests.average, latencyP50Ms: r.latency.p50, latencyP97_5Ms: r.latency.p97_5, errors: r.errors, non2xx: r.non2xx });
    results.proxy = {
      direct: pick(direct),
      frontDoor: pick(door),
      addedLatencyP50Ms: door.latency.p50 - direct.latency.p50,
      throughputRatio: +(door.requests.average / direct.requests.average).toFixed(3),
    };
    log(`proxy: ${JSON.stringify(results.proxy)}`);
    await h.close();
  }

  // 4. per-request: sustained requests per second, a fresh clone each, by pool size
  results.perRequest = {};
  for (const pool of values.quick ? [0, 2] : [0, 2, 4]) {
    const h = await serve(opts({ mode: 'per-request', pool: String(pool), max: String(Math.max(4, pool + 2)), queue: '1000', 'queue-timeout': '60s' }));
    if (pool) {
      const end = Date.now() + 120_000;
      while (h.stats().clones.pooled < pool && Date.now() < end) await sleep(100);
    }
    const secs = values.quick ? 20 : 40;
    const end = Date.now() + secs * 1000;
    let ok = 0,
      other = 0;
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while (Date.now() < end) {
          const r = await ttfb(h.address.port).catch(() => ({ status: 0, ms: 0 }));
          if (r.status === 200) ok++;
          else other++;
        }
      }),
    );
    results.perRequest[pool] = { seconds: secs, ok, other, rps: +(ok / secs).toFixed(2), forkToReadyMs: summarise(h.stats().forkMs) };
    log(`per-request pool ${pool}: ${JSON.stringify(results.perRequest[pool])}`);
    await h.close();
  }

  // 5. 200 concurrent requests against zero clones, --max 8 --queue 100
  {
    const h = await serve(opts({ max: '8', queue: '100', concurrency: '10' }));
    const t0 = Date.now();
    const rs = await Promise.all(
      Array.from({ length: 200 }, () =>
        ttfb(h.address.port).then(
          (r) => r.status,
          () => -1,
        ),
      ),
    );
    const count = (s: number) => rs.filter((x) => x === s).length;
    results.burst = {
      ok: count(200),
      unavailable: count(503),
      other: rs.filter((x) => x !== 200 && x !== 503).length,
      seconds: (Date.now() - t0) / 1000,
      maxClones: h.stats().maxClones,
    };
    log(`burst: ${JSON.stringify(results.burst)}`);
    // 6. scale to zero: from the last request to no QEMU process, and host memory then
    const last = Date.now();
    const idleH = h;
    const end = Date.now() + 120_000;
    while (scionQemuProcesses().length && Date.now() < end) await sleep(100);
    results.scaleToZero = {
      secondsFromLastRequest: (Date.now() - last) / 1000,
      idleSetting: '30s',
      memAvailableBeforeMB: memBefore,
      memAvailableAfterMB: memAvailableMB(),
    };
    results.scaleToZero.memoryDeltaMB = memBefore - results.scaleToZero.memAvailableAfterMB;
    log(`scale to zero: ${JSON.stringify(results.scaleToZero)}`);
    await idleH.close();
  }
} finally {
  for (const v of await vm.list()) await vm.removeVm(v.name).catch((e) => log(`cleanup ${v.name}: ${(e as Error).message}`));
  rmSync(process.env.SCION_RUN_DIR!, { recursive: true, force: true });
  rmSync(process.env.SCION_TEMPLATE_DIR!, { recursive: true, force: true });
}
mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
const text = JSON.stringify(results, null, 2) + '\n';
writeFileSync(join(ROOT, 'bench/results/serve-latest.json'), text);
writeFileSync(join(ROOT, `bench/results/serve-${results.date.slice(0, 10)}.json`), text);
console.log(text);
