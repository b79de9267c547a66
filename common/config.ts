/**
 * scion's configuration from the environment, in one place and read at call
 * time (never at import: a library caller, a test or the bench may set a
 * variable after importing scion, and every call must see the same value).
 * The README's "Environment" section lists these; a value that is set but
 * malformed is refused with the variable's name, not silently replaced.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ScionError } from './errors.ts';
import { validName } from './names.ts';

export type Env = Record<string, string | undefined>;

/** The configuration the `SCION_*` variables give now (read at each call). */
export interface ScionConfig {
  /** SCION_RUN_DIR: run directories and reservations (default /run/scion for root, else $XDG_RUNTIME_DIR/scion) */
  runDir: string;
  /** SCION_TEMPLATE_DIR: frozen templates, on tmpfs (default /dev/shm/scion-<uid>/templates) */
  templateDir: string;
  /** SCION_UID_BASE: QEMU runs as uid/gid base+n when scion is root */
  uidBase: number;
  /** SCION_VMM: pinned (default: the QEMU closure scion's own lock names, vmm/qemu.scion.lock) or system (the host's QEMU); SCION_QEMU implies system */
  vmm: 'pinned' | 'system';
  /** SCION_VMM_DIR: where the pinned closure is extracted (default /var/lib/scion/vmm for root, else <cacheDir>/vmm) */
  vmmDir: string;
  /** SCION_CPU: the CPU model VMs boot with (default: max under TCG, a named baseline under KVM; see host/qemu/vmm-plan.ts) */
  cpu?: string;
  /** SCION_STATE_DIR: what scion keeps on disk, e.g. hibernated clones (default /var/lib/scion/state for root, else <cacheDir>/state) */
  stateDir: string;
  /** SCION_QEMU: the host's QEMU binary, when the VMM is the system's (default qemu-system-x86_64) */
  qemu: string;
  /** SCION_ACCEL: force kvm or tcg (default: probe) */
  accel?: 'kvm' | 'tcg';
  /** SCION_TB_SIZE_MB: TCG translation buffer of each clone, in MiB (default: host/qemu/argv.ts CLONE_TB_SIZE_MB, 32) */
  tbSizeMB?: number;
  /** XDG_CACHE_HOME: the package cache is $XDG_CACHE_HOME/scion (default ~/.cache/scion) */
  cacheDir: string;
  /** SOURCE_DATE_EPOCH: the timestamp builds write (default 0) */
  sourceDateEpoch: number;
  /** SCION_REGISTRY_STALL_S: a registry response that sends no byte for this long fails (default 30) */
  registryStallMs: number;
  /** SCION_DEBUG: print stack traces of unexpected errors */
  debug: boolean;
  /** SCION_SHIM_TEMPLATE: the template containerd-shim-scion-v2 forks pods from (default pod-tpl), or a template snapshot's reference the node pulls once */
  shimTemplate: string;
  /** SCION_SHIM_IMAGES: the reference prefixes a pod may name with io.scion.image (comma-separated; none: the annotation is refused) */
  shimImagePrefixes: string[];
  /** SCION_SHIM_POOL: how many paused, warmed forks of each pod template the node keeps ready (default 1; 0: none) */
  shimPool: number;
}

/** A `SCION_*` variable that is set but malformed: which one and why. */
export class ConfigError extends ScionError {}

function integer(env: Env, name: string, min: number, max: number): number | undefined {
  const v = env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max)
    throw new ConfigError('E_CONFIG', `${name}=${JSON.stringify(v)}: use a whole number from ${min} to ${max}`, { hint: `unset ${name} for the default` });
  return n;
}

function cpuName(v: string | undefined): string | undefined {
  if (!v) return undefined;
  if (!/^[A-Za-z0-9][\w.-]{0,63}$/.test(v))
    throw new ConfigError('E_CONFIG', `SCION_CPU=${JSON.stringify(v)}: name one CPU model (qemu-system-x86_64 -cpu help lists them)`, {
      hint: 'unset it for the default',
    });
  return v;
}

/** A template name, or a template snapshot's reference (registry/repository:tag or @sha256:…): the shim pulls that once per node. */
function templateOrSnapshot(v: string): string {
  if (!v.includes('/')) return validName(v, 'SCION_SHIM_TEMPLATE');
  if (!/^[a-z0-9][\w.-]*(:\d{1,5})?\/[a-z0-9][\w./-]{0,250}(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})$/.test(v))
    throw new ConfigError('E_CONFIG', `SCION_SHIM_TEMPLATE=${JSON.stringify(v)}: name a template, or a template snapshot as registry/repository:tag`, {
      hint: 'unset it for pod-tpl',
    });
  return v;
}

/** The configuration as the environment says now. Pure over `env`. */
export function config(env: Env = process.env): ScionConfig {
  const uid = process.getuid?.() ?? 0;
  const accel = env.SCION_ACCEL || undefined;
  if (accel !== undefined && accel !== 'kvm' && accel !== 'tcg')
    throw new ConfigError('E_CONFIG', `SCION_ACCEL=${JSON.stringify(accel)}: use kvm or tcg`, { hint: 'unset it to let scion probe KVM' });
  const vmm = env.SCION_VMM || (env.SCION_QEMU ? 'system' : 'pinned');
  if (vmm !== 'pinned' && vmm !== 'system')
    throw new ConfigError('E_CONFIG', `SCION_VMM=${JSON.stringify(vmm)}: use pinned or system`, { hint: "unset it for scion's pinned QEMU" });
  const cacheDir = join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'scion');
  return {
    runDir: env.SCION_RUN_DIR || (uid === 0 ? '/run/scion' : join(env.XDG_RUNTIME_DIR || '/tmp', 'scion')),
    templateDir: env.SCION_TEMPLATE_DIR || join('/dev/shm', `scion-${uid}`, 'templates'),
    uidBase: integer(env, 'SCION_UID_BASE', 1000, 4_000_000_000) ?? 1_500_000_000,
    vmm,
    stateDir: env.SCION_STATE_DIR || (uid === 0 ? '/var/lib/scion/state' : join(cacheDir, 'state')),
    vmmDir: env.SCION_VMM_DIR || (uid === 0 ? '/var/lib/scion/vmm' : join(cacheDir, 'vmm')),
    qemu: env.SCION_QEMU || 'qemu-system-x86_64',
    cpu: cpuName(env.SCION_CPU),
    accel,
    tbSizeMB: integer(env, 'SCION_TB_SIZE_MB', 1, 2048),
    cacheDir,
    sourceDateEpoch: integer(env, 'SOURCE_DATE_EPOCH', 0, 2 ** 40) ?? 0,
    registryStallMs: (integer(env, 'SCION_REGISTRY_STALL_S', 1, 3600) ?? 30) * 1000,
    debug: !!env.SCION_DEBUG,
    shimTemplate: env.SCION_SHIM_TEMPLATE ? templateOrSnapshot(env.SCION_SHIM_TEMPLATE) : 'pod-tpl',
    shimImagePrefixes: (env.SCION_SHIM_IMAGES ?? '')
      .split(',')
      .map((p) => p.trim())
      .filter(Boolean),
    shimPool: integer(env, 'SCION_SHIM_POOL', 0, 16) ?? 1,
  };
}

/** The variables config() reads, for the README and `scion --help`. */
export const CONFIG_VARIABLES = [
  'SCION_RUN_DIR',
  'SCION_TEMPLATE_DIR',
  'SCION_UID_BASE',
  'SCION_QEMU',
  'SCION_ACCEL',
  'SCION_TB_SIZE_MB',
  'XDG_CACHE_HOME',
  'SOURCE_DATE_EPOCH',
  'SCION_REGISTRY_STALL_S',
  'SCION_DEBUG',
  'SCION_SHIM_TEMPLATE',
  'SCION_SHIM_IMAGES',
  'SCION_SHIM_POOL',
] as const;

/** Choose the VMM for this process and the processes it starts (the CLI's --vmm): sets SCION_VMM, and pinned drops SCION_QEMU. */
export function chooseVmm(kind: 'pinned' | 'system', env: Env = process.env): void {
  env.SCION_VMM = kind;
  if (kind === 'pinned') delete env.SCION_QEMU;
}
