/**
 * What runs, and taking it down: ls, stop, rm and gc, all rebuilt from the
 * run directories alone (the Machine layer's view of the whole host). A VM that another live
 * scion process is still making is never stopped or removed by these
 * (E_VM_BUSY); gc takes only what is dead or abandoned.
 */
import { rm, readdir, lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { VmError, type ScionError } from '../../common/errors.ts';
import { validName, type ValidName } from '../../common/names.ts';
import { config } from '../../common/config.ts';
import { QmpClient } from '../qemu/qmp.ts';
import { isQemuIn, processAlive, killPid, waitDead, qemuPidsUnder } from '../qemu/process.ts';
import { deleteTap, netnsOf } from './net.ts';
import { vmPaths, vmsDir, trustedTemplateRoot, hibernationDir } from '../store/dirs.ts';
import { readRecord, type VmRecord } from '../store/records.ts';
import { listRunDirs, listSlots, release, abandonedTempDirs } from '../store/slots.ts';
import { POOL_OWNER, dropEntries, listPools, poolHolds, sweepPool } from '../store/pool.ts';

/** A VM's state as its run directory and processes tell it. */
export type VmState = 'running' | 'starting' | 'frozen' | 'hibernated' | 'dead' | 'incomplete' | 'invalid';
/** One VM as `list` sees it: role, state, QEMU pid, identity, ports, owner, what makes it if it is being made. */
export interface VmListing {
  name: string;
  role: string;
  state: VmState;
  pid?: number;
  runDir: string;
  agentSocket: string;
  template?: string;
  hostname?: string;
  ip?: string;
  mac?: string;
  ports: Record<string, number>;
  generation: number;
  accel?: string;
  owner?: { pid: number; kind: string; alive: boolean };
  problem?: string;
  /** the scion process still making it, if any */
  makerPid?: number;
}

function stateOf(r: VmRecord, alive: boolean): VmState {
  if (r.making && !processAlive(r.making.ownerPid)) return 'incomplete';
  if (alive) return r.making ? 'starting' : 'running';
  return r.frozen ? 'frozen' : r.hibernated ? 'hibernated' : 'dead';
}

/** Every VM scion knows, rebuilt from the run directories alone (what `scion ls --json` prints). */
export async function list(): Promise<VmListing[]> {
  const vms = vmsDir();
  const out: VmListing[] = [];
  for (const n of await listRunDirs()) {
    const p = vmPaths(n, vms);
    const base = { name: n, runDir: p.dir, agentSocket: p.agent, ports: {}, generation: 0 };
    let r: VmRecord | undefined;
    try {
      r = await readRecord(n);
    } catch (e) {
      out.push({ ...base, role: 'unknown', state: 'invalid', problem: (e as Error).message });
      continue;
    }
    if (!r) {
      out.push({ ...base, role: 'unknown', state: 'incomplete' });
      continue;
    }
    const alive = isQemuIn(r.pid, p.jail);
    out.push({
      ...base,
      role: r.role,
      state: stateOf(r, alive),
      pid: alive ? r.pid : undefined,
      template: r.template,
      hostname: r.identity?.hostname ?? (r.role === 'template' ? r.name : undefined),
      ip: r.identity?.ip,
      mac: r.identity?.mac,
      ports: r.ports,
      generation: r.generation,
      accel: r.accel,
      owner: r.owner ? { ...r.owner, alive: processAlive(r.owner.pid) } : undefined,
      makerPid: r.making?.ownerPid,
    });
  }
  return out;
}

/** Whether another live scion process is still making this VM. */
export const makingElsewhere = (r: VmRecord | undefined): boolean => !!r?.making && r.making.ownerPid !== process.pid && processAlive(r.making.ownerPid);

/** Refuse to touch a VM another live scion process is still making. */
export function assertNotBusy(r: VmRecord | undefined, name: string, doing: string): void {
  if (makingElsewhere(r)) {
    throw new VmError('E_VM_BUSY', `cannot ${doing} ${name}: scion process ${r!.making!.ownerPid} is still making it (${r!.making!.phase})`, {
      hint: 'wait for it to finish; if that process hangs, kill it and run scion gc',
    });
  }
}

export async function quitQemu(name: ValidName, r: VmRecord | undefined): Promise<void> {
  const p = vmPaths(name, vmsDir());
  const pid = r?.pid;
  if (!isQemuIn(pid, p.jail)) return;
  const q = new QmpClient(`${name}/qmp`);
  try {
    await q.connect(p.qmp, 1000);
    await q.execute('quit', undefined, 2000);
  } catch {
    // a QEMU that does not answer QMP is killed below
  } finally {
    q.close();
  }
  await waitDead(pid, 3000);
}

/** Stop a VM's QEMU; its run directory stays (E_VM_BUSY if another scion process is still making it). */
export async function stopVm(vm: string): Promise<void> {
  const name = validName(vm);
  const r = await readRecordOrThrow(name);
  assertNotBusy(r, name, 'stop');
  await quitQemu(name, r);
}

export async function readRecordOrThrow(name: ValidName): Promise<VmRecord | undefined> {
  const r = await readRecord(name);
  if (
    !r &&
    !(await lstat(vmPaths(name, vmsDir()).dir).then(
      () => true,
      () => false,
    ))
  )
    throw new VmError('E_NO_VM', `no VM named ${name}`, { hint: 'scion ls' });
  return r;
}

/**
 * Stop and remove a VM: its QEMU, tap, reservations, run directory and (for
 * a template) its template directory. `force` is for the process that made
 * it; a record that cannot be trusted is removed without reading anything
 * from it (its QEMU is found by its jail instead).
 */
export async function removeVm(vm: string, opts: { force?: boolean } = {}): Promise<void> {
  const name = validName(vm);
  const vms = vmsDir();
  const p = vmPaths(name, vms);
  let r: VmRecord | undefined;
  let untrusted = false;
  try {
    r = await readRecordOrThrow(name);
  } catch (e) {
    if ((e as ScionError).code === 'E_NO_VM') throw e;
    untrusted = true; // a damaged or foreign record: remove by name alone
  }
  if (!opts.force) assertNotBusy(r, name, 'remove');
  if (r?.role === 'template' && !opts.force) await assertNoHibernatedClones(name);
  if (r) await quitQemu(name, r);
  for (const q of qemuPidsUnder(vms))
    if (q.jail === p.jail) {
      killPid(q.pid);
      await waitDead(q.pid, 3000);
    }
  // (a pod's tc redirect on its interface goes with the pod's namespace, which CRI removes)
  if (r?.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, netnsOf(r.netMode));
  // the template directory is found by name under the checked root, never by a path from the record
  if (r?.role === 'template' || untrusted) await rm(join(trustedTemplateRoot(), name), { recursive: true, force: true });
  // a pooled VM leaves its pool (nobody claims a VM that is gone)
  if (r?.owner?.kind === POOL_OWNER && r.template) await dropEntries(r.template, name);
  // a hibernated clone's saved state, found by name under the checked state root
  if (r?.hibernated || untrusted) await rm(hibernationDir(name), { recursive: true, force: true });
  for (const s of r?.slots ?? []) await release(s);
  await rm(p.dir, { recursive: true, force: true });
}

/** A template its hibernated clones still need (each is restored over its memory) is not removed from under them. */
async function assertNoHibernatedClones(template: ValidName): Promise<void> {
  const sleeping: string[] = [];
  for (const n of await listRunDirs()) {
    const c = await readRecord(n).catch(() => undefined);
    if (c?.role === 'clone' && c.template === template && c.hibernated) sleeping.push(n);
  }
  if (sleeping.length)
    throw new VmError(
      'E_TEMPLATE_IN_USE',
      `cannot remove template ${template}: its hibernated clone${sleeping.length > 1 ? 's' : ''} ${sleeping.join(', ')} need it to resume`,
      {
        hint: 'resume or remove them first (or push them to a registry: the template goes with them)',
      },
    );
}

/**
 * Remove what is dead or abandoned: run directories whose QEMU is gone (not
 * frozen templates) or whose maker or owning front door died, QEMUs whose run directory is gone,
 * half-made directories and reservations of dead processes, template
 * directories without a VM, and pool entries and claims naming nothing live.
 */
export async function gc(): Promise<{ removed: string[]; killed: number[]; released: string[] }> {
  const vms = vmsDir();
  const removed: string[] = [];
  const killed: number[] = [];
  const released: string[] = [];
  for (const n of await listRunDirs()) {
    let r: VmRecord | undefined;
    let invalid = false;
    try {
      r = await readRecord(n);
    } catch {
      invalid = true;
    } // an invalid record is garbage by definition
    if (r?.making && processAlive(r.making.ownerPid)) continue; // still being made by a live scion
    const p = vmPaths(n, vms);
    const alive = r ? isQemuIn(r.pid, p.jail) : false;
    // a clone owned by a long-running scion (the front door) that died would never be removed by it;
    // a pooled clone belongs to its pool while an entry or a live claimer names it, or its filler lives
    // (and a pooled clone whose template was removed is nobody's: no pod can be given it any more)
    const pooled = r?.owner?.kind === POOL_OWNER && !!r.template;
    const templateGone =
      pooled &&
      !(await lstat(join(trustedTemplateRoot(), r!.template!)).then(
        () => true,
        () => false,
      ));
    const ownerGone = !!r?.owner && ((!processAlive(r.owner.pid) && !(pooled && (await poolHolds(r.template!, n, processAlive)))) || templateGone);
    if (r && !r.making && !ownerGone && (alive || r.frozen || r.hibernated)) continue;
    if (!r && !invalid) {
      // no record yet: only the maker can be writing it (run directories appear complete, by rename)
      continue;
    }
    if (alive) {
      killPid(r!.pid);
      killed.push(r!.pid!);
    }
    await removeVm(n, { force: true });
    removed.push(n);
  }
  for (const q of qemuPidsUnder(vms)) {
    const dir = q.jail.replace(/\/jail$/, '');
    if (
      !(await lstat(join(dir, 'vm.json')).then(
        () => true,
        () => false,
      ))
    ) {
      killPid(q.pid);
      killed.push(q.pid);
    }
  }
  for (const d of await abandonedTempDirs(processAlive)) await rm(d, { recursive: true, force: true });
  const names = new Set(await listRunDirs());
  const held = new Set<string>();
  for (const n of names) {
    try {
      for (const sl of (await readRecord(n))?.slots ?? []) held.add(sl);
    } catch {
      // an invalid record holds nothing: its VM was removed above
    }
  }
  for (const s of await listSlots()) {
    if (held.has(s.slot)) continue;
    // reserved by a scion that is still making its VM (its record may not list it yet): not ours to take
    if (s.pid && processAlive(s.pid)) continue;
    await release(s.slot);
    released.push(s.slot);
  }
  for (const pool of await listPools()) removed.push(...(await sweepPool(pool.template, (vm) => names.has(vm as ValidName), processAlive)));
  const troot = trustedTemplateRoot();
  for (const t of await readdir(troot)) {
    if (!names.has(t as ValidName)) {
      await rm(join(troot, t), { recursive: true, force: true });
      removed.push(`template:${t}`);
    }
  }
  // saved states nobody will resume: no hibernated VM of that name, no live hibernation making it
  for (const n of await hibernatedNames()) {
    const r = await readRecord(n).catch(() => undefined);
    if (r?.hibernated || (r?.making && processAlive(r.making.ownerPid))) continue;
    await rm(hibernationDir(n), { recursive: true, force: true });
    removed.push(`${n} (saved state)`);
  }
  return { removed, killed, released };
}

/** Names under the hibernation root that follow the name rule (anything else there is not scion's to touch). */
async function hibernatedNames(): Promise<ValidName[]> {
  const names = await readdir(join(config().stateDir, 'hibernated')).catch(() => [] as string[]);
  return names.flatMap((n) => {
    try {
      return [validName(n)];
    } catch {
      return [];
    }
  });
}
