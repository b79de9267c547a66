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
/** `cold`: boot the pod's VM from the template's image instead of forking it (a baseline for benchmarks) */
export const BOOT_ANNOTATION = 'io.scion.boot';

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

