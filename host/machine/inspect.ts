/**
 * What benchmarks and soak tests look at beside the API (`scion/inspect`):
 * the QEMU build in use, the QEMU processes under scion's run directory, and
 * the ready VMs of a template's node pool. Read-only: nothing here makes or
 * changes a VM.
 */
import { qemuPidsUnder } from '../qemu/process.ts';
import { vmsDir } from '../store/dirs.ts';
import { readyEntries } from '../store/pool.ts';

export { qemuVersion } from '../qemu/accel.ts';

/** The QEMU processes scion runs now (those whose jail is under the run directory). */
export function scionQemuProcesses(): { pid: number; jail: string }[] {
  return qemuPidsUnder(vmsDir());
}

/** The names of the ready (paused, unclaimed) VMs in the node pool of `template`. */
export async function pooledVms(template: string): Promise<string[]> {
  return readyEntries(template);
}
