import { describe, it, expect } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, readFileSync, readlinkSync, statSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tar from 'tar-stream';
import { FileTree } from '../../builder/tree.ts';
import { cpioChunks } from '../../builder/cpio.ts';
import { parseAr, extractDeb } from '../../builder/debian/deb.ts';
import { elfDeps, moduleDepends } from '../../builder/elf.ts';
import { moduleLoadOrder } from '../../builder/modules.ts';
import { libraryClosure, addPackageFiles } from '../../builder/assemble.ts';

function sampleTree() {
  const t = new FileTree();
  t.file('/etc/hello', 'hello world\n');
  t.file('/bin/tool', Buffer.from([0, 1, 2, 3, 4]), 0o755);
  t.symlink('/usr/bin/t2', 'tool');
  t.chardev('/dev/console', 5, 1);
  return t;
}

describe('cpio newc writer', () => {
  it('is listed by cpio -t and bsdtar, and extracts the same bytes', () => {
    const dir = mkdtempSync(join(tmpdir(), 'scion-cpio-'));
    const f = join(dir, 'a.cpio');
    writeFileSync(f, Buffer.concat(cpioChunks(sampleTree(), 1234)));
    const cpioList = execFileSync('cpio', ['-t', '--quiet', '-F', f], { encoding: 'utf8' }).trim().split('\n');
    expect(cpioList).toContain('etc/hello');
    expect(cpioList).toContain('usr/bin/tool'); // /bin is merged into /usr/bin
    expect(cpioList).toContain('bin');
    const bsd = execFileSync('bsdtar', ['-tvf', f], { encoding: 'utf8' });
    expect(bsd).toMatch(/crw-------\s+1 0\s+0\s+5,\s*1 .* dev\/console/);
    const out = join(dir, 'x');
    execFileSync('bsdtar', ['-xf', f, '-C', dir, '--exclude', 'dev/*'], { cwd: dir });
    expect(readFileSync(join(dir, 'etc/hello'), 'utf8')).toBe('hello world\n');
    expect(readlinkSync(join(dir, 'usr/bin/t2'))).toBe('tool');
    expect(statSync(join(dir, 'usr/bin/tool')).mode & 0o777).toBe(0o755);
    expect(statSync(join(dir, 'etc/hello')).mtimeMs).toBe(1234_000);
    void out;
    rmSync(dir, { recursive: true, force: true });
  });
  it('gives the same bytes for the same tree whatever the insertion order', () => {
    const a = sampleTree();
    const b = new FileTree();
    b.chardev('/dev/console', 5, 1);
    b.symlink('/usr/bin/t2', 'tool');
    b.file('/bin/tool', Buffer.from([0, 1, 2, 3, 4]), 0o755);
    b.file('/etc/hello', 'hello world\n');
    expect(Buffer.concat(cpioChunks(a, 1)).equals(Buffer.concat(cpioChunks(b, 1)))).toBe(true);
  });
});

async function makeDeb(files: Record<string, string>): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: unknown) => chunks.push(c as Buffer));
  for (const [name, body] of Object.entries(files)) pack.entry({ name: `./${name}`, mode: 0o644 }, body);
  pack.entry({ name: './usr/bin/link', type: 'symlink', linkname: 'real' });
  pack.finalize();
  await new Promise<void>((r) => pack.on('end', () => r()));
  const dataTar = execFileSync('xz', ['-c'], { input: Buffer.concat(chunks) });
  const member = (name: string, data: Buffer) => {
    const h = Buffer.alloc(60, ' ');
    h.write(name, 0);
    h.write('0', 16);
    h.write('0', 28);
    h.write('0', 34);
    h.write('100644', 40);
    h.write(String(data.length), 48);
    h.write('`\n', 58);
    return Buffer.concat([h, data, data.length % 2 ? Buffer.from('\n') : Buffer.alloc(0)]);
  };
  return Buffer.concat([
    Buffer.from('!<arch>\n'),
    member('debian-binary', Buffer.from('2.0\n')),
    member('control.tar.xz', execFileSync('xz', ['-c'], { input: Buffer.alloc(1024) })),
    member('data.tar.xz', dataTar),
  ]);
}

describe('.deb extraction', () => {
  it('reads the ar members and the xz data.tar', async () => {
    const deb = await makeDeb({ 'usr/bin/real': 'REAL\n', 'etc/x.conf': 'x=1\n' });
    expect(parseAr(deb).map((m) => m.name)).toEqual(['debian-binary', 'control.tar.xz', 'data.tar.xz']);
    const entries = await extractDeb(deb);
    const byPath = Object.fromEntries(entries.map((e) => [e.path, e]));
    expect(byPath['/usr/bin/real'].data!.toString()).toBe('REAL\n');
    expect(byPath['/usr/bin/link']).toMatchObject({ type: 'symlink', linkname: 'real' });
  });
  it('refuses a file that is not a .deb', async () => {
    await expect(extractDeb(Buffer.from('hello, not an archive'))).rejects.toThrow(/not an ar archive/);
  });
});

describe('ELF', () => {
  it('reads DT_NEEDED and the interpreter the way readelf does', () => {
    const bin = readFileSync(process.execPath);
    const deps = elfDeps(bin);
    // binutils' readelf (setup installs it): its failure fails the test
    const dynamic = execFileSync('readelf', ['-d', process.execPath], { encoding: 'utf8' });
    const readelf = [...dynamic.matchAll(/Shared library: \[(.*)\]/g)].map((m) => m[1]);
    expect(readelf.length).toBeGreaterThan(0);
    expect(deps.needed).toEqual(readelf);
    expect(deps.needed).toContain('libc.so.6');
    expect(deps.interp).toBe('/lib64/ld-linux-x86-64.so.2');
  });
  it('copies the shared-library closure from staging (with symlink hops)', () => {
    const node = readFileSync(process.execPath);
    const staging = new FileTree();
    const tree = new FileTree();
    tree.file('/usr/bin/app', node, 0o755);
    const libc = readFileSync('/lib/x86_64-linux-gnu/libc.so.6');
    staging.file('/lib/x86_64-linux-gnu/libc.so.6', libc, 0o755);
    staging.file('/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2', Buffer.from('\x7fELF'), 0o755);
    staging.symlink('/lib64/ld-linux-x86-64.so.2', '../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2');
    const r = libraryClosure(tree, staging);
    expect(tree.resolve('/usr/lib/x86_64-linux-gnu/libc.so.6')).toBeTruthy();
    expect(tree.nodes.get('/usr/lib64/ld-linux-x86-64.so.2')).toMatchObject({ type: 'symlink' });
    expect(tree.resolve('/lib64/ld-linux-x86-64.so.2')?.path).toBe('/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2');
    // node needs more than libc; those are reported, not invented
    expect(r.missing.map((m) => m.soname)).toEqual(
      expect.arrayContaining(elfDeps(node).needed.filter((s) => s !== 'libc.so.6' && s !== 'ld-linux-x86-64.so.2')),
    );
    void addPackageFiles;
  });
  it('reads depends= from a module .modinfo section', () => {
    // a minimal ELF64 with one .modinfo section, built byte by byte
    const modinfo = Buffer.from('license=GPL\0depends=virtio,virtio_ring\0name=virtio_net\0');
    const shstr = Buffer.from('\0.modinfo\0.shstrtab\0');
    const ehdr = Buffer.alloc(64);
    ehdr.write('\x7fELF', 0, 'latin1');
    ehdr[4] = 2;
    ehdr[5] = 1;
    ehdr[6] = 1;
    const dataOff = 64,
      strOff = dataOff + modinfo.length,
      shOff = strOff + shstr.length;
    ehdr.writeBigUInt64LE(BigInt(shOff), 0x28);
    ehdr.writeUInt16LE(64, 0x3a);
    ehdr.writeUInt16LE(3, 0x3c);
    ehdr.writeUInt16LE(2, 0x3e);
    const sh = (name: number, off: number, size: number) => {
      const b = Buffer.alloc(64);
      b.writeUInt32LE(name, 0);
      b.writeUInt32LE(1, 4);
      b.writeBigUInt64LE(BigInt(off), 0x18);
      b.writeBigUInt64LE(BigInt(size), 0x20);
      return b;
    };
    const ko = Buffer.concat([ehdr, modinfo, shstr, Buffer.alloc(64), sh(1, dataOff, modinfo.length), sh(10, strOff, shstr.length)]);
    expect(moduleDepends(ko)).toEqual(['virtio', 'virtio_ring']);
  });
});

describe('kernel module order', () => {
  const avail = new Map([
    ['virtio_net', ['net_failover', 'virtio_ring']],
    ['net_failover', ['failover']],
    ['failover', []],
    ['virtio_ring', []],
    ['virtio_pci', ['virtio_pci_modern_dev']],
    ['virtio_pci_modern_dev', []],
  ]);
  it('puts dependencies first, deterministically', () => {
    expect(moduleLoadOrder(['virtio_net', 'virtio-pci'], avail)).toEqual([
      'failover',
      'net_failover',
      'virtio_ring',
      'virtio_net',
      'virtio_pci_modern_dev',
      'virtio_pci',
    ]);
  });
  it('skips built-ins and names an unknown module with who needed it', () => {
    expect(moduleLoadOrder(['virtio'], avail, new Set(['virtio']))).toEqual([]);
    expect(() => moduleLoadOrder(['nope'], avail)).toThrow(/kernel module "nope" is not in the kernel package/);
    const cyc = new Map([
      ['a', ['b']],
      ['b', ['a']],
    ]);
    expect(() => moduleLoadOrder(['a'], cyc)).toThrow(/cycle: a -> b -> a/);
  });
});

describe('kernel stub for clones', () => {
  it('keeps the bzImage setup header and drops the rest', async () => {
    const { kernelStub } = await import('../../host/qemu/argv.ts');
    const bz = Buffer.alloc(1 << 20, 7);
    bz.write('HdrS', 0x202, 'latin1');
    bz[0x1f1] = 30;
    const stub = kernelStub(bz);
    expect(stub.length).toBe(31 * 512 + 4096);
    expect(stub.equals(bz.subarray(0, stub.length))).toBe(true);
    expect(() => kernelStub(Buffer.alloc(4096))).toThrow(/not a bzImage/);
  });
});
