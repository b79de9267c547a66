/**
 * Clone networking. `user`: QEMU's user-mode stack, each clone with its own
 * host ports forwarded to the guest ports the image lists. `bridge`: one tap
 * per VM on a Linux bridge (optionally inside a network namespace), so clones
 * reach each other by IP.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { VmError } from '../common/errors.ts';
import { USER_NET } from './qemu-argv.ts';

export interface BridgeSpec {
  bridge: string;
  /** network namespace the bridge lives in (QEMU is started inside it) */
  netns?: string;
  /** clone addresses come from here: .15 the template, .16+ the clones */
  network: string; // e.g. 10.44.0.0/24
  gateway?: string;
  dns?: string[];
}

export type NetMode = { mode: 'user' } | ({ mode: 'bridge' } & BridgeSpec) | { mode: 'none' };

export function netParams(n: NetMode): { network: string; gateway: string; dns: string[] } {
  if (n.mode === 'bridge') {
    const base = n.network.split('/')[0].split('.').slice(0, 3).join('.');
    return { network: n.network, gateway: n.gateway ?? `${base}.1`, dns: n.dns ?? [n.gateway ?? `${base}.1`] };
  }
  return { network: USER_NET.network, gateway: USER_NET.gateway, dns: [USER_NET.dns] };
}

function ip(args: string[], netns?: string): Promise<string> {
  const argv = netns ? ['-n', netns, ...args] : args;
  return new Promise((resolve, reject) => execFile('ip', argv, (e, out, err) => (e ? reject(new VmError('E_NET', `ip ${argv.join(' ')}: ${String(err).trim() || e.message}`)) : resolve(out))));
}

/** A tap on the bridge for one VM; its name fits IFNAMSIZ. */
export async function createTap(spec: BridgeSpec): Promise<string> {
  try { await ip(['link', 'show', 'dev', spec.bridge], spec.netns); } catch {
    throw new VmError('E_NO_BRIDGE', `bridge ${spec.bridge} does not exist${spec.netns ? ` in network namespace ${spec.netns}` : ''}`, { hint: `ip link add ${spec.bridge} type bridge && ip link set ${spec.bridge} up` });
  }
  const tap = `sct${randomBytes(4).toString('hex')}`;
  await ip(['tuntap', 'add', 'dev', tap, 'mode', 'tap'], spec.netns);
  await ip(['link', 'set', 'dev', tap, 'master', spec.bridge, 'up'], spec.netns);
  return tap;
}

export async function deleteTap(tap: string, netns?: string): Promise<void> {
  await ip(['link', 'del', 'dev', tap], netns).catch(() => {});
}
