/**
 * npm run bench:stdio — a container's output through containerd, scion beside
 * runc in one run: `ctr run --rm IMAGE sh -c 'head -c SIZE /dev/zero'` with
 * ctr's stdout counted by this process (every byte must arrive), and the
 * same with `| tr '\0' a` (the issue's writer). Then a stalled reader: ctr's
 * stdout not read for a while, the shim's and QEMU's memory sampled
 * meanwhile, then read to the end (nothing lost). Options: --mb 100 --runs 3
 * --stall 15 (seconds)
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { startContainerd, shimPids } from '../test/support/containerd.ts';
import { busyboxOciArchive } from '../test/support/oci-busybox.ts';
import { summarise } from './stats.ts';

const { values } = parseArgs({
  options: { mb: { type: 'string', default: '100' }, runs: { type: 'string', default: '3' }, stall: { type: 'string', default: '15' } },
});
const MB = Number(values.mb),
  RUNS = Number(values.runs),
  STALL_S = Number(values.stall);
const SIZE = MB * 1_000_000;
const ROOT = join(import.meta.dirname, '..');
const IMAGE = 'docker.io/scion/busybox:test';
const work = mkdtempSync(join(tmpdir(), 'scion-bench-stdio-'));
process.env.SCION_RUN_DIR = join(work, 'run');
const templateDir = (process.env.SCION_TEMPLATE_DIR = mkdtempSync(join('/dev/shm', 'scion-bench-stdio-tpl-')));
const log = (m: string) => console.error(`[bench:stdio] ${m}`);

const { build } = await import('../host/index.ts');
const vm = await import('../host/index.ts');
const img = await vm.loadImage((await build({ definitionPath: join(ROOT, 'images/pod.yaml') })).dir);
await vm.freeze(await vm.bootTemplate(img, { name: 'pod-tpl' }), img);
const cd = await startContainerd({ path: [join(ROOT, 'bin')] });
await cd.ctr(['images', 'import', await busyboxOciArchive(work, IMAGE)]);

const RUNTIMES = { scion: ['--runtime', 'io.containerd.scion.v2'], runc: ['--runtime', 'io.containerd.runc.v2'] } as const;
type Runtime = keyof typeof RUNTIMES;

/** ctr run with its stdout counted here; `stallMs`: not read at first for that long (sampling memory meanwhile). */
function runCounted(
  rt: Runtime,
  id: string,
  script: string,
  stallMs = 0,
): Promise<{ bytes: number; ms: number; streamMs: number; exit: number | null; samples: { shimKb: number; qemuKb: number }[] }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const p = spawn(
      'ctr',
      ['--address', cd.address, '--namespace', 'scion-test', 'run', '--rm', ...RUNTIMES[rt], '--snapshotter', 'native', IMAGE, id, 'sh', '-c', script],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let bytes = 0,
      first = 0,
      last = 0;
    const samples: { shimKb: number; qemuKb: number }[] = [];
    p.stdout.on('data', (c: Buffer) => {
      bytes += c.length;
      last = performance.now();
      first ||= last;
    });
    if (stallMs) {
      p.stdout.pause();
      const sampler = setInterval(() => samples.push(memory()), 1000);
      setTimeout(() => {
        clearInterval(sampler);
        p.stdout.resume();
      }, stallMs);
    }
    p.on('close', (exit) => resolve({ bytes, ms: performance.now() - t0, streamMs: last - first, exit, samples }));
  });
}

/** Resident memory (kB) of the shims serving this containerd's tasks and of scion's QEMU processes. */
function memory(): { shimKb: number; qemuKb: number } {
  const rss = (pid: number) => {
    try {
      return Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
    } catch {
      return 0;
    }
  };
  const qemu = readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        return (
          readFileSync(`/proc/${p}/cmdline`, 'utf8').startsWith('qemu-system') || readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('/qemu-system-x86_64\0')
        );
      } catch {
        return false;
      }
    })
    .map(Number);
  return { shimKb: shimPids(cd.dir).reduce((a, p) => a + rss(p), 0), qemuKb: qemu.reduce((a, p) => a + rss(p), 0) };
}

const WRITERS = { zero: `head -c ${SIZE} /dev/zero`, tr: `head -c ${SIZE} /dev/zero | tr '\\000' a` } as const;
/** per writer and runtime: MB/s from the first byte to the last (the stream), and the whole ctr run in ms (the pod's start too) */
const results: Record<string, { mbPerS: number[]; ms: number[]; lost: number }> = {};
try {
  let n = 0;
  for (let r = 0; r < RUNS; r++) {
    // interleaved: each run measures every runtime and writer once, so machine noise hits them alike
    for (const rt of Object.keys(RUNTIMES) as Runtime[]) {
      for (const [w, script] of Object.entries(WRITERS)) {
        const key = `${rt} ${w}`;
        const res = await runCounted(rt, `io${n++}`, script);
        const entry = (results[key] ??= { mbPerS: [], ms: [], lost: 0 });
        entry.ms.push(res.ms);
        entry.mbPerS.push(res.bytes / 1e6 / (res.streamMs / 1000));
        entry.lost += SIZE - res.bytes;
        log(
          `${key} run ${r + 1}: ${res.bytes} bytes, first to last in ${res.streamMs.toFixed(0)} ms (${(res.bytes / 1e6 / (res.streamMs / 1000)).toFixed(1)} MB/s), ctr run ${res.ms.toFixed(0)} ms, exit ${res.exit}`,
        );
      }
    }
  }
  // a stalled reader: memory must stay flat while the writer is held back, and every byte still arrive
  const base = memory();
  const stalled = await runCounted('scion', 'stall', WRITERS.zero, STALL_S * 1000);
  const peak = stalled.samples.reduce((a, s) => ({ shimKb: Math.max(a.shimKb, s.shimKb), qemuKb: Math.max(a.qemuKb, s.qemuKb) }), { shimKb: 0, qemuKb: 0 });
  log(
    `stalled reader (${STALL_S} s): ${stalled.bytes} of ${SIZE} bytes in the end; shim RSS ${(peak.shimKb / 1024).toFixed(1)} MB at most, QEMU ${(peak.qemuKb / 1024).toFixed(1)} MB at most (before: shims ${(base.shimKb / 1024).toFixed(1)}, QEMU ${(base.qemuKb / 1024).toFixed(1)})`,
  );

  console.log(`\n| ${MB} MB to ctr's stdout (${RUNS} runs, interleaved) | MB/s p50 (first to last byte) | MB/s min | whole ctr run ms p50 | bytes lost |`);
  console.log('|---|---|---|---|---|');
  for (const [k, v] of Object.entries(results)) {
    const s = summarise(v.mbPerS),
      t = summarise(v.ms);
    console.log(`| ${k} | ${s.p50.toFixed(1)} | ${Math.min(...v.mbPerS).toFixed(1)} | ${t.p50.toFixed(0)} | ${v.lost} |`);
  }
  console.log(
    `\nstalled reader ${STALL_S} s: shim RSS peak ${(peak.shimKb / 1024).toFixed(1)} MB, QEMU RSS peak ${(peak.qemuKb / 1024).toFixed(1)} MB; ${stalled.bytes === SIZE ? 'every byte arrived after' : `${SIZE - stalled.bytes} bytes LOST`}`,
  );
  mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
  writeFileSync(
    join(ROOT, 'bench/results/stdio-latest.json'),
    JSON.stringify(
      {
        when: new Date().toISOString(),
        mb: MB,
        runs: RUNS,
        results,
        stalled: { seconds: STALL_S, bytes: stalled.bytes, size: SIZE, samples: stalled.samples, before: base },
      },
      null,
      2,
    ) + '\n',
  );
} finally {
  await cd.stop();
  await vm.removeVm('pod-tpl', { force: true }).catch(() => undefined);
  rmSync(work, { recursive: true, force: true });
  rmSync(templateDir, { recursive: true, force: true });
}
