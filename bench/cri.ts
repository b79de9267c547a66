/**
 * npm run bench:cri — pods through containerd's CRI, as the kubelet makes
 * them, four ways side by side in one run (interleaved): scion from the
 * node's pool (each pod's VM a paused fork taken out of it), scion forking
 * each pod's VM on demand, scion without a template (each pod's VM booted
 * cold, like a VM runtime without templating), and runc (plain containers).
 * Every run starts with the pool full and no refill under way, so no mode
 * is measured beside a background fork.
 * Each: RunPodSandbox (CNI bridge) + CreateContainer + StartContainer, until
 * the container answers HTTP at the pod's IP. Then memory per running pod
 * with 10 scion pods (the shim's share said), and N create/remove cycles
 * counting what leaked. Options: --runs 5 --density 10 --cycles 50
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, writeFileSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { $ } from 'zx';
import { startContainerd, shimPids, freezeTapTemplate, cniBridgeConfig } from '../test/support/containerd.ts';
import { busyboxOciArchive } from '../test/support/oci-busybox.ts';
import { criClient } from '../test/support/cri.ts';
import { summarise } from './stats.ts';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '5' }, density: { type: 'string', default: '10' }, cycles: { type: 'string', default: '50' } },
});
const RUNS = Number(values.runs),
  DENSITY = Number(values.density),
  CYCLES = Number(values.cycles);
const ROOT = join(import.meta.dirname, '..');
const IMAGE = 'docker.io/scion/busybox:test',
  PAUSE = 'docker.io/scion/pause:test';
const work = mkdtempSync(join(tmpdir(), 'scion-bench-cri-'));
process.env.SCION_RUN_DIR = join(work, 'run');
const templateDir = (process.env.SCION_TEMPLATE_DIR = mkdtempSync(join('/dev/shm', 'scion-bench-cri-tpl-')));
const tag = randomBytes(2).toString('hex');
const bridge = `scnb${tag}`,
  subnet = `10.89.${parseInt(tag.slice(0, 2), 16)}`;
const log = (m: string) => console.error(`[bench:cri] ${m}`);

// the template: the pod image, booted with a tap (on a scratch bridge) as the pods' VMs will have one
const { build } = await import('../host/index.ts');
const vm = await import('../host/index.ts');
const img = await vm.loadImage((await build({ definitionPath: join(ROOT, 'images/pod.yaml') })).dir);
await freezeTapTemplate(img, 'pod-tpl');
const cd = await startContainerd({
  path: [join(ROOT, 'bin')],
  pool: 1,
  cri: { sandboxImage: PAUSE, cniConfDir: cniBridgeConfig(join(work, 'cni'), { name: `scion-bench-${tag}`, bridge, subnet }) },
});
await cd.ctr(['images', 'import', await busyboxOciArchive(work, IMAGE)], { namespace: 'k8s.io' });
await cd.ctr(['images', 'import', await busyboxOciArchive(work, PAUSE, ['sleep', '2147483647'])], { namespace: 'k8s.io' });
const cri = criClient(cd.address);

type Mode = 'pool' | 'fork' | 'cold' | 'runc';
const MODES: Mode[] = ['pool', 'fork', 'cold', 'runc'];
const { Machine } = await import('../host/runtime.ts');
const { pooledVms } = await import('../host/machine/inspect.ts');
const poolDir = join(work, 'run', 'pool', 'pod-tpl');
const shimDir = join(work, 'run', 'shim');
let shimStarted = false;
/**
 * Wait until the node settled: the pool of pod-tpl holds its VM, nobody is filling it, and (once a
 * scion pod was started) a spare shim is up (ms waited).
 */
async function poolSettled(): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    const filling = readdirSync(poolDir).includes('.fill');
    const spare = !shimStarted || readdirSync(shimDir).some((f) => /^spare-.*\.sock$/.test(f));
    if (!filling && spare && (await pooledVms('pod-tpl')).length >= 1) return performance.now() - t0;
    if (performance.now() - t0 > 120_000) throw new Error('the pool of pod-tpl was not refilled within 120 s');
    await new Promise((r) => setTimeout(r, 50));
  }
}
// what was there before (another run's namespaces): not this run's leaks
const hostTaps = async () => (await $`ip -o link`.quiet()).stdout.split('\n').filter((l) => / sct[0-9a-f]{8}[:@]/.test(l)).length;
const cniNetns = async () => (await $`ip netns list`.quiet()).stdout.split('\n').filter((l) => l.startsWith('cni-')).length;
const before = { taps: await hostTaps(), netns: await cniNetns() };
// the node's pool, filled before the first pod (as the DaemonSet's first pod, or a prior one, would leave it)
await Machine.fillPool('pod-tpl', { size: 1, prefix: 'pod' });
const WEB = ['sh', '-c', 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 8080 -h /www'];
let seq = 0;

/** One pod to HTTP: ms, and its ids for removal. */
async function pod(mode: Mode): Promise<{ ms: number; sb: string; ct: string }> {
  const name = `b${++seq}-${mode}`;
  const annotations = mode === 'cold' || mode === 'fork' ? [{ key: 'io.scion.boot', value: mode }] : [];
  const cfg = { metadata: { name, uid: name, namespace: 'default', attempt: 0 }, hostname: name, log_directory: join(work, 'logs', name), annotations };
  const t0 = performance.now();
  if (mode !== 'runc') shimStarted = true;
  const { pod_sandbox_id: sb } = await cri.runtime.RunPodSandbox({ config: cfg, runtime_handler: mode === 'runc' ? '' : 'scion' });
  const { container_id: ct } = await cri.runtime.CreateContainer({
    pod_sandbox_id: sb,
    config: {
      metadata: { name: 'web' },
      image: { image: IMAGE },
      command: WEB,
      log_path: 'web.log',
      linux: { security_context: { namespace_options: { pid: 'CONTAINER' } } },
    },
    sandbox_config: cfg,
  }); // pid: what the kubelet asks without shareProcessNamespace
  await cri.runtime.StartContainer({ container_id: ct });
  const ip = (await cri.runtime.PodSandboxStatus({ pod_sandbox_id: sb })).status.network.ip;
  for (let i = 0; ; i++) {
    try {
      if ((await (await fetch(`http://${ip}:8080/`, { signal: AbortSignal.timeout(2000) })).text()) === `hello from ${name}\n`) break;
    } catch {
      /* not yet */
    }
    if (i > 600) throw new Error(`${name}: no HTTP at ${ip}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return { ms: performance.now() - t0, sb, ct };
}
async function remove(p: { sb: string; ct: string }) {
  await cri.runtime.StopContainer({ container_id: p.ct, timeout: 1 });
  await cri.runtime.RemoveContainer({ container_id: p.ct });
  await cri.runtime.StopPodSandbox({ pod_sandbox_id: p.sb });
  await cri.runtime.RemovePodSandbox({ pod_sandbox_id: p.sb });
}

const anon = (pid: number) => Number(/Anonymous:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))![1]) / 1024;
const rss = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
/** memory only this process holds (private pages: the Node binary and shared libraries are counted once per node, not here) */
const uss = (pid: number) => {
  const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  return ['Private_Clean', 'Private_Dirty'].reduce((a, k) => a + Number(new RegExp(`${k}:\\s+(\\d+)`).exec(t)![1]), 0) / 1024;
};
const out: Record<string, unknown> = { date: new Date().toISOString(), runs: RUNS };

try {
  // 1. time to HTTP, interleaved
  const times: Record<Mode, number[]> = { pool: [], fork: [], cold: [], runc: [] };
  const failed: Partial<Record<Mode, string>> = {};
  for (let r = 0; r < RUNS; r++) {
    for (const mode of MODES) {
      if (failed[mode]) continue;
      try {
        await poolSettled();
        const p = await pod(mode);
        times[mode].push(p.ms);
        await remove(p);
      } catch (e) {
        // a mode this host cannot run is reported, not hidden; the others go on
        failed[mode] = (e as Error).message.split('\n')[0];
        log(`${mode}: ${failed[mode]}`);
        for (const s of (await cri.runtime.ListPodSandbox({})).items) {
          await cri.runtime.StopPodSandbox({ pod_sandbox_id: s.id }).catch(() => undefined);
          await cri.runtime.RemovePodSandbox({ pod_sandbox_id: s.id }).catch(() => undefined);
        }
      }
    }
    log(`run ${r + 1}/${RUNS}: ${MODES.map((m) => `${m} ${failed[m] ? 'failed' : `${times[m].at(-1)!.toFixed(0)} ms`}`).join(', ')}`);
  }
  out.failed = failed;
  out.readyMs = Object.fromEntries(
    Object.entries(times)
      .filter(([, v]) => v.length)
      .map(([k, v]) => [k, summarise(v)]),
  );
  // 2. memory per running pod
  const pods = [];
  await poolSettled();
  for (let i = 0; i < DENSITY; i++) pods.push(await pod('fork'));
  const running = (await vm.list()).filter((v) => v.role === 'clone' && v.pid);
  const qemus = running.filter((v) => v.owner?.kind !== 'pool').map((v) => v.pid!);
  const pooledMB = running.filter((v) => v.owner?.kind === 'pool').map((v) => anon(v.pid!));
  const shims = shimPids(cd.dir);
  const qemuMB = qemus.reduce((a, p) => a + anon(p), 0) / qemus.length;
  const shimMB = shims.reduce((a, p) => a + rss(p), 0) / shims.length;
  const shimUss = shims.reduce((a, p) => a + uss(p), 0) / shims.length;
  const r1 = (x: number) => Math.round(x * 10) / 10;
  out.memoryPerPodMB = {
    pods: DENSITY,
    qemuUnique: r1(qemuMB),
    shimRss: r1(shimMB),
    shimUnique: r1(shimUss),
    total: r1(qemuMB + shimUss),
    pooledVmUnique: pooledMB.map(r1),
  };
  log(`memory per pod (${DENSITY} pods): QEMU unique ${qemuMB.toFixed(1)} MB + shim unique ${shimUss.toFixed(1)} MB (RSS ${shimMB.toFixed(1)} MB)`);
  for (const p of pods) await remove(p);
  // 3. create/remove cycles, then what is left
  // (from the pool: claims and refills under way as pods come and go, then the pool as it settles)
  for (let i = 0; i < CYCLES; i++) await remove(await pod('pool'));
  await poolSettled();
  for (let i = 0; i < 200 && shimPids(cd.dir).length; i++) await new Promise((r) => setTimeout(r, 100));
  const clonesLeft = (await vm.list()).filter((v) => v.role === 'clone');
  const leaked = {
    qemu: clonesLeft.filter((v) => v.owner?.kind !== 'pool').length,
    pooled: clonesLeft.filter((v) => v.owner?.kind === 'pool').length,
    shims: shimPids(cd.dir).length,
    // a pooled VM's tap waits in the host's namespace until a pod takes the VM
    taps: (await hostTaps()) - before.taps - clonesLeft.filter((v) => v.owner?.kind === 'pool').length,
    mounts: readFileSync('/proc/mounts', 'utf8')
      .split('\n')
      .filter((l) => l.includes(join(work, 'run'))).length,
    netns: (await cniNetns()) - before.netns,
    runDirs: readdirSync(join(work, 'run', 'vms')).filter((d) => d !== 'pod-tpl' && !clonesLeft.some((v) => v.name === d && v.owner?.kind === 'pool')).length,
    tasks: (await cd.ctr(['tasks', 'ls', '-q'], { namespace: 'k8s.io' })).stdout.trim().split('\n').filter(Boolean).length,
  };
  out.cycles = { n: CYCLES, leaked };
  log(`${CYCLES} create/remove cycles; left: ${JSON.stringify(leaked)}`);
} finally {
  cri.close();
  await cd.stop();
  for (const v of await vm.list()) await vm.removeVm(v.name);
  await $({ nothrow: true, quiet: true })`ip link del ${bridge}`;
  rmSync(templateDir, { recursive: true, force: true });
}
const f = (m: Mode) => (out.readyMs as Record<Mode, { p50: number; p95: number }>)[m];
console.log(`| pod to HTTP (RunPodSandbox + CreateContainer + StartContainer, CNI) | p50 ms | p95 ms | runs |\n|---|---|---|---|`);
for (const [m, label] of [
  ['pool', "scion, from the node's pool of paused forks"],
  ['fork', 'scion, forked on demand'],
  ['cold', 'scion without a template (cold boot per pod)'],
  ['runc', 'runc (no VM)'],
] as [Mode, string][]) {
  const failedWith = (out.failed as Record<string, string>)[m];
  console.log(
    failedWith ? `| ${label} | failed on this host: ${failedWith} | | |` : `| ${label} | ${f(m).p50.toFixed(0)} | ${f(m).p95.toFixed(0)} | ${RUNS} |`,
  );
}
const ratio = (a: Mode, b: Mode) => (f(a) && f(b) ? (f(a).p50 / f(b).p50).toFixed(1) : '?');
console.log(
  `\ncold/pool ${ratio('cold', 'pool')}x, cold/fork ${ratio('cold', 'fork')}x; memory per running pod (${DENSITY}): ${JSON.stringify(out.memoryPerPodMB)}; cycles: ${JSON.stringify(out.cycles)}`,
);
writeFileSync(join(ROOT, 'bench/results/cri-latest.json'), JSON.stringify(out, null, 2) + '\n');
