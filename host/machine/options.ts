/**
 * What callers pass to the Machine layer and read back from it: the options
 * of its ways to make and claim a VM, and the public part of a VM's record.
 */
import type { ValidName } from '../../common/names.ts';
import type { DnsConfig } from '../../common/contracts.ts';
import type { Accel } from '../qemu/argv.ts';
import type { CloneIdentity } from './identity.ts';
import type { NetMode, PodNetSpec } from './net.ts';

/** A process that owns a VM: `scion ls` shows it, and `scion gc` removes the VM once that process is gone. */
export interface Owner {
  pid: number;
  kind: string;
}

/** What booting a template takes (`Machine.boot`, `bootTemplate`): its name, networking, accelerator, hostname, disk, owner. */
export interface BootOptions {
  name?: string;
  net?: NetMode;
  accel?: Accel;
  timeoutMs?: number;
  log?: (m: string) => void;
  /** its hostname (default: the image's name) */
  hostname?: string;
  /** the resolver configuration it gets instead of its network's (a pod's) */
  dns?: DnsConfig;
  /** 'ram': an ordinary VM whose freeze saves RAM into the state stream (the baseline scion is compared with) */
  memory?: 'file' | 'ram';
  /** stop at the agent's boot ready, without the template identity (cold-boot measurements) */
  skipIdentity?: boolean;
  /** a qcow2 disk: the template writes to an overlay on it, clones to overlays on that */
  disk?: string;
  /** a process that owns this template (shown by ls; `scion gc` removes it once that process is gone) */
  owner?: Owner;
  /** keep a failed VM's run directory for inspection */
  keepOnFailure?: boolean;
}

/** What forking one clone takes (`Machine.fork`; `fork`'s ForkOptions make N of them): its name prefix, hostname pattern, owner, TCG buffer, a pod's network and resolver. */
export interface CloneOptions {
  /** clone names are <prefix>-c<index> */
  prefix: ValidName;
  /** hostname pattern with {n} for the clone index (default <template without -tpl>-{n}) */
  hostname?: string;
  owner?: Owner;
  keepOnFailure?: boolean;
  /** QEMU's TCG translation buffer (MiB); default SCION_TB_SIZE_MB, else QEMU's */
  tbSizeMB?: number;
  /** how long the agent may take to answer after the resume (default 30 s) */
  agentTimeoutMs?: number;
  /** a pod's network namespace (CNI's): the VM's tap goes there, joined to `dev`, and the VM takes its addresses */
  pod?: PodNetSpec;
  /** the resolver configuration the VM gets instead of its network's (a pod's) */
  dns?: DnsConfig;
  /**
   * Do not send identity.apply: the clone keeps the template's hostname,
   * machine-id, addresses and RNG state. Only for showing that an identity
   * test fails when re-identification is broken; never in real use.
   */
  skipIdentityApply?: boolean;
  log?: (m: string) => void;
}

export interface PoolFillOptions {
  /** how many ready VMs the pool holds */
  size: number;
  /** pooled VMs are named <prefix>-c<index> */
  prefix: string;
  log?: (m: string) => void;
  /** stops the fill: no fork starts after it, and a VM forked meanwhile is removed, not pooled */
  signal?: AbortSignal;
}

export interface PoolClaimOptions {
  /** its new hostname (default: the one it was pooled with) */
  hostname?: string;
  /** a pod's network namespace: the VM's tap moves there, and the VM takes the pod's addresses */
  pod?: PodNetSpec;
  dns?: DnsConfig;
  /** who owns it from now on (gc removes it once that process is gone) */
  owner?: Owner;
  log?: (m: string) => void;
}

/** What a caller may read of a VM (a copy of its record's public part). */
export interface MachineInfo {
  name: ValidName;
  role: 'template' | 'clone';
  pid?: number;
  accel: Accel;
  generation: number;
  template?: string;
  identity?: CloneIdentity;
  ports: Record<string, number>;
  netMode: NetMode;
  runDir: string;
  agentSocket: string;
  console: string;
  frozen: boolean;
  timings: Record<string, number>;
  /** the built image directory it was booted from */
  image: string;
  owner?: Owner;
  /** set while a scion process is still making it */
  making?: { ownerPid: number; phase: string };
}
