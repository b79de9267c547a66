/**
 * Agent-level identity without QEMU: the real agent runs on the host inside
 * a fresh network namespace (with a veth pair the test makes) and a fresh UTS
 * namespace; after identity.apply, everything is checked from outside.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { $ } from 'zx';
import { readFileSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { connect } from 'node:net';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { AgentClient } from '../../host/agent-client.ts';
import { startHostAgent, type HostAgent } from './helpers.ts';

const isRoot = process.getuid?.() === 0;
/** A command's stdout (zx: every argument quoted, a failure throws with its stderr). */
const sh = (cmd: string, args: string[]) => $.sync({ quiet: true })`${cmd} ${args}`.stdout;

/** A fresh network namespace whose eth0 is a veth to `hostIf` (addressed hostAddr), and the real agent inside it (own UTS namespace too). */
async function agentInNamespace(prefix: string, hostAddr: string, opts: { dhcp?: boolean; before?: (hostIf: string) => void } = {}) {
  const tag = randomBytes(3).toString('hex');
  const ns = `scion-${prefix}${tag}`;
  const hostIf = `v${prefix}${tag}`;
  await $`ip netns add ${ns}`;
  await $`ip link add ${hostIf} type veth peer name eth0 netns ${ns}`;
  await $`ip addr add ${hostAddr} dev ${hostIf}`;
  await $`ip link set ${hostIf} up`;
  opts.before?.(hostIf);
  const agent = await startHostAgent({ dhcp: opts.dhcp, wrap: ['ip', 'netns', 'exec', ns, 'unshare', '--uts', '--'] });
  const client = new AgentClient(`${prefix}-agent`);
  await client.connect(agent.socket);
  await client.sync(10_000);
  const cleanup = () => {
    client.close();
    agent.stop();
    $.sync({ quiet: true, nothrow: true })`ip link del ${hostIf}`; // gone with the namespace already, or never made
    $.sync({ quiet: true, nothrow: true })`ip netns del ${ns}`; // never made: setup failed earlier, which that test reports
  };
  return { ns, hostIf, agent, client, cleanup };
}

describe.skipIf(!isRoot)('identity in namespaces (needs root)', () => {
  let ns: string,
    hostIf: string,
    agent: HostAgent,
    client: AgentClient,
    cleanup = () => {};
  beforeAll(async () => ({ ns, hostIf, agent, client, cleanup } = await agentInNamespace('t', '10.231.0.1/24')));
  afterAll(() => cleanup());

  const identity = {
    generation: 7,
    hostname: 'clone-seven',
    machineId: randomBytes(16).toString('hex'),
    rngSeed: randomBytes(32).toString('hex'),
    interfaces: [{ mac: '02:53:43:aa:bb:07', address: '10.231.0.7', prefix: 24, gateway: '10.231.0.1' }],
    dns: ['10.231.0.1'],
  };

  it('really changes hostname, MAC, address, route and machine-id in the namespace', async () => {
    const before = JSON.parse(sh('ip', ['-n', ns, '-j', 'link', 'show', 'eth0']))[0].address;
    const r = await client.call('identity.apply', identity);
    if (!r.applied) throw new Error(`not applied: ${JSON.stringify(r)}`);
    expect(Object.keys(r.stepsMs)).toEqual(expect.arrayContaining(['hostname', 'machineId', 'network', 'rng']));

    expect(sh('nsenter', ['-t', String(agent.proc.pid), '-u', 'hostname']).trim()).toBe('clone-seven');
    expect(sh('hostname', []).trim()).not.toBe('clone-seven'); // the host's own name is untouched
    const link = JSON.parse(sh('ip', ['-n', ns, '-j', 'addr', 'show', 'eth0']))[0];
    expect(before).not.toBe('02:53:43:aa:bb:07');
    expect(link.address).toBe('02:53:43:aa:bb:07');
    expect(link.addr_info.filter((a: any) => a.family === 'inet').map((a: any) => `${a.local}/${a.prefixlen}`)).toEqual(['10.231.0.7/24']);
    const routes = JSON.parse(sh('ip', ['-n', ns, '-j', 'route', 'show', 'default']));
    expect(routes[0]).toMatchObject({ dst: 'default', gateway: '10.231.0.1', dev: 'eth0' });
    expect(readFileSync(join(agent.root, 'etc/machine-id'), 'utf8').trim()).toBe(identity.machineId);
    expect(readFileSync(join(agent.root, 'etc/hosts'), 'utf8')).toContain('10.231.0.7 clone-seven');
    expect(readFileSync(join(agent.root, 'etc/resolv.conf'), 'utf8')).toBe('nameserver 10.231.0.1\n');

    // and the new address answers on the wire with the new MAC: a TCP connect is refused (RST), not timed out
    const refused = await new Promise<string>((res) => {
      const s = connect({ host: '10.231.0.7', port: 9, timeout: 3000 });
      s.on('error', (e: any) => res(e.code));
      s.on('timeout', () => {
        s.destroy();
        res('timeout');
      });
      s.on('connect', () => {
        s.destroy();
        res('connected');
      });
    });
    expect(refused).toBe('ECONNREFUSED');
    expect(sh('ip', ['neigh', 'show', '10.231.0.7', 'dev', hostIf])).toContain('lladdr 02:53:43:aa:bb:07');

    const info = await client.call('info');
    expect(info.generation).toBe(7);
    expect(info.identity.hostname).toBe('clone-seven');
  });

  it('a second apply of the same generation changes nothing', async () => {
    const r = await client.call('identity.apply', { ...identity, hostname: 'other-name', interfaces: [{ mac: '02:53:43:aa:bb:08', address: '10.231.0.8' }] });
    expect(r.applied).toBe(false);
    expect(r.generation).toBe(7);
    expect(sh('nsenter', ['-t', String(agent.proc.pid), '-u', 'hostname']).trim()).toBe('clone-seven');
    expect(JSON.parse(sh('ip', ['-n', ns, '-j', 'link', 'show', 'eth0']))[0].address).toBe('02:53:43:aa:bb:07');
  });

  it('a later generation (a fork of the clone) applies again', async () => {
    const r = await client.call('identity.apply', {
      ...identity,
      generation: 8,
      hostname: 'clone-eight',
      interfaces: [{ mac: '02:53:43:aa:bb:08', address: '10.231.0.8', gateway: '10.231.0.1' }],
    });
    expect(r.applied).toBe(true);
    expect(sh('nsenter', ['-t', String(agent.proc.pid), '-u', 'hostname']).trim()).toBe('clone-eight');
    expect(JSON.parse(sh('ip', ['-n', ns, '-j', 'link', 'show', 'eth0']))[0].address).toBe('02:53:43:aa:bb:08');
  });
});

describe.skipIf(!isRoot)('DHCP identity in namespaces (needs root)', () => {
  let ns2: string,
    hostIf2: string,
    agent: HostAgent,
    client: AgentClient,
    cleanup = () => {};
  let server: ChildProcess | undefined;
  let dir: string | undefined;
  beforeAll(async () => {
    ({
      ns: ns2,
      hostIf: hostIf2,
      agent,
      client,
      cleanup,
    } = await agentInNamespace('d', '10.233.0.1/24', {
      dhcp: true,
      before: (hostIf) => {
        dir = mkdtempSync(join(tmpdir(), 'scion-udhcpd-'));
        writeFileSync(
          join(dir, 'udhcpd.conf'),
          `start 10.233.0.100\nend 10.233.0.120\ninterface ${hostIf}\nlease_file ${dir}/leases\noption subnet 255.255.255.0\noption router 10.233.0.1\noption dns 10.233.0.1\n`,
        );
        writeFileSync(join(dir, 'leases'), '');
        // a real DHCP server (busybox udhcpd) on the host side of the veth
        server = spawn('busybox', ['udhcpd', '-f', join(dir, 'udhcpd.conf')], { stdio: 'ignore' });
      },
    }));
  });
  afterAll(() => {
    server?.kill();
    cleanup();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('takes a lease for the new MAC on every fork', async () => {
    const base = { hostname: 'dhcp-clone', machineId: randomBytes(16).toString('hex'), dns: [] };
    for (const [generation, mac] of [
      [1, '02:53:43:dd:00:01'],
      [2, '02:53:43:dd:00:02'],
    ] as const) {
      const r = await client.call('identity.apply', { ...base, generation, interfaces: [{ mac }] });
      expect(r.applied).toBe(true);
      const link = JSON.parse(sh('ip', ['-n', ns2, '-j', 'addr', 'show', 'eth0']))[0];
      expect(link.address).toBe(mac);
      const inet = link.addr_info.filter((a: any) => a.family === 'inet');
      expect(inet).toHaveLength(1);
      expect(inet[0].local).toMatch(/^10\.233\.0\.(1[01]\d|120)$/);
      expect(JSON.parse(sh('ip', ['-n', ns2, '-j', 'route', 'show', 'default']))[0]).toMatchObject({ gateway: '10.233.0.1' });
      expect(readFileSync(join(agent.root, 'etc/resolv.conf'), 'utf8')).toBe('nameserver 10.233.0.1\n');
      // the leased address answers on the wire with the new MAC
      const refused = await new Promise<string>((res) => {
        const s = connect({ host: inet[0].local, port: 9, timeout: 3000 });
        s.on('error', (e: any) => res(e.code));
        s.on('timeout', () => {
          s.destroy();
          res('timeout');
        });
        s.on('connect', () => {
          s.destroy();
          res('connected');
        });
      });
      expect(refused).toBe('ECONNREFUSED');
      expect(sh('ip', ['neigh', 'show', inet[0].local, 'dev', hostIf2])).toContain(`lladdr ${mac}`);
    }
  });
});
