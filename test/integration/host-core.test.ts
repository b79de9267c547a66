/**
 * The host core under concurrency, bad input and a hostile local user, with
 * real QEMU: concurrent scion processes, QEMU's sandbox and uid, refused
 * names and directories, tampered templates, a missing QEMU, and clone
 * clocks that stay on the host's.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { distinct } from '../support/guest.ts';
import { spawn } from 'node:child_process';
import { readFileSync, mkdirSync, chownSync, chmodSync, cpSync, writeFileSync, symlinkSync, rmSync, readdirSync, linkSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import * as vm from '../../host/index.ts';
import { readRecord } from '../../host/store/records.ts';
import { validName } from '../../common/names.ts';
import { currentVmm } from '../../host/qemu/vmm.ts';
import { createHash } from 'node:crypto';
import { isolateRunDirs, ROOT, tmp, scionQemuPids, frozenWebTemplate, removeEverything } from './helpers.ts';

const dirs = isolateRunDirs('core');
const started = Date.now();

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}
function scion(args: string[], env: Record<string, string> = {}): Promise<Ran> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [join(ROOT, 'bin/scion.js'), ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '',
      stderr = '';
    p.stdout.on('data', (c) => (stdout += c));
    p.stderr.on('data', (c) => (stderr += c));
    p.on('exit', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

async function skewOf(name: string): Promise<{ skewMs: number; rttMs: number; clock: any }> {
  const a = await vm.connectAgent(name);
  try {
    let best = { skewMs: 0, rttMs: Infinity, clock: undefined as any };
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now();
      const info = await a.call('info');
      const t1 = Date.now();
      if (t1 - t0 < best.rttMs) best = { skewMs: info.time - (t0 + t1) / 2, rttMs: t1 - t0, clock: info.clock };
    }
    return best;
  } finally {
    a.close();
  }
}

let forked: vm.CloneResult[] = [];
const forkedAt = new Map<string, number>();

beforeAll(() => frozenWebTemplate());
afterAll(() => removeEverything(dirs));

describe('concurrency', () => {
  it("four scion fork processes of 3 clones each, started at once beside gc runs, all succeed with distinct clones, each clock on the host's as its fork returns", async () => {
    // each clone's clock read as soon as its `scion fork` returns, while the other forks still load the host
    const atReturn: { name: string; skewMs: number; rttMs: number }[] = [];
    const forks = Array.from({ length: 4 }, () =>
      scion(['fork', 'web-tpl', '-n', '3', '--json']).then(async (r) => {
        if (r.code === 0)
          for (const c of JSON.parse(r.stdout).clones) {
            const s = await skewOf(c.name);
            atReturn.push({ name: c.name, skewMs: s.skewMs, rttMs: s.rttMs });
          }
        return r;
      }),
    );
    // gc while they fork: it must not take anything the forks are making
    const gcs: Ran[] = [];
    for (let i = 0; i < 4; i++) {
      await new Promise((r) => setTimeout(r, 700));
      gcs.push(await scion(['gc', '--json']));
    }
    const results = await Promise.all(forks);
    for (const r of results) expect(r.code, r.stderr).toBe(0);
    for (const g of gcs) {
      expect(g.code, g.stderr).toBe(0);
      expect(JSON.parse(g.stdout).removed).toEqual([]);
    }
    forked = results.flatMap((r) => JSON.parse(r.stdout).clones as vm.CloneResult[]);
    for (const c of forked) forkedAt.set(c.name, Date.now());
    expect(forked).toHaveLength(12);
    expect(atReturn).toHaveLength(12);
    for (const s of atReturn) expect(Math.abs(s.skewMs) - s.rttMs / 2, `${s.name} at its fork's return: ${JSON.stringify(s)}`).toBeLessThanOrEqual(100);
    for (const k of ['name', 'mac', 'ip', 'hostname', 'machineId', 'vmgenid'] as const) expect(distinct(forked.map((c) => c[k])), k).toBe(true);
    expect(distinct(forked.map((c) => c.ports['8080']))).toBe(true);
    const running = (await vm.list()).filter((v) => v.role === 'clone' && v.state === 'running');
    expect(running.map((v) => v.name).sort()).toEqual(forked.map((c) => c.name).sort());
    // each clone answers on its own port with its own name
    for (const c of forked.slice(0, 4)) expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
  });

  it('rm refuses a VM another scion process is still making, and that fork completes', async () => {
    const child = scion(['fork', 'web-tpl', '-n', '1', '--json']);
    let making: string | undefined;
    const end = Date.now() + 60_000;
    while (!making && Date.now() < end) {
      for (const v of await vm.list()) if (v.state === 'starting') making = v.name;
      if (!making) await new Promise((r) => setTimeout(r, 20));
    }
    expect(making).toBeDefined();
    const rm = await scion(['rm', making!]);
    expect(rm.code).toBe(1);
    expect(rm.stderr).toMatch(new RegExp(`cannot remove ${making}: scion process \\d+ is still making it \\(fork\\)`));
    const done = await child;
    expect(done.code, done.stderr).toBe(0);
    expect(JSON.parse(done.stdout).clones[0].name).toBe(making);
    await vm.removeVm(making!);
  });
});

describe('QEMU sandbox', () => {
  it('a clone started as root runs under seccomp as its own unprivileged uid, serves, and is removed cleanly', async () => {
    const c = forked[0];
    const status = readFileSync(`/proc/${c.pid}/status`, 'utf8');
    expect(status).toMatch(/^Seccomp:\s+2$/m);
    const [ruid, euid, suid, fsuid] = /^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$/m.exec(status)!.slice(1).map(Number);
    expect([ruid, euid, suid, fsuid].every((u) => u === ruid && u !== 0)).toBe(true);
    const others = forked.slice(1).map((o) => Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${o.pid}/status`, 'utf8'))![1]));
    expect(others).not.toContain(ruid); // one uid per VM, as Firecracker's jailer gives
    expect(/^CapEff:\s+0+$/m.test(status)).toBe(true);
    expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    const r = (await readRecord(validName(c.name)))!;
    await vm.removeVm(c.name);
    expect(existsSync(c.runDir)).toBe(false);
    expect((await scionQemuPids()).map((q) => q.pid)).not.toContain(c.pid);
    const slots = readdirSync(join(dirs.run, 'slots'));
    for (const s of r.slots) expect(slots).not.toContain(s);
    forked = forked.slice(1);
  });
});

describe('translation buffer', () => {
  it("`scion fork --tb-size` gives each clone's QEMU that TCG buffer (default 32), and the clone serves", async () => {
    const cmdline = (pid: number) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    // under KVM there is no translation buffer: the accelerator is named alone
    const forkedAccel = (await vm.list()).find((v) => v.name === forked[0].name)!.accel;
    const accel = (size: number) => (forkedAccel === 'kvm' ? 'kvm' : `tcg,tb-size=${size}`);
    expect(cmdline(forked[0].pid)).toContain(accel(32));
    const r = await scion(['fork', 'web-tpl', '--tb-size', '16', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const [c] = JSON.parse(r.stdout).clones as vm.CloneResult[];
    try {
      expect(cmdline(c.pid)).toContain(accel(16));
      expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    } finally {
      await vm.removeVm(c.name);
    }
  });
});

describe('bad names are refused before anything is touched', () => {
  const bad: [string, string][] = [
    ['', 'empty'],
    ['..', 'looks like a path'],
    ['a/b', 'looks like a path'],
    ['a b', 'contains " "'],
    ['x;reboot', 'contains ";"'],
  ];
  it.each(['rm', 'stop', 'info', 'fork', 'freeze'])('scion %s', async (cmd) => {
    const before = readdirSync(join(dirs.run, 'vms')).sort();
    const runs = await Promise.all(bad.map(([name]) => scion([cmd, name])));
    bad.forEach(([name, why], i) => {
      expect(runs[i].code, `${cmd} ${JSON.stringify(name)}`).toBe(1);
      expect(runs[i].stderr).toContain(`name ${JSON.stringify(name)}: ${why}`);
    });
    expect(readdirSync(join(dirs.run, 'vms')).sort()).toEqual(before);
    expect((await vm.list()).filter((v) => v.state === 'running').length).toBe(forked.length);
  });
});

describe('directories and files another user could have touched', () => {
  it('refuses a run root owned by another user, one writable by others, and a symlink', async () => {
    const foreign = join(tmp('foreign'), 'run');
    mkdirSync(foreign, { mode: 0o700 });
    chownSync(foreign, 4242, 4242);
    let r = await scion(['ls'], { SCION_RUN_DIR: foreign });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`run root ${foreign} is owned by uid 4242, not by uid 0 (this user)`);
    chownSync(foreign, 0, 0);
    chmodSync(foreign, 0o777);
    r = await scion(['ls'], { SCION_RUN_DIR: foreign });
    expect(r.stderr).toContain(`run root ${foreign} is writable by its group (mode 0777)`);
    const link = join(tmp('link'), 'run');
    symlinkSync(dirs.run, link);
    r = await scion(['ls'], { SCION_RUN_DIR: link });
    expect(r.stderr).toContain(`run root ${link} is a symbolic link`);
  });

  it("refuses a template root another user owns or can write (they could swap root's template)", async () => {
    const t = join(tmp('tplroot'), 'x');
    const shm = join('/dev/shm', `scion-core-foreign-${process.pid}`);
    mkdirSync(shm, { mode: 0o700 });
    chownSync(shm, 4242, 4242);
    try {
      let r = await scion(['fork', 'web-tpl'], { SCION_TEMPLATE_DIR: shm });
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`template root ${shm} is owned by uid 4242`);
      chownSync(shm, 0, 0);
      chmodSync(shm, 0o1777);
      r = await scion(['fork', 'web-tpl'], { SCION_TEMPLATE_DIR: shm });
      expect(r.stderr).toContain(`template root ${shm} is writable by its group (mode 1777)`);
      mkdirSync(t, { recursive: true, mode: 0o700 });
      r = await scion(['fork', 'web-tpl'], { SCION_TEMPLATE_DIR: t });
      expect(r.stderr).toContain(`template root ${t} is not on tmpfs`);
    } finally {
      rmSync(shm, { recursive: true, force: true });
    }
  });

  it('refuses a tampered template: planted metadata, another format, a path outside, a symlinked directory', async () => {
    const tpl = join(dirs.templates, 'web-tpl');
    const evil = join(dirs.templates, 'evil-tpl');
    const plant = (metaOver: Record<string, unknown>) => {
      rmSync(evil, { recursive: true, force: true });
      cpSync(tpl, evil, { recursive: true, filter: (s) => !s.endsWith('/mem') });
      linkSync(join(tpl, 'mem'), join(evil, 'mem'));
      const meta = JSON.parse(readFileSync(join(tpl, 'meta.json'), 'utf8'));
      writeFileSync(join(evil, 'meta.json'), JSON.stringify({ ...meta, name: 'evil-tpl', ...metaOver }));
    };
    plant({ kernel: '/etc/shadow' });
    await expect(vm.fork('evil-tpl', { n: 1 })).rejects.toMatchObject({
      code: 'E_RECORD_INVALID',
      message: expect.stringContaining('kernel: must be a file name inside the template directory, not a path'),
    });
    plant({ format: 'scion.template/0' });
    await expect(vm.fork('evil-tpl', { n: 1 })).rejects.toMatchObject({
      code: 'E_RECORD_VERSION',
      message: `${join(evil, 'meta.json')} has format "scion.template/0"; this scion reads "scion.template/2"`,
    });
    plant({ name: 'web-tpl' });
    await expect(vm.fork('evil-tpl', { n: 1 })).rejects.toMatchObject({
      message: `${join(evil, 'meta.json')} names template "web-tpl", but lives in the directory of "evil-tpl"`,
    });
    plant({});
    rmSync(join(evil, 'state'));
    symlinkSync(join(tpl, 'state'), join(evil, 'state'));
    await expect(vm.fork('evil-tpl', { n: 1 })).rejects.toMatchObject({
      code: 'E_TEMPLATE_INCOMPLETE',
      message: `template evil-tpl: ${join(evil, 'state')} is not a regular file`,
    });
    rmSync(evil, { recursive: true, force: true });
    symlinkSync(tpl, evil);
    await expect(vm.fork('evil-tpl', { n: 1 })).rejects.toMatchObject({ code: 'E_UNTRUSTED_DIR', message: `template directory ${evil} is a symbolic link` });
    rmSync(evil, { force: true });
    expect((await vm.list()).filter((v) => v.name.startsWith('evil'))).toEqual([]);
  });

  it('a missing QEMU binary is a typed error naming it and its package', async () => {
    const r = await scion(['fork', 'web-tpl', '--json'], { SCION_QEMU: '/nonexistent/qemu-system-x86_64' });
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error).toEqual({
      code: 'E_COMMAND_MISSING',
      message: '/nonexistent/qemu-system-x86_64 is not installed (or not on PATH)',
      hint: 'apt-get install qemu-system-x86 (bash scripts/setup.sh installs everything scion needs)',
    });
  });
});

describe('a fork that fails leaves nothing behind (the one Machine construction path)', () => {
  /** What a fork could leave: run directories, reservation files, QEMU processes (from /proc). */
  const snapshot = async () => ({
    runDirs: readdirSync(join(dirs.run, 'vms')).sort(),
    slots: readdirSync(join(dirs.run, 'slots')).sort(),
    qemus: (await scionQemuPids()).map((q) => q.pid).sort(),
  });

  it('whose QEMU fails to start', async () => {
    // the real QEMU, given an option it refuses: it exits at once with its own error. The wrapper is a
    // VMM of its own (SCION_QEMU: a system VMM, identified by its file's hash), so the template is a copy
    // of web-tpl (its memory hard-linked) whose record names the wrapper: the same QEMU build underneath
    const pinned = await currentVmm();
    const bin = tmp('badqemu');
    chmodSync(bin, 0o755); // the VM's unprivileged uid runs it
    const wrapper = join(bin, 'qemu-refusing');
    const real = [...pinned.command, ...pinned.args].map((a) => `'${a}'`).join(' ');
    writeFileSync(
      wrapper,
      `#!/bin/sh\nexport QEMU_MODULE_DIR='${pinned.env.QEMU_MODULE_DIR}'\ncase "$1" in --version|-machine) exec ${real} "$@";; esac\nexec ${real} "$@" -no-such-option\n`,
      { mode: 0o755 },
    );
    const tpl = join(dirs.templates, 'web-tpl');
    const copy = join(dirs.templates, 'wrapped-tpl');
    cpSync(tpl, copy, { recursive: true, filter: (src) => !src.endsWith('/mem') });
    linkSync(join(tpl, 'mem'), join(copy, 'mem'));
    const meta = JSON.parse(readFileSync(join(copy, 'meta.json'), 'utf8'));
    const digest = `sha256:${createHash('sha256').update(readFileSync(wrapper)).digest('hex')}`;
    writeFileSync(join(copy, 'meta.json'), JSON.stringify({ ...meta, name: 'wrapped-tpl', vmm: { kind: 'system', version: pinned.version, digest } }));
    const before = await snapshot();
    process.env.SCION_QEMU = wrapper;
    try {
      await expect(vm.fork('wrapped-tpl', { n: 1 })).rejects.toMatchObject({ code: 'E_QEMU_EXITED', message: expect.stringContaining('-no-such-option') });
    } finally {
      delete process.env.SCION_QEMU;
      rmSync(copy, { recursive: true, force: true });
    }
    expect(await snapshot()).toEqual(before);
  });

  it('whose agent never answers', async () => {
    // a deadline no agent can meet stands in for a guest whose agent hangs (one cannot be made on
    // demand): QEMU has really started and restored the clone when the wait gives up
    const before = await snapshot();
    await expect(vm.fork('web-tpl', { n: 1, agentTimeoutMs: 1 })).rejects.toMatchObject({ code: 'E_AGENT_TIMEOUT' });
    expect(await snapshot()).toEqual(before);
  });

  it('whose identity the guest refuses', async () => {
    // the host accepts the pattern; the guest's agent refuses "bad-N-" (a host name cannot end in "-")
    const before = await snapshot();
    await expect(vm.fork('web-tpl', { n: 2, hostname: 'bad-{n}-' })).rejects.toMatchObject({
      code: 'E_IDENTITY_REFUSED',
      message: expect.stringContaining('hostname: must be a valid host name'),
    });
    expect(await snapshot()).toEqual(before);
  });
});

describe('clone clocks', () => {
  it('stay within 100 ms of the host right after the fork and after 2 minutes idle (agent round trip as the error bar)', async () => {
    const sample = forked.slice(0, 3);
    for (const c of sample) {
      // right after: the clock keeper's first check (within about a second of the fork)
      const a = await vm.connectAgent(c.name);
      for (let i = 0; i < 100 && !((await a.call('info')).clock.checks >= 1); i++) await new Promise((r) => setTimeout(r, 100));
      a.close();
      const s = await skewOf(c.name);
      expect(Math.abs(s.skewMs) - s.rttMs / 2, `${c.name}: ${JSON.stringify(s)}`).toBeLessThanOrEqual(100);
    }
    const idleUntil = Math.max(...sample.map((c) => forkedAt.get(c.name)!)) + 125_000;
    await new Promise((r) => setTimeout(r, Math.max(0, idleUntil - Date.now())));
    for (const c of sample) {
      const s = await skewOf(c.name);
      expect(
        Math.abs(s.skewMs) - s.rttMs / 2,
        `${c.name} after ${((Date.now() - forkedAt.get(c.name)!) / 1000).toFixed(0)} s: ${JSON.stringify(s)}`,
      ).toBeLessThanOrEqual(100);
    }
    expect(Date.now() - started).toBeGreaterThan(120_000);
  });
});
