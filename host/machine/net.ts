/**
 * A VM's networking, by NetMode. `user`: QEMU's user-mode stack, each clone
 * with its own host ports forwarded to the guest ports the image lists.
 * `bridge`: one tap per VM on a Linux bridge (optionally inside a network
 * namespace), so clones reach each other by IP. `pod`: a tap in a pod's CNI
 * namespace, joined to the pod's interface by tc redirects. `tap`: a tap
 * attached to nothing (a template for pods: only the device line-up
 * matters). `none`: no network device backend. `tapFor` makes the tap any of
 * them needs: the one entry construction uses.
 */
import { run } from '../../common/run.ts';
import { chmod, stat } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { VmError } from '../../common/errors.ts';
import { USER_NET } from '../qemu/argv.ts';

export interface BridgeSpec {
  bridge: string;
  /** network namespace the bridge lives in (QEMU is started inside it) */
  netns?: string;
  /** clone addresses come from here: .15 the template, .16+ the clones */
  network: string; // e.g. 10.44.0.0/24
  gateway?: string;
  dns?: string[];
}

/**
 * A pod's network namespace as CNI made it (containerd's CRI): the VM's tap
 * lives in it, and tc redirects every frame between the tap and the pod's
 * interface (`dev`, CNI's eth0) both ways, as Kata does; the VM takes that
 * interface's MAC, address and routes, so for the network the VM is the pod.
 */
export interface PodNetSpec {
  netns: string;
  dev: string;
}

/**
 * `tap`: a tap of its own in the host namespace, attached to nothing: for a
 * template whose clones each join another network (pod VMs), which needs the
 * tap-backed NIC they will have (the device line-up must match) and no bridge.
 */
export type NetMode = { mode: 'user' } | ({ mode: 'bridge' } & BridgeSpec) | ({ mode: 'pod' } & PodNetSpec) | { mode: 'tap' } | { mode: 'none' };

/** Whether VMs in this mode have a tap (QEMU's NIC backed by it). */
export const hasTap = (n: NetMode): boolean => n.mode === 'bridge' || n.mode === 'pod' || n.mode === 'tap';

/** A tap attached to nothing (mode `tap`), up so the guest sees a carrier. */
export async function createLooseTap(owner?: { uid: number; gid: number }): Promise<string> {
  const tap = await addTap(undefined, owner);
  try {
    await ip(['link', 'set', 'dev', tap, 'up']);
  } catch (e) {
    await deleteTap(tap, undefined);
    throw e;
  }
  return tap;
}

/** The network namespace a VM's tap lives in, if any. */
export const netnsOf = (n: NetMode): string | undefined => (n.mode === 'bridge' || n.mode === 'pod' ? n.netns : undefined);

/** What CNI gave the pod's interface: its MAC, first IPv4 address and the default route. */
export async function readPodNetwork(spec: PodNetSpec): Promise<{ mac: string; ip: string; prefix: number; gateway?: string }> {
  const link = JSON.parse(await ip(['-j', 'addr', 'show', 'dev', spec.dev], spec.netns))[0];
  const inet = (link?.addr_info ?? []).find((a: { family: string }) => a.family === 'inet');
  if (!link?.address || !inet) throw new VmError('E_NET', `network namespace ${spec.netns}: ${spec.dev} has no IPv4 address (did CNI run?)`);
  const routes = JSON.parse(await ip(['-j', 'route', 'show', 'default'], spec.netns)) as { gateway?: string }[];
  return { mac: String(link.address).toLowerCase(), ip: inet.local, prefix: inet.prefixlen, gateway: routes[0]?.gateway };
}

function tc(args: string[], netns: string): Promise<unknown> {
  return run('tc', ['-n', netns, ...args], { code: 'E_NET' });
}

/** A tap for the VM in the pod's namespace, owned by its uid, joined to the pod's interface by tc redirects. */
export async function createPodTap(spec: PodNetSpec, owner?: { uid: number; gid: number }): Promise<string> {
  const tap = await addTap(spec.netns, owner);
  await joinPod(tap, spec);
  return tap;
}

/**
 * Move a running VM's tap (a pooled clone's, in the host namespace) into the
 * pod's namespace and join it to the pod's interface. QEMU keeps its file
 * descriptor: a tap's queue stays attached across namespaces. On failure the
 * tap is deleted (the VM has no network any more, and is removed by the caller).
 */
export async function movePodTap(tap: string, spec: PodNetSpec): Promise<void> {
  try {
    await ip(['link', 'set', 'dev', tap, 'netns', spec.netns]);
  } catch (e) {
    await deleteTap(tap, undefined);
    throw e;
  }
  await joinPod(tap, spec);
}

/** tc's batch (one process: every exec counts) that redirects every frame between two interfaces, both ways. Pure. */
export function redirectBatch(a: string, b: string): string {
  return (
    [
      [a, b],
      [b, a],
    ]
      .flatMap(([from, to]) => [
        `qdisc add dev ${from} ingress`,
        `filter add dev ${from} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev ${to}`,
      ])
      .join('\n') + '\n'
  );
}

/** Bring the tap up in the pod's namespace and redirect every frame between it and the pod's interface, both ways. */
async function joinPod(tap: string, spec: PodNetSpec): Promise<void> {
  try {
    await ip(['link', 'set', 'dev', tap, 'up'], spec.netns);
    await run('tc', ['-n', spec.netns, '-batch', '-'], {
      code: 'E_NET',
      input: redirectBatch(spec.dev, tap),
      what: `redirecting ${spec.dev} <-> ${tap} in network namespace ${spec.netns}`,
    });
  } catch (e) {
    await deleteTap(tap, spec.netns);
    await tc(['qdisc', 'del', 'dev', spec.dev, 'ingress'], spec.netns).catch(() => undefined);
    throw e;
  }
}

export function netParams(n: NetMode): { network: string; gateway: string; dns: string[] } {
  if (n.mode === 'bridge') {
    const base = n.network.split('/')[0].split('.').slice(0, 3).join('.');
    return { network: n.network, gateway: n.gateway ?? `${base}.1`, dns: n.dns ?? [n.gateway ?? `${base}.1`] };
  }
  return { network: USER_NET.network, gateway: USER_NET.gateway, dns: [USER_NET.dns] };
}

function ip(args: string[], netns?: string): Promise<string> {
  const argv = netns ? ['-n', netns, ...args] : args;
  return run('ip', argv, { code: 'E_NET' }).then((r) => r.stdout);
}

/**
 * A tap on the bridge for one VM; its name fits IFNAMSIZ. With `owner`, the
 * tap belongs to the VM's uid, so its unprivileged QEMU can attach to it.
 */
export async function createTap(spec: BridgeSpec, owner?: { uid: number; gid: number }): Promise<string> {
  try {
    await ip(['link', 'show', 'dev', spec.bridge], spec.netns);
  } catch (e) {
    throw new VmError('E_NO_BRIDGE', `bridge ${spec.bridge} does not exist${spec.netns ? ` in network namespace ${spec.netns}` : ''}`, {
      hint: `ip link add ${spec.bridge} type bridge && ip link set ${spec.bridge} up`,
      cause: e,
    });
  }
  const tap = await addTap(spec.netns, owner);
  try {
    await ip(['link', 'set', 'dev', tap, 'master', spec.bridge, 'up'], spec.netns);
  } catch (e) {
    await deleteTap(tap, spec.netns);
    throw e;
  }
  return tap;
}

/** A new tap (down, unattached) in `netns`, owned by `owner` so its unprivileged QEMU can attach to it. */
async function addTap(netns: string | undefined, owner?: { uid: number; gid: number }): Promise<string> {
  if (owner) await tunOpenToAll();
  // random names: two scion processes never pick the same one (and `tuntap add` fails if one did)
  const tap = `sct${randomBytes(4).toString('hex')}`;
  await ip(['tuntap', 'add', 'dev', tap, 'mode', 'tap', ...(owner ? ['user', String(owner.uid), 'group', String(owner.gid)] : [])], netns);
  return tap;
}

/**
 * An unprivileged QEMU opens /dev/net/tun to attach to the tap its uid owns.
 * Debian's udev rules make the device 0666 (opening it grants nothing: a tap
 * can only be attached by its owner or with CAP_NET_ADMIN); hosts without
 * udev leave it 0600, so scion sets the same mode.
 */
async function tunOpenToAll(): Promise<void> {
  const st = await stat(TUN);
  if ((st.mode & 0o666) !== 0o666) await chmod(TUN, 0o666);
}
const TUN = '/dev/net/tun';

/** Remove a tap; one already gone (its namespace deleted, or removed by another call) is not an error. */
export async function deleteTap(tap: string, netns?: string): Promise<void> {
  try {
    await ip(['link', 'del', 'dev', tap], netns);
  } catch (e) {
    if (!/Cannot find device|does not exist|Cannot open network namespace/.test((e as Error).message)) throw e;
  }
}

/** The tap a VM of this networking runs on, made for it (owned by `owner`); undefined when it needs none. */
export async function tapFor(n: NetMode, owner?: { uid: number; gid: number }): Promise<string | undefined> {
  if (n.mode === 'pod') return createPodTap(n, owner);
  if (n.mode === 'bridge') return createTap(n, owner);
  if (n.mode === 'tap') return createLooseTap(owner);
  return undefined;
}
