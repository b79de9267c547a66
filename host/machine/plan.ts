/**
 * A construction plan (what differs between booting, forking and making a
 * template from a clone), and what a plan's last step may do with the VM it
 * made: the Machine layer's sibling modules reach a handle's record and
 * steps through `Building`, which the package never exports.
 */
import type { AppliedIdentity } from '../../common/agent-protocol.ts';
import type { AgentClient } from '../agent-client.ts';
import type { Credentials, QemuFiles, QemuProcess } from '../qemu/process.ts';
import { VM_FORMAT, type VmRecord } from '../store/records.ts';
import type { Machine } from './machine.ts';

/** A handle's insides, for the Machine layer's own modules (plans, freeze, the node pool, hot-plug). */
export interface Building {
  readonly m: Machine;
  readonly record: VmRecord;
  setAgent(a: AgentClient): void;
  assertRunning(doing: string): void;
  /** identity.apply with the record's identity as `generation` (E_IDENTITY_REFUSED if refused) */
  sendIdentity(generation: number, timeoutMs?: number): Promise<AppliedIdentity>;
  /** construction done: `making` cleared, timings kept */
  finished(timings: Record<string, number>): Promise<void>;
}

/** One construction: what differs between boot, fork and making a template from a clone. */
export interface Plan {
  /** claim name and numbers; resolves once the run directory exists (from then on, undo removes it) */
  claim(): Promise<VmRecord>;
  /** files QEMU gets, prepared inside the run or template directory */
  files(r: VmRecord, cred?: Credentials): Promise<QemuFiles>;
  /** a device line-up QEMU must reproduce (a clone's template's) */
  lineup?: string[];
  restore?: { ignoreShared: boolean };
  resume: boolean;
  qmpTimeoutMs: number;
  /** what the caller's process is doing, for a QEMU that exits on the way */
  doing: string;
  finish(b: Building, proc: QemuProcess): Promise<void>;
  keepOnFailure?: boolean;
  /** told when QEMU answers QMP ('spawn'), has loaded the state ('restore') and runs ('resume') */
  mark?(step: 'spawn' | 'restore' | 'resume'): void;
}

/** A new VM's record, the one factory boot, fork and a template's loader share (the claim then sets its uid, gid and slots). */
export function newVmRecord(fields: Omit<VmRecord, 'format' | 'createdAt'>): VmRecord {
  return { format: VM_FORMAT, createdAt: new Date().toISOString(), ...fields };
}
