/**
 * Applying a new identity: direct file and /proc writes where they do the
 * job, and one batched shell for what needs commands (link, address, route,
 * clock, gratuitous ARP), since every process spawn costs 50-100 ms under TCG.
 */
import type { ShellWorker } from './shell.ts';
import type { Platform } from './platform.ts';
import type { Identity } from './protocol.ts';
import { phcStepArgs } from './clock.ts';

export interface SystemConfig {
  /** prefix for /etc files (tests run the agent on the host with a scratch root) */
  root: string;
  /** set the wall clock (off in host-side tests: the realtime clock is not namespaced) */
  setClock: boolean;
  defaultInterface: string;
  /** DHCP instead of static addresses */
  dhcp: boolean;
}

/**
 * The batched commands for clock, link, address, route and ARP. Pure.
 * `nowMs` is the guest's clock when the identity arrived: the clock is
 * stepped by the difference to the host's time, relatively (clock_adjtime
 * through phc_ctl), so however late the batch runs the step is exact to the
 * millisecond (`date -s` sets whole seconds only); the clock keeper then
 * holds it on the RTC (clock.ts).
 */
export function networkScript(id: Identity, cfg: Pick<SystemConfig, 'setClock' | 'defaultInterface' | 'dhcp' | 'root'>, nowMs: number): string {
  const lines: string[] = ['set -e'];
  if (cfg.setClock && id.time !== undefined) lines.push(`${phcStepArgs(id.time - nowMs)} >/dev/null`);
  for (const i of id.interfaces) {
    const dev = i.name ?? cfg.defaultInterface;
    if (cfg.dhcp) {
      // virtio-net changes its MAC live (VIRTIO_NET_F_CTRL_MAC_ADDR): no link flap
      lines.push(`ip link set dev ${dev} address ${i.mac} up`);
      // a fresh lease for the new MAC; the event script writes under the agent's root
      lines.push(`SCION_ROOT='${cfg.root}' busybox udhcpc -i ${dev} -n -q -t 5 -T 1 -s ${cfg.root}/usr/lib/scion/udhcpc.script >/dev/null 2>&1`);
    } else if (i.address) {
      // one command for MAC, address (replacing the old primary one) and link up: every
      // exec right after a fork costs tens of ms under TCG
      lines.push(`busybox ifconfig ${dev} hw ether ${i.mac} ${i.address} netmask ${prefixToMask(i.prefix ?? 24)} up`);
      if (i.gateway) lines.push(`ip route replace default via ${i.gateway} dev ${dev}`);
      // neighbours learn the new MAC and IP; not awaited
      lines.push(`arping -U -c 1 -I ${dev} ${i.address} >/dev/null 2>&1 &`);
    } else {
      lines.push(`ip link set dev ${dev} address ${i.mac} up`);
    }
    lines.push(ipv6Renew(dev));
  }
  return lines.join('\n') + '\n';
}

/**
 * IPv6 addresses follow the new MAC: turning IPv6 off on the interface drops
 * every address (the template's link-local and autoconfigured ones); turning
 * it on makes a link-local address from the current MAC and solicits router
 * advertisements for new autoconfigured ones. Shell builtins only, no exec.
 */
export function ipv6Renew(dev: string): string {
  const f = `/proc/sys/net/ipv6/conf/${dev}/disable_ipv6`;
  // busybox's read reports EOF (status 1) on a proc file even when it read the value
  return `v6=; if [ -w ${f} ]; then read v6 < ${f} || :; fi; if [ "$v6" = 0 ]; then echo 1 > ${f}; echo 0 > ${f}; fi`;
}

export function prefixToMask(prefix: number): string {
  const m = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return [24, 16, 8, 0].map((s) => (m >>> s) & 0xff).join('.');
}

export function hostsFile(hostname: string, address?: string): string {
  return `127.0.0.1 localhost\n${address ?? '127.0.1.1'} ${hostname}\n::1 localhost ip6-localhost ip6-loopback\n`;
}

export type Steps = Record<string, number>;

/** The bytes of a hex string. Pure. */
export function hexBytes(hex: string): Uint8Array {
  const out = new Uint8Array(hex.length >> 1);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Files are written directly (each is one small write); commands go to the shell in one batch, started first. */
/** /etc/resolv.conf for an identity. Pure. */
export function resolvConf(id: Pick<Identity, 'dns' | 'dnsSearch' | 'dnsOptions'>): string {
  return [
    ...id.dns.map((d) => `nameserver ${d}\n`),
    ...(id.dnsSearch?.length ? [`search ${id.dnsSearch.join(' ')}\n`] : []),
    ...(id.dnsOptions?.length ? [`options ${id.dnsOptions.join(' ')}\n`] : []),
  ].join('');
}

export async function applyIdentity(id: Identity, cfg: SystemConfig, shell: ShellWorker, platform: Platform): Promise<Steps> {
  const steps: Steps = {};
  let t = platform.monotonic();
  const mark = (k: string) => {
    const n = platform.monotonic();
    steps[k] = Math.round((n - t) * 10) / 10;
    t = n;
  };
  const etc = (f: string) => `${cfg.root}/etc/${f}`;

  // the batched commands run in the long-lived shell while the agent writes the files
  const network = shell.runOrThrow(networkScript(id, cfg, Date.now()), 'network setup');
  platform.writeText('/proc/sys/kernel/hostname', id.hostname);
  mark('hostname');
  platform.writeText(etc('machine-id'), id.machineId + '\n');
  mark('machineId');
  const addr = id.interfaces[0]?.address;
  platform.writeText(etc('hostname'), id.hostname + '\n');
  platform.writeText(etc('hosts'), hostsFile(id.hostname, addr));
  platform.writeText(etc('resolv.conf'), resolvConf(id));
  mark('files');
  // writing to /dev/urandom mixes the bytes into the pool (without crediting entropy)
  if (id.rngSeed) platform.writeBytes('/dev/urandom', hexBytes(id.rngSeed));
  mark('rng');
  await network;
  mark('network');
  return steps;
}
