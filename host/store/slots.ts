/**
 * Reservations that make concurrent scion processes safe without a daemon
 * or a global lock: every shared number (clone index: MAC and IP; host
 * port; QEMU uid) is taken by creating slots/<kind>-<n> with O_EXCL, which
 * exactly one process can win. A run directory appears under its name only
 * by an atomic rename of a complete directory, so nobody sees (or removes)
 * one half-made, and nobody makes one twice.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, unlink, chown } from 'node:fs/promises';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { writeExclusive } from '../../common/safe-fs.ts';
import { VmError } from '../../common/errors.ts';
import type { ValidName } from '../../common/names.ts';
import { slotsDir, vmsDir, vmPaths } from './dirs.ts';
import { VmRecordSchema, type VmRecord } from './records.ts';

export type SlotKind = 'index' | 'port' | 'uid';
export const slotName = (kind: SlotKind, n: number) => `${kind}-${n}`;

/** Take slot kind-n for `owner`; false if someone holds it. */
export async function reserve(kind: SlotKind, n: number, owner: string): Promise<boolean> {
  try {
    await writeExclusive(join(slotsDir(), slotName(kind, n)), JSON.stringify({ vm: owner, pid: process.pid }) + '\n');
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

/** The lowest free n in [from, to], reserved for `owner`. */
export async function reserveFirstFree(kind: SlotKind, from: number, to: number, owner: string, what: string): Promise<number> {
  for (let n = from; n <= to; n++) if (await reserve(kind, n, owner)) return n;
  throw new VmError('E_NO_SLOTS', `no free ${what}: all ${to - from + 1} are taken`, { hint: 'scion rm some VMs (scion gc releases what dead ones held)' });
}

export async function release(slot: string): Promise<void> {
  try {
    await unlink(join(slotsDir(), slot));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e; // already released: removal is idempotent
  }
}

export async function listSlots(): Promise<{ slot: string; vm?: string; pid?: number }[]> {
  const dir = slotsDir();
  const out: { slot: string; vm?: string; pid?: number }[] = [];
  for (const f of await readdir(dir)) {
    if (!/^[a-z]+-\d+$/.test(f)) continue;
    try {
      const j = JSON.parse(await readFile(join(dir, f), 'utf8'));
      out.push({ slot: f, vm: j.vm, pid: j.pid });
    } catch {
      out.push({ slot: f }); // unreadable: gc judges it by its age alone
    }
  }
  return out;
}

/** A host port nobody listens on now and no other scion process has reserved. */
export async function reservePort(owner: string): Promise<number> {
  for (let tries = 0; tries < 50; tries++) {
    const p = await kernelFreePort();
    if (await reserve('port', p, owner)) return p;
  }
  throw new VmError('E_NO_SLOTS', 'could not reserve a free host port after 50 tries');
}

function kernelFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => resolve(typeof a === 'object' && a ? a.port : 0));
    });
  });
}

/**
 * Make `name`'s run directory with its record and jail in one step: built
 * under a temporary name, then renamed into place. Fails with E_VM_EXISTS if
 * the name is taken (rename never replaces a non-empty directory).
 */
export async function createRunDir(record: VmRecord, jailOwner?: { uid: number; gid: number }): Promise<void> {
  VmRecordSchema.parse(record);
  const vms = vmsDir();
  const tmp = join(vms, `.new-${process.pid}-${randomBytes(6).toString('hex')}`);
  await mkdir(tmp, { mode: 0o700 });
  try {
    await writeExclusive(join(tmp, 'vm.json'), JSON.stringify(record, null, 2) + '\n');
    await mkdir(join(tmp, 'jail'), { mode: 0o700 });
    if (jailOwner) await chown(join(tmp, 'jail'), jailOwner.uid, jailOwner.gid);
    await rename(tmp, vmPaths(record.name as ValidName, vms).dir);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOTEMPTY' || code === 'EEXIST')
      throw new VmError('E_VM_EXISTS', `a VM named ${record.name} already exists`, { hint: `scion rm ${record.name}, or choose another name` });
    throw e;
  }
}

/** Names of run directories (temporary ones being made are not VMs yet). */
export async function listRunDirs(): Promise<ValidName[]> {
  const names = await readdir(vmsDir());
  return names.filter((n) => !n.startsWith('.')).sort() as ValidName[];
}

/** Temporary run directories whose maker is gone (for gc). */
export async function abandonedTempDirs(alive: (pid: number) => boolean): Promise<string[]> {
  const vms = vmsDir();
  return (await readdir(vms))
    .filter((n) => {
      const m = /^\.new-(\d+)-/.exec(n);
      return m && !alive(Number(m[1]));
    })
    .map((n) => join(vms, n));
}
