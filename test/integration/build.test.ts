/**
 * The builder against the real Debian archive and npm registry: reproducibility
 * from empty caches, the cache's integrity, offline builds, and the failures a
 * user can meet, each with its message.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync, copyFileSync, existsSync, readdirSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { build, type BuildEvent } from '../../builder/build.ts';
import { BlobCache } from '../../builder/cache.ts';
import { mirrorFromAptSources } from '../../builder/debian/archive.ts';
import { tmpdir } from 'node:os';
import * as CDX from '@cyclonedx/cyclonedx-library';
import { PackageURL } from 'packageurl-js';
import { $ } from 'zx';
import { parseCpio } from '../../builder/compare.ts';
import { image, tmp, cleanupTmp, ROOT } from './helpers.ts';

afterAll(cleanupTmp);

import { sha256File as sha } from '../support/guest.ts';
const lock = JSON.parse(readFileSync(image('minimal').replace('.yaml', '.scion.lock'), 'utf8'));
// a port that was free a moment ago: nothing listens there, so connections are refused
const OFFLINE = await new Promise<string>((res) => {
  const s = createServer().listen(0, '127.0.0.1', () => {
    const p = (s.address() as any).port;
    s.close(() => res(`http://127.0.0.1:${p}/debian`));
  });
});

describe('reproducible builds', () => {
  const cacheA = tmp('cache-a');
  const outA = tmp('out-a');
  let first: Awaited<ReturnType<typeof build>>;

  it('a build from an empty cache writes the outputs it lists, with sizes and SHA-256s', async () => {
    first = await build({ definitionPath: image('minimal'), cacheDir: cacheA, outDir: outA });
    expect(first.lockChanged).toBe(false);
    expect(first.outputs.map((o) => o.name)).toEqual(['vmlinuz', 'initrd.img', 'manifest.json', 'sbom.cdx.json', 'provenance.intoto.json']);
    for (const o of first.outputs) {
      expect(o.path).toBe(join(outA, 'minimal', o.name));
      expect(sha(o.path)).toBe(o.sha256);
      expect(readFileSync(o.path).length).toBe(o.size);
    }
    expect(readdirSync(join(outA, 'minimal')).sort()).toEqual(first.outputs.map((o) => o.name).sort());
    const manifest = JSON.parse(readFileSync(first.manifest, 'utf8'));
    expect(manifest.outputs['initrd.img'].sha256).toBe(sha(first.initrd));
    expect(manifest.packages.find((p: any) => p.name === 'libc6').version).toBe(lock.sets.guest.packages.find((p: any) => p.name === 'libc6').version);
  });

  it('`scion verify images/minimal.yaml`: two builds from empty caches are identical, SBOM and provenance included', async () => {
    const r = await $({ nothrow: true, quiet: true, cwd: tmp('vcwd') })`${process.execPath} ${join(ROOT, 'bin/scion.js')} verify ${image('minimal')} --json`;
    expect(r.exitCode, r.stderr).toBe(0);
    const v = JSON.parse(r.stdout);
    expect(v).toMatchObject({ ok: true, name: 'minimal', identical: true });
    expect(v.outputs.map((o: any) => o.name)).toEqual(['vmlinuz', 'initrd.img', 'manifest.json', 'sbom.cdx.json', 'provenance.intoto.json']);
    for (const o of v.outputs) {
      expect(o.sha256[0]).toBe(o.sha256[1]);
      // and the same bytes as this file's own build from another empty cache
      expect(o.sha256[0]).toBe(first.outputs.find((x) => x.name === o.name)!.sha256);
    }
    expect(readdirSync(tmpdir()).filter((d) => d.startsWith('scion-verify-'))).toEqual([]);
  });

  it('an interrupted `scion verify` (SIGINT) removes its temporary builds and exits 130', async () => {
    const t = tmp('verify-int');
    const p = $({
      nothrow: true,
      quiet: true,
      env: { ...process.env, TMPDIR: t },
    })`${process.execPath} ${join(ROOT, 'bin/scion.js')} verify ${image('minimal')}`;
    for (let i = 0; i < 300 && !readdirSync(t).some((d) => d.startsWith('scion-verify-') && readdirSync(join(t, d)).length); i++)
      await new Promise((r) => setTimeout(r, 50));
    expect(readdirSync(t).filter((d) => d.startsWith('scion-verify-'))).toHaveLength(1); // it started making them
    await new Promise((r) => setTimeout(r, 1000)); // into the download
    p.kill('SIGINT');
    const r = await p;
    expect(r.exitCode).toBe(130);
    expect(r.stderr).toMatch(/scion: interrupted: removed .*scion-verify-/);
    expect(readdirSync(t).filter((d) => d.startsWith('scion-'))).toEqual([]); // (tsx, which runs the checkout's CLI, keeps its cache there)
  });

  it('the SBOM is valid CycloneDX 1.6 and lists exactly the packages of the lock, with purls, hashes and relations', async () => {
    const text = readFileSync(first.sbom, 'utf8');
    expect(await new CDX.Validation.JsonStrictValidator(CDX.Spec.Version.v1dot6).validate(text)).toBeNull();
    const bom = JSON.parse(text);
    expect(bom.specVersion).toBe('1.6');
    const debs = bom.components.filter((c: any) => c.purl?.startsWith('pkg:deb/'));
    const locked = new Map<string, any>();
    for (const s of Object.values<any>(lock.sets)) for (const p of s.packages) locked.set(`${p.name}@${p.version}`, p);
    expect(debs.map((c: any) => `${c.name}@${c.version}`).sort()).toEqual([...locked.keys()].sort());
    for (const c of debs) {
      const p = locked.get(`${c.name}@${c.version}`);
      expect(c.hashes).toEqual([{ alg: 'SHA-256', content: p.sha256 }]);
      const arch = /_([a-z0-9]+)\.deb$/.exec(p.filename)![1];
      const purl = PackageURL.fromString(c.purl);
      expect({ type: purl.type, namespace: purl.namespace, name: purl.name, version: purl.version, qualifiers: purl.qualifiers }).toEqual({
        type: 'deb',
        namespace: 'debian',
        name: c.name,
        version: c.version,
        qualifiers: { arch, distro: lock.codename },
      });
    }
    // the agent runs on the locked QuickJS package: no npm component, and the agent depends on that .deb
    expect(bom.components.filter((c: any) => c.purl?.startsWith('pkg:npm/'))).toEqual([]);
    const qjs = debs.find((c: any) => c.name === 'quickjs');
    expect(qjs.version).toBe(locked.get(`quickjs@${qjs.version}`).version);
    const agent = bom.components.find((c: any) => c.name === 'scion-guest-agent');
    expect(agent.hashes[0].content).toBe(JSON.parse(readFileSync(first.manifest, 'utf8')).agent.sha256);
    const deps = new Map(bom.dependencies.map((d: any) => [d.ref, d.dependsOn ?? []]));
    expect(deps.get('scion:guest-agent')).toEqual([qjs['bom-ref']]);
    expect(JSON.parse(readFileSync(first.manifest, 'utf8')).agent.runtime).toEqual({
      package: 'quickjs',
      version: qjs.version,
      sha256: locked.get(`quickjs@${qjs.version}`).sha256,
    });
    const busybox = debs.find((c: any) => c.name === 'busybox-static');
    expect(deps.get(bom.metadata.component['bom-ref'])).toEqual(expect.arrayContaining([busybox['bom-ref'], 'scion:guest-agent']));
    expect(deps.get(qjs['bom-ref'])).toEqual([debs.find((c: any) => c.name === 'libc6')['bom-ref']]);
  });

  it('the provenance is an in-toto statement with a SLSA v1 predicate naming outputs, definition, lock and every fetched artifact', () => {
    const st = JSON.parse(readFileSync(first.provenance, 'utf8'));
    expect(st._type).toBe('https://in-toto.io/Statement/v1');
    expect(st.predicateType).toBe('https://slsa.dev/provenance/v1');
    const outs = first.outputs.filter((o) => o.name !== 'provenance.intoto.json');
    expect(st.subject).toEqual(expect.arrayContaining(outs.map((o) => ({ name: `minimal/${o.name}`, digest: { sha256: o.sha256 } }))));
    expect(st.subject).toHaveLength(outs.length);
    const bd = st.predicate.buildDefinition;
    expect(bd.externalParameters.definition).toEqual({ path: 'minimal.yaml', digest: { sha256: sha(image('minimal')) } });
    expect(bd.externalParameters.lock.digest.sha256).toBe(sha(image('minimal').replace('.yaml', '.scion.lock')));
    const deps = bd.resolvedDependencies.map((d: any) => d.digest.sha256);
    for (const s of Object.values<any>(lock.sets)) for (const p of s.packages) expect(deps).toContain(p.sha256);
    expect(st.predicate.runDetails.builder.version.scion).toBe(JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version);
  });

  it("tiny: no Node and no C++ library; the agent's qjs runs on the image's own C library, and no ELF file keeps debug sections", async () => {
    const entries = parseCpio(readFileSync(first.initrd));
    const names = entries.map((e) => e.name);
    expect(names.filter((n) => /\/node$|libstdc\+\+|libgcc_s/.test(n))).toEqual([]);
    expect(readFileSync(first.initrd).length).toBeLessThan(10 * 1024 * 1024); // the Node-based initramfs was 112 MiB
    const dir = tmp('qjs');
    for (const n of [
      '/usr/bin/qjs',
      '/usr/lib/x86_64-linux-gnu/libc.so.6',
      '/usr/lib/x86_64-linux-gnu/libm.so.6',
      '/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2',
    ]) {
      const e = entries.find((x) => x.name === n);
      expect(e, n).toBeDefined();
      writeFileSync(join(dir, n.split('/').pop()!), e!.data, { mode: 0o755 });
    }
    expect((await $`${join(dir, 'ld-linux-x86-64.so.2')} --library-path ${dir} ${join(dir, 'qjs')} -e ${'print(6 * 7)'}`.quiet()).stdout.trim()).toBe('42');
    expect(names).not.toContain('/usr/bin/qjsc'); // of quickjs only the interpreter
    const sections = (await $`readelf -SW ${join(dir, 'qjs')}`.quiet()).stdout;
    expect(sections).not.toMatch(/\.debug_|\.symtab/);
    expect(first.largest.map((l) => l.path)).toContain('/usr/bin/qjs');
  });

  it('only what is needed: no static library, header or pkg-config file, of linuxptp only phc_ctl; what each package contributes adds up', async () => {
    const entries = parseCpio(readFileSync(first.initrd));
    const names = entries.map((e) => e.name);
    expect(names.filter((n) => n.endsWith('.a') || n.startsWith('/usr/include/') || n.includes('/pkgconfig/'))).toEqual([]);
    expect(names).toContain('/usr/sbin/phc_ctl');
    expect(names.filter((n) => /\/(ptp4l|phc2sys|ts2phc|pmc|timemaster)$/.test(n))).toEqual([]);
    const regular = entries.filter((e) => (e.mode & 0o170000) === 0o100000);
    expect(first.packageSizes.reduce((a, p) => a + p.bytes, 0)).toBe(regular.reduce((a, e) => a + e.data.length, 0));
    expect(first.packageSizes.reduce((a, p) => a + p.files, 0)).toBe(regular.length);
    expect(first.packageSizes.find((p) => p.name === 'quickjs')).toMatchObject({ files: 1 });
    expect(first.packageSizes.map((p) => p.name)).toEqual(expect.arrayContaining(['libc6', 'busybox-static', 'linuxptp', 'quickjs']));
  });

  it('exclude: globs leave paths out (a directory with all under it); one that would take out /init is refused', async () => {
    const dir = tmp('def-exclude');
    const def = join(dir, 'minimal.yaml');
    copyFileSync(image('minimal').replace('.yaml', '.scion.lock'), join(dir, 'minimal.scion.lock'));
    writeFileSync(def, readFileSync(image('minimal'), 'utf8') + '\nexclude:\n  - /etc/hosts\n  - /usr/lib/modules/scion/**\n');
    const r = await build({ definitionPath: def, cacheDir: cacheA, outDir: tmp('out-exclude') });
    const names = parseCpio(readFileSync(r.initrd)).map((e) => e.name);
    expect(names).not.toContain('/etc/hosts');
    expect(names.filter((n) => n.startsWith('/usr/lib/modules/scion'))).toEqual([]);
    expect(names).toContain('/etc/hostname');
    expect(r.excluded.files).toBeGreaterThanOrEqual(2);
    writeFileSync(def, readFileSync(image('minimal'), 'utf8') + '\nexclude:\n  - /**\n');
    const bad = await $({ nothrow: true, quiet: true })`${process.execPath} ${join(ROOT, 'bin/scion.js')} build ${def} --out ${tmp('out-exclude-bad')} --json`;
    expect(bad.exitCode).toBe(3);
    expect(JSON.parse(bad.stdout).error.message).toBe('exclude: /** would leave out /init, which the guest needs');
  });

  it('a nondeterministic input makes `scion verify` fail (exit 5) and name the file inside the initramfs', async () => {
    const dir = tmp('def-nondet');
    const def = join(dir, 'minimal.yaml');
    writeFileSync(def, readFileSync(image('minimal'), 'utf8') + '\nfiles:\n  - path: /etc/build-id\n    source: /proc/sys/kernel/random/uuid\n');
    copyFileSync(image('minimal').replace('.yaml', '.scion.lock'), join(dir, 'minimal.scion.lock'));
    const r = await $({ nothrow: true, quiet: true })`${process.execPath} ${join(ROOT, 'bin/scion.js')} verify ${def}`;
    expect(r.exitCode).toBe(5);
    expect(r.stdout).toMatch(
      /^minimal: NOT reproducible: initrd\.img: \/etc\/build-id: contents differ from byte \d+ \(37 bytes each; sha256 [0-9a-f]{16}… vs [0-9a-f]{16}…\)$/m,
    );
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
    await expect(build({ definitionPath: image('minimal'), cacheDir: tmp('cache-empty'), outDir: tmp('out-x'), mirror: OFFLINE })).rejects.toMatchObject({
      code: 'E_NETWORK',
      message: expect.stringMatching(/^cannot fetch http:\/\/127\.0\.0\.1:\d+\/debian\/pool\/.*\.deb: ECONNREFUSED$/),
    });
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
    // another initrd (one more file), and a failure once every output is written but before they are swapped in
    writeFileSync(def, readFileSync(def, 'utf8') + '\nfiles:\n  - path: /etc/late\n    contents: "changed"\n');
    const failLate = (ev: BuildEvent) => {
      if (ev.type === 'log' && ev.message.startsWith('wrote vmlinuz and initrd.img')) throw new Error('interrupted after writing');
    };
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
      code: 'E_PKG_UNKNOWN',
      message: 'package "scion-no-such-package" is not in the archive index',
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
        code: 'E_SIGNATURE',
        message: 'InRelease signature is not valid: BAD signature',
      });
    } finally {
      server.close();
    }
  });
});
