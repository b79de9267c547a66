/**
 * `scion verify <image.yaml>`: build twice, each from an empty cache and into
 * its own temporary directory, and compare every output byte for byte. When
 * they differ, the report names the first output that differs and, for the
 * initramfs, the first file inside it and how. Both builds use the lock as it
 * is (neither rewrites it unless it is missing), and everything temporary is
 * removed, whatever the outcome.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { runBuffer } from '../common/run.ts';
import { removeOnInterrupt } from '../common/interrupt.ts';
import { build, type BuildEvent, type BuildResult, type Compression } from './build.ts';
import { IMAGE_FILES as OUTPUT_FILES } from '../common/image-layout.ts';
import { parseCpio, firstCpioDifference, firstLineDifference } from './compare.ts';

/** What `verify` takes: the definition, the mirror and compression both builds use, where their caches go, a progress callback per build. */
export interface VerifyOptions {
  definitionPath: string;
  mirror?: string;
  compression?: Compression;
  /** where the two builds' caches and outputs go (default: the system temp dir) */
  tmpDir?: string;
  onEvent?: (build: 1 | 2, ev: BuildEvent) => void;
}

/** Where two builds differ: the output, the path inside it (an initramfs member), and how. */
export interface Difference {
  output: string;
  /** for initrd.img: the first file inside it that differs */
  path?: string;
  how: string;
}

/** `identical`, or the first difference found between the two builds. */
export interface VerifyResult {
  name: string;
  identical: boolean;
  outputs: { name: string; sha256: [string, string]; size: [number, number] }[];
  difference?: Difference;
  buildMs: [number, number];
}

async function unpack(data: Buffer, compression: string): Promise<Buffer> {
  if (compression === 'gzip') return gunzipSync(data);
  if (compression === 'zstd') return runBuffer('zstd', ['-dc'], data, { code: 'E_DECOMPRESS', what: 'zstd -dc (initramfs)' });
  return data;
}

/** The first difference between two finished builds (pure over their files). */
export async function compareBuilds(a: BuildResult, b: BuildResult, compression: string): Promise<Difference | undefined> {
  for (const name of OUTPUT_FILES) {
    const oa = a.outputs.find((o) => o.name === name)!,
      ob = b.outputs.find((o) => o.name === name)!;
    if (oa.sha256 === ob.sha256) continue;
    if (name === 'initrd.img') {
      const [x, y] = await Promise.all([readFile(oa.path).then((d) => unpack(d, compression)), readFile(ob.path).then((d) => unpack(d, compression))]);
      const d = firstCpioDifference(parseCpio(x), parseCpio(y));
      if (d) return { output: name, path: d.path, how: d.how };
      return { output: name, how: 'the archived files are the same; the compressed stream differs (compressor version or settings)' };
    }
    if (name === 'vmlinuz') return { output: name, how: `sha256 ${oa.sha256} vs ${ob.sha256}` };
    const d = firstLineDifference(await readFile(oa.path, 'utf8'), await readFile(ob.path, 'utf8'));
    return { output: name, how: d ? `line ${d.line}: ${d.first.trim()} vs ${d.second.trim()}` : 'bytes differ' };
  }
  return undefined;
}

/** Build a definition twice, each from an empty cache, and compare the outputs byte for byte. */
export async function verify(opts: VerifyOptions): Promise<VerifyResult> {
  const root = await mkdtemp(join(opts.tmpDir ?? tmpdir(), 'scion-verify-'));
  const forget = removeOnInterrupt(root);
  try {
    const results: BuildResult[] = [];
    const ms: number[] = [];
    for (const n of [1, 2] as const) {
      const t0 = performance.now();
      results.push(
        await build({
          definitionPath: opts.definitionPath,
          cacheDir: join(root, `cache-${n}`),
          outDir: join(root, `out-${n}`),
          mirror: opts.mirror,
          compression: opts.compression,
          onEvent: opts.onEvent && ((ev) => opts.onEvent!(n, ev)),
        }),
      );
      ms.push(Math.round(performance.now() - t0));
    }
    const [a, b] = results;
    const difference = await compareBuilds(a, b, opts.compression ?? 'none');
    return {
      name: a.name,
      identical: !difference,
      outputs: OUTPUT_FILES.map((name) => {
        const oa = a.outputs.find((o) => o.name === name)!,
          ob = b.outputs.find((o) => o.name === name)!;
        return { name, sha256: [oa.sha256, ob.sha256], size: [oa.size, ob.size] };
      }),
      difference,
      buildMs: [ms[0], ms[1]],
    };
  } finally {
    await rm(root, { recursive: true, force: true });
    forget();
  }
}
