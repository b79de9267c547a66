/** Clone identity allocation. Pure given its inputs (randomness is injected). */
import type { Identity } from '../../common/contracts.ts';
import { randomBytes, randomUUID } from 'node:crypto';
import { USER_NET } from '../qemu/argv.ts';
import type { DnsConfig } from '../../common/contracts.ts';

export interface CloneIdentity {
  index: number;
  hostname: string;
  mac: string;
  ip: string;
  prefix: number;
  gateway: string;
  dns: string[];
  dnsSearch?: string[];
  dnsOptions?: string[];
  machineId: string;
  vmgenid: string;
  rngSeed: string;
}

/** An identity that takes what CNI gave a pod's interface (MAC, address, route; no DNS of its own). Pure. */
export function withPodNetwork(id: CloneIdentity, pod: { mac: string; ip: string; prefix: number; gateway?: string } | undefined): CloneIdentity {
  return pod ? { ...id, mac: pod.mac, ip: pod.ip, prefix: pod.prefix, gateway: pod.gateway ?? id.gateway, dns: [] } : id;
}

/** An identity with the resolver configuration a pod was given (its nameservers, search domains, options). Pure. */
export function withDns(id: CloneIdentity, dns: DnsConfig | undefined): CloneIdentity {
  return dns ? { ...id, dns: dns.servers, dnsSearch: dns.search, dnsOptions: dns.options } : id;
}

export const MAC_PREFIX = '02:53:43'; // locally administered, unicast ("SC")
export const MAX_CLONE_INDEX = 238; // 10.0.2.16 .. 10.0.2.253 in user mode

export function macFor(index: number): string {
  const b = [(index >> 16) & 0xff, (index >> 8) & 0xff, index & 0xff];
  return `${MAC_PREFIX}:${b.map((x) => x.toString(16).padStart(2, '0')).join(':')}`;
}

export function ipFor(index: number, base = USER_NET.network): string {
  const [a, b, c] = base.split('/')[0].split('.');
  return `${a}.${b}.${c}.${15 + index}`;
}

/**
 * A new VM's identity, the one pipeline boot and fork share: allocated for
 * its index on its network, then a pod's addresses from CNI when it has a
 * pod's interface, then the pod's resolver configuration when it has one.
 * Not pure (fresh machine-id, vmgenid and seed), but for them.
 */
export function newIdentity(
  index: number,
  hostnamePattern: string,
  net: { network: string; gateway: string; dns: string[] },
  pod?: Parameters<typeof withPodNetwork>[1],
  dns?: DnsConfig,
): CloneIdentity {
  return withDns(withPodNetwork(allocateIdentity(index, hostnamePattern, undefined, net), pod), dns);
}

export function allocateIdentity(
  index: number,
  hostnamePattern: string,
  rand: { bytes: (n: number) => Buffer; uuid: () => string } = { bytes: randomBytes, uuid: randomUUID },
  net = { network: USER_NET.network, gateway: USER_NET.gateway, dns: [USER_NET.dns] },
): CloneIdentity {
  return {
    index,
    hostname: hostnamePattern.replace('{n}', String(index)),
    mac: macFor(index),
    ip: ipFor(index, net.network),
    prefix: Number(net.network.split('/')[1] ?? 24),
    gateway: net.gateway,
    dns: net.dns,
    machineId: rand.bytes(16).toString('hex'),
    vmgenid: rand.uuid(),
    rngSeed: rand.bytes(32).toString('hex'),
  };
}

/** identity.apply's arguments for a clone identity. Pure. */
export function identityArgs(id: CloneIdentity, generation: number): Identity {
  return {
    generation,
    hostname: id.hostname,
    machineId: id.machineId,
    rngSeed: id.rngSeed,
    time: Date.now(),
    vmgenid: id.vmgenid,
    interfaces: [{ mac: id.mac, address: id.ip, prefix: id.prefix, gateway: id.gateway }],
    dns: id.dns,
    dnsSearch: id.dnsSearch,
    dnsOptions: id.dnsOptions,
  };
}
