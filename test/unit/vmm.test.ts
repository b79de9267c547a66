/**
 * The pinned VMM as data (host/qemu/vmm-plan.ts) and the template's
 * compatibility record (host/machine/compat.ts): pure, no QEMU.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  closureDigest,
  closureDir,
  closurePackages,
  closureSbom,
  containedLink,
  cpuModel,
  parseVmmLock,
  pinnedCommand,
  readonlyPrivateMemory,
  versionOf,
} from '../../host/qemu/vmm-plan.ts';
import { compatibilityProblems, describeVmm } from '../../host/machine/compat.ts';
import { qemuArgv, deviceLineup, type VmDescription } from '../../host/qemu/argv.ts';

const ROOT = join(import.meta.dirname, '../..');
const lockText = readFileSync(join(ROOT, 'vmm/qemu.scion.lock'), 'utf8');

describe('the pinned VMM', () => {
  it("the shipped lock names trixie's qemu-system-x86 with its loader, firmware and libraries, and no maintainer-script tools", () => {
    const lock = parseVmmLock(lockText);
    const names = closurePackages(lock).map((p) => p.name);
    expect(lock.codename).toBe('trixie');
    expect(names).toEqual(expect.arrayContaining(['qemu-system-x86', 'qemu-system-data', 'seabios', 'ipxe-qemu', 'libc6', 'libglib2.0-0t64', 'libpixman-1-0']));
    expect(names.filter((n) => ['adduser', 'passwd', 'debconf', 'libpam-modules'].includes(n))).toEqual([]);
    expect(closurePackages(lock).find((p) => p.name === 'qemu-system-x86')!.version).toMatch(/^1:10\.0\./);
  });
  it('its digest covers every package hash: one changed .deb is another VMM', () => {
    const lock = parseVmmLock(lockText);
    const pkgs = closurePackages(lock);
    const d = closureDigest(pkgs);
    expect(d).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(closureDigest([...pkgs].reverse().sort((a, b) => a.name.localeCompare(b.name)))).toBe(closureDigest(closurePackages(lock)));
    const changed = pkgs.map((p, i) => (i === 3 ? { ...p, sha256: 'f'.repeat(64) } : p));
    expect(closureDigest(changed)).not.toBe(d);
    expect(closureDir('/var/lib/scion/vmm', d)).toBe(`/var/lib/scion/vmm/${d.slice(7, 31)}`);
  });
  it('refuses a lock without its package set or with a malformed entry', () => {
    expect(() => parseVmmLock('{"lockVersion":1,"sets":{}}')).toThrow(/no "vmm" package set/);
    expect(() => parseVmmLock('{"lockVersion":1,"sets":{"vmm":{"roots":[],"packages":[{"name":"x","version":"1","sha256":"../.."}]}}}')).toThrow(/malformed/);
    expect(() => parseVmmLock('{"lockVersion":2}')).toThrow(/lockVersion 1/);
  });
  it("runs QEMU through the closure's own loader and libraries, with its firmware first on the search path", () => {
    const c = pinnedCommand('/v/abc');
    expect(c.command).toEqual([
      '/v/abc/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2',
      '--library-path',
      '/v/abc/usr/lib/x86_64-linux-gnu',
      '/v/abc/usr/bin/qemu-system-x86_64',
    ]);
    expect(c.args).toEqual(['-L', '/v/abc/usr/share/qemu', '-L', '/v/abc/usr/share/seabios', '-L', '/v/abc/usr/lib/ipxe/qemu']);
    expect(c.env).toEqual({ QEMU_MODULE_DIR: '/v/abc/usr/lib/x86_64-linux-gnu/qemu' });
  });
  it("keeps the closure's absolute symlinks inside it", () => {
    expect(containedLink('/usr/share/qemu/bios-256k.bin', '/usr/share/seabios/bios-256k.bin')).toBe('../seabios/bios-256k.bin');
    expect(containedLink('/usr/lib/x86_64-linux-gnu/libz.so.1', 'libz.so.1.3.1')).toBe('libz.so.1.3.1');
    expect(containedLink('/a/b/c', '/etc/passwd')).toBe('../../etc/passwd');
  });
  it('lists every package in its SBOM by purl and .deb hash', () => {
    const lock = parseVmmLock(lockText);
    const sbom = JSON.parse(closureSbom(lock, closureDigest(closurePackages(lock))));
    expect(sbom.bomFormat).toBe('CycloneDX');
    expect(sbom.components).toHaveLength(closurePackages(lock).length);
    const q = sbom.components.find((c: { name: string }) => c.name === 'qemu-system-x86');
    expect(q.purl).toMatch(/^pkg:deb\/debian\/qemu-system-x86@1%3A10\.0\.[\d]+.*\?arch=amd64&distro=trixie$/);
    expect(q.hashes[0].content).toBe(closurePackages(lock).find((p) => p.name === 'qemu-system-x86')!.sha256);
  });
  it('maps a template read-only behind a private mapping from QEMU 8.2, and names a CPU model other than host', () => {
    expect(versionOf('QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)')).toEqual([10, 0, 13]);
    expect(readonlyPrivateMemory('QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u16)')).toBe(false);
    expect(readonlyPrivateMemory('QEMU emulator version 8.1.5')).toBe(false);
    expect(readonlyPrivateMemory('QEMU emulator version 8.2.0')).toBe(true);
    expect(readonlyPrivateMemory('QEMU emulator version 10.0.13')).toBe(true);
    expect(cpuModel('tcg')).toBe('max');
    expect(cpuModel('kvm')).not.toBe('host');
    expect(cpuModel('kvm', 'host')).toBe('host');
    const d: VmDescription = {
      name: 'web-c1',
      mode: 'clone',
      accel: 'tcg',
      machine: 'pc-q35-10.0',
      cpu: 'max',
      ramMB: 512,
      cpus: 1,
      memory: 'file',
      cmdline: '',
      initrd: false,
      vmgenid: '00000000-0000-4000-8000-000000000000',
      mac: '02:00:00:00:00:01',
      net: { mode: 'none' },
      memReadonly: true,
      sandbox: true,
    };
    const argv = qemuArgv(d).join(' ');
    expect(argv).toContain('-machine pc-q35-10.0,memory-backend=mem');
    expect(argv).toMatch(/memory-backend-file,[^ ]*share=off,readonly=on,rom=off/);
    expect(qemuArgv({ ...d, memReadonly: undefined }).join(' ')).not.toContain('readonly=on');
    expect(deviceLineup(d)).toContain('machine=q35,memory-backend=mem'); // the versioned machine type is recorded apart (meta.machine)
  });
});

describe("a template's compatibility record", () => {
  const pinned = {
    kind: 'pinned' as const,
    version: 'QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)',
    digest: `sha256:${'4'.repeat(64)}`,
    machine: 'pc-q35-10.0',
  };
  const system = {
    kind: 'system' as const,
    version: 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u16)',
    digest: `sha256:${'7'.repeat(64)}`,
    machine: 'pc-q35-7.2',
  };
  const meta = { vmm: { kind: pinned.kind, version: pinned.version, digest: pinned.digest }, machine: 'pc-q35-10.0', accel: 'tcg' as const };
  it('agrees with the VMM it was frozen under', () => {
    expect(compatibilityProblems(meta, pinned, false)).toEqual([]);
  });
  it('names both sides when the VMM differs', () => {
    expect(compatibilityProblems(meta, system, false)).toEqual([
      `it was frozen under the pinned QEMU 10.0.13 (sha256:444444444444…), this node runs the system QEMU 7.2.22 (sha256:777777777777…)`,
    ]);
    expect(describeVmm(system)).toBe('the system QEMU 7.2.22 (sha256:777777777777…)');
  });
  it('refuses a machine type the same build does not call q35, and KVM where /dev/kvm is unusable', () => {
    expect(compatibilityProblems({ ...meta, machine: 'pc-q35-9.2' }, pinned, true)).toEqual(["its machine type is pc-q35-9.2, this QEMU's q35 is pc-q35-10.0"]);
    expect(compatibilityProblems({ ...meta, accel: 'kvm' }, pinned, false)).toEqual(['it was frozen under KVM, and /dev/kvm is not usable here']);
    expect(compatibilityProblems({ ...meta, accel: 'kvm' }, pinned, true)).toEqual([]);
  });
});

describe("the VMM's identity", () => {
  it('is worked out once per binary (QEMU spawned, the host binary hashed) and again when the binary changes', async () => {
    const { mkdtempSync, writeFileSync, readFileSync: read, chmodSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { execFileSync } = await import('node:child_process');
    const dir = mkdtempSync(join(tmpdir(), 'scion-vmm-id-'));
    const qemu = join(dir, 'qemu-system-x86_64');
    const calls = join(dir, 'calls');
    // a stand-in QEMU that counts how often it is asked (a real one cannot be made to change under the test)
    const fake = (version: string) =>
      `#!/bin/sh\necho x >> ${calls}\nif [ "$1" = --version ]; then echo "QEMU emulator version ${version}"; else echo "q35 Standard PC (alias of pc-q35-${version})"; fi\n`;
    writeFileSync(qemu, fake('7.2.1'));
    chmodSync(qemu, 0o755);
    const env = { ...process.env, SCION_QEMU: qemu, XDG_CACHE_HOME: join(dir, 'cache'), HOME: dir };
    const identify = () =>
      JSON.parse(
        execFileSync(
          process.execPath,
          [
            '--import',
            'tsx',
            '-e',
            `const { currentVmm } = await import(${JSON.stringify(join(ROOT, 'host/qemu/vmm.ts'))}); console.log(JSON.stringify(await currentVmm()))`,
          ],
          { env, encoding: 'utf8' },
        ),
      );
    const spawned = () => read(calls, 'utf8').split('\n').filter(Boolean).length;
    const first = identify();
    expect(first).toMatchObject({ kind: 'system', version: 'QEMU emulator version 7.2.1', machine: 'pc-q35-7.2.1' });
    expect(spawned()).toBe(2);
    expect(identify()).toEqual(first); // another process: from the cache, QEMU not spawned
    expect(spawned()).toBe(2);
    writeFileSync(qemu, fake('8.0.0')); // the binary replaced
    const changed = identify();
    expect(changed).toMatchObject({ version: 'QEMU emulator version 8.0.0', machine: 'pc-q35-8.0.0' });
    expect(changed.digest).not.toBe(first.digest);
    expect(spawned()).toBe(4);
  });
});
