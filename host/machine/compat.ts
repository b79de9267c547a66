/**
 * Whether a frozen template restores under the VMM this node runs. A
 * migration stream loads only into the QEMU build, machine type and CPU
 * model it was saved from (QEMU's migration docs; Firecracker refuses
 * snapshots across CPUs), so the template's record names all three and the
 * accelerator, and a fork under anything else is refused up front with both
 * sides named, instead of QEMU failing half-way through a restore. Pure.
 */
import type { Vmm } from '../qemu/vmm-plan.ts';
import type { TemplateMeta } from '../store/records.ts';

/** What the template needs, set against what this node has; empty when they agree. */
export function compatibilityProblems(
  meta: Pick<TemplateMeta, 'vmm' | 'machine' | 'accel'>,
  vmm: Pick<Vmm, 'kind' | 'version' | 'digest' | 'machine'>,
  kvmUsable: boolean,
): string[] {
  const p: string[] = [];
  if (meta.vmm.digest !== vmm.digest) p.push(`it was frozen under ${describeVmm(meta.vmm)}, this node runs ${describeVmm(vmm)}`);
  else if (meta.machine !== vmm.machine) p.push(`its machine type is ${meta.machine}, this QEMU's q35 is ${vmm.machine}`);
  if (meta.accel === 'kvm' && !kvmUsable) p.push('it was frozen under KVM, and /dev/kvm is not usable here');
  return p;
}

/** "the pinned QEMU 10.0.13 (sha256:40198a63c1d8…)". Pure. */
export function describeVmm(v: Pick<Vmm, 'kind' | 'version' | 'digest'>): string {
  const version = /version ([\w.+~:-]+)/.exec(v.version)?.[1] ?? v.version;
  return `the ${v.kind} QEMU ${version} (${v.digest.slice(0, 19)}…)`;
}
