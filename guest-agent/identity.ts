/**
 * Applying a new identity: direct file and /proc writes where they do the
 * job, and one batched shell for what needs commands (link, address, route,
 * clock, gratuitous ARP), since every process spawn costs 50-100 ms under TCG.
 */
import { writeFile, open } from 'node:fs/promises';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import type { Identity } from './protocol.ts';

export interface SystemConfig {
  /** prefix for /etc files (tests run the agent on the host with a scratch root) */
  root: string;
  /** set the wall clock (off in host-side tests: the realtime clock is not namespaced) */
  setClock: boolean;
  defaultInterface: string;
  /** DHCP instead of static addresses */
  dhcp: boolean;
}

/** The batched commands for link, address, route, clock and ARP. Pure. */
export function networkScript(id: Identity, cfg: Pick<SystemConfig, 'setClock' | 'defaultInterface' | 'dhcp'>): string {
  const lines: string[] = ['set -e'];
  for (const i of id.interfaces) {
    const dev = i.name ?? cfg.defaultInterface;
    lines.push(`ip link set dev ${dev} down`, `ip link set dev ${dev} address ${i.mac}`, `ip link set dev ${dev} up`);
    if (cfg.dhcp) {
      lines.push(`udhcpc -i ${dev} -n -q -t 3 -T 1 -s /usr/lib/scion/udhcpc.script >/dev/null 2>&1 || true`);
    } else if (i.address) {
      lines.push(`ip addr flush dev ${dev}`, `ip addr add ${i.address}/${i.prefix ?? 24} dev ${dev}`);
      if (i.gateway) lines.push(`ip route replace default via ${i.gateway} dev ${dev}`);
      // neighbours learn the new MAC and IP; not awaited
      lines.push(`(arping -U -c 1 -I ${dev} ${i.address} >/dev/null 2>&1 &) || true`);
    }
  }
  if (cfg.setClock && id.time !== undefined) lines.push(`date -s @${Math.floor(id.time / 1000)} >/dev/null`);
  return lines.join('\n') + '\n';
}

export function hostsFile(hostname: string, address?: string): string {
  return `127.0.0.1 localhost\n${address ?? '127.0.1.1'} ${hostname}\n::1 localhost ip6-localhost ip6-loopback\n`;
}

export function runScript(script: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const p = spawn('sh', ['-s'], { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (c) => (err += c));
    p.on('error', reject);
    p.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`identity script failed (${code}): ${err.trim().slice(-500)}`))));
    p.stdin.end(script);
  });
}

export type Steps = Record<string, number>;

export async function applyIdentity(id: Identity, cfg: SystemConfig): Promise<Steps> {
  const steps: Steps = {};
  let t = performance.now();
  const mark = (k: string) => { const n = performance.now(); steps[k] = Math.round((n - t) * 10) / 10; t = n; };
  const etc = (f: string) => join(cfg.root, 'etc', f);

  await writeFile('/proc/sys/kernel/hostname', id.hostname);
  mark('hostname');
  await writeFile(etc('machine-id'), id.machineId + '\n');
  mark('machineId');
  const addr = id.interfaces[0]?.address;
  await Promise.all([
    writeFile(etc('hostname'), id.hostname + '\n'),
    writeFile(etc('hosts'), hostsFile(id.hostname, addr)),
    writeFile(etc('resolv.conf'), id.dns.map((d) => `nameserver ${d}\n`).join('')),
  ]);
  mark('files');
  if (id.rngSeed) {
    // writing to /dev/urandom mixes the bytes into the pool (without crediting entropy)
    const fh = await open('/dev/urandom', 'w');
    try { await fh.write(Buffer.from(id.rngSeed, 'hex')); } finally { await fh.close(); }
  }
  mark('rng');
  await runScript(networkScript(id, cfg));
  mark('network');
  return steps;
}
