/**
 * Claiming a VM's name and numbers before anything is made: the QEMU uid,
 * the clone index (and so its name, MAC and IP), host ports. Each is an
 * exclusive reservation file, and the run directory appears by an atomic
 * rename, so any number of scion processes can claim at once. A claim that
 * fails releases what it reserved; once the run directory exists, its record
 * lists every reservation and removing the VM releases them.
 */
import type { ScionError } from '../../common/errors.ts';
import { validName, type ValidName } from '../../common/names.ts';
import { credentialsFor, runningAsRoot, type Credentials } from '../qemu/process.ts';
import { createRunDir, reserveFirstFree, reservePort, release, slotName } from '../store/slots.ts';
import type { VmRecord } from '../store/records.ts';
import { MAX_CLONE_INDEX } from './identity.ts';

/** The largest uid slot: uids SCION_UID_BASE+1 .. SCION_UID_BASE+MAX_UID_SLOT. */
export const MAX_UID_SLOT = 60_000;

/** Reserve a uid for a VM's QEMU when scion is root (none otherwise: QEMU runs as the caller). */
export async function reserveCredentials(owner: string): Promise<{ cred?: Credentials; slot?: string }> {
  if (!runningAsRoot()) return {};
  const n = await reserveFirstFree('uid', 1, MAX_UID_SLOT, owner, 'QEMU uids');
  return { cred: credentialsFor(n), slot: `uid-${n}` };
}

/**
 * Make the run directory of a VM with a fixed name (a template, a pulled
 * clone), its uid reserved first; `gid` overrides the uid's group as in claimClone.
 */
export async function claimNamed(name: ValidName, build: (cred?: Credentials) => VmRecord, gid?: number): Promise<VmRecord> {
  const { cred: reserved, slot } = await reserveCredentials(name);
  const cred = reserved && gid !== undefined ? { ...reserved, gid } : reserved;
  const record = build(cred);
  record.uid = cred?.uid;
  record.gid = cred?.gid;
  record.slots = [...(slot ? [slot] : []), ...record.slots];
  try {
    await createRunDir(record, cred);
  } catch (e) {
    if (slot) await release(slot);
    throw e;
  }
  return record;
}

/** A host port forwarded to a guest port (user-mode networking). */
export interface PortForward {
  guestPort: number;
  hostPort: number;
}

/** Host ports forwarded to `guestPorts`, reserved together (all or none); `releasePorts` gives them back if the claim after fails. */
export async function reserveForwards(guestPorts: number[], owner: string): Promise<{ ports: number[]; forwards: PortForward[] }> {
  const ports: number[] = [];
  try {
    for (let i = 0; i < guestPorts.length; i++) ports.push(await reservePort(owner));
  } catch (e) {
    await releasePorts(ports);
    throw e;
  }
  return { ports, forwards: ports.map((hostPort, i) => ({ guestPort: guestPorts[i], hostPort })) };
}

/** Give reserved host ports back (a claim that failed after reserving them). */
export async function releasePorts(ports: number[]): Promise<void> {
  for (const p of ports) await release(slotName('port', p));
}

/**
 * Reserve an index and make the run directory for it. The index decides the
 * name (<prefix>-c<index>); a name someone else already uses (say a VM booted
 * with --name web-c3) keeps its index reserved until we have found ours, so
 * the search moves on. `gid` overrides the group of the reserved uid (clones
 * run as their template's group: the one allowed to open its memory file).
 */
export async function claimClone(prefix: ValidName, build: (index: number, name: ValidName) => VmRecord, gid?: number): Promise<VmRecord> {
  const skipped: number[] = [];
  try {
    for (;;) {
      const index = await reserveFirstFree('index', 1, MAX_CLONE_INDEX, `${prefix}-c?`, `clone slots (at most ${MAX_CLONE_INDEX} clones on this host)`);
      const name = validName(`${prefix}-c${index}`, 'clone');
      const { cred, slot } = await reserveCredentials(`${prefix}-c?`);
      const jailOwner = cred ? { uid: cred.uid, gid: gid ?? cred.gid } : undefined;
      const record = build(index, name);
      record.uid = jailOwner?.uid;
      record.gid = jailOwner?.gid;
      record.slots = [slotName('index', index), ...(slot ? [slot] : []), ...record.slots];
      try {
        await createRunDir(record, jailOwner);
        return record;
      } catch (e) {
        if (slot) await release(slot);
        if ((e as ScionError).code !== 'E_VM_EXISTS') {
          await release(slotName('index', index));
          throw e;
        }
        skipped.push(index);
      }
    }
  } finally {
    for (const i of skipped) await release(slotName('index', i));
  }
}
