/** The shim's pure parts: its command line, what a task is, the guest's OCI config, the rootfs argv. */
import { describe, it, expect } from 'vitest';
import { parseShimArgs, serveArgs, ShimUsageError } from '../../shim/args.ts';
import { taskKind, diskSerial } from '../../shim/service.ts';
import { guestSpec } from '../../shim/spec.ts';
import { mountArgv, mkfsArgv } from '../../shim/rootfs.ts';
import { envelope } from '../../shim/events.ts';
import { decode } from '../../shim/proto.ts';

describe('the shim command line (containerd runtime v2, Go flag style)', () => {
  it('reads what containerd passes to start and delete, and what serve needs', () => {
    expect(
      parseShimArgs(['-namespace', 'k8s.io', '-address', '/run/c.sock', '-publish-binary', '/usr/bin/containerd', '-id', 'abc', '-debug', 'start']),
    ).toEqual({
      action: 'start',
      namespace: 'k8s.io',
      id: 'abc',
      address: '/run/c.sock',
      publishBinary: '/usr/bin/containerd',
      bundle: undefined,
      socket: undefined,
      debug: true,
    });
    expect(parseShimArgs(['--namespace=default', '-id=x', '-bundle', '/b', 'delete'])).toMatchObject({ action: 'delete', bundle: '/b' });
    const a = parseShimArgs(['-namespace', 'n', '-id', 'i', '-address', '/a', 'start']);
    expect(parseShimArgs(serveArgs(a, '/s.sock'))).toMatchObject({ action: 'serve', socket: '/s.sock', namespace: 'n', id: 'i' });
  });
  it('refuses what containerd would never send, saying what', () => {
    expect(() => parseShimArgs(['-namespace', 'n', '-id', 'i'])).toThrow(ShimUsageError);
    expect(() => parseShimArgs(['-namespace', 'n', '-id', '../x', 'start'])).toThrow(/-id/);
    expect(() => parseShimArgs(['-namespace', 'n', '-id', 'i', '-bogus', 'start'])).toThrow(/unknown flag -bogus/);
    expect(() => parseShimArgs(['-namespace', 'n', '-id', 'i', 'serve'])).toThrow(/-socket/);
  });
});

describe('tasks', () => {
  it('are told apart by the CRI annotations', () => {
    expect(taskKind({ 'io.kubernetes.cri.container-type': 'sandbox' })).toEqual({ kind: 'sandbox' });
    expect(taskKind({ 'io.kubernetes.cri.container-type': 'container', 'io.kubernetes.cri.sandbox-id': 's1' })).toEqual({ kind: 'container', sandboxId: 's1' });
    expect(taskKind(undefined)).toEqual({ kind: 'lone' });
  });
  it("name their rootfs disk by a serial that fits virtio-blk (20 bytes) and the agent's rule", () => {
    const s = diskSerial('f8649f88152866a01c2f8b366132a7d7fb3841ba90f2c1007cf0624780149473');
    expect(s).toMatch(/^[a-z0-9][a-z0-9-]{0,19}$/);
    expect(diskSerial('a')).not.toBe(diskSerial('b'));
  });
});

describe("the guest's OCI config", () => {
  const cri = {
    process: { args: ['sh'], terminal: true },
    hostname: 'web-pod',
    hooks: { prestart: [{ path: '/usr/bin/x' }] },
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/etc/hosts', type: 'bind', source: '/var/lib/containerd/sandboxes/s/hosts', options: ['rbind', 'rw'] },
      { destination: '/dev/shm', type: 'bind', source: '/run/containerd/sandboxes/s/shm', options: ['rbind'] },
      { destination: '/data', type: 'bind', source: '/host/data', options: ['rbind'] },
    ],
    linux: {
      cgroupsPath: '/k8s.io/c',
      resources: { memory: { limit: 1 } },
      namespaces: [
        { type: 'pid', path: '/proc/9/ns/pid' },
        { type: 'ipc', path: '/proc/9/ns/ipc' },
        { type: 'uts', path: '/proc/9/ns/uts' },
        { type: 'mount' },
        { type: 'network', path: '/proc/9/ns/net' },
      ],
    },
    root: { path: 'rootfs' },
  };
  it("shares the VM's network, IPC, UTS and /dev/shm (the pod's), and the pod's pid namespace when it joins the sandbox's; leaves host paths, hooks and limits out", () => {
    const { spec, dropped, podPid } = guestSpec(cri, { hostname: 'pod-1' });
    expect(spec.linux.namespaces).toEqual([{ type: 'pid' }, { type: 'mount' }]);
    expect(podPid).toBe(true);
    expect(guestSpec({ linux: { namespaces: [{ type: 'pid' }] } }).podPid).toBe(false);
    expect(spec.linux.cgroupsPath).toBeUndefined();
    expect(spec.linux.resources).toBeUndefined();
    expect(spec.hooks).toBeUndefined();
    expect(spec.root).toBeUndefined();
    expect(spec.process.terminal).toBe(false);
    expect(spec.hostname).toBeUndefined(); // the VM's UTS namespace has the pod's hostname
    expect(spec.mounts).toEqual([
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/etc/hosts', type: 'bind', source: '/etc/hosts', options: ['rbind', 'ro'] },
      { destination: '/dev/shm', type: 'bind', source: '/dev/shm', options: ['rbind', 'rw', 'nosuid', 'nodev'] },
    ]);
    expect(dropped.join('; ')).toMatch(/hooks.*network namespace.*cgroupsPath.*resources.*\/host\/data/);
    expect(cri.linux.namespaces).toHaveLength(5); // the input is left as it was
  });
  it('sets a hostname only where the container has a UTS namespace of its own', () => {
    expect(guestSpec({ linux: { namespaces: [{ type: 'mount' }] }, hostname: 'x' }).spec.hostname).toBeUndefined();
    expect(guestSpec({ linux: { namespaces: [{ type: 'uts' }] } }, { hostname: 'pod-3' }).spec.hostname).toBe('pod-3');
  });
});

describe('rootfs and events', () => {
  it("mounts containerd's snapshot and packs it reproducibly", () => {
    expect(mountArgv({ type: 'bind', source: '/snap/1/fs', options: ['rbind', 'ro'] }, '/t')).toEqual([
      'mount',
      '-t',
      'none',
      '-o',
      'rbind,ro',
      '/snap/1/fs',
      '/t',
    ]);
    expect(mountArgv({ type: 'overlay', source: 'overlay', options: ['lowerdir=/a:/b', 'upperdir=/u', 'workdir=/w'] }, '/t')).toEqual([
      'mount',
      '-t',
      'overlay',
      '-o',
      'lowerdir=/a:/b,upperdir=/u,workdir=/w',
      'overlay',
      '/t',
    ]);
    expect(mkfsArgv('/i.erofs', '/t')).toEqual(['mkfs.erofs', '--quiet', '-T0', '/i.erofs', '/t']);
  });
  it('an event envelope carries its message as an Any named by its full protobuf name', () => {
    const e = envelope('k8s.io', '/tasks/exit', { containerId: 'c', exitStatus: 137 }, 1500) as any;
    expect(e.envelope).toMatchObject({ namespace: 'k8s.io', topic: '/tasks/exit', timestamp: { seconds: 1, nanos: 500_000_000 } });
    expect(e.envelope.event.type_url).toBe('containerd.events.TaskExit');
    expect(decode('containerd.events.TaskExit', e.envelope.event.value)).toMatchObject({ containerId: 'c', exitStatus: 137 });
  });
});

import { parseResolvConf, resolvConfSource } from '../../shim/spec.ts';
import { resolvConf } from '../../guest-agent/identity.ts';
import { validateIdentity } from '../../guest-agent/protocol.ts';

describe("a pod's DNS into its VM", () => {
  it('reads the resolv.conf containerd wrote for the pod, keeping what the guest can use', () => {
    const text =
      '# written by containerd\nnameserver 10.96.0.10\nnameserver fd00::a\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 edns0 $(reboot)\nnameserver 1.1.1.1 ; trailing\n';
    expect(parseResolvConf(text)).toEqual({
      servers: ['10.96.0.10', '1.1.1.1'],
      search: ['default.svc.cluster.local', 'svc.cluster.local', 'cluster.local'],
      options: ['ndots:5', 'edns0'],
    });
    expect(parseResolvConf('nameserver 1.1.1.1\nnameserver 1.1.1.2\nnameserver 1.1.1.3\nnameserver 1.1.1.4\n').servers).toHaveLength(3);
    expect(resolvConfSource({ mounts: [{ destination: '/etc/resolv.conf', type: 'bind', source: '/var/lib/containerd/s/resolv.conf' }] })).toBe(
      '/var/lib/containerd/s/resolv.conf',
    );
    expect(resolvConfSource({ mounts: [{ destination: '/etc/hosts', source: '/x' }] })).toBeUndefined();
  });

  it('the agent writes it as resolv.conf, and refuses what is not a domain or an option', () => {
    expect(resolvConf({ dns: ['10.96.0.10'], dnsSearch: ['a.svc', 'svc'], dnsOptions: ['ndots:5'] })).toBe(
      'nameserver 10.96.0.10\nsearch a.svc svc\noptions ndots:5\n',
    );
    expect(resolvConf({ dns: ['10.0.2.3'] })).toBe('nameserver 10.0.2.3\n');
    const id = { generation: 2, hostname: 'p', machineId: 'a'.repeat(32), interfaces: [{ mac: '02:00:00:00:00:01' }], dns: [] as string[] };
    expect(validateIdentity({ ...id, dnsSearch: ['default.svc.cluster.local'], dnsOptions: ['ndots:5'] })).toMatchObject({
      dnsSearch: ['default.svc.cluster.local'],
      dnsOptions: ['ndots:5'],
    });
    expect(() => validateIdentity({ ...id, dnsSearch: ['evil\nnameserver 6.6.6.6'] })).toThrow(/dnsSearch/);
    expect(() => validateIdentity({ ...id, dnsOptions: ['ndots:5 rotate'] })).toThrow(/dnsOptions/);
  });
});

import { cpuOfStat, kbField } from '../../guest-agent/task-spec.ts';
import { metricsOf, METRICS_TYPE } from '../../shim/service.ts';
import { encode } from '../../shim/proto.ts';

describe('task stats', () => {
  it('the guest reads CPU time and memory from /proc; the shim sends them as cgroup v2 metrics', () => {
    // a command name with spaces and a parenthesis: the fields are counted from the last ")"
    const stat = '42 (sh) x (y)) S 1 42 42 0 -1 4194560 300 0 0 0 250 30 0 0 20 0 1 0 100 4000000 200 18446744073709551615';
    expect(cpuOfStat(stat)).toEqual({ userUsec: 2_500_000, systemUsec: 300_000 });
    expect(cpuOfStat('garbage')).toBeUndefined();
    expect(kbField('Name:\tsh\nVmRSS:\t    1234 kB\nRssAnon:\t  100 kB\n', 'VmRSS')).toBe(1234 * 1024);
    expect(kbField('VmRSS:\t1 kB\n', 'RssFile')).toBe(0);
    const m = metricsOf({
      id: 't',
      pids: 2,
      cpuUserUsec: 2_500_000,
      cpuSystemUsec: 300_000,
      memoryBytes: 5 << 20,
      anonBytes: 3 << 20,
      fileBytes: 2 << 20,
      limitBytes: 480 << 20,
    });
    const back = decode(METRICS_TYPE, encode(METRICS_TYPE, m));
    expect(back).toMatchObject({
      pids: { current: 2 },
      cpu: { usageUsec: 2_800_000, userUsec: 2_500_000, systemUsec: 300_000 },
      memory: { usage: 5 << 20, anon: 3 << 20, file: 2 << 20, usageLimit: 480 << 20 },
    });
  });
});

import { imageAllowed } from '../../shim/kinds.ts';
import { config } from '../../common/config.ts';

describe('images a pod may name', () => {
  it('only under a prefix the node allows; none when SCION_SHIM_IMAGES is unset', () => {
    const allowed = config({ SCION_SHIM_IMAGES: ' registry.example.com/scion/ ,127.0.0.1:5000/' }).shimImagePrefixes;
    expect(allowed).toEqual(['registry.example.com/scion/', '127.0.0.1:5000/']);
    expect(imageAllowed('registry.example.com/scion/pod:1.0', allowed)).toBe(true);
    expect(imageAllowed('registry.example.com/scionx/pod:1.0', allowed)).toBe(false);
    expect(imageAllowed('127.0.0.1:5000/a:1', allowed)).toBe(true);
    expect(imageAllowed('registry.example.com/scion/pod:1.0', config({}).shimImagePrefixes)).toBe(false);
  });
});

describe('a pod VM: how it is made, and which one a bundle names', () => {
  it('io.scion.boot is pool (unset), fork or cold; anything else is refused', async () => {
    const { bootMode } = await import('../../shim/kinds.ts');
    expect(bootMode(undefined)).toBe('pool');
    expect(bootMode({ 'io.scion.boot': '' })).toBe('pool');
    expect(bootMode({ 'io.scion.boot': 'fork' })).toBe('fork');
    expect(bootMode({ 'io.scion.boot': 'cold' })).toBe('cold');
    expect(bootMode({ 'io.scion.boot': 'warm' })).toBeUndefined();
  });
  it('a bundle names the VM and its generation ID; anything else names nothing', async () => {
    const { vmFileLine, parseVmFile } = await import('../../shim/pod.ts');
    const id = '0f3c9a52-7d1e-4b8a-9c2f-1a2b3c4d5e6f';
    expect(parseVmFile(vmFileLine('pod-c3', id))).toEqual({ name: 'pod-c3', vmgenid: id });
    expect(parseVmFile(vmFileLine('pod-cold-1a2b', undefined))).toEqual({ name: 'pod-cold-1a2b', vmgenid: undefined });
    expect(parseVmFile('pod-c3\n')).toEqual({ name: 'pod-c3', vmgenid: undefined }); // written by the last release
    for (const bad of ['', '../etc x', 'pod-c3 $(reboot)', 'POD x', 'a'.repeat(64)]) expect(parseVmFile(bad)).toBeUndefined();
  });
  it('the tap and the pod interface are joined both ways in one tc batch', async () => {
    const { redirectBatch } = await import('../../host/machine/net.ts');
    expect(redirectBatch('eth0', 'sct1').split('\n')).toEqual([
      'qdisc add dev eth0 ingress',
      'filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev sct1',
      'qdisc add dev sct1 ingress',
      'filter add dev sct1 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev eth0',
      '',
    ]);
  });
});

describe('the pool on disk (host/store/pool.ts)', () => {
  const withRun = async (fn: (pool: typeof import('../../host/store/pool.ts')) => Promise<void>) => {
    const { mkdtempSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const run = mkdtempSync(join(tmpdir(), 'scion-pool-'));
    const prev = process.env.SCION_RUN_DIR;
    process.env.SCION_RUN_DIR = run;
    try {
      await fn(await import('../../host/store/pool.ts'));
    } finally {
      if (prev === undefined) delete process.env.SCION_RUN_DIR;
      else process.env.SCION_RUN_DIR = prev;
      rmSync(run, { recursive: true, force: true });
    }
  };
  const alive = (pid: number) => pid === process.pid;

  it('a ready VM goes to exactly one of many claimers at once, and stays held while its claimer lives', async () =>
    withRun(async (pool) => {
      const vm = 'pod-c1' as never;
      await pool.addEntry('pod-tpl', vm, '2026-12-03T10:00:00.000Z');
      expect(await pool.readyEntries('pod-tpl')).toEqual(['pod-c1']);
      const won = await Promise.all(Array.from({ length: 8 }, () => pool.takeEntry('pod-tpl', vm)));
      expect(won.filter(Boolean)).toEqual([{ frozenAt: '2026-12-03T10:00:00.000Z' }]); // the freeze its entry names
      expect(await pool.readyEntries('pod-tpl')).toEqual([]);
      expect(await pool.poolHolds('pod-tpl', 'pod-c1', alive)).toBe(true); // the claim names a live pid
      expect(await pool.poolHolds('pod-tpl', 'pod-c1', () => false)).toBe(false); // its claimer died: nobody holds it
      await pool.dropClaim('pod-tpl', vm);
      expect(await pool.poolHolds('pod-tpl', 'pod-c1', alive)).toBe(false);
    }));
  it("one filler per template; a dead filler's lock is taken over", async () =>
    withRun(async (pool) => {
      const release = await pool.takeFillLock('pod-tpl', alive);
      expect(release).toBeDefined();
      expect(await pool.takeFillLock('pod-tpl', alive)).toBeUndefined(); // this (live) process holds it
      expect(await pool.takeFillLock('web-tpl', alive)).toBeDefined(); // another template's pool is another lock
      const taken = await pool.takeFillLock('pod-tpl', () => false); // its holder looks dead
      expect(taken).toBeDefined();
      await taken!();
    }));
  it("sweeping removes dead claims, entries naming no VM and a dead filler's lock; template names are checked", async () =>
    withRun(async (pool) => {
      await pool.addEntry('pod-tpl', 'pod-c1' as never, 'f');
      await pool.addEntry('pod-tpl', 'pod-c2' as never, 'f');
      await pool.takeEntry('pod-tpl', 'pod-c2' as never);
      await pool.takeFillLock('pod-tpl', alive);
      const removed = await pool.sweepPool(
        'pod-tpl',
        (v) => v === 'pod-c2',
        () => false,
      );
      expect(removed.sort()).toEqual([`pool:pod-tpl/.claim-${process.pid}-pod-c2`, 'pool:pod-tpl/.fill', 'pool:pod-tpl/pod-c1']);
      expect(await pool.listPools()).toEqual([{ template: 'pod-tpl', ready: [], claims: [] }]);
      await expect(pool.readyEntries('../etc')).rejects.toThrow(/template name/);
    }));
});

describe('spare shims: which containerd and namespace a spare serves', () => {
  it('a key per containerd and namespace; a spare is found only under its own key; its argv parses as the spare action', async () => {
    const { spareKey, sparesOf, spareSocketName, spareArgs } = await import('../../shim/spare.ts');
    const a = { namespace: 'k8s.io', address: '/run/containerd/containerd.sock' };
    const k = spareKey(a, '/run/containerd/containerd.sock.ttrpc');
    expect(k).toMatch(/^[0-9a-f]{12}$/);
    expect(spareKey({ ...a, namespace: 'default' }, '/run/containerd/containerd.sock.ttrpc')).not.toBe(k);
    expect(spareKey({ ...a, address: '/tmp/other.sock' }, '/tmp/other.sock.ttrpc')).not.toBe(k);
    const names = [spareSocketName(k, 42), spareSocketName('0123456789ab', 43), `taken-7-${spareSocketName(k, 44)}`, `spare-${k}-x.sock`, 'abc.sock'];
    expect(sparesOf(names, k)).toEqual([`spare-${k}-42.sock`]);
    const parsed = parseShimArgs(
      spareArgs({ action: 'start', namespace: 'k8s.io', id: 'sb1', address: a.address, publishBinary: '/usr/bin/containerd', debug: false }),
    );
    expect(parsed).toMatchObject({ action: 'spare', namespace: 'k8s.io', address: a.address, publishBinary: '/usr/bin/containerd' });
  });
});

import { judge, reachable } from '../../shim/lifetime.ts';
import { createServer as netServer } from 'node:net';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

describe('a shim judging whether its containerd is gone', () => {
  it('gone at once when its directories are; away within the grace (a restart); gone past it', () => {
    const since = 1000;
    expect(judge({ at: 1500, dirsThere: false, reachable: true }, 1400, since, 5000)).toBe('gone');
    expect(judge({ at: 9000, dirsThere: true, reachable: true }, 9000, since, 5000)).toBe('alive');
    // last reachable at 4000: unreachable until 8999 is a restart's window, from 9000 on it is gone
    expect(judge({ at: 8999, dirsThere: true, reachable: false }, 4000, since, 5000)).toBe('away');
    expect(judge({ at: 9000, dirsThere: true, reachable: false }, 4000, since, 5000)).toBe('gone');
    // never reachable since the watch began: counted from its start
    expect(judge({ at: 1999, dirsThere: true, reachable: false }, undefined, since, 1000)).toBe('away');
    expect(judge({ at: 2000, dirsThere: true, reachable: false }, undefined, since, 1000)).toBe('gone');
  });
  it('a socket is reachable while something accepts on it; not once it is closed (file left, as after SIGKILL) or removed', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'scion-life-'));
    const path = join(dir, 'c.sock');
    const srv = netServer((c) => c.destroy());
    await new Promise<void>((r) => srv.listen(path, r));
    expect(await reachable(path)).toBe(true);
    // a listener that is gone but whose file stays: what a SIGKILLed containerd leaves
    const stale = join(dir, 'stale.sock');
    spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`], {
      stdio: 'ignore',
    });
    expect(existsSync(stale)).toBe(true);
    expect(await reachable(stale)).toBe(false);
    await new Promise<void>((r) => srv.close(() => r()));
    expect(await reachable(path)).toBe(false);
    expect(await reachable(join(dir, 'none.sock'))).toBe(false);
    rmSync(dir, { recursive: true, force: true });
  });
});
