/**
 * Templates: boot one from a built image, freeze it (device state only; RAM
 * stays in its memory file on tmpfs), or freeze a running clone as a new
 * template (a fork of a fork). The template directory holds meta.json,
 * mem, state, kernel-stub and an optional disk overlay; it is found by name
 * under the checked template root, never by a path read from a file.
 */
import { chmod, chown, copyFile, lstat, mkdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { run } from '../common/run.ts';
import { constants, readFileSync } from 'node:fs';
import { join, resolve as resolvePath } from 'node:path';
import { VmError, ScionError } from '../common/errors.ts';
import { validName, type ValidName } from '../common/names.ts';
import { dirProblem, writeExclusive } from '../common/safe-fs.ts';
import { QmpClient } from './qemu/qmp.ts';
import { AgentClient } from './agent-client.ts';
import { deviceLineup, kernelStub, type VmDescription, type Accel } from './qemu/argv.ts';
import { chooseAccel, qemuVersion } from './qemu/accel.ts';
import { spawnQemu, connectQmp, restoreFromFd, migrateToFile, exitOf, killPid, waitDead, credentialsFor, runningAsRoot, qemuDied, type Credentials, type QemuProcess } from './qemu/process.ts';
import { allocateIdentity } from './identity.ts';
import { syncGuestClock } from './clock.ts';
import { createTap, deleteTap, netParams, type NetMode } from './net.ts';
import { qcow2Overlay } from './disk.ts';
import { trustedTemplateRoot, vmPaths, vmsDir, templatePaths } from './store/dirs.ts';
import { readRecord, writeRecord, readTemplateMeta, writeTemplateMeta, TEMPLATE_FORMAT, VM_FORMAT, type VmRecord, type TemplateMeta } from './store/records.ts';
import { createRunDir, reserveFirstFree, release } from './store/slots.ts';
import type { ImageArtifacts } from './image.ts';

export type { TemplateMeta };

export interface BootOptions {
  name?: string; net?: NetMode; accel?: Accel; timeoutMs?: number; log?: (m: string) => void;
  /** 'ram': an ordinary VM whose freeze saves RAM into the state stream (the baseline scion is compared with) */
  memory?: 'file' | 'ram';
  /** stop at the agent's boot ready, without the template identity (cold-boot measurements) */
  skipIdentity?: boolean;
  /** a qcow2 disk: the template writes to an overlay on it, clones to overlays on that */
  disk?: string;
  /** a process that owns this template (shown by ls; `scion gc` removes it once that process is gone) */
  owner?: { pid: number; kind: string };
}

export interface Handle { record: VmRecord; qmp: QmpClient; agent: AgentClient }

/** The largest uid slot: uids UID_BASE+1 .. UID_BASE+MAX_UID_SLOT. */
export const MAX_UID_SLOT = 60_000;

function tail(file: string, lines = 15): string {
  try { return readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).slice(-lines).join('\n'); } catch { return '(no console output)'; } // QEMU died before writing any
}

/** Reserve a uid for a VM's QEMU when scion is root (none otherwise: QEMU runs as the caller). */
export async function reserveCredentials(owner: string): Promise<{ cred?: Credentials; slot?: string }> {
  if (!runningAsRoot()) return {};
  const n = await reserveFirstFree('uid', 1, MAX_UID_SLOT, owner, 'QEMU uids');
  return { cred: credentialsFor(n), slot: `uid-${n}` };
}

/**
 * Memory file mode. QEMU before 8.2 opens a private (copy-on-write) memory
 * file read-write, so clones, which run as the template's group, need group
 * write to open it; docs/SECURITY.md says what that allows.
 */
const memMode = (): number => (runningAsRoot() ? 0o660 : 0o600);

/** A new template directory for `name` (the name is ours: its run directory exists). A leftover of a crash is replaced. */
async function makeTemplateDir(name: ValidName): Promise<string> {
  const tdir = join(trustedTemplateRoot(), name);
  await rm(tdir, { recursive: true, force: true });
  await mkdir(tdir, { mode: 0o700 });
  return tdir;
}

async function makeMemFile(path: string, ramMB: number, gid?: number): Promise<void> {
  await writeExclusive(path, '', 0o600);
  if (gid !== undefined) await chown(path, 0, gid);
  await chmod(path, memMode()); // explicitly: the umask would take the group's write away
  await truncate(path, ramMB * 1024 * 1024);
}

/** Boot the template VM of an image and wait for its agent's ready. */
export async function bootTemplate(img: ImageArtifacts, opts: BootOptions = {}): Promise<Handle> {
  const name = validName(opts.name ?? `${img.name}-tpl`, 'template');
  const vms = vmsDir();
  const p = vmPaths(name, vms);
  const accel = opts.accel ? { accel: opts.accel, reason: 'requested' } : await chooseAccel(img.vmlinuz, opts.log);
  opts.log?.(`accelerator: ${accel.accel} (${accel.reason})`);
  const netMode: NetMode = opts.net ?? { mode: 'user' };
  const baseDisk = opts.disk ? resolvePath(opts.disk) : undefined;
  if (baseDisk && !(await stat(baseDisk).then((s) => s.isFile(), () => false))) throw new VmError('E_DISK', `disk ${opts.disk} does not exist or is not a file`);
  // the template's own identity (index 0, generation 1): clones start from a known state
  const id = allocateIdentity(0, img.name, undefined, netParams(netMode));
  const { cred, slot } = await reserveCredentials(name);
  const desc: VmDescription = {
    name, mode: 'template', accel: accel.accel, ramMB: img.ramMB, cpus: 1, memory: opts.memory ?? 'file', cmdline: img.cmdline, initrd: true,
    vmgenid: id.vmgenid, mac: id.mac, net: { mode: 'none' }, sandbox: true, disk: baseDisk ? { layers: ['base', 'template'] } : undefined,
  };
  if (netMode.mode === 'user') desc.net = { mode: 'user', guestIp: id.ip, forwards: [] };
  const record: VmRecord = {
    format: VM_FORMAT, name, role: 'template', image: img.dir, accel: accel.accel, createdAt: new Date().toISOString(), generation: 0, ports: {}, desc, netMode,
    uid: cred?.uid, gid: cred?.gid, slots: slot ? [slot] : [], making: { ownerPid: process.pid, phase: 'boot' }, owner: opts.owner,
  };
  try { await createRunDir(record, cred); } catch (e) { if (slot) await release(slot); throw e; }
  let proc: QemuProcess | undefined;
  let tap: string | undefined;
  try {
    const tdir = await makeTemplateDir(name);
    const t = templatePaths(tdir);
    if (desc.memory === 'file') await makeMemFile(t.mem, img.ramMB, cred?.gid);
    if (baseDisk) await qcow2Overlay(baseDisk, t.disk);
    if (netMode.mode === 'bridge') { tap = await createTap(netMode, cred); desc.net = { mode: 'bridge', tap }; await writeRecord(record); }
    const tSpawn = performance.now();
    proc = await spawnQemu(desc, { jail: p.jail, cred, netns: netMode.mode === 'bridge' ? netMode.netns : undefined, files: { mem: desc.memory === 'file' ? t.mem : undefined, kernel: img.vmlinuz, initrd: img.initrd, diskBase: baseDisk, diskTemplate: baseDisk ? t.disk : undefined } });
    record.pid = proc.pid;
    await writeRecord(record);
    const qmp = await connectQmp(name, p.qmp, proc, 10_000);
    const agent = new AgentClient(`${name}/agent`);
    await agent.connect(p.agent);
    const timeout = opts.timeoutMs ?? 180_000;
    const died = proc.exited.then(() => { throw new VmError('E_BOOT_FAILED', `${name}: QEMU exited during boot${proc!.stderrTail() ? ` (${proc!.stderrTail()})` : ''}; console:\n${tail(p.console)}`); });
    died.catch(() => undefined); // raced below; a later exit is not this call's error
    await Promise.race([agent.sync(timeout), died]).catch((e) => {
      if (e instanceof VmError) throw e;
      throw new VmError('E_BOOT_TIMEOUT', `${name}: the agent did not answer within ${timeout / 1000} s; last console lines:\n${tail(p.console)}`, { cause: e });
    });
    const info = await agent.call('info');
    if (!info.lastReady) await agent.waitEvent('ready', () => true, timeout);
    record.timings = { bootReadyMs: Math.round(performance.now() - tSpawn) };
    if (!opts.skipIdentity) {
      const applied = await agent.call('identity.apply', { generation: 1, hostname: id.hostname, machineId: id.machineId, interfaces: [{ mac: id.mac, address: id.ip, prefix: id.prefix, gateway: id.gateway }], dns: id.dns, rngSeed: id.rngSeed, time: Date.now(), vmgenid: id.vmgenid });
      record.generation = applied.generation;
      // the clones' clock reference: the template's clock stepped onto the host's, and the RTC's phase against it
      const c = await syncGuestClock(agent);
      opts.log?.(`guest clock was ${c.offsetMs.toFixed(0)} ms off (±${c.errorMs.toFixed(0)}); now ${c.after.offsetMs.toFixed(0)} ms (±${c.after.errorMs.toFixed(0)})`);
    }
    record.making = undefined;
    await writeRecord(record);
    return { record, qmp, agent };
  } catch (e) {
    if (proc) { killPid(proc.pid); await exitOf(proc); }
    if (tap) await deleteTap(tap, netMode.mode === 'bridge' ? netMode.netns : undefined);
    // the run directory stays, marked as made by this (soon dead) process: ls shows it, gc removes it
    throw e;
  }
}

/** Check that `name` is a frozen template this QEMU can fork; fail clearly if not. */
export async function checkTemplate(name: string): Promise<{ meta: TemplateMeta; tdir: string }> {
  const n = validName(name, 'template');
  const tdir = join(trustedTemplateRoot(), n);
  const st = await lstat(tdir).catch(() => undefined);
  if (!st) throw new VmError('E_TEMPLATE_MISSING', `no frozen template named ${n}`, { hint: 'scion ls lists templates; scion freeze <template> makes one' });
  const problem = dirProblem(st, process.getuid?.() ?? 0);
  if (problem) throw new VmError('E_UNTRUSTED_DIR', `template directory ${tdir} ${problem}`, { hint: 'remove it and freeze the template again' });
  const meta = await readTemplateMeta(tdir, n);
  const v = await qemuVersion();
  if (meta.qemuVersion !== v) throw new VmError('E_TEMPLATE_QEMU', `template ${meta.name} was frozen with "${meta.qemuVersion}", this host runs "${v}"`, { hint: 'boot and freeze the template again with this QEMU' });
  const t = templatePaths(tdir);
  const files = [t.state, join(tdir, meta.kernel), ...(meta.memory === 'file' ? [t.mem] : []), ...(meta.disk ? [join(tdir, meta.disk)] : [])];
  for (const f of files) {
    const s = await lstat(f).catch(() => undefined);
    if (!s) throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: ${f} is missing`, { hint: 'freeze the template again' });
    if (!s.isFile()) throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: ${f} is not a regular file`, { hint: 'something replaced it; freeze the template again' });
    if (s.uid !== (process.getuid?.() ?? 0)) throw new VmError('E_UNTRUSTED_DIR', `template ${meta.name}: ${f} is owned by uid ${s.uid}`, { hint: 'something replaced it; freeze the template again' });
  }
  if (meta.memory === 'file') {
    const size = (await stat(t.mem)).size;
    if (size !== meta.ramMB * 1024 * 1024) throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: memory file is ${size} bytes, expected ${meta.ramMB} MiB`);
  }
  return { meta, tdir };
}

/** Freeze: agent prepares, CPU stops, device state to a file (RAM stays in the memory file). */
export async function freeze(h: Handle, img: ImageArtifacts, log?: (m: string) => void): Promise<TemplateMeta> {
  const r = h.record;
  const name = validName(r.name, 'template');
  const tdir = join(trustedTemplateRoot(), name);
  const t = templatePaths(tdir);
  const p = vmPaths(name, vmsDir());
  const cred = r.uid !== undefined && r.gid !== undefined ? { uid: r.uid, gid: r.gid } : undefined;
  const t0 = performance.now();
  await h.agent.call('freeze.prepare', {}, 120_000);
  const tPrepared = performance.now();
  await h.qmp.execute('stop');
  const shared = r.desc.memory !== 'ram';
  // shared: RAM stays in the memory file, only device state is saved; 'ram': the ordinary full snapshot
  if (shared) await h.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  await migrateToFile(h.qmp, name, p.jail, cred, t.state);
  const freezeMs = Math.round(performance.now() - tPrepared);
  await h.qmp.execute('quit').catch(() => undefined); // QEMU may close the monitor before answering
  h.qmp.close(); h.agent.close();
  await waitDead(r.pid);
  if (shared) await chmod(t.mem, memMode());
  await writeFile(t.kernel, kernelStub(await readFile(img.vmlinuz)), { mode: 0o644, flag: constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL });
  if (r.desc.disk) await chmod(t.disk, 0o400); // now the base of every clone's overlay
  if (r.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, r.netMode.mode === 'bridge' ? r.netMode.netns : undefined);
  const meta: TemplateMeta = {
    format: TEMPLATE_FORMAT, memory: shared ? 'file' : 'ram', net: r.netMode,
    name, qemuVersion: await qemuVersion(), lineup: deviceLineup(r.desc), accel: r.accel as Accel, image: img.dir, manifestSha256: img.manifestSha256,
    kernel: 'kernel-stub', cmdline: r.desc.cmdline, ramMB: r.desc.ramMB, generation: r.generation, disk: r.desc.disk ? 'disk.qcow2' : undefined, baseDisk: await baseDiskOf(r),
    gid: r.gid, frozenAt: new Date().toISOString(), freezeMs, ports: img.ports,
  };
  await writeTemplateMeta(tdir, meta);
  r.frozen = true; r.pid = undefined; r.timings = { prepareMs: Math.round(tPrepared - t0), freezeMs };
  await writeRecord(r);
  log?.(`froze ${name} in ${freezeMs} ms (prepare ${Math.round(tPrepared - t0)} ms)`);
  return meta;
}

/** The user's base disk under a template's overlay (qemu-img reads it from the overlay's header). */
async function baseDiskOf(r: VmRecord): Promise<string | undefined> {
  if (!r.desc.disk) return undefined;
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', templatePaths(join(trustedTemplateRoot(), r.name)).disk])).stdout);
  return info['full-backing-filename'] ?? info['backing-filename'];
}

/**
 * Freeze a running clone as a new template (a fork of a fork). A clone's RAM
 * is a private copy-on-write mapping, so it is saved whole, then loaded into
 * a fresh shared memory file by a paused QEMU that saves the device state the
 * usual way. The new template's clones carry the clone's generation + 1.
 */
export async function freezeClone(cloneName: string, newName: string, log?: (m: string) => void): Promise<TemplateMeta> {
  const cname = validName(cloneName, 'clone');
  const tname = validName(newName, 'template');
  const r = await readRecord(cname);
  if (!r || r.role !== 'clone' || !r.template) throw new VmError('E_NO_VM', `no clone named ${cname}`, { hint: 'scion ls' });
  if (r.desc.disk) throw new VmError('E_UNSUPPORTED', `${cname} has a disk; freezing a clone with a disk is not supported yet`);
  const { meta: parent, tdir: parentDir } = await checkTemplate(r.template);
  const vms = vmsDir();
  const cp = vmPaths(cname, vms);
  const t0 = performance.now();
  const { cred, slot } = await reserveCredentials(tname);
  const desc: VmDescription = { ...r.desc, name: tname, mode: 'template', memory: 'file', incoming: true, initrd: false, tbSizeMB: undefined, net: r.desc.net.mode === 'user' ? { ...r.desc.net, forwards: [] } : r.desc.net };
  const record: VmRecord = {
    format: VM_FORMAT, name: tname, role: 'template', image: r.image, accel: r.accel, createdAt: new Date().toISOString(), generation: r.generation, ports: {}, desc, netMode: r.netMode,
    uid: cred?.uid, gid: cred?.gid, slots: slot ? [slot] : [], making: { ownerPid: process.pid, phase: 'freeze' },
  };
  try { await createRunDir(record, cred); } catch (e) { if (slot) await release(slot); throw e; }
  const p = vmPaths(tname, vms);
  const tdir = await makeTemplateDir(tname);
  const t = templatePaths(tdir);
  const full = join(tdir, 'full-state');
  // 1. the running clone's whole RAM and devices, then it goes on running
  const qmp = new QmpClient(`${cname}/qmp`);
  const agent = new AgentClient(`${cname}/agent`);
  try {
    await qmp.connect(cp.qmp); await agent.connect(cp.agent); await agent.sync();
    await agent.call('freeze.prepare', {}, 120_000);
    await qmp.execute('stop');
    // the clone restored with x-ignore-shared on; its private RAM must now go into the stream
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: false }] });
    const ccred = r.uid !== undefined && r.gid !== undefined ? { uid: r.uid, gid: r.gid } : undefined;
    try { await migrateToFile(qmp, cname, cp.jail, ccred, full); } finally { await qmp.execute('cont'); }
  } finally { qmp.close(); agent.close(); }
  // 2. a paused template QEMU loads it into a shared memory file, then saves device state only
  let proc: QemuProcess | undefined;
  let tap: string | undefined;
  try {
    await makeMemFile(t.mem, desc.ramMB, cred?.gid);
    if (r.netMode.mode === 'bridge') { tap = await createTap(r.netMode, cred); desc.net = { mode: 'bridge', tap }; }
    await writeRecord(record);
    proc = await spawnQemu(desc, { jail: p.jail, cred, netns: r.netMode.mode === 'bridge' ? r.netMode.netns : undefined, files: { mem: t.mem, kernel: join(parentDir, parent.kernel), state: full } });
    record.pid = proc.pid;
    await writeRecord(record);
    const q2 = await connectQmp(tname, p.qmp, proc, 10_000);
    try {
      await restoreFromFd(q2, tname, proc, false);
      await q2.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
      await migrateToFile(q2, tname, p.jail, cred, t.state);
      await q2.execute('quit').catch(() => undefined); // QEMU may close the monitor before answering
    } finally { q2.close(); }
    await waitDead(proc.pid);
  } catch (e) {
    if (proc) { killPid(proc.pid); await exitOf(proc); }
    throw e instanceof ScionError ? e : proc?.isDead() ? qemuDied(tname, proc, `making the template from ${cname}`) : e;
  } finally {
    await rm(full, { force: true });
    if (tap) await deleteTap(tap, r.netMode.mode === 'bridge' ? r.netMode.netns : undefined);
  }
  await chmod(t.mem, memMode());
  const freezeMs = Math.round(performance.now() - t0);
  await copyFile(join(parentDir, parent.kernel), t.kernel, constants.COPYFILE_EXCL);
  const meta: TemplateMeta = { ...parent, name: tname, memory: 'file', kernel: 'kernel-stub', generation: r.generation, frozenAt: new Date().toISOString(), freezeMs, lineup: deviceLineup(desc), gid: cred?.gid };
  await writeTemplateMeta(tdir, meta);
  record.frozen = true; record.pid = undefined; record.making = undefined; record.timings = { freezeMs };
  if (tap) record.desc.net = { mode: 'bridge', tap };
  await writeRecord(record);
  log?.(`froze clone ${cname} as template ${tname} in ${freezeMs} ms`);
  return meta;
}
