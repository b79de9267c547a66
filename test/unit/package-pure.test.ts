/** The pure parts of issue 10: references, artifact manifests, credentials, exit codes, ELF stripping, build comparison, SBOM and provenance. */
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { $ } from 'zx';
import * as CDX from '@cyclonedx/cyclonedx-library';
import { parseReference, registryBaseUrl } from '../../registry/reference.ts';
import { artifactManifest, checkArtifactManifest, ARTIFACT_TYPE } from '../../registry/artifact.ts';
import { credentialsFromConfig, parseChallenge } from '../../registry/client.ts';
import { exitCodeFor, ScionError, DefinitionError } from '../../common/errors.ts';
import { stripElf } from '../../builder/strip.ts';
import { elfSection, elfDeps } from '../../builder/elf.ts';
import { parseCpio, firstCpioDifference, firstLineDifference } from '../../builder/compare.ts';
import { cpioChunks } from '../../builder/cpio.ts';
import { FileTree } from '../../builder/tree.ts';
import { sbomJson, resolvedDepends, debArchitecture, type SbomInput } from '../../builder/sbom.ts';
import { provenanceJson, type ProvenanceInput } from '../../builder/provenance.ts';
import { sourceKind } from '../../host/image-source.ts';
import type { ImageFile } from '../../common/image-layout.ts';

const dir = mkdtempSync(join(tmpdir(), 'scion-unit-pkg-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('OCI references', () => {
  it('parses registry, repository, tag and digest', () => {
    expect(parseReference('127.0.0.1:5000/scion/web:1.0')).toEqual({ registry: '127.0.0.1:5000', repository: 'scion/web', tag: '1.0', digest: undefined });
    const d = 'sha256:' + 'a'.repeat(64);
    expect(parseReference(`ghcr.io/acme/images/web@${d}`)).toEqual({ registry: 'ghcr.io', repository: 'acme/images/web', tag: undefined, digest: d });
    expect(parseReference(`[::1]:5000/x:t@${d}`)).toMatchObject({ registry: '[::1]:5000', tag: 't', digest: d });
  });
  it.each([
    ['web:1.0', 'no registry'],
    ['127.0.0.1:5000/Web:1', 'repository "Web"'],
    ['127.0.0.1:5000/a/../b:1', 'repository "a/../b"'],
    ['127.0.0.1:5000/web', 'name a tag'],
    ['127.0.0.1:5000/web:-x', 'tag "-x"'],
    ['127.0.0.1:5000/web@sha256:xyz', 'is not sha256:<64 hex digits>'],
    ['a b/web:1', 'registry "a b"'],
  ])('refuses %s', (ref, why) => {
    expect(() => parseReference(ref)).toThrow(why);
    try {
      parseReference(ref);
    } catch (e) {
      expect((e as ScionError).code).toBe('E_IMAGE_REF');
    }
  });
  it('speaks plain HTTP only to loopback unless asked', () => {
    expect(registryBaseUrl('127.0.0.1:5000')).toBe('http://127.0.0.1:5000');
    expect(registryBaseUrl('localhost:5000')).toBe('http://localhost:5000');
    expect(registryBaseUrl('registry.example:5000')).toBe('https://registry.example:5000');
    expect(registryBaseUrl('registry.example:5000', true)).toBe('http://registry.example:5000');
  });
  it('tells a reference from a definition or a directory', () => {
    expect(sourceKind('images/web.yaml', true)).toBe('definition');
    expect(sourceKind('out/web', true)).toBe('directory');
    expect(sourceKind('127.0.0.1:5000/scion/web:1', false)).toBe('reference');
    expect(sourceKind('out/nothing', false)).toBeUndefined();
  });
});

describe('artifact manifests', () => {
  const files: { name: ImageFile; digest: string; size: number }[] = [
    { name: 'vmlinuz', digest: 'sha256:' + '1'.repeat(64), size: 10 },
    { name: 'initrd.img', digest: 'sha256:' + '2'.repeat(64), size: 20 },
    { name: 'manifest.json', digest: 'sha256:' + '3'.repeat(64), size: 30 },
  ];
  it('round-trips through the check', () => {
    const m = artifactManifest('web', files);
    expect(m.artifactType).toBe(ARTIFACT_TYPE);
    expect(checkArtifactManifest('r', JSON.parse(JSON.stringify(m)))).toEqual(m);
  });
  const bad = (patch: (m: any) => void) => {
    const m: any = JSON.parse(JSON.stringify(artifactManifest('web', files)));
    patch(m);
    return () => checkArtifactManifest('r', m);
  };
  it('refuses a path as a title, an unknown file, another artifact type, a missing initrd, an absurd size', () => {
    expect(
      bad((m) => {
        m.layers[0].annotations['org.opencontainers.image.title'] = '../../etc/passwd';
      }),
    ).toThrow('a layer is titled "../../etc/passwd"');
    expect(
      bad((m) => {
        m.layers[0].annotations['org.opencontainers.image.title'] = 'evil.sh';
      }),
    ).toThrow('only vmlinuz, initrd.img');
    expect(
      bad((m) => {
        m.artifactType = 'application/vnd.oci.image.config.v1+json';
      }),
    ).toThrow('artifactType is');
    expect(
      bad((m) => {
        m.layers.splice(1, 1);
      }),
    ).toThrow('it has no initrd.img');
    expect(
      bad((m) => {
        m.layers[1].size = 1e13;
      }),
    ).toThrow('is not a size up to 4 GiB');
    expect(
      bad((m) => {
        m.layers[1].digest = 'sha256:../x';
      }),
    ).toThrow('is not sha256:<hex>');
    expect(
      bad((m) => {
        m.layers[2] = { ...m.layers[1] };
      }),
    ).toThrow('two layers are titled initrd.img');
  });
});

describe('registry credentials and challenges', () => {
  const cfg = (auths: object) => JSON.stringify({ auths });
  it('reads auth (base64 user:password) and username/password, matching keys with a scheme', () => {
    expect(credentialsFromConfig(cfg({ 'https://reg.example:5000/v1/': { auth: Buffer.from('u:p:w').toString('base64') } }), 'reg.example:5000')).toEqual({
      username: 'u',
      password: 'p:w',
    });
    expect(credentialsFromConfig(cfg({ 'reg.example': { username: 'a', password: 'b' } }), 'reg.example')).toEqual({ username: 'a', password: 'b' });
    expect(credentialsFromConfig(cfg({ 'other.example': { auth: 'eDp5' } }), 'reg.example')).toBeUndefined();
    expect(() => credentialsFromConfig('{', 'x')).toThrow('the Docker config file is not valid JSON');
  });
  it('parses Bearer and Basic challenges', () => {
    expect(parseChallenge('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"')).toEqual({
      scheme: 'bearer',
      params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull' },
    });
    expect(parseChallenge('Basic realm="scion-test"')).toEqual({ scheme: 'basic', params: { realm: 'scion-test' } });
  });
});

describe('exit codes', () => {
  it.each([
    [new ScionError('E_USAGE', 'x'), 2],
    [new DefinitionError('a.yaml', 1, 1, 'name', 'bad'), 3],
    [new ScionError('E_LOCK_CHANGED', 'x'), 3],
    [new ScionError('E_NETWORK', 'x'), 4],
    [new ScionError('E_REGISTRY_UNREACHABLE', 'x'), 4],
    [new ScionError('E_DIGEST_MISMATCH', 'x'), 5],
    [new ScionError('E_SIGNATURE', 'x'), 5],
    [new ScionError('E_VM_BUSY', 'x'), 1],
    [new Error('x'), 1],
  ])('%s -> %i', (e, code) => expect(exitCodeFor(e)).toBe(code));
});

describe('ELF stripping', () => {
  it('removes debug sections and the symbol table of a real binary, which still runs the same; deterministic and idempotent', async () => {
    const src = join(dir, 'hello.c');
    writeFileSync(src, '#include <stdio.h>\nint main(void){puts("hello, stripped");return 0;}\n');
    await $`cc -g -O1 -o ${join(dir, 'hello')} ${src}`;
    const orig = readFileSync(join(dir, 'hello'));
    expect(elfSection(orig, '.debug_info')).toBeDefined();
    const s = stripElf(orig)!;
    expect(s.length).toBeLessThan(orig.length);
    for (const name of ['.debug_info', '.debug_line', '.symtab', '.strtab']) expect(elfSection(s, name), name).toBeUndefined();
    expect(elfSection(s, '.dynsym')).toBeDefined();
    expect(elfDeps(s)).toEqual(elfDeps(orig));
    expect(stripElf(orig)!.equals(s)).toBe(true);
    expect(stripElf(s)).toBeUndefined();
    writeFileSync(join(dir, 'hello-s'), s, { mode: 0o755 });
    expect((await $`${join(dir, 'hello-s')}`).stdout).toBe('hello, stripped\n');
    expect((await $`readelf -a ${join(dir, 'hello-s')}`.quiet()).stderr).toBe(''); // readelf finds nothing malformed
  });
  it('leaves what is not an executable or shared object alone', () => {
    expect(stripElf(Buffer.from('#!/bin/sh\necho hi\n'))).toBeUndefined();
    const rel = Buffer.alloc(128);
    rel.write('\x7fELF', 0, 'latin1');
    rel[4] = 2;
    rel[5] = 1;
    rel.writeUInt16LE(1, 0x10); // ET_REL: a kernel module
    expect(stripElf(rel)).toBeUndefined();
  });
});

describe('comparing two builds', () => {
  const archive = (edit?: (t: FileTree) => void, mtime = 0) => {
    const t = new FileTree();
    t.file('/etc/a', 'same\n');
    t.file('/etc/b', 'one\n', 0o644);
    edit?.(t);
    return parseCpio(Buffer.concat(cpioChunks(t, mtime)));
  };
  it('names the first differing file and how', () => {
    expect(firstCpioDifference(archive(), archive())).toBeUndefined();
    expect(
      firstCpioDifference(
        archive(),
        archive((t) => t.file('/etc/b', 'two\n')),
      ),
    ).toMatchObject({ path: '/etc/b', how: expect.stringMatching(/^contents differ from byte 0 \(4 bytes each; sha256 /) });
    expect(
      firstCpioDifference(
        archive(),
        archive((t) => t.file('/etc/b', 'one\n', 0o755)),
      ),
    ).toEqual({ path: '/etc/b', how: 'mode 0100644 vs 0100755' });
    expect(
      firstCpioDifference(
        archive(),
        archive((t) => t.file('/etc/c', 'new\n')),
      ),
    ).toEqual({ path: '/etc/c', how: 'only in the second build' });
    expect(firstCpioDifference(archive(), archive(undefined, 5))).toMatchObject({ how: 'mtime 0 vs 5 (set SOURCE_DATE_EPOCH)' });
    expect(firstLineDifference('a\nb\nc', 'a\nx\nc')).toEqual({ line: 2, first: 'b', second: 'x' });
  });
});

describe('SBOM and provenance', () => {
  const input: SbomInput = {
    image: 'web',
    scionVersion: '9.9.9',
    codename: 'trixie',
    sourceDateEpoch: 0,
    sets: {
      guest: {
        roots: ['crun'],
        packages: [
          { name: 'crun', version: '1.21-1', architecture: 'amd64', sha256: 'a'.repeat(64), depends: ['libc6'] },
          { name: 'libc6', version: '2.41-12', architecture: 'amd64', sha256: 'b'.repeat(64), depends: [] },
          { name: 'quickjs', version: '2025.04.26-1', architecture: 'amd64', sha256: '9'.repeat(64), depends: ['libc6'] },
        ],
      },
      'container:web': {
        roots: ['busybox-static'],
        packages: [{ name: 'busybox-static', version: '1:1.37.0-6', architecture: 'amd64', sha256: 'c'.repeat(64), depends: [] }],
      },
    },
    runtime: { package: 'quickjs', version: '2025.04.26-1' },
    agentBundleSha256: 'e'.repeat(64),
    containers: [
      { name: 'web', set: 'container:web' },
      { name: 'app', layers: [{ digest: 'sha256:' + 'f'.repeat(64), size: 9, mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip' }] },
    ],
  };
  it('is valid CycloneDX 1.6, the same bytes for the same input, and lists OCI layers by digest', async () => {
    const a = sbomJson(input);
    expect(sbomJson(structuredClone(input))).toBe(a);
    expect(await new CDX.Validation.JsonStrictValidator(CDX.Spec.Version.v1dot6).validate(a)).toBeNull();
    const bom = JSON.parse(a);
    expect(bom.components.find((c: any) => c.name === 'sha256:' + 'f'.repeat(64)).hashes).toEqual([{ alg: 'SHA-256', content: 'f'.repeat(64) }]);
    const deps = new Map(bom.dependencies.map((d: any) => [d.ref, d.dependsOn ?? []]));
    expect(deps.get('container:app')).toEqual(['oci-layer:sha256:' + 'f'.repeat(64)]);
    expect(deps.get('container:web')).toEqual(['deb:busybox-static@1:1.37.0-6']);
    expect(deps.get('deb:crun@1.21-1')).toEqual(['deb:libc6@2.41-12']);
    // the agent runs on the locked QuickJS package: no component of its own
    expect(deps.get('scion:guest-agent')).toEqual(['deb:quickjs@2025.04.26-1']);
    expect(bom.components.filter((c: any) => c.name === 'quickjs')).toHaveLength(1);
  });
  it('resolves Depends alternatives and Provides to packages of the set', () => {
    const avail = new Map([
      ['libc6', []],
      ['mawk', ['awk']],
      ['libgcc-s1', []],
    ]);
    expect(resolvedDepends({ 'Pre-Depends': 'libc6 (>= 2.34)', Depends: 'gawk | awk, libgcc-s1, missing' }, avail)).toEqual(['libc6', 'libgcc-s1', 'mawk']);
    expect(debArchitecture('pool/main/b/busybox/busybox-static_1.37.0-6+b9_amd64.deb')).toBe('amd64');
    expect(debArchitecture('pool/main/t/tzdata/tzdata_2025a-1_all.deb')).toBe('all');
  });
  it('provenance: the same bytes for the same input, subjects sorted, no time or host in it', () => {
    const p: ProvenanceInput = {
      image: 'web',
      scionVersion: '9.9.9',
      outputs: [
        { name: 'vmlinuz', sha256: '1'.repeat(64) },
        { name: 'initrd.img', sha256: '2'.repeat(64) },
      ],
      definition: { path: 'web.yaml', sha256: '3'.repeat(64) },
      lock: { path: 'web.scion.lock', sha256: '4'.repeat(64) },
      compression: 'none',
      sourceDateEpoch: 0,
      mirror: 'http://deb.debian.org/debian/',
      suite: 'trixie',
      codename: 'trixie',
      architecture: 'amd64',
      packages: [{ name: 'crun', version: '1.21-1', filename: 'pool/main/c/crun/crun_1.21-1_amd64.deb', sha256: 'a'.repeat(64) }],
      containerImages: [],
      userFiles: [],
    };
    const a = provenanceJson(p);
    expect(provenanceJson(structuredClone(p))).toBe(a);
    const st = JSON.parse(a);
    expect(st.subject.map((s: any) => s.name)).toEqual(['web/initrd.img', 'web/vmlinuz']);
    expect(st.predicate.buildDefinition.resolvedDependencies).toContainEqual({
      uri: 'http://deb.debian.org/debian/pool/main/c/crun/crun_1.21-1_amd64.deb',
      name: 'crun_1.21-1',
      digest: { sha256: 'a'.repeat(64) },
    });
    expect(a).not.toMatch(/startedOn|finishedOn|invocationId|hostname/);
  });
});
