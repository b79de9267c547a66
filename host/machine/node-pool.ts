/**
 * The node's pool of paused forks (host/store/pool.ts keeps it on disk):
 * filled by forking and pausing, claimed by moving a VM's tap into a pod's
 * namespace, resuming it and giving it its new identity. Orchestration over
 * Machine handles, beside the other things made of them.
 */
import { randomBytes } from 'node:crypto';
import { VmError } from '../../common/errors.ts';
import { validName, templateBase } from '../../common/names.ts';
import { processAlive } from '../qemu/process.ts';
import { writeRecord } from '../store/records.ts';
import { POOL_OWNER, addEntry, dropClaim, readyEntries, takeEntry, takeFillLock } from '../store/pool.ts';
import { withPodNetwork, withDns, type CloneIdentity } from './identity.ts';
import { clockRightAtReady } from './clock.ts';
import { movePodTap, readPodNetwork } from './net.ts';
import { checkTemplate } from './templates.ts';
import { removeVm } from './inventory.ts';
import { Machine, internalsOf } from './machine.ts';
import type { PoolClaimOptions, PoolFillOptions } from './options.ts';

/**
 * Fill the pool of `template` up to `size` paused, ready forks (forked,
 * re-identified, then paused: no CPU while they wait). One filler per
 * template at a time: with another at work this returns 0 at once.
 * Returns the number of VMs it added.
 */
export async function fillPool(template: string, o: PoolFillOptions): Promise<number> {
  const tpl = await checkTemplate(template);
  const release = await takeFillLock(tpl.meta.name, processAlive);
  if (!release) return 0;
  let added = 0;
  try {
    for (let ready = (await readyEntries(tpl.meta.name)).length; ready < o.size && !o.signal?.aborted; ready = (await readyEntries(tpl.meta.name)).length) {
      // the hostname a fork on demand would have: a claim without a hostname of its own keeps it
      const m = await Machine.fork(tpl, {
        prefix: validName(o.prefix, 'clone prefix'),
        owner: { pid: process.pid, kind: POOL_OWNER },
        hostname: `${templateBase(tpl.meta.name)}-{n}`,
        log: o.log,
      });
      if (o.signal?.aborted) {
        // the filler is going (its containerd went, or it was told to stop): nothing half-made stays behind
        await m.remove({ force: true }).catch(() => undefined);
        o.log?.(`pool of ${tpl.meta.name}: fill stopped, ${m.name} removed`);
        break;
      }
      try {
        await m.pause();
        m.close();
        await addEntry(tpl.meta.name, m.name, tpl.meta.frozenAt);
      } catch (e) {
        await m.remove({ force: true }).catch(() => undefined); // ours, made by this call; gc finds it if this fails too
        throw e;
      }
      added++;
      o.log?.(`pooled ${m.name} (template ${tpl.meta.name}, ${ready + 1} of ${o.size} ready)`);
    }
  } finally {
    await release();
  }
  return added;
}

/**
 * A paused fork out of the pool of `template`, made the caller's: its tap
 * moved into the pod's namespace (for a pod), resumed, and given its new
 * identity (hostname, the pod's addresses and resolver, a fresh RNG seed)
 * as the next generation. Undefined when the pool has none. A pooled VM that
 * cannot be taken (its QEMU died, the guest refused) is removed and the next
 * one tried.
 */
export async function claimPooled(template: string, o: PoolClaimOptions): Promise<Machine | undefined> {
  const t = validName(template, 'template');
  // no such template: nothing to claim (the fork that follows says what is missing)
  const tpl = await checkTemplate(t).catch(() => undefined);
  if (!tpl) return undefined;
  for (const vm of await readyEntries(t)) {
    const entry = await takeEntry(t, vm);
    if (!entry) continue; // another process took it first
    let m: Machine | undefined;
    try {
      // forked from an earlier template of that name (made again since): not this template's
      if (entry.frozenAt !== tpl.meta.frozenAt)
        throw new VmError(
          'E_TEMPLATE_MISSING',
          `${vm} was forked from an earlier ${t} (frozen ${entry.frozenAt ?? 'at an unknown time'}, now ${tpl.meta.frozenAt})`,
        );
      m = await Machine.open(vm);
      await adopt(m, o);
      return m;
    } catch (e) {
      o.log?.(`pooled ${vm} could not be claimed (${(e as Error).message}): removed`);
      m?.close();
      await removeVm(vm, { force: true }).catch(() => undefined);
    } finally {
      await dropClaim(t, vm).catch(() => undefined);
    } // the record names its owner now, or the VM is gone
  }
  return undefined;
}

/** Make a pooled VM the claimer's (see claimPooled). */
async function adopt(m: Machine, o: PoolClaimOptions): Promise<void> {
  const t0 = performance.now();
  const b = internalsOf(m);
  const r = b.record;
  if (r.owner?.kind !== POOL_OWNER || !r.identity) throw new VmError('E_VM_BUSY', `${m.name} is not a pooled VM`);
  b.assertRunning('claim');
  let id: CloneIdentity = { ...r.identity, hostname: o.hostname ?? r.identity.hostname, rngSeed: randomBytes(32).toString('hex') };
  const tap = r.desc.net.mode === 'bridge' ? r.desc.net.tap : undefined;
  if (o.pod && !tap) throw new VmError('E_NET', `${m.name}: a pooled VM without a tap cannot join a pod's network`);
  if (o.pod) {
    id = withPodNetwork(id, await readPodNetwork(o.pod));
    r.netMode = { mode: 'pod', ...o.pod };
  }
  // the record names its owner, and the tap's new namespace, first: removing the VM then finds it all
  r.owner = o.owner;
  await writeRecord(r);
  if (o.pod) await movePodTap(tap!, o.pod);
  r.identity = withDns(id, o.dns);
  const tMoved = performance.now();
  await (await m.qmp()).execute('cont');
  const tResumed = performance.now();
  const applied = await b.sendIdentity(r.generation + 1);
  const clockFix = await clockRightAtReady(await m.agent(), applied.time, Date.now());
  r.timings = {
    claimNet: Math.round(tMoved - t0),
    resume: Math.round(tResumed - tMoved),
    identity: applied.stepsMs.identity ?? 0,
    clockFix,
    ready: Math.round(performance.now() - t0),
  };
  await writeRecord(r);
  o.log?.(`claimed pooled ${m.name} (${r.identity.hostname}, ${r.identity.ip}) in ${r.timings.ready} ms`);
}
