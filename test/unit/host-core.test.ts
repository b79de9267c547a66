/**
 * The host core's pure parts and its on-disk store, without a VM: the name
 * rule, trusted directories, versioned records, reservations, the QEMU argv
 * and device line-up, identity allocation, the up policy, the clock maths.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { mkdirSync, mkdtempSync, writeFileSync, symlinkSync, chmodSync, chownSync, rmSync, readFileSync, readdirSync, statSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { validName, nameProblem } from '../../common/names.ts';
import { ensureTrustedDir, writeExclusive, atomicWrite, readNoFollow } from '../../common/safe-fs.ts';
import { parseVmRecord, parseTemplateMeta, VM_FORMAT, TEMPLATE_FORMAT } from '../../host/store/records.ts';
import { qemuArgv, deviceLineup, diskArgs, FD, SANDBOX, type VmDescription } from '../../host/qemu/argv.ts';
import { allocateIdentity, macFor, ipFor } from '../../host/machine/identity.ts';
import { templateDecision } from '../../host/up.ts';
import { estimateOffset } from '../../host/machine/clock.ts';
import { netFrom, count } from '../../cli/commands.ts';

const scratch = mkdtempSync(join(tmpdir(), 'scion-unit-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe('the name rule', () => {
  it.each([
    ['', 'empty'],
    ['..', 'looks like a path'],
    ['.', 'looks like a path'],
    ['a/b', 'looks like a path'],
    ['a b', 'contains " "'],
    ['a;rm', 'contains ";"'],
    ['Web', 'contains "W"'],
    ['-web', 'starts with "-"'],
    ['x'.repeat(64), '64 characters long'],
    ['web\n', 'contains "\\n"'],
  ])('refuses %j (%s)', (name, why) => {
    expect(nameProblem(name)).toContain(why);
    expect(() => validName(name, 'VM')).toThrow(
      expect.objectContaining({ code: 'E_BAD_NAME', message: expect.stringContaining(`VM name ${JSON.stringify(name)}: ${why}`) }),
    );
  });
  it.each(['web', 'web-tpl', 'a', '0', 'web-c12', 'x'.repeat(63)])('accepts %j', (name) => {
    expect(validName(name)).toBe(name);
  });
  it('refuses what is not a string', () => {
    expect(() => validName(undefined)).toThrow(/not a string/);
  });
});

describe('trusted directories', () => {
  it('creates a missing directory 0700 and accepts it again', () => {
    const d = join(scratch, 'new', 'root');
    const real = ensureTrustedDir(d, { what: 'run root' });
    expect(real).toBe(d);
    expect(statSync(d).mode & 0o777).toBe(0o700);
    expect(ensureTrustedDir(d, { what: 'run root' })).toBe(d);
  });
  it('refuses a directory others can write', () => {
    const d = join(scratch, 'wide');
    mkdirSync(d);
    chmodSync(d, 0o777);
    expect(() => ensureTrustedDir(d, { what: 'run root', env: 'SCION_RUN_DIR' })).toThrow(
      expect.objectContaining({
        code: 'E_UNTRUSTED_DIR',
        message: `run root ${d} is writable by its group (mode 0777)`,
        hint: expect.stringContaining('SCION_RUN_DIR'),
      }),
    );
    chmodSync(d, 0o702);
    expect(() => ensureTrustedDir(d, { what: 'run root' })).toThrow(/is writable by others \(mode 0702\)/);
  });
  it('refuses a directory another user owns (as OpenSSH refuses such a key directory)', () => {
    const d = join(scratch, 'foreign');
    mkdirSync(d, { mode: 0o700 });
    chownSync(d, 4242, 4242);
    expect(() => ensureTrustedDir(d, { what: 'template root' })).toThrow(`template root ${d} is owned by uid 4242, not by uid 0 (this user)`);
  });
  it('refuses a symlink in its place, even to a good directory', () => {
    const good = join(scratch, 'good');
    mkdirSync(good, { mode: 0o700 });
    const link = join(scratch, 'link');
    symlinkSync(good, link);
    expect(() => ensureTrustedDir(link, { what: 'run root' })).toThrow(`run root ${link} is a symbolic link`);
  });
  it('refuses a directory inside one that others can write and that is not sticky', () => {
    const open = join(scratch, 'open');
    mkdirSync(open);
    chmodSync(open, 0o777);
    const d = join(open, 'mine');
    mkdirSync(d, { mode: 0o700 });
    expect(() => ensureTrustedDir(d, { what: 'run root' })).toThrow(`run root ${d} is inside ${open}, which is writable by others and not sticky (mode 0777)`);
    chmodSync(open, 0o1777); // sticky and root's (like /tmp, /dev/shm): nobody else can rename "mine"
    expect(ensureTrustedDir(d, { what: 'run root' })).toBe(d);
  });
  it('requires tmpfs for the template root', () => {
    const d = join(scratch, 'not-tmpfs');
    if (statfsSync(scratch).type === 0x01021994) throw new Error('the scratch directory must not be on tmpfs for this test');
    expect(() => ensureTrustedDir(d, { what: 'template root', tmpfs: true, env: 'SCION_TEMPLATE_DIR' })).toThrow(
      expect.objectContaining({ code: 'E_NOT_TMPFS' }),
    );
  });
  it('accepts a directory on /dev/shm as a template root', () => {
    const d = mkdtempSync('/dev/shm/scion-unit-');
    try {
      expect(ensureTrustedDir(d, { what: 'template root', tmpfs: true })).toBe(d);
    } finally {
      rmSync(d, { recursive: true });
    }
  });
});

describe('files scion creates', () => {
  it('never writes through a planted symlink', async () => {
    const target = join(scratch, 'victim');
    writeFileSync(target, 'precious');
    const planted = join(scratch, 'planted');
    symlinkSync(target, planted);
    await expect(writeExclusive(planted, 'x')).rejects.toMatchObject({ code: 'EEXIST' });
    await atomicWrite(planted, 'new'); // rename replaces the link itself
    expect(readFileSync(target, 'utf8')).toBe('precious');
    expect(readFileSync(planted, 'utf8')).toBe('new');
  });
  it('refuses to read a record through a symlink', async () => {
    const target = join(scratch, 'other.json');
    writeFileSync(target, '{}');
    const link = join(scratch, 'vm.json');
    symlinkSync(target, link);
    await expect(readNoFollow(link)).rejects.toMatchObject({ code: 'ELOOP' });
  });
});

const desc = (over: Partial<VmDescription> = {}): VmDescription => ({
  name: 'web-c1',
  mode: 'clone',
  accel: 'tcg',
  ramMB: 512,
  cpus: 1,
  memory: 'file',
  cmdline: 'console=ttyS0',
  initrd: false,
  vmgenid: '11111111-2222-3333-4444-555555555555',
  mac: '02:53:43:00:00:01',
  net: { mode: 'user', guestIp: '10.0.2.16', forwards: [{ hostPort: 40000, guestPort: 8080 }] },
  incoming: true,
  sandbox: true,
  ...over,
});
const record = (over: Record<string, unknown> = {}) => ({
  format: VM_FORMAT,
  name: 'web-c1',
  role: 'clone',
  image: '/work/out/web',
  accel: 'tcg',
  createdAt: '2026-11-26T00:00:00Z',
  template: 'web-tpl',
  generation: 2,
  ports: { 8080: 40000 },
  desc: desc(),
  netMode: { mode: 'user' },
  slots: ['index-1', 'uid-2', 'port-40000'],
  ...over,
});
const meta = (over: Record<string, unknown> = {}) => ({
  format: TEMPLATE_FORMAT,
  name: 'web-tpl',
  vmm: { kind: 'pinned', version: 'QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)', digest: `sha256:${'4'.repeat(64)}` },
  machine: 'pc-q35-10.0',
  cpu: 'max',
  lineup: deviceLineup(desc()),
  accel: 'tcg',
  image: '/work/out/web',
  manifestSha256: 'a'.repeat(64),
  kernel: 'kernel-stub',
  cmdline: 'console=ttyS0',
  ramMB: 512,
  generation: 1,
  memory: 'file',
  net: { mode: 'user' },
  frozenAt: '2026-11-26T00:00:00Z',
  freezeMs: 14,
  ports: [8080],
  ...over,
});

describe('versioned records', () => {
  it('reads back a valid vm.json', () => {
    expect(parseVmRecord('/r/vm.json', JSON.stringify(record()), 'web-c1').name).toBe('web-c1');
  });
  it('refuses one of another format version, an older one without a version, and garbage', () => {
    expect(() => parseVmRecord('/r/vm.json', JSON.stringify(record({ format: 'scion.vm/2' })), 'web-c1')).toThrow(
      expect.objectContaining({ code: 'E_RECORD_VERSION', message: '/r/vm.json has format "scion.vm/2"; this scion reads "scion.vm/1"' }),
    );
    const { format: _, ...old } = record();
    expect(() => parseVmRecord('/r/vm.json', JSON.stringify(old), 'web-c1')).toThrow(
      '/r/vm.json has no format field (written by an older scion); this scion reads "scion.vm/1"',
    );
    expect(() => parseVmRecord('/r/vm.json', '{"format":', 'web-c1')).toThrow(/\/r\/vm.json is not valid JSON/);
  });
  it("refuses a tampered one: another VM's name, a hostile tap name, an unknown field", () => {
    expect(() => parseVmRecord('/r/vm.json', JSON.stringify(record()), 'web-c2')).toThrow(
      '/r/vm.json names VM "web-c1", but lives in the run directory of "web-c2"',
    );
    expect(() => parseVmRecord('/r/vm.json', JSON.stringify(record({ desc: desc({ net: { mode: 'bridge', tap: 'x;reboot' } }) })), 'web-c1')).toThrow(
      /desc\.net\.tap: not a valid interface name/,
    );
    expect(() => parseVmRecord('/r/vm.json', JSON.stringify(record({ templateDir: '/' })), 'web-c1')).toThrow(/Unrecognized key/);
    expect(() => parseVmRecord('/r/vm.json', JSON.stringify(record({ name: '../x' })), 'web-c1')).toThrow(/name: not a valid scion name/);
  });
  it('refuses template metadata that points outside its directory or is tampered', () => {
    expect(parseTemplateMeta('/t/meta.json', JSON.stringify(meta()), 'web-tpl').kernel).toBe('kernel-stub');
    expect(() => parseTemplateMeta('/t/meta.json', JSON.stringify(meta({ kernel: '/etc/shadow' })), 'web-tpl')).toThrow(
      /kernel: must be a file name inside the template directory, not a path/,
    );
    expect(() => parseTemplateMeta('/t/meta.json', JSON.stringify(meta({ kernel: '../web2-tpl/kernel-stub' })), 'web-tpl')).toThrow(
      /kernel: must be a file name inside the template directory/,
    );
    expect(() => parseTemplateMeta('/t/meta.json', JSON.stringify(meta({ name: 'evil-tpl' })), 'web-tpl')).toThrow(
      '/t/meta.json names template "evil-tpl", but lives in the directory of "web-tpl"',
    );
    expect(() => parseTemplateMeta('/t/meta.json', JSON.stringify(meta({ format: 'scion.template/0' })), 'web-tpl')).toThrow(
      expect.objectContaining({ code: 'E_RECORD_VERSION' }),
    );
    expect(() => parseTemplateMeta('/t/meta.json', JSON.stringify(meta({ ramMB: -1 })), 'web-tpl')).toThrow(/ramMB/);
  });
});

describe('QEMU argv', () => {
  it('hands every outside file over as a descriptor and names jail files relatively', () => {
    const a = qemuArgv(desc({ disk: { layers: ['base', 'template', 'clone'] } }));
    const joined = a.join(' ');
    expect(joined).toContain(`mem-path=/proc/self/fd/${FD.mem},share=off`);
    expect(a[a.indexOf('-kernel') + 1]).toBe(`/proc/self/fd/${FD.kernel}`);
    expect(a[a.indexOf('-qmp') + 1]).toBe('unix:qmp.sock,server=on,wait=off');
    expect(joined).toContain('socket,id=agent,path=agent.sock,');
    expect(a[a.indexOf('-sandbox') + 1]).toBe(SANDBOX);
    expect(SANDBOX).toBe('on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny');
    // no absolute path other than /proc/self/fd and /dev/urandom reaches QEMU
    const paths = a.flatMap((x) => x.match(/(?<![\w.])\/[\w./-]+/g) ?? []);
    expect(paths.filter((p) => !p.startsWith('/proc/self/fd/') && !p.startsWith('/dev/fdset/') && p !== '/dev/urandom')).toEqual([]);
    expect(a.slice(-2)).toEqual(['-incoming', 'defer']);
  });
  it('template and clone of one VM have the same device line-up, whatever their per-VM values', () => {
    const t = desc({ mode: 'template', initrd: true, incoming: false, mac: '02:53:43:00:00:00', net: { mode: 'user', guestIp: '10.0.2.15', forwards: [] } });
    expect(deviceLineup(t)).toEqual(deviceLineup(desc()));
    expect(deviceLineup(desc({ net: { mode: 'bridge', tap: 'sct00000001' } }))).not.toEqual(deviceLineup(desc()));
    expect(qemuArgv(t)).toContain('-initrd');
    expect(qemuArgv(desc())).not.toContain('-initrd');
  });
  it('builds the disk chain with explicit backing nodes, never a backing path from a qcow2 header', () => {
    expect(diskArgs({ layers: ['base', 'template'] })).toEqual([
      '-add-fd',
      `fd=${FD.diskBase},set=${FD.diskBase}`,
      '-blockdev',
      `driver=file,node-name=disk-base-file,filename=/dev/fdset/${FD.diskBase},read-only=on`,
      '-blockdev',
      'driver=qcow2,node-name=disk-base,file=disk-base-file,read-only=on',
      '-add-fd',
      `fd=${FD.diskTemplate},set=${FD.diskTemplate}`,
      '-blockdev',
      `driver=file,node-name=disk-top-file,filename=/dev/fdset/${FD.diskTemplate}`,
      '-blockdev',
      'driver=qcow2,node-name=disk-top,file=disk-top-file,backing=disk-base',
    ]);
  });
});

describe('identity allocation', () => {
  it('derives MAC and IP from the index and takes randomness from what it is given', () => {
    let n = 0;
    const rand = { bytes: (k: number) => Buffer.alloc(k, ++n), uuid: () => `00000000-0000-4000-8000-00000000000${++n}` };
    const id = allocateIdentity(5, 'web-{n}', rand, { network: '10.44.0.0/24', gateway: '10.44.0.1', dns: ['10.44.0.1'] });
    expect(id).toEqual({
      index: 5,
      hostname: 'web-5',
      mac: '02:53:43:00:00:05',
      ip: '10.44.0.20',
      prefix: 24,
      gateway: '10.44.0.1',
      dns: ['10.44.0.1'],
      machineId: '01'.repeat(16),
      vmgenid: '00000000-0000-4000-8000-000000000002',
      rngSeed: '03'.repeat(32),
    });
    expect(macFor(0x010203)).toBe('02:53:43:01:02:03');
    expect(ipFor(1)).toBe('10.0.2.16');
  });
  it('gives two clones distinct machine-ids, GUIDs and seeds with real randomness', () => {
    const a = allocateIdentity(1, 'x'),
      b = allocateIdentity(2, 'x');
    expect(a.machineId).not.toBe(b.machineId);
    expect(a.vmgenid).not.toBe(b.vmgenid);
    expect(a.rngSeed).not.toBe(b.rngSeed);
  });
});

describe('the up policy', () => {
  const m = meta() as any;
  it('reuses a template frozen from the same build with the same networking and disk kind', () => {
    expect(templateDecision(m, { manifestSha256: 'a'.repeat(64) }, {})).toEqual({ reuse: true });
  });
  it('re-makes it otherwise, saying why', () => {
    expect(templateDecision(undefined, { manifestSha256: 'a'.repeat(64) }, {})).toEqual({ reuse: false, why: 'no frozen template' });
    expect(templateDecision(m, { manifestSha256: 'b'.repeat(64) }, {})).toEqual({ reuse: false, why: 'it is from another build of the image' });
    expect(templateDecision(m, { manifestSha256: 'a'.repeat(64) }, { net: { mode: 'bridge', bridge: 'br0', network: '10.44.0.0/24' } })).toEqual({
      reuse: false,
      why: 'it has other networking',
    });
    expect(templateDecision(m, { manifestSha256: 'a'.repeat(64) }, { disk: '/d.qcow2' })).toEqual({ reuse: false, why: 'it has no disk' });
  });
});

describe('CLI argument checks', () => {
  it('refuses hostile bridge and namespace names and odd counts', () => {
    expect(() => netFrom({ bridge: 'br0;reboot' })).toThrow(/not an interface name/);
    expect(() => netFrom({ bridge: 'br0', netns: '../../x' })).toThrow(/not a network namespace name/);
    expect(() => netFrom({ bridge: 'br0', network: '10.44.300.0/24' })).toThrow(/use a \/24/);
    expect(netFrom({ bridge: 'br0' })).toEqual({ mode: 'bridge', bridge: 'br0', netns: undefined, network: '10.44.0.0/24' });
    expect(netFrom({ tap: true })).toEqual({ mode: 'tap' });
    expect(() => netFrom({ tap: true, bridge: 'br0' })).toThrow(/--tap goes alone/);
    expect(() => count('0', '-n', 1)).toThrow(/whole number from 1 to 200/);
    expect(() => count('2.5', '-n', 1)).toThrow(/whole number/);
  });
});

describe('clock offset estimate', () => {
  it('takes the sample with the shortest round trip; its half is the error bound', () => {
    expect(
      estimateOffset([
        { sentMs: 1000, guestMs: 1600, receivedMs: 1100 },
        { sentMs: 2000, guestMs: 2510, receivedMs: 2020 },
      ]),
    ).toEqual({ offsetMs: 500, errorMs: 10 });
  });
});

describe('reservations and run directories (the lock files)', () => {
  it('processes racing for indices each get distinct ones, and a released one is taken again', async () => {
    const run = mkdtempSync(join(tmpdir(), 'scion-slots-'));
    const script = `import { reserveFirstFree } from ${JSON.stringify(join(import.meta.dirname, '../../host/store/slots.ts'))};
      const got = []; for (let i = 0; i < 25; i++) got.push(await reserveFirstFree('index', 1, 238, 'race', 'clone slots'));
      console.log(JSON.stringify(got));`;
    const { spawn } = await import('node:child_process');
    const outs = await Promise.all(
      Array.from(
        { length: 4 },
        () =>
          new Promise<number[]>((resolve, reject) => {
            const p = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
              env: { ...process.env, SCION_RUN_DIR: run },
              stdio: ['ignore', 'pipe', 'inherit'],
            });
            let o = '';
            p.stdout.on('data', (c) => (o += c));
            p.on('exit', (code) => (code === 0 ? resolve(JSON.parse(o)) : reject(new Error(`exit ${code}`))));
          }),
      ),
    );
    const all = outs.flat();
    expect(all).toHaveLength(100);
    expect(new Set(all).size).toBe(100);
    expect(Math.max(...all)).toBe(100); // the lowest free ones, none skipped
    const prev = process.env.SCION_RUN_DIR;
    process.env.SCION_RUN_DIR = run;
    try {
      const { release, reserveFirstFree, createRunDir } = await import('../../host/store/slots.ts');
      await release('index-37');
      expect(await reserveFirstFree('index', 1, 238, 'again', 'clone slots')).toBe(37);
      await expect(reserveFirstFree('index', 1, 100, 'full', 'clone slots')).rejects.toMatchObject({ code: 'E_NO_SLOTS' });
      // a name is claimed once: the second maker gets E_VM_EXISTS and the first one's directory is intact
      await createRunDir(record() as any);
      await expect(createRunDir({ ...(record() as any), generation: 9 })).rejects.toMatchObject({
        code: 'E_VM_EXISTS',
        message: 'a VM named web-c1 already exists',
      });
      expect(JSON.parse(readFileSync(join(run, 'vms', 'web-c1', 'vm.json'), 'utf8')).generation).toBe(2);
      expect(readdirSync(join(run, 'vms'))).toEqual(['web-c1']); // no temporary directory left behind
    } finally {
      process.env.SCION_RUN_DIR = prev;
      rmSync(run, { recursive: true, force: true });
    }
  });
});
