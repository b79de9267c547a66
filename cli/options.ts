/**
 * What the command table is made of (commands.ts): a command's spec, its
 * options, the context it runs in, and the option readers and checks
 * commands share (networking, counts, sizes, compression).
 */
import { ScionError } from '../common/errors.ts';
import { validName } from '../common/names.ts';
import { connectAgent, type Compression, type NetMode, type AgentClient } from '../host/index.ts';

export type OptionValues = Record<string, string | boolean | undefined>;
export interface Context {
  json: boolean;
  err: (s: string) => void;
  out: (s: string) => void;
}
export interface OptionSpec {
  type: 'string' | 'boolean';
  short?: string;
  value?: string;
  help: string;
}
export interface CommandSpec {
  name: string;
  /** arguments as the help shows them */
  args: string;
  summary: string;
  /** more lines for the help */
  details?: string[];
  options: Record<string, OptionSpec>;
  /** remove temporary directories on SIGINT/SIGTERM and exit 130/143 */
  cleansUpOnInterrupt?: boolean;
  run(pos: string[], v: OptionValues, ctx: Context): Promise<number>;
}

export const str = (v: OptionValues, k: string): string | undefined => (typeof v[k] === 'string' ? (v[k] as string) : undefined);
/** `fn` with a synced agent connection to `vm`, closed afterwards. */
export async function withAgent<T>(vm: string, fn: (a: AgentClient) => Promise<T>): Promise<T> {
  const a = await connectAgent(validName(vm));
  try {
    return await fn(a);
  } finally {
    a.close();
  }
}
export const need = (pos: string[], k: number, cmd: string, usage: string) => {
  if (pos.length < k) throw new ScionError('E_USAGE', `scion ${cmd}: missing argument`, { hint: usage });
};

/** --bridge/--netns/--network → a bridge network mode, --tap → a loose tap (user-mode networking otherwise). */
export function netFrom(v: OptionValues): NetMode | undefined {
  if (v.tap) {
    if (v.bridge || v.netns || v.network) throw new ScionError('E_USAGE', '--tap goes alone: not with --bridge, --netns or --network');
    return { mode: 'tap' };
  }
  if (!v.bridge) {
    if (v.netns || v.network) throw new ScionError('E_USAGE', '--netns and --network go with --bridge');
    return undefined;
  }
  const bridge = v.bridge as string;
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(bridge))
    throw new ScionError('E_USAGE', `--bridge ${JSON.stringify(bridge)}: not an interface name (1-15 of A-Z a-z 0-9 _ . -)`);
  const netns = v.netns as string | undefined;
  if (netns !== undefined && !/^[A-Za-z0-9_.-]{1,64}$/.test(netns))
    throw new ScionError('E_USAGE', `--netns ${JSON.stringify(netns)}: not a network namespace name (A-Z a-z 0-9 _ . -)`);
  const network = (v.network as string | undefined) ?? '10.44.0.0/24';
  if (
    !/^(\d{1,3}\.){3}0\/24$/.test(network) ||
    network
      .split(/[./]/)
      .slice(0, 4)
      .some((o) => Number(o) > 255)
  )
    throw new ScionError('E_USAGE', `--network ${network}: use a /24 such as 10.44.0.0/24`);
  return { mode: 'bridge', bridge, netns, network };
}

/** A whole-number option within bounds, or E_USAGE naming the flag. */
export function wholeNumber(v: string | boolean, flag: string, min: number, max: number, unit = ''): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new ScionError('E_USAGE', `${flag} ${v}: use a whole number${unit} from ${min} to ${max}`);
  return n;
}

export function count(v: string | boolean | undefined, flag: string, dflt: number, min = 1): number {
  return v === undefined ? dflt : wholeNumber(v, flag, min, 200);
}

export const tbSize = (v: string | boolean | undefined): number | undefined => (v === undefined ? undefined : wholeNumber(v, '--tb-size', 1, 2048, ' of MiB'));

export function compressionOf(v: string | undefined): Compression {
  const c = v ?? 'none';
  if (c !== 'none' && c !== 'gzip' && c !== 'zstd') throw new ScionError('E_USAGE', `--compression ${c}: use none, gzip or zstd`);
  return c;
}

export const NET_OPTIONS: Record<string, OptionSpec> = {
  bridge: { type: 'string', value: 'BR', help: 'a tap per VM on bridge BR instead of user-mode networking' },
  netns: { type: 'string', value: 'NS', help: 'the network namespace BR lives in' },
  network: { type: 'string', value: 'CIDR', help: 'addresses for bridged VMs (default 10.44.0.0/24; .15 the template, .16+ clones)' },
  tap: { type: 'boolean', help: 'a tap per VM attached to nothing: a template for containerd pods (each pod VM joins its own network)' },
};
export const INSECURE: Record<string, OptionSpec> = { insecure: { type: 'boolean', help: 'plain HTTP to a registry that is not on loopback' } };
export const BUILD_INPUT: Record<string, OptionSpec> = {
  compression: { type: 'string', value: 'none|gzip|zstd', help: 'initramfs compression (default none: fastest boot under TCG)' },
  mirror: { type: 'string', value: 'URL', help: "Debian mirror (default: the definition's, else the host's apt sources)" },
};
