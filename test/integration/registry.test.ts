/**
 * scion push / pull against a real registry (Debian's docker-registry on
 * 127.0.0.1): the artifact as skopeo reads it, blobs the registry has are
 * not sent again (counted in the registry's own log), chunked uploads, a
 * tampered blob refused with nothing written, clear errors for an
 * unreachable registry, a wrong tag and missing or wrong credentials, and
 * `scion boot <reference>`.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFileSync, writeFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { $ } from 'zx';
import { build } from '../../builder/build.ts';
import { push, pull, pullCached } from '../../registry/transfer.ts';
import { ARTIFACT_TYPE } from '../../registry/artifact.ts';
import { LAYER_MEDIA_TYPES as LAYER_TYPES } from '../../common/image-layout.ts';
import { image, tmp, cleanupTmp, isolateRunDirs, removeEverything, scionQemuPids, ROOT } from './helpers.ts';
import { startRegistry, type TestRegistry } from '../support/registry.ts';

let reg: TestRegistry;
let dir: string;
const dirs = isolateRunDirs('registry');
const scion = (...args: string[]) =>
  $({ nothrow: true, quiet: true, env: { ...process.env, DOCKER_CONFIG: tmp('no-docker-config') } })`${process.execPath} ${join(ROOT, 'bin/scion.js')} ${args}`;

beforeAll(async () => {
  reg = await startRegistry();
  dir = (await build({ definitionPath: image('minimal'), outDir: tmp('reg-out') })).dir;
});
afterAll(async () => {
  await reg?.stop();
  await removeEverything(dirs);
  cleanupTmp();
});

describe('push and pull', () => {
  let digest: string;

  it('pushes the image as one OCI artifact that skopeo reads, the initramfs in chunks', async () => {
    // chunks smaller than the (6 MiB) initramfs: it goes up in several PATCHes, and so does the kernel
    const CHUNK = 2 * 1024 * 1024;
    const r = await push(dir, `${reg.host}/scion/minimal:1.0`, { chunkBytes: CHUNK });
    digest = r.digest;
    expect(r.uploaded).toEqual(['config (empty)', 'vmlinuz', 'initrd.img', 'manifest.json', 'sbom.cdx.json', 'provenance.intoto.json']);
    expect(reg.requests('POST', '/blobs/uploads/')).toBe(6);
    const chunksOf = (f: string) => Math.ceil(readFileSync(join(dir, f)).length / CHUNK);
    expect(chunksOf('initrd.img')).toBeGreaterThan(1);
    expect(reg.requests('PATCH', '/blobs/uploads/')).toBe(chunksOf('initrd.img') + chunksOf('vmlinuz'));
    const raw = JSON.parse((await $`skopeo inspect --raw --tls-verify=false docker://${reg.host}/scion/minimal:1.0`.quiet()).stdout);
    expect(raw.artifactType).toBe(ARTIFACT_TYPE);
    expect(raw.layers.map((l: any) => [l.annotations['org.opencontainers.image.title'], l.mediaType])).toEqual(Object.entries(LAYER_TYPES));
    for (const l of raw.layers) {
      const bytes = readFileSync(join(dir, l.annotations['org.opencontainers.image.title']));
      expect(l.size).toBe(bytes.length);
      expect(l.digest).toBe(`sha256:${(await import('node:crypto')).createHash('sha256').update(bytes).digest('hex')}`);
    }
  });

  it('a second push uploads no blob again (the registry log counts no new upload)', async () => {
    const before = reg.requests('POST', '/blobs/uploads/');
    const r = await push(dir, `${reg.host}/scion/minimal:1.1`);
    expect(r.uploaded).toEqual([]);
    expect(r.skipped).toHaveLength(6);
    expect(reg.requests('POST', '/blobs/uploads/')).toBe(before);
    expect(r.digest).toBe(digest); // the same build under another tag: the same manifest
  });

  it('pull (by tag and by digest) gives the same bytes, every digest checked', async () => {
    const out = tmp('pulled');
    const byTag = await pull(`${reg.host}/scion/minimal:1.0`, out);
    for (const f of Object.keys(LAYER_TYPES)) expect(readFileSync(join(byTag.dir, f)).equals(readFileSync(join(dir, f))), f).toBe(true);
    const byDigest = await pull(`${reg.host}/scion/minimal@${digest}`, tmp('pulled-digest'));
    expect(byDigest.digest).toBe(digest);
    expect(readdirSync(out)).toEqual(['minimal']); // no temporary directory left
  });

  it('a tampered blob is refused, nothing is written, and the previous copy stays as it was', async () => {
    const out = tmp('pulled-tampered');
    const first = await pull(`${reg.host}/scion/minimal:1.0`, out);
    const before = readFileSync(join(first.dir, 'initrd.img'));
    const raw = JSON.parse((await $`skopeo inspect --raw --tls-verify=false docker://${reg.host}/scion/minimal:1.0`.quiet()).stdout);
    const initrd = raw.layers.find((l: any) => l.annotations['org.opencontainers.image.title'] === 'initrd.img').digest.slice(7);
    const blob = join(reg.storage, 'docker/registry/v2/blobs/sha256', initrd.slice(0, 2), initrd, 'data');
    const bytes = readFileSync(blob);
    bytes[4096] ^= 0x01;
    writeFileSync(blob, bytes);
    const r = await scion('pull', `${reg.host}/scion/minimal:1.0`, '--out', out, '--json');
    expect(r.exitCode).toBe(5);
    const err = JSON.parse(r.stdout).error;
    expect(err.code).toBe('E_DIGEST_MISMATCH');
    expect(err.message).toContain(`initrd.img: the bytes the registry sent hash to`);
    expect(err.message).toContain(`the manifest names sha256:${initrd}`);
    expect(readdirSync(out)).toEqual(['minimal']);
    expect(readFileSync(join(first.dir, 'initrd.img')).equals(before)).toBe(true);
    bytes[4096] ^= 0x01;
    writeFileSync(blob, bytes); // restored for the tests after this one
  });

  it('an unreachable registry, a wrong tag and a malformed reference give clear errors and exit codes', async () => {
    const down = await scion('pull', '127.0.0.1:9/scion/minimal:1.0', '--out', tmp('x'), '--json');
    expect(down.exitCode).toBe(4);
    expect(JSON.parse(down.stdout).error).toMatchObject({
      code: 'E_REGISTRY_UNREACHABLE',
      message: expect.stringContaining('cannot reach the registry 127.0.0.1:9'),
    });
    const tag = await scion('pull', `${reg.host}/scion/minimal:nope`, '--out', tmp('x'), '--json');
    expect(tag.exitCode).toBe(1);
    expect(JSON.parse(tag.stdout).error).toMatchObject({
      code: 'E_UNKNOWN_TAG',
      message: `${reg.host}/scion/minimal: no manifest nope (unknown tag or digest)`,
    });
    const bad = await scion('push', dir, `${reg.host}/Scion/../x:1`, '--json');
    expect(bad.exitCode).toBe(3);
    expect(JSON.parse(bad.stdout).error.code).toBe('E_IMAGE_REF');
  });

  it('a directory changed after its build is not pushed', async () => {
    const copy = tmp('changed');
    for (const f of Object.keys(LAYER_TYPES)) writeFileSync(join(copy, f), readFileSync(join(dir, f)));
    writeFileSync(join(copy, 'vmlinuz'), Buffer.concat([readFileSync(join(dir, 'vmlinuz')), Buffer.from('x')]));
    await expect(push(copy, `${reg.host}/scion/minimal:changed`)).rejects.toMatchObject({
      code: 'E_DIGEST_MISMATCH',
      message: expect.stringContaining('vmlinuz does not match the SHA-256 in its manifest.json'),
    });
  });

  it('a reference is downloaded once into the cache (by manifest digest); a damaged cached copy is pulled again', async () => {
    const cache = tmp('image-cache');
    const a = await pullCached(`${reg.host}/scion/minimal:1.0`, cache);
    expect(a).toMatchObject({ cached: false, digest, dir: join(cache, digest.replace(':', '-'), 'minimal') });
    const gets = reg.requests('GET', '/blobs/');
    const b = await pullCached(`${reg.host}/scion/minimal:1.1`, cache); // the same build under another tag
    expect(b).toMatchObject({ cached: true, dir: a.dir });
    expect(reg.requests('GET', '/blobs/')).toBe(gets);
    writeFileSync(join(a.dir, 'vmlinuz'), 'not a kernel');
    const c = await pullCached(`${reg.host}/scion/minimal:1.0`, cache);
    expect(c.cached).toBe(false);
    expect(readFileSync(join(c.dir, 'vmlinuz')).equals(readFileSync(join(dir, 'vmlinuz')))).toBe(true);
  });

  it('scion boot <reference> pulls, verifies and boots it', async () => {
    const r = await scion('boot', `${reg.host}/scion/minimal:1.0`, '--name', 'from-registry', '--json');
    expect(r.exitCode, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).name).toBe('from-registry');
    const info = await scion('info', 'from-registry', '--json');
    expect(JSON.parse(info.stdout).identity.hostname).toBe('minimal');
    expect((await scion('rm', 'from-registry')).exitCode).toBe(0);
    expect(await scionQemuPids()).toEqual([]);
  });
});

describe('credentials', () => {
  let locked: TestRegistry;
  beforeAll(async () => {
    locked = await startRegistry({ user: 'ci', password: 's3cret' });
  });
  afterAll(async () => {
    await locked?.stop();
  });

  const withConfig = (auth?: string) => {
    const d = tmp('docker-config');
    if (auth) writeFileSync(join(d, 'config.json'), JSON.stringify({ auths: { [`http://${locked.host}`]: { auth: Buffer.from(auth).toString('base64') } } }));
    return d;
  };

  it('403 (an account without access) says so', async () => {
    // a stand-in, said plainly: Debian's registry with htpasswd has no per-repository access
    // rules, so it can never answer 403; a token service with ACLs is what would
    const { createServer } = await import('node:http');
    const server = createServer((_req, res) => {
      res.writeHead(403, { 'content-type': 'application/json' });
      res.end('{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const host = `127.0.0.1:${(server.address() as any).port}`;
      await expect(push(dir, `${host}/scion/minimal:1.0`, { dockerConfig: join(withConfig('ci:s3cret'), 'config.json') })).rejects.toMatchObject({
        code: 'E_REGISTRY_DENIED',
        message: `${host}/scion/minimal: HTTP 403: the registry denies anonymous access to the repository`,
        hint: expect.stringContaining('no access to this repository'),
      });
    } finally {
      server.close();
    }
  });

  it('401 without credentials, 401 with wrong ones (each says what to do), and a push with the right ones', async () => {
    await expect(push(dir, `${locked.host}/scion/minimal:1.0`, { dockerConfig: join(withConfig(), 'config.json') })).rejects.toMatchObject({
      code: 'E_REGISTRY_AUTH',
      message: `${locked.host}/scion/minimal: HTTP 401: the registry asks for credentials and the Docker config has none for it`,
      hint: expect.stringContaining('docker login'),
    });
    await expect(push(dir, `${locked.host}/scion/minimal:1.0`, { dockerConfig: join(withConfig('ci:wrong'), 'config.json') })).rejects.toMatchObject({
      code: 'E_REGISTRY_AUTH',
      message: `${locked.host}/scion/minimal: HTTP 401: the registry refused the credentials in the Docker config`,
    });
    expect(locked.requests('POST', '/blobs/uploads/')).toBe(0);
    const ok = await push(dir, `${locked.host}/scion/minimal:1.0`, { dockerConfig: join(withConfig('ci:s3cret'), 'config.json') });
    expect(ok.uploaded).toHaveLength(6);
    const back = await pull(`${locked.host}/scion/minimal:1.0`, tmp('locked-pull'), { dockerConfig: join(withConfig('ci:s3cret'), 'config.json') });
    expect(readFileSync(join(back.dir, 'initrd.img')).equals(readFileSync(join(dir, 'initrd.img')))).toBe(true);
  });
});
