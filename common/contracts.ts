/**
 * What builder, guest agent and host agree on, defined once: the agent's
 * virtio-serial port, the guest's /etc/scion/image.json (the builder writes
 * it, the agent reads it), the identity the host sends and the agent applies
 * (guest-agent/PROTOCOL.md). The built image's layout is common/image-layout.ts.
 */

/** The virtio-serial port name the agent opens (/dev/virtio-ports/<name>) and QEMU creates. */
export const AGENT_PORT_NAME = 'org.scion.agent.0';

/** Where the builder puts the agent's config in the guest. */
export const GUEST_IMAGE_CONFIG = '/etc/scion/image.json';

/** A host name the agent applies (RFC 1123 label: letters, digits, inner -; at most 63). */
export const HOSTNAME_PATTERN = /^(?=.{1,63}$)[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?$/;

export interface HealthCheck {
  http?: { port: number; path: string };
  tcp?: { port: number };
  command?: string[];
  intervalMs: number;
  timeoutMs: number;
}
/** `onFork`: restart the container after a fork (default), or keep it running and update its UTS hostname in place */
export interface ContainerSpec {
  name: string;
  restart: 'always' | 'on-failure' | 'no';
  onFork?: 'restart' | 'keep';
  healthcheck?: HealthCheck;
  ports: number[];
  bundle: string;
}

/** /etc/scion/image.json in the guest. */
export interface GuestImageConfig {
  name: string;
  exec: boolean;
  network: { mode: 'static' | 'dhcp'; interface: string };
  containers: ContainerSpec[];
}

/** A resolver configuration: nameservers, search domains, options (resolv.conf's). */
export interface DnsConfig {
  servers: string[];
  search: string[];
  options: string[];
}

/** A search domain (a DNS name) and a resolv.conf option (ndots:5, edns0, ...): what the agent accepts. */
export const DNS_SEARCH_PATTERN = /^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$/;
/** A dotted-quad IPv4 address (no leading zeros). */
export const IPV4_PATTERN = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
export const DNS_OPTION_PATTERN = /^[a-z][a-z0-9-]{0,31}(?::[0-9]{1,5})?$/;

/** identity.apply's arguments: what makes a clone its own machine. */
export interface Identity {
  generation: number;
  hostname: string;
  machineId: string;
  interfaces: { name?: string; mac: string; address?: string; prefix?: number; gateway?: string }[];
  dns: string[];
  /** resolv.conf's search domains and options (a pod's, as Kubernetes gives them) */
  dnsSearch?: string[];
  dnsOptions?: string[];
  rngSeed?: string; // hex
  /** the VM generation ID the host gave this VM (the guest cannot read it back; reported in info) */
  vmgenid?: string;
  time?: number; // ms since epoch
}
