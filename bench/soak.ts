/**
 * `npm run soak`: fork/rm cycles, several at a time, then count what leaked.
 * Not part of `npm test` (it takes minutes). Clones use bridge networking in
 * a namespace this script makes, so taps are exercised and counted too.
 *
 *   npm run soak -- [--cycles 200] [--parallel 4] [--net bridge|user] [--json]
 */
import { parseArgs } from 'node:util';
import { $ } from 'zx';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tmpdir } from 'node:os';
import { randomBytes } from 'node:crypto';

const { values } = parseArgs({
  options: {
    cycles: { type: 'string', default: '200' },
    parallel: { type: 'string', default: '4' },
    net: { type: 'string', default: 'bridge' },
    json: { type: 'boolean' },
  },
});
const cycles = Number(values.cycles),
  parallel = Number(values.parallel);
const ROOT = resolve(import.meta.dirname, '..');
process.env.SCION_RUN_DIR = mkdtempSync(join(tmpdir(), 'scion-soak-run-'));
process.env.SCION_TEMPLATE_DIR = mkdtempSync('/dev/shm/scion-soak-tpl-');
const vm = await import('../host/index.ts');
const { scionQemuProcesses } = await import('../host/machine/inspect.ts');

const ns = `scion-soak${randomBytes(3).toString('hex')}`;
const ipNs = (...a: string[]) => $.sync({ quiet: true })`ip -n ${ns} ${a}`.stdout;
const log = (m: string) => {
  if (!values.json) console.error(`[soak] ${m}`);
};

function snapshot() {
  const mem = readFileSync('/proc/meminfo', 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(mem)![1]);
  return {
    qemus: scionQemuProcesses().length,
    fds: readdirSync('/proc/self/fd').length,
    taps:
      values.net === 'bridge'
        ? ipNs('-o', 'link', 'show')
            .split('\n')
            .filter((l) => /: sct[0-9a-f]{8}[@:]/.test(l)).length
        : 0,
    runDirs: readdirSync(join(process.env.SCION_RUN_DIR!, 'vms')).length,
    slots: readdirSync(join(process.env.SCION_RUN_DIR!, 'slots')).length,
    templateFiles: readdirSync(process.env.SCION_TEMPLATE_DIR!, { recursive: true }).length,
    memAvailableMB: Math.round(kb('MemAvailable') / 1024),
    shmemMB: Math.round(kb('Shmem') / 1024),
  };
}

let net: any;
if (values.net === 'bridge') {
  await $`ip netns add ${ns}`;
  await $`ip -n ${ns} link add br0 type bridge`;
  await $`ip -n ${ns} addr add 10.45.0.1/24 dev br0`;
  await $`ip -n ${ns} link set br0 up`;
  net = { mode: 'bridge', bridge: 'br0', netns: ns, network: '10.45.0.0/24' };
}
try {
  const img = await vm.loadImage((await vm.build({ definitionPath: join(ROOT, 'images/web.yaml') })).dir);
  const h = await vm.bootTemplate(img, { name: 'soak-tpl', net });
  await vm.freeze(h, img);
  const before = snapshot();
  log(`template frozen; before: ${JSON.stringify(before)}`);
  const t0 = Date.now();
  let next = 0,
    done = 0;
  const failures: string[] = [];
  const ready: number[] = [];
  const worker = async () => {
    while (next < cycles) {
      next++;
      try {
        const [c] = await vm.fork('soak-tpl', { n: 1 });
        ready.push(c.timings.ready);
        await vm.removeVm(c.name);
      } catch (e) {
        failures.push((e as Error).message);
      }
      if (++done % 20 === 0) log(`${done}/${cycles} cycles, ${failures.length} failed, ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
  const after = snapshot();
  const leaks = {
    qemus: after.qemus - before.qemus,
    fds: after.fds - before.fds,
    taps: after.taps - before.taps,
    runDirs: after.runDirs - before.runDirs,
    slots: after.slots - before.slots,
    templateFiles: after.templateFiles - before.templateFiles,
  };
  ready.sort((a, b) => a - b);
  const result = {
    cycles,
    parallel,
    net: values.net,
    seconds: Math.round((Date.now() - t0) / 1000),
    failures: failures.length,
    firstFailures: failures.slice(0, 3),
    readyMs: { p50: ready[Math.floor(ready.length / 2)], p95: ready[Math.floor(ready.length * 0.95)] },
    before,
    after,
    leaks,
    memoryDeltaMB: before.memAvailableMB - after.memAvailableMB,
  };
  if (values.json) console.log(JSON.stringify(result, null, 2));
  else {
    log(
      `${cycles} cycles (${parallel} at a time, ${values.net} networking) in ${result.seconds} s; ${failures.length} failed${failures.length ? `: ${failures.slice(0, 3).join(' | ')}` : ''}`,
    );
    log(
      `leaked: ${Object.entries(leaks)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}`,
    );
    log(
      `host memory available: ${before.memAvailableMB} MB before, ${after.memAvailableMB} MB after (${result.memoryDeltaMB} MB less); fork to ready p50 ${result.readyMs.p50} ms`,
    );
  }
  process.exitCode = failures.length || Object.values(leaks).some((v) => v > 0) ? 1 : 0;
} finally {
  for (const v of await vm.list()) await vm.removeVm(v.name).catch((e) => console.error(`cleanup ${v.name}: ${(e as Error).message}`));
  if (values.net === 'bridge') await $`ip netns del ${ns}`;
  rmSync(process.env.SCION_RUN_DIR!, { recursive: true, force: true });
  rmSync(process.env.SCION_TEMPLATE_DIR!, { recursive: true, force: true });
}
