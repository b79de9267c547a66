import { describe, it, expect } from 'vitest';
import { compareVersions } from '../../builder/debian/version.ts';
import { parseDepends, parseStanzas, parseReleaseHashes } from '../../builder/debian/control.ts';
import { buildIndex, entryFromStanza, resolve } from '../../builder/debian/resolver.ts';

const packages = `Package: app
Version: 1.0-1
Architecture: amd64
Depends: libfoo (>= 2.0), mta | default-mta, libc6
Filename: pool/a/app.deb
Size: 10
SHA256: aa

Package: libfoo
Version: 1.5-1
Architecture: amd64
Filename: pool/l/libfoo1.deb
Size: 1
SHA256: f1

Package: libfoo
Version: 2.1-1
Architecture: amd64
Pre-Depends: libc6 (>= 2.36)
Filename: pool/l/libfoo2.deb
Size: 1
SHA256: f2

Package: exim
Version: 4.0
Architecture: amd64
Provides: mta, default-mta
Filename: pool/e/exim.deb
Size: 1
SHA256: e1

Package: libc6
Version: 2.41-1
Architecture: amd64
Filename: pool/l/libc6.deb
Size: 1
SHA256: c6

Package: broken
Version: 1
Architecture: amd64
Depends: libfoo (>= 9)
Filename: pool/b/broken.deb
Size: 1
SHA256: bb

Package: armonly
Version: 1
Architecture: arm64
Filename: pool/a/armonly.deb
Size: 1
SHA256: ar
`;
const index = buildIndex(parseStanzas(packages).map(entryFromStanza), 'amd64');

describe('Debian versions', () => {
  it('orders like dpkg', () => {
    expect(compareVersions('1.0', '1.0')).toBe(0);
    expect(compareVersions('1.0~rc1', '1.0')).toBeLessThan(0);
    expect(compareVersions('1:0.1', '2.0')).toBeGreaterThan(0);
    expect(compareVersions('1.0-2', '1.0-10')).toBeLessThan(0);
    expect(compareVersions('2.41-12+deb13u5', '2.41-12')).toBeGreaterThan(0);
    expect(compareVersions('1.2a', '1.2+')).toBeLessThan(0);
  });
});

describe('control files', () => {
  it('parses relationship fields with alternatives, versions and arch qualifiers', () => {
    expect(parseDepends('a (>= 1), b | c:any (<< 2~), d')).toEqual([
      [{ name: 'a', rel: '>=', version: '1', arch: undefined }],
      [
        { name: 'b', rel: undefined, version: undefined, arch: undefined },
        { name: 'c', arch: 'any', rel: '<<', version: '2~' },
      ],
      [{ name: 'd', rel: undefined, version: undefined, arch: undefined }],
    ]);
  });
  it('reads the SHA256 table of a Release file', () => {
    const h = parseReleaseHashes('Origin: Debian\nSHA256:\n abc 12 main/binary-amd64/Packages.gz\n def 3 main/x\n');
    expect(h.get('main/binary-amd64/Packages.gz')).toEqual({ sha256: 'abc', size: 12 });
  });
});

describe('dependency resolution', () => {
  it('takes the closure with versions, alternatives and virtual packages', () => {
    const r = resolve(index, ['app']);
    expect(r.map((p) => `${p.name}=${p.version}`)).toEqual(['app=1.0-1', 'exim=4.0', 'libc6=2.41-1', 'libfoo=2.1-1']);
  });
  it('honours pins from a lock', () => {
    expect(() => resolve(index, ['libfoo'], { pins: new Map([['libfoo', '9.9']]) })).toThrow(/scion.lock pins libfoo 9.9, which the archive no longer has/);
    expect(resolve(index, ['libfoo'], { pins: new Map([['libfoo', '1.5-1']]) })[0].version).toBe('1.5-1');
  });
  it('fails clearly on an unknown package', () => {
    expect(() => resolve(index, ['nope'])).toThrow(/package "nope" is not in the archive index/);
    expect(() => resolve(index, ['armonly'])).toThrow(/package "armonly" is not in the archive index/);
  });
  it('fails clearly on an unsatisfiable dependency', () => {
    expect(() => resolve(index, ['broken'])).toThrow('broken 1 depends on libfoo (>= 9), which no package in the index satisfies');
  });
  it('follows only what the filter allows (kernel metapackage)', () => {
    expect(resolve(index, ['app'], { follow: (n) => n.startsWith('libfoo') }).map((p) => p.name)).toEqual(['app', 'libfoo']);
  });
});
