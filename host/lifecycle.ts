/**
 * What runs, and taking it down: ls, stop, rm, gc and an agent connection,
 * for callers above the Machine layer. A VM that another live scion process
 * is still making is never stopped or removed by these (E_VM_BUSY); gc takes
 * only what is dead or abandoned.
 */
import { validName } from '../common/names.ts';
import type { AgentClient } from './agent-client.ts';
import { Machine } from './machine/machine.ts';

export { list, stopVm, removeVm, gc, type VmListing, type VmState } from './machine/inventory.ts';

/** A synced agent connection to a running VM; the caller closes it. */
export async function connectAgent(vm: string, timeoutMs = 10_000): Promise<AgentClient> {
  const m = await Machine.open(validName(vm));
  return m.agent(timeoutMs);
}
