/**
 * `scion pull` against a registry that misbehaves the way a hostile or broken
 * one would: an endless error body, a token endpoint that streams forever, a
 * blob that stalls, and a blob that is slow but steady. The registry is a
 * stand-in HTTP server on 127.0.0.1 written here: a real registry cannot be
 * made to send these answers. The pull runs as the real CLI in its own
 * process, whose memory is read from /proc while it runs.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { createServer, type Server, type ServerResponse } from 'node:http';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { artifactManifest, MANIFEST_MEDIA_TYPE } from '../../registry/artifact.ts';
import { tmp, cleanupTmp, ROOT } from './helpers.ts';

import { sha256 as sha } from '../../common/digest.ts';

// a small but complete scion image, consistent with itself
const vmlinuz = randomBytes(96 * 1024);
const initrd = randomBytes(160 * 1024);
const inner = Buffer.from(
  JSON.stringify({
    manifestVersion: 1,
    name: 'hostile',
    definition: { path: 'hostile.yaml', sha256: sha('def') },
    debian: { mirror: 'http://mirror.invalid/debian', suite: 'trixie', architecture: 'amd64' },
    sourceDateEpoch: 0,
    kernel: { version: '6.12', modules: [], cmdline: 'console=ttyS0' },
    guestRamMB: 256,
    ports: [],
    compression: 'none',
    agent: { sha256: sha('agent'), runtime: { package: 'quickjs', version: '2025.04.26-1', sha256: sha('quickjs') } },
    packages: [],
    outputs: {
      vmlinuz: { sha256: sha(vmlinuz), size: vmlinuz.length },
      'initrd.img': { sha256: sha(initrd), size: initrd.length, uncompressedSize: initrd.length },
    },
  }),
);
const blobs = new Map<string, Buffer>([
  [`sha256:${sha(vmlinuz)}`, vmlinuz],
  [`sha256:${sha(initrd)}`, initrd],
  [`sha256:${sha(inner)}`, inner],
]);
const manifest = JSON.stringify(
  artifactManifest('hostile', [
    { name: 'vmlinuz', digest: `sha256:${sha(vmlinuz)}`, size: vmlinuz.length },
    { name: 'initrd.img', digest: `sha256:${sha(initrd)}`, size: initrd.length },
    { name: 'manifest.json', digest: `sha256:${sha(inner)}`, size: inner.length },
  ]),
);

type Behaviour = 'endless-500' | 'endless-token' | 'stalled-blob' | 'steady-blob';
let server: Server;
let port = 0;
const timers = new Set<NodeJS.Timeout>();

/** Write `data` forever, a chunk at a time, as fast as the client takes it (until it hangs up). */
function endless(res: ServerResponse, chunk = Buffer.alloc(64 * 1024, 0x61)) {
  const pump = () => {
    while (!res.destroyed && res.write(chunk));
  };
  res.on('drain', pump);
  pump();
}

beforeAll(async () => {
  server = createServer((req, res) => {
    // the behaviour is the repository's first component (/v2/<behaviour>/img/...), or the token realm's path
    const path = (req.url ?? '').split('?')[0];
    const parts = path.split('/');
    const b = (parts[1] === 'v2' ? parts[2] : parts[1]) as Behaviour;
    if (b === 'endless-500') {
      res.writeHead(500, { 'content-type': 'text/plain' });
      endless(res);
      return;
    }
    if (b === 'endless-token') {
      if (parts[1] !== 'v2') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write('{"token":"');
        endless(res);
        return;
      }
      res.writeHead(401, { 'www-authenticate': `Bearer realm="http://127.0.0.1:${port}/endless-token/token",service="stand-in"` });
      res.end();
      return;
    }
    const m = /^\/v2\/(.+)\/(manifests|blobs)\/(.+)$/.exec(path);
    if (!m) {
      res.writeHead(404);
      res.end();
      return;
    }
    if (m[2] === 'manifests') {
      res.writeHead(200, { 'content-type': MANIFEST_MEDIA_TYPE });
      res.end(manifest);
      return;
    }
    const blob = blobs.get(m[3]);
    if (!blob) {
      res.writeHead(404);
      res.end();
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(blob.length) });
    if (b === 'stalled-blob') {
      res.write(blob.subarray(0, 1000));
      return;
    } // then nothing, connection held open
    // steady: 16 KiB every 250 ms (64 KiB/s): the whole image takes ~4 s, longer than the 2 s stall limit
    let off = 0;
    const t = setInterval(() => {
      if (res.destroyed) {
        clearInterval(t);
        timers.delete(t);
        return;
      }
      res.write(blob.subarray(off, off + 16 * 1024));
      off += 16 * 1024;
      if (off >= blob.length) {
        clearInterval(t);
        timers.delete(t);
        res.end();
      }
    }, 250);
    timers.add(t);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  port = (server.address() as { port: number }).port;
});
afterAll(async () => {
  for (const t of timers) clearInterval(t);
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
  cleanupTmp();
});

/** `scion pull --json` of the stand-in's behaviour, with the peak RSS of the pull process read from /proc while it runs. */
async function pullAgainst(behaviour: Behaviour, outDir: string): Promise<{ code: number | null; out: any; peakRssMB: number; ms: number }> {
  const t0 = Date.now();
  // the stand-in names its behaviour as the first path segment: the repository's first component
  const p = spawn(process.execPath, [join(ROOT, 'bin/scion.js'), 'pull', `127.0.0.1:${port}/${behaviour}/img:1`, '--out', outDir, '--json'], {
    env: { ...process.env, SCION_REGISTRY_STALL_S: '2', DOCKER_CONFIG: tmp('no-docker-config') },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  p.stdout.on('data', (c) => (stdout += c));
  let peak = 0;
  const poll = setInterval(() => {
    try {
      const kb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${p.pid}/status`, 'utf8'))?.[1] ?? 0);
      peak = Math.max(peak, kb);
    } catch {
      /* exited between looks */
    }
  }, 50);
  const code = await new Promise<number | null>((r) => p.on('exit', r));
  clearInterval(poll);
  return { code, out: stdout.includes('{') ? JSON.parse(stdout.slice(stdout.indexOf('{'))) : undefined, peakRssMB: peak / 1024, ms: Date.now() - t0 };
}

describe('a registry that misbehaves', () => {
  it('an endless error body: a typed HTTP error at once, memory bounded, nothing in --out', async () => {
    const out = join(tmp('hostile'), 'new-out');
    const r = await pullAgainst('endless-500', out);
    expect(r.code).toBe(4);
    expect(r.out.error.code).toBe('E_REGISTRY_HTTP');
    expect(r.out.error.message).toContain('HTTP 500');
    expect(r.peakRssMB).toBeLessThan(300);
    expect(existsSync(out)).toBe(false);
  });

  it('a token endpoint that streams forever: refused past its cap, memory bounded', async () => {
    const out = join(tmp('hostile'), 'new-out');
    const r = await pullAgainst('endless-token', out);
    expect(r.code).toBe(4);
    expect(r.out.error.code).toBe('E_REGISTRY_RESPONSE_TOO_LARGE');
    expect(r.out.error.message).toContain("the token service's answer is larger than 65536 bytes");
    expect(r.peakRssMB).toBeLessThan(300);
    expect(existsSync(out)).toBe(false);
  });

  it('a blob that stalls: E_REGISTRY_STALLED after the stall limit, no temporary directory left, --out removed', async () => {
    const parent = tmp('hostile');
    const out = join(parent, 'a', 'b');
    const r = await pullAgainst('stalled-blob', out);
    expect(r.code).toBe(4);
    expect(r.out.error.code).toBe('E_REGISTRY_STALLED');
    expect(r.out.error.message).toMatch(/blob vmlinuz: no data for 2 s/);
    expect(r.peakRssMB).toBeLessThan(300);
    expect(readdirSync(parent)).toEqual([]); // both directories the pull made are gone
  });

  it('a blob that is slow but steady: longer than the stall limit in all, and it succeeds', async () => {
    const out = tmp('steady');
    const r = await pullAgainst('steady-blob', out);
    expect(r.out, JSON.stringify(r.out)).toMatchObject({ ok: true, name: 'hostile' });
    expect(r.code).toBe(0);
    expect(r.ms).toBeGreaterThan(2000); // it really outlasted the stall limit
    expect(readFileSync(join(out, 'hostile', 'vmlinuz')).equals(vmlinuz)).toBe(true);
    expect(readFileSync(join(out, 'hostile', 'initrd.img')).equals(initrd)).toBe(true);
  });
});
