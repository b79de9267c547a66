/**
 * What a task is to the shim, from the annotations containerd's CRI plugin
 * puts on its OCI config, and the annotations scion reads. Pure, and light:
 * the shim's `start` (a process containerd runs for every task) needs only this.
 */
export const CRI_TYPE = 'io.kubernetes.cri.container-type';
export const CRI_SANDBOX = 'io.kubernetes.cri.sandbox-id';
export const TEMPLATE_ANNOTATION = 'io.scion.template';
/** an OCI reference (`scion pull` takes it): the pod forks from a template of that image, made on this node at first use */
export const IMAGE_ANNOTATION = 'io.scion.image';
/**
 * How the pod's VM is made: unset, out of the node's pool of warmed forks
 * when it has one, else forked; `fork`: forked now, past the pool; `cold`:
 * booted from the template's image (the baselines benchmarks compare with)
 */
export const BOOT_ANNOTATION = 'io.scion.boot';
export const BOOT_MODES = ['pool', 'fork', 'cold'] as const;
export type BootMode = (typeof BOOT_MODES)[number];

/** The boot mode a pod's annotations ask for; undefined if the value is not one. Pure. */
export function bootMode(annotations: Record<string, string> | undefined): BootMode | undefined {
  const v = annotations?.[BOOT_ANNOTATION];
  if (v === undefined || v === '') return 'pool';
  return (BOOT_MODES as readonly string[]).includes(v) ? (v as BootMode) : undefined;
}

/**
 * Whether a pod may name `ref` as its image: a node boots what it pulls, as
 * root, so only references under a prefix the node allows
 * (SCION_SHIM_IMAGES, e.g. `registry.example.com/scion/`) are taken. Pure.
 */
export function imageAllowed(ref: string, prefixes: string[]): boolean {
  return prefixes.some((p) => ref.startsWith(p));
}

export type TaskKind = 'sandbox' | 'container' | 'lone';

/** What a task is, from its OCI annotations. Pure. */
export function taskKind(annotations: Record<string, string> | undefined): { kind: TaskKind; sandboxId?: string } {
  const t = annotations?.[CRI_TYPE];
  if (t === 'sandbox') return { kind: 'sandbox' };
  if (t === 'container' && annotations?.[CRI_SANDBOX]) return { kind: 'container', sandboxId: annotations[CRI_SANDBOX] };
  return { kind: 'lone' };
}
