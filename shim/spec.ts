/**
 * containerd's OCI runtime config, made fit for the pod's guest. Pure.
 * The VM is the pod's sandbox: its network is the pod's network, so the
 * container shares it (no network namespace of its own); anything that names
 * a host path (namespaces to join, bind mounts of host files, hooks, the cgroup
 * path) means nothing inside the VM and is left out; the host's
 * /etc/hosts, /etc/hostname and /etc/resolv.conf binds become the guest's own
 * files (which the agent wrote with the pod's identity), the sandbox's /dev/shm
 * the VM's (shared by the pod's containers, like its IPC namespace). Resource limits are
 * the VM's own size; they are not applied again inside it.
 */
import { open } from 'node:fs/promises';
import { constants } from 'node:fs';
import { DNS_OPTION_PATTERN, DNS_SEARCH_PATTERN, IPV4_PATTERN as IPV4, type DnsConfig } from '../common/contracts.ts';

export type OciSpec = Record<string, any>;

/** Guest files that stand in for the host's bind mounts of the same name. */
const GUEST_FILES = new Set(['/etc/hosts', '/etc/hostname', '/etc/resolv.conf']);
/** Mount types the guest makes itself (no host source). */
const SELF_MADE = new Set(['proc', 'sysfs', 'tmpfs', 'devpts', 'mqueue', 'cgroup', 'cgroup2', 'shm']);

/** `podPid`: the container joins the pod's pid namespace (CRI's pid mode POD, Kubernetes' shareProcessNamespace) */
export interface GuestSpecResult {
  spec: OciSpec;
  dropped: string[];
  podPid: boolean;
}

export function guestSpec(host: OciSpec, o: { hostname?: string } = {}): GuestSpecResult {
  const dropped: string[] = [];
  let podPid = false;
  const spec: OciSpec = structuredClone(host);
  delete spec.root; // the agent points it at the task's overlay
  if (spec.hooks) {
    dropped.push('hooks');
    delete spec.hooks;
  }
  if (spec.process) spec.process = { ...spec.process, terminal: false };
  const linux = spec.linux ?? {};
  if (o.hostname && !spec.hostname && (linux.namespaces ?? []).some((n: { type: string }) => n.type === 'uts')) spec.hostname = o.hostname;
  if (Array.isArray(linux.namespaces)) {
    // A namespace to join names a host process (CRI: the sandbox's). The VM is the pod: its containers share
    // the VM's network, and, joining the sandbox's IPC and UTS namespaces as Kubernetes has them do, the VM's
    // IPC and UTS (the pod's hostname). The sandbox's pid namespace becomes the pod's in the guest (the agent
    // keeps one, with a reaper as its first process: the VM's own would show the agent).
    linux.namespaces = linux.namespaces.flatMap((n: { type: string; path?: string }) => {
      if (n.type === 'network') {
        dropped.push('network namespace (the VM is the pod network)');
        return [];
      }
      if (n.path && (n.type === 'ipc' || n.type === 'uts')) return []; // the VM's own: the pod's
      if (n.path && n.type === 'pid') {
        podPid = true;
        return [{ type: 'pid' }];
      } // the agent points it at the pod's
      if (n.path) {
        dropped.push(`${n.type} namespace at ${n.path} (a new one instead)`);
        return [{ type: n.type }];
      }
      return [n];
    });
  }
  if (spec.hostname && !(linux.namespaces ?? []).some((n: { type: string }) => n.type === 'uts')) delete spec.hostname; // crun sets a hostname only in a UTS namespace of its own
  if (linux.cgroupsPath) {
    dropped.push('cgroupsPath');
    delete linux.cgroupsPath;
  }
  if (linux.resources) {
    dropped.push('resources (the VM is the limit)');
    delete linux.resources;
  }
  spec.linux = linux;
  if (Array.isArray(spec.mounts)) {
    spec.mounts = spec.mounts.flatMap((m: { destination: string; type?: string; source?: string; options?: string[] }) => {
      if (GUEST_FILES.has(m.destination)) return [{ destination: m.destination, type: 'bind', source: m.destination, options: ['rbind', 'ro'] }];
      // the pod's shared memory (CRI binds the sandbox's): the VM's /dev/shm, which all its containers share
      if (m.destination === '/dev/shm' && m.type === 'bind')
        return [{ destination: '/dev/shm', type: 'bind', source: '/dev/shm', options: ['rbind', 'rw', 'nosuid', 'nodev'] }];
      if (SELF_MADE.has(m.type ?? '') || (m.type === 'bind' && m.source && m.source.startsWith('/dev/'))) return [m];
      if (m.type === 'bind' || (m.options ?? []).includes('bind') || (m.options ?? []).includes('rbind')) {
        dropped.push(`bind mount ${m.source} -> ${m.destination}`);
        return [];
      }
      return [m];
    });
  }
  return { spec, dropped, podPid };
}

/**
 * The resolver configuration in a resolv.conf (the one containerd wrote for a
 * pod from its DNS config): IPv4 nameservers (at most 3, as glibc reads),
 * search domains and options the agent accepts; anything else left out. Pure.
 */
export function parseResolvConf(text: string): DnsConfig {
  const out: DnsConfig = { servers: [], search: [], options: [] };
  for (const raw of text.split('\n')) {
    const [key, ...words] = raw
      .replace(/[#;].*$/, '')
      .trim()
      .split(/\s+/);
    if (key === 'nameserver' && words[0] && IPV4.test(words[0]) && out.servers.length < 3) out.servers.push(words[0]);
    else if (key === 'search' || key === 'domain')
      out.search = words.filter((w) => DNS_SEARCH_PATTERN.test(w)).slice(0, 6); // the last one counts
    else if (key === 'options') out.options.push(...words.filter((w) => DNS_OPTION_PATTERN.test(w)));
  }
  out.options = out.options.slice(0, 16);
  return out;
}

/** Where containerd's config binds a pod's resolv.conf from (a file it wrote), if it does. Pure. */
export function resolvConfSource(config: OciSpec): string | undefined {
  const m = (config.mounts ?? []).find(
    (x: { destination?: string; type?: string; source?: string }) =>
      x.destination === '/etc/resolv.conf' && typeof x.source === 'string' && x.source.startsWith('/'),
  );
  return m?.source;
}

/**
 * The network namespace CNI set up for a pod sandbox, by name (`ip netns`
 * keeps them in /var/run/netns): none for a pod on the node's network. Pure.
 */
export function podNetns(config: OciSpec): string | undefined {
  const ns = (config.linux?.namespaces ?? []).find((n: { type: string; path?: string }) => n.type === 'network' && n.path);
  const m = ns ? /^\/(?:var\/)?run\/netns\/([A-Za-z0-9_.-]{1,64})$/.exec(ns.path) : null;
  return m?.[1];
}

/** The DNS config containerd wrote for a pod (the file its config binds as /etc/resolv.conf; at most 64 KiB read). */
export async function podDns(config: OciSpec): Promise<DnsConfig | undefined> {
  const src = resolvConfSource(config);
  if (!src) return undefined;
  const fh = await open(src, constants.O_RDONLY | constants.O_NOFOLLOW).catch(() => undefined);
  if (!fh) return undefined;
  try {
    const buf = Buffer.alloc(64 * 1024);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return parseResolvConf(buf.subarray(0, bytesRead).toString('utf8'));
  } finally {
    await fh.close();
  }
}
