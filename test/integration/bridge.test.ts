/**
 * Bridge mode: a bridge inside a network namespace this test makes, one tap
 * per VM; the clones reach each other by IP, with no address conflict.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { guestExec } from '../support/guest.ts';
import { $ } from 'zx';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { build } from '../../builder/build.ts';
import * as vm from '../../host/index.ts';
import { image, isolateRunDirs } from './helpers.ts';

const isRoot = process.getuid?.() === 0;
const ns = `scion-br${randomBytes(3).toString('hex')}`;

describe.skipIf(!isRoot)('bridge networking (needs root)', () => {
  const dirs = isolateRunDirs('br');
  let clones: vm.CloneResult[];
  beforeAll(async () => {
    await $`ip netns add ${ns}`;
    await $`ip -n ${ns} link add br0 type bridge`;
    await $`ip -n ${ns} addr add 10.44.0.1/24 dev br0`;
    await $`ip -n ${ns} link set br0 up`;
    const net = { mode: 'bridge' as const, bridge: 'br0', netns: ns, network: '10.44.0.0/24' };
    const img = await vm.loadImage((await build({ definitionPath: image('minimal') })).dir);
    const h = await vm.bootTemplate(img, { name: 'br-tpl', net });
    await vm.freeze(h, img);
    clones = await vm.fork('br-tpl', { n: 3, parallel: 2 });
  });
  afterAll(async () => {
    for (const v of await vm.list()) await vm.removeVm(v.name);
    await $({ nothrow: true, quiet: true })`ip netns del ${ns}`; // never made: the setup failure is what the run reports
    rmSync(dirs.templates, { recursive: true, force: true });
    rmSync(dirs.run, { recursive: true, force: true });
  });

  const sh = (name: string, script: string) => guestExec(name, script);

  it('every clone pings every other clone, and sees each at its own MAC', async () => {
    expect(clones.map((c) => c.ip)).toEqual(['10.44.0.16', '10.44.0.17', '10.44.0.18']);
    for (const a of clones) {
      for (const b of clones) {
        if (a === b) continue;
        const r = await sh(a.name, `ping -c 1 -W 3 ${b.ip}`);
        expect(r.exitCode, `${a.name} -> ${b.ip}: ${r.stdout}${r.stderr}`).toBe(0);
        const neigh = await sh(a.name, `ip neigh show ${b.ip}`);
        expect(neigh.stdout).toContain(`lladdr ${b.mac}`);
      }
    }
  });

  it("IPv6: each clone's addresses follow its own MAC; no two clones share one and none of the template's remains", async () => {
    const eui = (mac: string) => {
      const b = mac.split(':').map((x) => parseInt(x, 16));
      b[0] ^= 2;
      return [(b[0] << 8) | b[1], (b[2] << 8) | 0xff, (0xfe << 8) | b[3], (b[4] << 8) | b[5]].map((x) => x.toString(16)).join(':');
    };
    const templateLinkLocal = `fe80::${eui('02:53:43:00:00:00')}`;
    const all: string[] = [];
    for (const c of clones) {
      // wait out duplicate-address detection (tentative addresses) of the renewed link-local
      let out = '';
      for (let i = 0; i < 50; i++) {
        out = (await sh(c.name, 'ip -6 -o addr show dev eth0')).stdout;
        if (out.includes('fe80::') && !out.includes('tentative')) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      const addrs = [...out.matchAll(/inet6 ([0-9a-f:]+)\//g)].map((m) => m[1]);
      expect(addrs, `${c.name}: ${out}`).toContain(`fe80::${eui(c.mac)}`);
      expect(addrs).not.toContain(templateLinkLocal);
      expect(out).not.toContain('dadfailed');
      all.push(...addrs);
    }
    expect(new Set(all).size, all.join(' ')).toBe(all.length);
  });

  it('no duplicate address: duplicate-address probes get no answer, and no kernel conflict messages', async () => {
    for (const c of clones) {
      const dad = await sh(c.name, `arping -D -c 2 -w 3 -I eth0 ${c.ip}`);
      expect(dad.exitCode, `${c.name}: ${dad.stdout}`).toBe(0); // 0: nobody else answers for this address
      const log = await sh(c.name, 'dmesg');
      expect(log.stdout).not.toMatch(/duplicate address|address conflict|IPv6 duplicate/i);
    }
  });
});
