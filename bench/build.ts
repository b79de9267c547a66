/**
 * `npm run bench:build`: build time with a cold and a warm cache, artifact
 * sizes, and boot time to the agent's ready for each initramfs compression
 * (none, gzip, zstd), interleaved, under the accelerator this machine has.
 * Options: --runs N (boots per compression, default 3), --image PATH.
 */
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { build, type Compression } from '../host/index.ts';
import * as vm from '../host/index.ts';
import { summarise } from './stats.ts';

const ROOT = resolve(import.meta.dirname, '..');
const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' }, image: { type: 'string', default: join(ROOT, 'images/minimal.yaml') } } });
process.env.SCION_RUN_DIR = mkdtempSync(join(tmpdir(), 'scion-benchb-run-'));
process.env.SCION_TEMPLATE_DIR = mkdtempSync(join('/dev/shm', 'scion-benchb-tpl-'));
const log = (m: string) => process.stderr.write(`[bench:build] ${m}\n`);
const scratch: string[] = [process.env.SCION_RUN_DIR!, process.env.SCION_TEMPLATE_DIR!];
const scratchDir = (prefix: string) => {
  const d = mkdtempSync(join(tmpdir(), prefix));
  scratch.push(d);
  return d;
};

const cache = scratchDir('scion-benchb-cache-');
const out: Record<string, any> = { image: values.image, date: new Date().toISOString() };
let t = performance.now();
await build({ definitionPath: values.image!, cacheDir: cache, outDir: scratchDir('scion-benchb-out-') });
out.coldCacheMs = Math.round(performance.now() - t);
t = performance.now();
await build({ definitionPath: values.image!, cacheDir: cache, outDir: scratchDir('scion-benchb-out-') });
out.warmCacheMs = Math.round(performance.now() - t);
log(`cold cache ${out.coldCacheMs} ms, warm cache ${out.warmCacheMs} ms`);

const comps: Compression[] = ['none', 'gzip', 'zstd'];
const imgs: Record<string, vm.ImageArtifacts> = {};
out.compression = {};
for (const c of comps) {
  t = performance.now();
  const r = await build({ definitionPath: values.image!, cacheDir: cache, outDir: scratchDir(`scion-benchb-${c}-`), compression: c });
  out.compression[c] = { buildMs: Math.round(performance.now() - t), initrdBytes: r.sizes.initrd, boots: [] as number[] };
  imgs[c] = await vm.loadImage(r.dir);
}
for (let i = 0; i < Number(values.runs); i++) {
  for (const c of comps) {
    const h = await vm.bootTemplate(imgs[c], { name: `b-${c}-${i}`, skipIdentity: true });
    out.compression[c].boots.push(h.info().timings.bootReadyMs);
    h.close();
    await vm.removeVm(`b-${c}-${i}`);
    log(`${c}: boot to agent ready ${h.info().timings.bootReadyMs} ms`);
  }
}
for (const d of scratch) rmSync(d, { recursive: true, force: true });
console.log(`| initramfs | size MiB | build ms (warm) | boot to agent ready p50 ms | runs |\n|---|---|---|---|---|`);
for (const c of comps) {
  const s = summarise(out.compression[c].boots);
  out.compression[c].bootReadyMs = s;
  console.log(`| ${c} | ${(out.compression[c].initrdBytes / 1048576).toFixed(1)} | ${out.compression[c].buildMs} | ${s.p50} | ${s.n} |`);
}
console.log(`\nbuild: cold cache ${out.coldCacheMs} ms, warm cache ${out.warmCacheMs} ms (${values.image})`);
mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
writeFileSync(join(ROOT, 'bench/results/build-latest.json'), JSON.stringify(out, null, 2) + '\n');
process.exit(0);
