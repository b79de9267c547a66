/**
 * Real QEMU under TCG (KVM where it works): boot, freeze and fork images/web.yaml
 * and check, from the agents and from inside each guest, that every clone is
 * its own machine while the template's memory stays untouched.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { guestSh, distinct } from '../support/guest.ts';
import { createHash } from 'node:crypto';
import { createReadStream, readFileSync, existsSync, truncateSync, copyFileSync, mkdirSync, cpSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { build } from '../../builder/build.ts';
import type { AgentClient } from '../../host/agent-client.ts';
import { QmpClient } from '../../host/qemu/qmp.ts';
import * as vm from '../../host/index.ts';
import { readRecord } from '../../host/store/records.ts';
import { validName } from '../../common/names.ts';
import { currentVmm } from '../../host/qemu/vmm.ts';
import { image, isolateRunDirs, ROOT, paths, scionQemuPids, removeEverything } from './helpers.ts';

const dirs = isolateRunDirs('vm');
const fileSha = (f: string) =>
  new Promise<string>((res, rej) => {
    const h = createHash('sha256');
    createReadStream(f)
      .on('data', (c) => h.update(c))
      .on('end', () => res(h.digest('hex')))
      .on('error', rej);
  });
async function agentOf(name: string): Promise<AgentClient> {
  return vm.connectAgent(name, 30_000);
}
const sh = async (name: string, script: string): Promise<string> => (await guestSh(name, script)).trim();

afterAll(() => removeEverything(dirs));

describe('minimal image', () => {
  it('boots under QEMU, prints the init marker, and its agent answers', async () => {
    const b = await build({ definitionPath: image('minimal') });
    const h = await vm.bootTemplate(await vm.loadImage(b.dir), { name: 'mini-tpl' });
    try {
      expect(readFileSync((await paths('mini-tpl')).console, 'utf8')).toContain('SCION-INIT-OK');
      const info = await (await h.agent()).call('info');
      expect(info.kernel).toMatch(/^6\.\d+/);
      expect(info.identity.hostname).toBe('minimal');
      expect(info.generation).toBe(1);
    } finally {
      h.close();
      await vm.removeVm('mini-tpl');
    }
    expect((await scionQemuPids()).filter((p) => p.runDir?.endsWith('/mini-tpl'))).toEqual([]);
  });
});

describe('web image: boot, freeze, fork', () => {
  let tplDir: string;
  let memShaBefore: string;
  let clones: vm.CloneResult[];

  beforeAll(async () => {
    const b = await build({ definitionPath: image('web') });
    const img = await vm.loadImage(b.dir);
    const h = await vm.bootTemplate(img, { name: 'web-tpl' });
    await vm.freeze(h, img);
    tplDir = join(dirs.templates, 'web-tpl');
    memShaBefore = await fileSha(join(tplDir, 'mem'));
    clones = await vm.fork('web-tpl', { n: 3, parallel: 2 });
  });

  it('gives three clones pairwise distinct identities, as the agents and the guests report them', async () => {
    const seen = {
      hostname: [] as string[],
      mac: [] as string[],
      ip: [] as string[],
      machineId: [] as string[],
      vmgenid: [] as string[],
      random: [] as string[],
      bootId: [] as string[],
    };
    for (const c of clones) {
      const a = await agentOf(c.name);
      const info = await a.call('info');
      a.close();
      expect(info.generation).toBe(2);
      expect(info.identity.hostname).toBe(c.hostname);
      expect(info.vmForks).toBe(1); // the kernel saw the vmgenid change
      // from inside the guest, not from what the host asked for
      const [hostname, mac, addr, machineId, random, bootId] = (
        await sh(
          c.name,
          'cat /proc/sys/kernel/hostname /sys/class/net/eth0/address; ip -4 -o addr show dev eth0 | awk \'{print $4}\'; cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; cat /proc/sys/kernel/random/boot_id',
        )
      ).split('\n');
      expect(hostname).toBe(c.hostname);
      expect(mac).toBe(c.mac);
      expect(addr).toBe(`${c.ip}/24`);
      expect(machineId).toBe(c.machineId);
      const q = new QmpClient();
      await q.connect((await paths(c.name)).qmp);
      const guid = (await q.execute<{ guid: string }>('query-vm-generation-id')).guid;
      expect(info.identity.vmgenid).toBe(guid);
      seen.vmgenid.push(guid);
      q.close();
      seen.hostname.push(hostname);
      seen.mac.push(mac);
      seen.ip.push(addr);
      seen.machineId.push(machineId);
      seen.random.push(random);
      seen.bootId.push(bootId);
      expect(bootId).toMatch(/^[0-9a-f-]{36}$/);
    }
    for (const [k, xs] of Object.entries(seen)) expect(distinct(xs), `${k}: ${xs.join(' ')}`).toBe(true);
  });

  it('each clone serves HTTP on its own forwarded port, naming its own hostname', async () => {
    for (const c of clones) {
      const res = await fetch(`http://127.0.0.1:${c.ports['8080']}/`);
      expect(await res.text()).toBe(`hello from ${c.hostname}\n`);
    }
    const a = await agentOf(clones[0].name);
    const list = await a.call('containers.list');
    a.close();
    expect(list.containers[0]).toMatchObject({ name: 'web', state: 'running', healthy: true });
  });

  it("10,000 requests pipelined on a clone's agent port get exactly one answer each", async () => {
    // through the virtio-serial port, where the agent once dropped answers past 1024 queued
    const { connect } = await import('node:net');
    const s = connect(clones[1].agentSocket);
    await new Promise((r) => s.once('connect', r));
    let buf = '';
    const seen = new Map<number, number>();
    const N = 10_000;
    const done = new Promise<void>((resolve) =>
      s.on('data', (c) => {
        buf += c.toString('latin1');
        let i: number;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i).replace(/^\xff/, '');
          buf = buf.slice(i + 1);
          let m: any;
          try {
            m = JSON.parse(line);
          } catch {
            continue;
          } // stale bytes of an earlier session
          if (typeof m.id === 'number' && m.id > 1_000_000) seen.set(m.id, (seen.get(m.id) ?? 0) + 1);
          if (seen.size === N) resolve();
        }
      }),
    );
    // the resync marker first (PROTOCOL.md): any partial frame of an earlier session is dropped
    s.write(
      Buffer.concat([
        Buffer.from([0xff]),
        Buffer.from(Array.from({ length: N }, (_, i) => JSON.stringify({ id: 1_000_001 + i, cmd: 'ping' })).join('\n') + '\n'),
      ]),
    );
    await Promise.race([done, new Promise((r) => setTimeout(r, 120_000))]);
    await new Promise((r) => setTimeout(r, 300)); // anything extra would arrive now
    s.destroy();
    expect(seen.size).toBe(N);
    expect([...seen.values()].every((n) => n === 1)).toBe(true);
  });

  it('leaves the template memory file unchanged after the clones have written memory', async () => {
    for (const c of clones) await sh(c.name, 'dd if=/dev/urandom of=/tmp/fill bs=1M count=8 2>/dev/null; sync');
    expect(await fileSha(join(tplDir, 'mem'))).toBe(memShaBefore);
  });

  it("a clone cannot write its template's memory: the file is group-read-only and QEMU opened it read-only", async () => {
    const { statSync, readdirSync, readlinkSync } = await import('node:fs');
    const mem = join(tplDir, 'mem');
    expect(statSync(mem).mode & 0o777).toBe(0o640);
    const r = (await readRecord(validName(clones[0].name)))!;
    const fds = readdirSync(`/proc/${r.pid}/fd`).filter((fd) => {
      try {
        return readlinkSync(`/proc/${r.pid}/fd/${fd}`) === mem;
      } catch {
        return false;
      }
    });
    expect(fds.length).toBeGreaterThan(0);
    // as the clone's own uid and gid (what a QEMU taken over by its guest is), through the clone's own descriptor:
    // /proc/PID/fd/N opens the file anew, checked against the file's mode
    for (const fd of fds) {
      const as = (redirect: string) =>
        spawnSync('setpriv', [`--reuid=${r.uid}`, `--regid=${r.gid}`, '--clear-groups', '--', 'sh', '-c', `exec 5${redirect}/proc/${r.pid}/fd/${fd}`], {
          encoding: 'utf8',
        });
      const rw = as('<>');
      expect(rw.status).not.toBe(0);
      expect(rw.stderr).toMatch(/Permission denied/);
      expect(as('<').status).toBe(0); // read: yes, that is how it maps it
    }
  });

  it('scion ls --json tells each VM role, state and sockets', async () => {
    const out = JSON.parse(execFileSync(process.execPath, [join(ROOT, 'bin/scion.js'), 'ls', '--json'], { encoding: 'utf8', env: process.env }));
    const byName = Object.fromEntries(out.map((v: any) => [v.name, v]));
    expect(byName['web-tpl']).toMatchObject({ role: 'template', state: 'frozen' });
    for (const c of clones)
      expect(byName[c.name]).toMatchObject({ role: 'clone', state: 'running', hostname: c.hostname, ip: c.ip, agentSocket: c.agentSocket });
  });

  it('a corrupted or truncated state file, or a missing memory file, fails clearly and leaves nothing behind', async () => {
    const bad = join(dirs.templates, 'bad-tpl');
    mkdirSync(bad, { recursive: true });
    for (const f of ['meta.json', 'state', 'kernel-stub']) copyFileSync(join(tplDir, f), join(bad, f));
    execFileSync('ln', [join(tplDir, 'mem'), join(bad, 'mem')]); // a hard link: symlinks are refused
    const meta = JSON.parse(readFileSync(join(bad, 'meta.json'), 'utf8'));
    writeFileSync(join(bad, 'meta.json'), JSON.stringify({ ...meta, name: 'bad-tpl' }));
    const before = (await vm.list()).map((v) => v.name).sort();
    const qemusBefore = (await scionQemuPids()).length;

    truncateSync(join(bad, 'state'), 4096);
    await expect(vm.fork('bad-tpl', { n: 1 })).rejects.toMatchObject({
      code: 'E_RESTORE_FAILED',
      message: expect.stringContaining('QEMU exited while loading the template state'),
    });
    const state = readFileSync(join(tplDir, 'state'));
    state.fill(0x5a, 2000, 6000); // corrupt bytes in the device state
    writeFileSync(join(bad, 'state'), state);
    await expect(vm.fork('bad-tpl', { n: 1 })).rejects.toMatchObject({ code: 'E_RESTORE_FAILED' });
    rmSync(join(bad, 'mem'));
    await expect(vm.fork('bad-tpl', { n: 1 })).rejects.toMatchObject({
      code: 'E_TEMPLATE_INCOMPLETE',
      message: `template bad-tpl: ${join(bad, 'mem')} is missing`,
    });

    expect((await vm.list()).map((v) => v.name).sort()).toEqual(before);
    expect((await scionQemuPids()).length).toBe(qemusBefore);
  });

  it('after scion is killed with SIGKILL mid-fork, ls tells the truth and gc leaves no orphan', async () => {
    const child = spawn(process.execPath, [join(ROOT, 'bin/scion.js'), 'fork', 'web-tpl', '-n', '1'], { env: process.env, stdio: 'ignore' });
    // wait until its clone's QEMU exists, then kill scion
    const end = Date.now() + 60_000;
    let name: string | undefined;
    while (Date.now() < end && !name) {
      for (const v of await vm.list()) {
        const r = await readRecord(validName(v.name));
        if (r?.making && r.pid) name = v.name;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    child.kill('SIGKILL');
    await new Promise((r) => child.on('exit', r));
    expect(name).toBeDefined();
    const l = await vm.list();
    expect(l.find((v) => v.name === name)?.state).toBe('incomplete');
    const r = await vm.gc();
    expect(r.removed).toContain(name);
    expect(existsSync((await paths(name!)).dir)).toBe(false);
    expect((await scionQemuPids()).filter((p) => p.runDir?.endsWith(`/${name}`))).toEqual([]);
    // the finished clones are untouched
    for (const c of clones) expect((await vm.list()).find((v) => v.name === c.name)?.state).toBe('running');
  });

  it('if the agent dies, init restarts it and the new agent adopts the running container', async () => {
    const c = clones[1];
    const crunPid = async () => JSON.parse(await sh(c.name, 'crun state web')).pid as number;
    const before = await crunPid();
    const a = await agentOf(c.name);
    await a.call('exec', { argv: ['sh', '-c', '(sleep 0.5; kill -9 $(pidof qjs)) >/dev/null 2>&1 &'] });
    a.close();
    await new Promise((r) => setTimeout(r, 2500)); // init restarts the agent after 1 s
    const b = await agentOf(c.name);
    let info = await b.call('info');
    // the new agent answers at once; it announces ready once it has looked at crun's state
    for (let i = 0; i < 300 && !info.lastReady; i++) {
      await new Promise((r) => setTimeout(r, 100));
      info = await b.call('info');
    }
    b.close();
    expect(info.agentUptimeS).toBeLessThan(15);
    expect(info.generation).toBe(2); // its state survived the restart
    expect(info.identity.hostname).toBe(c.hostname);
    expect(info.containers[0]).toMatchObject({ name: 'web', state: 'running' });
    expect(await crunPid()).toBe(before); // adopted, not started again
    expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
  });

  it('scion console is an interactive root shell on the serial console (driven through a pty)', async () => {
    const pty = await import('node-pty');
    const c = clones[2];
    const term = pty.spawn(process.execPath, [join(ROOT, 'bin/scion.js'), 'console', c.name], {
      env: process.env as Record<string, string>,
      cols: 120,
      rows: 30,
    });
    let out = '';
    term.onData((d) => (out += d));
    const waitFor = async (what: string, ms = 30_000) => {
      const end = Date.now() + ms;
      while (!out.includes(what)) {
        if (Date.now() > end) throw new Error(`no "${what}" on the console; got: ${out.slice(-500)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    await waitFor('Ctrl-] to leave');
    term.write('\r');
    term.write('echo console-$((6*7)) $(cat /proc/sys/kernel/hostname)\r');
    await waitFor(`console-42 ${c.hostname}`);
    const exited = new Promise<number>((r) => term.onExit((e) => r(e.exitCode)));
    term.write('\x1d');
    expect(await exited).toBe(0);
  });

  it('a clone frozen as a new template forks clones with fresh identities (generation + 1)', async () => {
    const meta = await vm.freezeClone(clones[0].name, 'web2-tpl');
    expect(meta.generation).toBe(2);
    const grand = await vm.fork('web2-tpl', { n: 2, parallel: 2 });
    const all = [...clones, ...grand];
    for (const k of ['hostname', 'mac', 'ip', 'machineId', 'vmgenid'] as const) expect(distinct(all.map((c) => c[k])), k).toBe(true);
    for (const g of grand) {
      const a = await agentOf(g.name);
      const info = await a.call('info');
      a.close();
      expect(info.generation).toBe(3);
      expect(info.vmForks).toBe(2); // inherited one from its parent clone, saw one more
      expect(await (await fetch(`http://127.0.0.1:${g.ports['8080']}/`)).text()).toBe(`hello from ${g.hostname}\n`);
    }
    // the parent clone keeps running, unchanged
    const a = await agentOf(clones[0].name);
    expect((await a.call('info')).identity.hostname).toBe(clones[0].hostname);
    a.close();
  });

  it('a template frozen under another VMM is refused with a typed error naming both sides', async () => {
    // its record names the host's QEMU 7.2 (another build, another machine type): as if frozen there
    const other = join(dirs.templates, 'old-tpl');
    cpSync(tplDir, other, { recursive: true, dereference: false, filter: (src) => !src.endsWith('/mem') });
    execFileSync('ln', [join(tplDir, 'mem'), join(other, 'mem')]);
    const meta = JSON.parse(readFileSync(join(other, 'meta.json'), 'utf8'));
    const system = { kind: 'system', version: 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)', digest: `sha256:${'7'.repeat(64)}` };
    writeFileSync(join(other, 'meta.json'), JSON.stringify({ ...meta, name: 'old-tpl', vmm: system, machine: 'pc-q35-7.2' }));
    const pinned = await currentVmm();
    expect(pinned.kind).toBe('pinned');
    await expect(vm.fork('old-tpl', { n: 1 })).rejects.toMatchObject({
      code: 'E_TEMPLATE_INCOMPATIBLE',
      message: `template old-tpl cannot be restored here: it was frozen under the system QEMU 7.2.22 (sha256:777777777777…), this node runs the pinned QEMU ${pinned.version.match(/version ([\w.+~:-]+)/)![1]} (${pinned.digest.slice(0, 19)}…)`,
    });
    // and the other way round, for real: this template, under the host's own QEMU (SCION_VMM=system)
    const before = (await scionQemuPids()).length;
    process.env.SCION_VMM = 'system';
    try {
      await expect(vm.fork('web-tpl', { n: 1 })).rejects.toMatchObject({
        code: 'E_TEMPLATE_INCOMPATIBLE',
        message: expect.stringMatching(/it was frozen under the pinned QEMU 10\.0\.\d+ \(sha256:[0-9a-f]{12}…\), this node runs the system QEMU 7\.2\./),
      });
    } finally {
      delete process.env.SCION_VMM;
    }
    expect((await scionQemuPids()).length).toBe(before);
  });
});
