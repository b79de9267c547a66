/**
 * Clones: N running copies of a frozen template, each mapping its memory
 * file copy-on-write, each with a fresh identity. Every number a clone
 * takes (index -> MAC and IP, host ports, QEMU uid) is reserved first, and
 * its run directory appears by an atomic rename, so any number of scion
 * processes can fork at once; a failed clone removes only what it made.
 */
import { join } from 'node:path';
import { VmError, ScionError } from '../common/errors.ts';
import { validName, type ValidName } from '../common/names.ts';
import { AgentClient } from './agent-client.ts';
import type { QmpClient } from './qemu/qmp.ts';
import { deviceLineup, type NetConfig, type VmDescription } from './qemu/argv.ts';
import { spawnQemu, connectQmp, restoreFromFd, exitOf, killPid, type QemuProcess } from './qemu/process.ts';
import { allocateIdentity, MAX_CLONE_INDEX } from './identity.ts';
import { createTap, deleteTap, netParams, type NetMode } from './net.ts';
import { qcow2Overlay } from './disk.ts';
import { checkTemplate, reserveCredentials, type TemplateMeta } from './template.ts';
import { vmPaths, vmsDir, templatePaths } from './store/dirs.ts';
import { writeRecord, VM_FORMAT, type VmRecord } from './store/records.ts';
import { createRunDir, reserveFirstFree, reservePort, release, slotName } from './store/slots.ts';
import { removeVm } from './lifecycle.ts';
import { config } from '../common/config.ts';

export interface ForkOptions {
  n: number; parallel?: number; hostname?: string; namePrefix?: string; log?: (m: string) => void;
  /** keep a failed clone's run directory for inspection */
  keepOnFailure?: boolean;
  /** a long-running process that owns these clones (shown by ls) */
  owner?: { pid: number; kind: string };
  /**
   * Do not send identity.apply: the clone keeps the template's hostname,
   * machine-id, addresses and RNG state. Only for showing that an identity
   * test fails when re-identification is broken (scion/testing's option of
   * the same name); never in real use.
   */
  skipIdentityApply?: boolean;
}
export interface CloneResult { name: ValidName; hostname: string; mac: string; ip: string; machineId: string; vmgenid: string; ports: Record<string, number>; generation: number; timings: Record<string, number>; runDir: string; agentSocket: string; pid: number }

export async function fork(templateName: string, opts: ForkOptions): Promise<CloneResult[]> {
  const { meta, tdir } = await checkTemplate(templateName);
  const prefix = validName(opts.namePrefix ?? meta.name.replace(/-tpl$/, ''), 'clone prefix');
  if (opts.hostname !== undefined) validHostnamePattern(opts.hostname);
  const results: CloneResult[] = [];
  let started = 0;
  const errors: Error[] = [];
  const worker = async () => {
    while (started < opts.n && !errors.length) {
      started++;
      try { results.push(await forkOne(tdir, meta, prefix, opts)); } catch (e) { errors.push(e as Error); }
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.parallel ?? 4, opts.n) }, worker));
  if (errors.length) {
    // all or nothing: a fork that fails leaves no clone of this call behind
    for (const r of results) await removeVm(r.name).catch((e) => opts.log?.(`could not remove ${r.name} after the failed fork: ${(e as Error).message}`));
    throw errors[0];
  }
  return results.sort((a, b) => a.name.localeCompare(b.name, 'en', { numeric: true }));
}

function validHostnamePattern(h: string): void {
  if (!/^[a-z0-9]([a-z0-9-]{0,40})(\{n\})?([a-z0-9-]{0,20})$/.test(h)) throw new VmError('E_BAD_NAME', `hostname pattern ${JSON.stringify(h)}: use a-z, 0-9 and "-", with {n} for the clone index`, { hint: 'e.g. web-{n}' });
}

/**
 * Reserve an index and make the run directory for it. The index decides the
 * name (<prefix>-c<index>); a name someone else already uses (say a VM booted
 * with --name web-c3) keeps its index reserved until we have found ours, so
 * the search moves on.
 */
async function claimClone(prefix: ValidName, build: (index: number, name: ValidName) => VmRecord, cred: (index: number) => Promise<{ uid?: number; gid?: number; slot?: string }>): Promise<VmRecord> {
  const skipped: number[] = [];
  try {
    for (;;) {
      const index = await reserveFirstFree('index', 1, MAX_CLONE_INDEX, `${prefix}-c?`, `clone slots (at most ${MAX_CLONE_INDEX} clones on this host)`);
      const name = validName(`${prefix}-c${index}`, 'clone');
      const c = await cred(index);
      const record = build(index, name);
      record.uid = c.uid; record.gid = c.gid;
      record.slots = [slotName('index', index), ...(c.slot ? [c.slot] : [])];
      try {
        await createRunDir(record, c.uid !== undefined ? { uid: c.uid, gid: c.gid! } : undefined);
        return record;
      } catch (e) {
        if (c.slot) await release(c.slot);
        if ((e as ScionError).code !== 'E_VM_EXISTS') { await release(slotName('index', index)); throw e; }
        skipped.push(index);
      }
    }
  } finally {
    for (const i of skipped) await release(slotName('index', i));
  }
}

async function forkOne(tdir: string, meta: TemplateMeta, prefix: ValidName, opts: ForkOptions): Promise<CloneResult> {
  const t0 = performance.now();
  const netMode: NetMode = meta.net;
  const netns = netMode.mode === 'bridge' ? netMode.netns : undefined;
  const vms = vmsDir();
  const t = templatePaths(tdir);
  const reservedPorts: number[] = [];
  let record: VmRecord;
  try {
    // host ports first (they go into the record the run directory is made with); only user-mode
    // networking forwards ports: a bridged clone is reached at its own address
    if (netMode.mode === 'user') for (const _ of meta.ports) reservedPorts.push(await reservePort(`${prefix}-c?`));
  } catch (e) { for (const p of reservedPorts) await release(slotName('port', p)); throw e; }
  const forwards = reservedPorts.map((hostPort, i) => ({ guestPort: meta.ports[i], hostPort }));
  try {
    record = await claimClone(prefix, (index, name) => {
      const id = allocateIdentity(index, opts.hostname ?? `${meta.name.replace(/-tpl$/, '')}-{n}`, undefined, netParams(netMode));
      const net: NetConfig = netMode.mode === 'user' ? { mode: 'user', guestIp: id.ip, forwards } : { mode: 'none' };
      const desc: VmDescription = {
        name, mode: 'clone', accel: meta.accel, ramMB: meta.ramMB, cpus: 1, memory: meta.memory, cmdline: meta.cmdline, initrd: false,
        vmgenid: id.vmgenid, mac: id.mac, net, incoming: true, sandbox: true,
        // TCG's translation cache is private to each clone and fills up: a knob between speed and memory
        tbSizeMB: config().tbSizeMB,
        disk: meta.disk ? { layers: ['base', 'template', 'clone'] } : undefined,
      };
      return {
        format: VM_FORMAT, name, role: 'clone', image: meta.image, accel: meta.accel, createdAt: new Date().toISOString(), template: meta.name,
        generation: meta.generation, identity: id, ports: Object.fromEntries(forwards.map((f) => [String(f.guestPort), f.hostPort])), desc, netMode,
        slots: [], making: { ownerPid: process.pid, phase: 'fork' }, owner: opts.owner,
      };
    }, async () => {
      const { cred, slot } = await reserveCredentials(`${prefix}-c?`);
      // clones run as the template's group: the one allowed to open its memory file
      return cred ? { uid: cred.uid, gid: meta.gid ?? cred.gid, slot } : {};
    });
  } catch (e) { for (const p of reservedPorts) await release(slotName('port', p)); throw e; }
  record.slots.push(...reservedPorts.map((p) => slotName('port', p)));
  const name = record.name as ValidName;
  const id = record.identity!;
  const desc = record.desc;
  const p = vmPaths(name, vms);
  const cred = record.uid !== undefined ? { uid: record.uid, gid: record.gid! } : undefined;
  const timings: Record<string, number> = {};
  let tm = t0;
  const mark = (k: string) => { const n = performance.now(); timings[k] = Math.round((n - tm) * 10) / 10; tm = n; };
  let proc: QemuProcess | undefined;
  let qmp: QmpClient | undefined, agent: AgentClient | undefined;
  try {
    await writeRecord(record);
    const cloneDisk = join(p.dir, 'disk.qcow2');
    if (meta.disk) await qcow2Overlay(join(tdir, meta.disk), cloneDisk);
    if (netMode.mode === 'bridge') { desc.net = { mode: 'bridge', tap: await createTap(netMode, cred) }; await writeRecord(record); }
    if (JSON.stringify(deviceLineup(desc)) !== JSON.stringify(meta.lineup)) throw new VmError('E_TEMPLATE_LINEUP', `template ${meta.name} was frozen with another device line-up`, { hint: 'freeze it again with this scion' });
    proc = await spawnQemu(desc, {
      jail: p.jail, cred, netns,
      files: { mem: meta.memory === 'file' ? t.mem : undefined, kernel: join(tdir, meta.kernel), state: t.state, diskBase: meta.baseDisk, diskTemplate: meta.disk ? join(tdir, meta.disk) : undefined, diskClone: meta.disk ? cloneDisk : undefined },
    });
    record.pid = proc.pid;
    await writeRecord(record);
    qmp = await connectQmp(name, p.qmp, proc, 30_000); // generous: a loaded host starts QEMU slowly
    mark('spawn');
    await restoreFromFd(qmp, name, proc, desc.memory === 'file');
    mark('restore');
    await qmp.execute('cont');
    mark('resume');
    agent = new AgentClient(`${name}/agent`);
    await agent.connect(p.agent);
    // sync and identity.apply go out back to back: the agent reads them in order, and the
    // marker before the sync clears anything stale, so no round trip is spent waiting
    const synced = agent.sync(30_000);
    const generation = meta.generation + 1;
    const applying = opts.skipIdentityApply ? agent.call('ping', {}) : agent.call('identity.apply', {
      generation, hostname: id.hostname, machineId: id.machineId, rngSeed: id.rngSeed, time: Date.now(), vmgenid: id.vmgenid,
      interfaces: [{ mac: id.mac, address: id.ip, prefix: id.prefix, gateway: id.gateway }], dns: id.dns,
    }, 120_000);
    applying.catch(() => undefined); // awaited below, after the sync
    await synced;
    mark('agentSync');
    const applied = await applying;
    const s = applied.stepsMs ?? {};
    timings.identity = s.identity ?? 0;
    timings.containers = (s.containers ?? 0) + (s.health ?? 0);
    timings.applyRoundTrip = Math.round((performance.now() - tm) * 10) / 10;
    timings.ready = Math.round((performance.now() - t0) * 10) / 10;
    record.generation = generation;
    record.timings = timings;
    record.making = undefined;
    await writeRecord(record);
    opts.log?.(`forked ${name} (${id.hostname}, ${id.ip}) in ${timings.ready.toFixed(0)} ms`);
    return { name, hostname: id.hostname, mac: id.mac, ip: id.ip, machineId: id.machineId, vmgenid: id.vmgenid, ports: record.ports, generation, timings, runDir: p.dir, agentSocket: p.agent, pid: proc.pid };
  } catch (e) {
    if (proc) { killPid(proc.pid); await exitOf(proc); }
    if (desc.net.mode === 'bridge') await deleteTap(desc.net.tap, netns).catch(() => undefined); // best effort: the fork's own error is what the caller needs
    if (!opts.keepOnFailure) await removeVm(name, { force: true }).catch(() => undefined); // ours: made by this call; gc finds it if this fails too
    throw e instanceof ScionError ? e : new VmError('E_FORK_FAILED', `${name}: ${(e as Error).message}`, { cause: e });
  } finally {
    qmp?.close(); agent?.close();
  }
}
