/**
 * The builder against the real Debian archive and npm registry: reproducibility
 * from empty caches, the cache's integrity, offline builds, and the failures a
 * user can meet, each with its message.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync, copyFileSync, existsSync, readdirSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { build, type BuildEvent } from '../../builder/build.ts';
import { BlobCache } from '../../builder/cache.ts';
import { mirrorFromAptSources } from '../../builder/debian/archive.ts';
import { image, tmp, cleanupTmp } from './helpers.ts';

afterAll(cleanupTmp);

const sha = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');
const lock = JSON.parse(readFileSync(image('minimal').replace('.yaml', '.scion.lock'), 'utf8'));
// a port that was free a moment ago: nothing listens there, so connections are refused
const OFFLINE = await new Promise<string>((res) => {
  const s = createServer().listen(0, '127.0.0.1', () => { const p = (s.address() as any).port; s.close(() => res(`http://127.0.0.1:${p}/debian`)); });
});

describe('reproducible builds', () => {
  const cacheA = tmp('cache-a');
  const outA = tmp('out-a');
  let first: Awaited<ReturnType<typeof build>>;

  it('two builds of minimal.yaml, each from an empty cache, with one lock, are byte-identical', async () => {
    first = await build({ definitionPath: image('minimal'), cacheDir: cacheA, outDir: outA });
    const second = await build({ definitionPath: image('minimal'), cacheDir: tmp('cache-b'), outDir: tmp('out-b') });
    expect(second.sha256).toEqual(first.sha256);
    expect(sha(second.initrd)).toBe(sha(first.initrd));
    expect(sha(second.vmlinuz)).toBe(sha(first.vmlinuz));
    expect(first.lockChanged).toBe(false);
    const manifest = JSON.parse(readFileSync(first.manifest, 'utf8'));
    expect(manifest.outputs['initrd.img'].sha256).toBe(sha(first.initrd));
    expect(manifest.packages.map((p: any) => p.name)).toEqual(expect.arrayContaining(['busybox-static', 'libc6', 'linux-image-amd64']));
    expect(manifest.packages.find((p: any) => p.name === 'libc6').version).toBe(lock.sets.guest.packages.find((p: any) => p.name === 'libc6').version);
  });

  it('a tampered cached .deb is never used: it is discarded, fetched again, and the output is unchanged', async () => {
    const busybox = lock.sets.guest.packages.find((p: any) => p.name === 'busybox-static');
    const path = new BlobCache(cacheA).pathOf(busybox.sha256);
    const bytes = readFileSync(path);
    bytes[bytes.length >> 1] ^= 0xff;
    writeFileSync(path, bytes);
    const events: BuildEvent[] = [];
    const r = await build({ definitionPath: image('minimal'), cacheDir: cacheA, outDir: outA, onEvent: (e) => events.push(e) });
    expect(events).toContainEqual({ type: 'log', message: `cached blob ${busybox.sha256} did not match its SHA-256: discarded and fetched again` });
    expect(r.sha256).toEqual(first.sha256);
    expect(sha(path)).toBe(busybox.sha256);
  });

  it('with no network, a warm cache builds the same bytes', async () => {
    const r = await build({ definitionPath: image('minimal'), cacheDir: cacheA, outDir: tmp('out-offline'), mirror: OFFLINE });
    expect(r.sha256).toEqual(first.sha256);
  });

  it('with no network and an empty cache, the build fails clearly', async () => {
    await expect(build({ definitionPath: image('minimal'), cacheDir: tmp('cache-empty'), outDir: tmp('out-x'), mirror: OFFLINE }))
      .rejects.toMatchObject({ code: 'E_NETWORK', message: expect.stringMatching(/^cannot fetch http:\/\/127\.0\.0\.1:\d+\/debian\/pool\/.*\.deb: ECONNREFUSED$/) });
  });

  it('a failed build leaves the previous artifacts untouched', async () => {
    const dir = tmp('def-fail');
    const out = tmp('out-fail');
    const def = join(dir, 'minimal.yaml');
    copyFileSync(image('minimal'), def);
    copyFileSync(image('minimal').replace('.yaml', '.scion.lock'), join(dir, 'minimal.scion.lock'));
    const good = await build({ definitionPath: def, cacheDir: cacheA, outDir: out });
    writeFileSync(def, readFileSync(def, 'utf8').replace('virtio_blk]', 'virtio_blk, no_such_module]'));
    await expect(build({ definitionPath: def, cacheDir: cacheA, outDir: out })).rejects.toThrow('kernel module "no_such_module" is not in the kernel package');
    expect(sha(join(out, 'minimal', 'initrd.img'))).toBe(good.sha256.initrd);
    expect(JSON.parse(readFileSync(join(out, 'minimal', 'manifest.json'), 'utf8')).outputs['initrd.img'].sha256).toBe(good.sha256.initrd);
  });

  it('a build that fails after writing new outputs leaves the previous artifacts and no temporary directory', async () => {
    const dir = tmp('def-late');
    const out = tmp('out-late');
    const def = join(dir, 'minimal.yaml');
    copyFileSync(image('minimal'), def);
    copyFileSync(image('minimal').replace('.yaml', '.scion.lock'), join(dir, 'minimal.scion.lock'));
    const good = await build({ definitionPath: def, cacheDir: cacheA, outDir: out });
    // another initrd (one more file), and a failure once its bytes are written but before the manifest
    writeFileSync(def, readFileSync(def, 'utf8') + '\nfiles:\n  - path: /etc/late\n    contents: "changed"\n');
    const failLate = (ev: BuildEvent) => { if (ev.type === 'log' && ev.message.startsWith('wrote vmlinuz and initrd.img')) throw new Error('interrupted after writing'); };
    await expect(build({ definitionPath: def, cacheDir: cacheA, outDir: out, onEvent: failLate })).rejects.toThrow('interrupted after writing');
    expect(sha(join(out, 'minimal', 'initrd.img'))).toBe(good.sha256.initrd);
    expect(JSON.parse(readFileSync(join(out, 'minimal', 'manifest.json'), 'utf8')).outputs['initrd.img'].sha256).toBe(good.sha256.initrd);
    expect(readdirSync(out)).toEqual(['minimal']);
  });
});

describe('archive failures', () => {
  const defWith = (patch: (t: string) => string) => {
    const dir = tmp('def');
    const p = join(dir, 'img.yaml');
    writeFileSync(p, patch(readFileSync(image('minimal'), 'utf8')));
    return p;
  };

  it('an unknown package is named', async () => {
    const def = defWith((t) => t.replace('agent:', 'packages: [scion-no-such-package]\nagent:'));
    await expect(build({ definitionPath: def, outDir: tmp('o') })).rejects.toMatchObject({
      code: 'E_PKG_UNKNOWN', message: 'package "scion-no-such-package" is not in the archive index',
    });
    expect(existsSync(def.replace('.yaml', '.scion.lock'))).toBe(false);
  });

  it('an InRelease whose signature does not verify is refused', async () => {
    const upstream = (await mirrorFromAptSources()) ?? 'http://deb.debian.org/debian';
    // a local mirror that serves the real InRelease with one signed byte changed
    const server = createServer(async (req, res) => {
      const r = await fetch(upstream + req.url!.replace(/^\/debian/, ''));
      let body = Buffer.from(await r.arrayBuffer());
      if (req.url!.endsWith('/InRelease')) body = Buffer.from(body.toString('utf8').replace(/^Date: .*$/m, 'Date: Thu, 01 Jan 2099 00:00:00 UTC'));
      res.writeHead(r.status, { 'content-length': body.length });
      res.end(body);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const mirror = `http://127.0.0.1:${(server.address() as any).port}/debian`;
      await expect(build({ definitionPath: defWith((t) => t), outDir: tmp('o'), mirror, cacheDir: tmp('cache-sig') })).rejects.toMatchObject({
        code: 'E_SIGNATURE', message: 'InRelease signature is not valid: BAD signature',
      });
    } finally { server.close(); }
  });
});
