/**
 * VM lifecycle without a daemon: boot a template, freeze it, fork clones,
 * stop, remove, list, collect garbage. Everything a later command needs is
 * in the run directory (rundir.ts) and the template directory.
 */
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { readFile, stat, chmod, rm, mkdir, rename, writeFile, copyFile, access } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve as resolvePath } from 'node:path';
import { createHash } from 'node:crypto';
import { VmError, ScionError } from '../common/errors.ts';
import { atomicWrite } from '../builder/cache.ts';
import { QmpClient } from './qmp.ts';
import { AgentClient } from './agent-client.ts';
import { qemuArgv, deviceLineup, kernelStub, type VmDescription, type NetConfig, type Accel } from './qemu-argv.ts';
import { chooseAccel, qemuVersion, QEMU } from './accel.ts';
import { allocateIdentity, freeIndices } from './identity.ts';
import { createTap, deleteTap, netParams, type NetMode, type BridgeSpec } from './net.ts';
import { paths, makeRunDir, writeRecord, readRecord, listRunDirs, removeRunDir, pidIsOurs, processAlive, scionQemuPids, templateRoot, type VmRecord } from './rundir.ts';

export interface ImageArtifacts { name: string; dir: string; vmlinuz: string; initrd: string; manifest: any; cmdline: string; ramMB: number; ports: number[]; manifestSha256: string }

export async function loadImage(dir: string): Promise<ImageArtifacts> {
  const d = resolvePath(dir);
  let text: string;
  try { text = await readFile(join(d, 'manifest.json'), 'utf8'); } catch {
    throw new VmError('E_IMAGE_MISSING', `${dir} holds no built image (manifest.json missing)`, { hint: 'run `scion build images/<name>.yaml` first' });
  }
  const manifest = JSON.parse(text);
  const image = JSON.parse(await readFile(join(d, 'image.json'), 'utf8').catch(() => '{}'));
  return {
    name: manifest.name, dir: d, vmlinuz: join(d, 'vmlinuz'), initrd: join(d, 'initrd.img'), manifest,
    cmdline: manifest.kernel.cmdline ?? 'console=ttyS0', ramMB: manifest.guestRamMB ?? 512, ports: image.ports ?? manifest.ports ?? [],
    manifestSha256: createHash('sha256').update(text).digest('hex'),
  };
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const p = (s.address() as any).port; s.close(() => resolve(p)); });
  });
}

function tail(file: string, lines = 15): string {
  try { return readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).slice(-lines).join('\n'); } catch { return '(no console output)'; }
}

interface Spawned { pid: number; exited: Promise<{ code: number | null; stderr: string }>; stderr: () => string }

function spawnQemu(desc: VmDescription, netns?: string): Spawned {
  const argv = qemuArgv(desc);
  const [cmd, args] = netns ? ['ip', ['netns', 'exec', netns, QEMU, ...argv]] : [QEMU, argv];
  const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  let err = '';
  p.stderr!.on('data', (c) => { if (err.length < 8192) err += c; });
  const exited = new Promise<{ code: number | null; stderr: string }>((res) => p.on('exit', (code) => res({ code, stderr: err })));
  p.on('error', () => {});
  p.unref();
  (p.stderr as any).unref?.();
  return { pid: p.pid!, exited, stderr: () => err };
}

/** Connect QMP as soon as QEMU listens (the socket file appears a moment before it accepts). */
async function connectQmp(name: string, path: string, proc: Spawned, timeoutMs: number): Promise<QmpClient> {
  const end = Date.now() + timeoutMs;
  let dead = false;
  proc.exited.then(() => (dead = true));
  for (;;) {
    if (dead) throw new VmError('E_QEMU_EXITED', `${name}: QEMU exited at start: ${proc.stderr().trim().split('\n').slice(-3).join(' | ')}`);
    if (existsSync(path)) {
      const q = new QmpClient(`${name}/qmp`);
      try { await q.connect(path, Math.max(100, end - Date.now())); return q; } catch (e) {
        q.close();
        if (!/ECONNREFUSED|ENOENT/.test((e as Error).message) || Date.now() > end) throw e;
      }
    }
    if (Date.now() > end) throw new VmError('E_QEMU_TIMEOUT', `${name}: QEMU did not open ${path} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Wait for QEMU to exit (at most 5 s). The child is unref'd, so a timer keeps Node alive meanwhile. */
function exitOf(proc: Spawned, ms = 5000): Promise<unknown> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([proc.exited, new Promise((r) => (t = setTimeout(r, ms)))]).finally(() => clearTimeout(t));
}

/**
 * Start QEMU for a VM whose record is ready: the record is written before QEMU
 * exists (so gc never takes it for an orphan) and again with its pid.
 */
async function startQemu(record: VmRecord, desc: VmDescription): Promise<Spawned> {
  await writeRecord(record);
  const proc = spawnQemu(desc, record.netns);
  record.pid = proc.pid;
  await writeFile(paths(record.name).pid, String(proc.pid));
  await writeRecord(record);
  return proc;
}

/** Wait until an incoming migration has loaded (QEMU paused, migration completed); typed errors if QEMU dies or hangs. */
async function waitRestored(qmp: QmpClient, name: string, proc: Spawned): Promise<void> {
  let dead = false;
  proc.exited.then(() => (dead = true));
  const restoreFailed = () => new VmError('E_RESTORE_FAILED', `${name}: QEMU exited while loading the template state: ${proc.stderr().trim().split('\n').slice(-2).join(' | ')}`, { hint: 'the template state file may be corrupt or truncated; freeze the template again' });
  for (;;) {
    if (dead) throw restoreFailed();
    let s;
    try { s = await qmp.execute('query-status', undefined, 10_000); } catch (e) {
      // QEMU closing the monitor mid-load means the load failed and it exited
      await exitOf(proc, 2000);
      throw dead ? restoreFailed() : new VmError('E_RESTORE_FAILED', `${name}: QEMU stopped answering while loading the template state (${(e as Error).message})`, { hint: 'the template state file may be corrupt; freeze the template again', cause: e });
    }
    if (s.status === 'paused' || s.status === 'postmigrate') {
      const m = await qmp.execute('query-migrate');
      if (m.status === 'completed' || !m.status) return;
      if (m.status === 'failed') throw new VmError('E_RESTORE_FAILED', `${name}: loading the template state failed: ${m['error-desc'] ?? ''}`);
    }
    if (s.status === 'running') return;
    await new Promise((r) => setTimeout(r, 3));
  }
}

/** A qcow2 overlay on `base` (the base is never written through it). */
async function qcow2Overlay(base: string, overlay: string): Promise<void> {
  const { execFile } = await import('node:child_process');
  await new Promise<void>((res, rej) => execFile('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', base, overlay], (e, _o, err) =>
    e ? rej(new VmError('E_DISK', `qemu-img could not make an overlay on ${base}: ${String(err).trim() || e.message}`, { hint: 'the disk must be a qcow2 image (qemu-img info)' })) : res()));
}

function killPid(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL') { if (pid) { try { process.kill(pid, sig); } catch {} } }

export interface BootOptions {
  name?: string; net?: NetMode; accel?: Accel; timeoutMs?: number; log?: (m: string) => void;
  /** 'ram': an ordinary VM whose freeze saves RAM into the state stream (the baseline scion is compared with) */
  memory?: 'file' | 'ram';
  /** stop at the agent's boot ready, without the template identity (cold-boot measurements) */
  skipIdentity?: boolean;
  /** a qcow2 disk: the template writes to an overlay on it, clones to overlays on that */
  disk?: string;
}

export interface Handle { record: VmRecord; qmp: QmpClient; agent: AgentClient }

/** Boot the template VM of an image and wait for its agent's ready. */
export async function bootTemplate(img: ImageArtifacts, opts: BootOptions = {}): Promise<Handle> {
  const name = opts.name ?? `${img.name}-tpl`;
  const p = paths(name);
  if (existsSync(p.dir)) throw new VmError('E_VM_EXISTS', `a VM named ${name} already exists (${p.dir})`, { hint: `scion rm ${name}` });
  const accel = opts.accel ? { accel: opts.accel, reason: 'requested' } : await chooseAccel(img.vmlinuz, opts.log);
  opts.log?.(`accelerator: ${accel.accel} (${accel.reason})`);
  const tdir = join(templateRoot(), name);
  await rm(tdir, { recursive: true, force: true });
  await mkdir(tdir, { recursive: true, mode: 0o700 });
  await makeRunDir(name);
  const netMode: NetMode = opts.net ?? { mode: 'user' };
  // the template's own identity (index 0, generation 1): clones start from a known state
  const id = allocateIdentity(0, img.name, undefined, netParams(netMode));
  const desc: VmDescription = {
    mode: 'template', accel: accel.accel, ramMB: img.ramMB, cpus: 1, memory: opts.memory ?? 'file', memPath: join(tdir, 'mem'), kernel: img.vmlinuz, initrd: img.initrd,
    cmdline: img.cmdline, vmgenid: id.vmgenid, mac: id.mac,
    net: { mode: 'none' },
    qmpSocket: p.qmp, agentSocket: p.agent, consoleLog: p.console, consoleSocket: p.consoleSocket,
  };
  if (opts.disk) {
    const disk = resolvePath(opts.disk);
    if (!existsSync(disk)) throw new VmError('E_DISK', `disk ${opts.disk} does not exist`);
    desc.disk = join(tdir, 'disk.qcow2');
    await qcow2Overlay(disk, desc.disk);
  }
  if (netMode.mode === 'user') desc.net = { mode: 'user', guestIp: id.ip, forwards: [] };
  else if (netMode.mode === 'bridge') desc.net = { mode: 'bridge', tap: await createTap(netMode) };
  const record: VmRecord = { name, role: 'template', image: img.dir, accel: accel.accel, createdAt: new Date().toISOString(), templateDir: tdir, generation: 0, ports: {}, desc, netns: netMode.mode === 'bridge' ? netMode.netns : undefined, netMode, making: { ownerPid: process.pid, phase: 'boot' } };
  const tSpawn = performance.now();
  const proc = await startQemu(record, desc);
  try {
    const qmp = await connectQmp(name, p.qmp, proc, 10_000);
    const agent = new AgentClient(`${name}/agent`);
    await agent.connect(p.agent);
    const timeout = opts.timeoutMs ?? 180_000;
    const died = proc.exited.then((e) => { throw new VmError('E_BOOT_FAILED', `${name}: QEMU exited during boot (${e.code}); console:\n${tail(p.console)}`); });
    await Promise.race([agent.sync(timeout), died]).catch((e) => {
      if (e instanceof VmError) throw e;
      throw new VmError('E_BOOT_TIMEOUT', `${name}: the agent did not answer within ${timeout / 1000} s; last console lines:\n${tail(p.console)}`);
    });
    const info = await agent.call('info');
    if (!info.lastReady) await agent.waitEvent('ready', () => true, timeout);
    record.timings = { bootReadyMs: Math.round(performance.now() - tSpawn) };
    if (opts.skipIdentity) { record.making = undefined; await writeRecord(record); return { record, qmp, agent }; }
    const applied = await agent.call('identity.apply', { generation: 1, hostname: id.hostname, machineId: id.machineId, interfaces: [{ mac: id.mac, address: id.ip, prefix: id.prefix, gateway: id.gateway }], dns: id.dns, rngSeed: id.rngSeed, time: Date.now(), vmgenid: id.vmgenid });
    record.generation = applied.generation;
    record.making = undefined;
    await writeRecord(record);
    return { record, qmp, agent };
  } catch (e) {
    killPid(proc.pid);
    await exitOf(proc);
    if (desc.net.mode === 'bridge') await deleteTap(desc.net.tap, record.netns);
    await writeRecord(record).catch(() => {});
    throw e;
  }
}

export interface TemplateMeta {
  name: string;
  qemuVersion: string;
  lineup: string[];
  accel: Accel;
  image: string;
  manifestSha256: string;
  kernel: string;
  cmdline: string;
  ramMB: number;
  generation: number;
  memory: 'file' | 'ram';
  /** the template's disk (base of the clones' overlays), if it has one */
  disk?: string;
  /** how the template was networked; clones use the same kind (user-mode networking has migration state) */
  net: NetMode;
  frozenAt: string;
  freezeMs: number;
  ports: number[];
}

export async function templateMeta(dir: string): Promise<TemplateMeta> {
  try { return JSON.parse(await readFile(join(dir, 'meta.json'), 'utf8')); } catch {
    throw new VmError('E_TEMPLATE_MISSING', `${dir} is not a frozen template (meta.json missing)`, { hint: 'scion freeze <template> first' });
  }
}

/** Freeze: agent prepares, CPU stops, device state to a file (RAM stays in the memory file), memory file made read-only. */
export async function freeze(h: Handle, img: ImageArtifacts, log?: (m: string) => void): Promise<TemplateMeta> {
  const r = h.record;
  const tdir = r.templateDir!;
  const t0 = performance.now();
  await h.agent.call('freeze.prepare', {}, 120_000);
  const tPrepared = performance.now();
  await h.qmp.execute('stop');
  const shared = r.desc.memory !== 'ram';
  // shared: RAM stays in the memory file, only device state is saved; 'ram': the ordinary full snapshot
  if (shared) await h.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  const tmpState = join(tdir, `state.tmp-${process.pid}`);
  await h.qmp.execute('migrate', { uri: `exec:cat > ${tmpState}` });
  await waitMigration(h.qmp, r.name);
  await rename(tmpState, join(tdir, 'state'));
  const freezeMs = Math.round(performance.now() - tPrepared);
  await h.qmp.execute('quit').catch(() => {});
  h.qmp.close(); h.agent.close();
  await waitDead(r.pid);
  if (shared) await chmod(join(tdir, 'mem'), 0o444);
  await writeFile(join(tdir, 'kernel-stub'), kernelStub(await readFile(img.vmlinuz)));
  if (r.desc.disk) await chmod(r.desc.disk, 0o444); // now the base of every clone's overlay
  if (r.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, r.netns);
  const meta: TemplateMeta = {
    memory: shared ? 'file' : 'ram',
    net: r.netMode ?? { mode: 'user' },
    name: r.name, qemuVersion: qemuVersion(), lineup: deviceLineup(r.desc), accel: r.accel as Accel, image: img.dir, manifestSha256: img.manifestSha256,
    kernel: join(tdir, 'kernel-stub'), cmdline: r.desc.cmdline, ramMB: r.desc.ramMB, generation: r.generation, disk: r.desc.disk, frozenAt: new Date().toISOString(), freezeMs, ports: img.ports,
  };
  await atomicWrite(join(tdir, 'meta.json'), JSON.stringify(meta, null, 2) + '\n');
  r.frozen = true; r.pid = undefined; r.timings = { prepareMs: Math.round(tPrepared - t0), freezeMs };
  await writeRecord(r);
  log?.(`froze ${r.name} in ${freezeMs} ms (prepare ${Math.round(tPrepared - t0)} ms)`);
  return meta;
}

/**
 * Freeze a running clone as a new template (a fork of a fork). A clone's RAM
 * is a private copy-on-write mapping, so it is saved whole, then loaded into
 * a fresh shared memory file by a paused QEMU that saves the device state the
 * usual way. The new template's clones carry the clone's generation + 1.
 */
export async function freezeClone(cloneName: string, newName: string, log?: (m: string) => void): Promise<TemplateMeta> {
  const r = await readRecord(cloneName);
  if (!r || r.role !== 'clone' || !pidIsOurs(r.pid, cloneName)) throw new VmError('E_NO_VM', `no running clone named ${cloneName}`, { hint: 'scion ls' });
  const tplMeta = await templateMeta(r.templateDir!);
  if (r.desc.disk) throw new VmError('E_UNSUPPORTED', `${cloneName} has a disk; freezing a clone with a disk as a template is not supported yet`, { hint: 'fork the original template instead' });
  if (existsSync(paths(newName).dir)) throw new VmError('E_VM_EXISTS', `a VM named ${newName} already exists`, { hint: `scion rm ${newName}` });
  const tdir = join(templateRoot(), newName);
  await rm(tdir, { recursive: true, force: true });
  await mkdir(tdir, { recursive: true, mode: 0o700 });
  const full = join(tdir, `full.tmp-${process.pid}`);
  const t0 = performance.now();
  // 1. the clone: prepare, stop, save everything (RAM included)
  const qmp = await connectQmp(cloneName, paths(cloneName).qmp, { pid: r.pid!, exited: new Promise(() => {}), stderr: () => '' }, 5000);
  const agent = new AgentClient(`${cloneName}/agent`);
  try {
    await agent.connect(paths(cloneName).agent);
    await agent.sync(30_000);
    await agent.call('freeze.prepare', {}, 120_000);
    await qmp.execute('stop');
    // the clone came in with x-ignore-shared; this stream must carry its (private) RAM
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: false }] });
    await qmp.execute('migrate', { uri: `exec:cat > ${full}` });
    await waitMigration(qmp, cloneName);
    await qmp.execute('cont'); // the clone goes on running
  } finally { qmp.close(); agent.close(); }
  // 2. a paused template QEMU loads it into a shared memory file, then saves device state only
  await makeRunDir(newName);
  const p = paths(newName);
  const desc: VmDescription = { ...r.desc, mode: 'template', memory: 'file', memPath: join(tdir, 'mem'), incoming: true, net: r.desc.net.mode === 'user' ? { ...r.desc.net, forwards: [] } : r.desc.net, qmpSocket: p.qmp, agentSocket: p.agent, consoleLog: p.console, consoleSocket: p.consoleSocket, tbSizeMB: undefined };
  if (desc.net.mode === 'bridge') desc.net = { mode: 'bridge', tap: await createTap(r.netMode as BridgeSpec) };
  const record: VmRecord = { name: newName, role: 'template', image: r.image, accel: r.accel, createdAt: new Date().toISOString(), templateDir: tdir, generation: r.generation, ports: {}, desc, netns: r.netns, netMode: r.netMode, making: { ownerPid: process.pid, phase: 'freeze' } };
  const proc = await startQemu(record, desc);
  try {
    const q2 = await connectQmp(newName, p.qmp, proc, 10_000);
    await q2.execute('migrate-incoming', { uri: `exec:cat ${full}` });
    await waitRestored(q2, newName, proc);
    await q2.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    const tmpState = join(tdir, `state.tmp-${process.pid}`);
    await q2.execute('migrate', { uri: `exec:cat > ${tmpState}` });
    await waitMigration(q2, newName);
    await rename(tmpState, join(tdir, 'state'));
    await q2.execute('quit').catch(() => {});
    q2.close();
    await waitDead(proc.pid);
  } catch (e) {
    killPid(proc.pid);
    await exitOf(proc);
    await removeRunDir(newName);
    await rm(tdir, { recursive: true, force: true });
    const why = proc.stderr().trim().split('\n').slice(-2).join(' | ');
    throw why ? new VmError('E_FREEZE_FAILED', `${newName}: making the template from ${cloneName} failed: ${why}`, { cause: e }) : e;
  } finally {
    await rm(full, { force: true });
    if (desc.net.mode === 'bridge') await deleteTap(desc.net.tap, r.netns);
  }
  await chmod(join(tdir, 'mem'), 0o444);
  const freezeMs = Math.round(performance.now() - t0);
  await copyFile(tplMeta.kernel, join(tdir, 'kernel-stub'));
  const meta: TemplateMeta = { ...tplMeta, name: newName, memory: 'file', kernel: join(tdir, 'kernel-stub'), generation: r.generation, frozenAt: new Date().toISOString(), freezeMs, lineup: deviceLineup(desc) };
  await atomicWrite(join(tdir, 'meta.json'), JSON.stringify(meta, null, 2) + '\n');
  record.frozen = true; record.pid = undefined; record.making = undefined; record.timings = { freezeMs };
  await writeRecord(record);
  log?.(`froze clone ${cloneName} as template ${newName} in ${freezeMs} ms`);
  return meta;
}

async function waitMigration(q: QmpClient, name: string) {
  for (;;) {
    const m = await q.execute('query-migrate');
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled') throw new VmError('E_FREEZE_FAILED', `${name}: saving state failed: ${m['error-desc'] ?? m.status}`);
    await new Promise((res) => setTimeout(res, 5));
  }
}

async function waitDead(pid: number | undefined, timeoutMs = 10_000) {
  const end = Date.now() + timeoutMs;
  while (processAlive(pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
  killPid(pid);
}

export interface ForkOptions { n: number; parallel?: number; hostname?: string; namePrefix?: string; log?: (m: string) => void; keepOnFailure?: boolean }
export interface CloneResult { name: string; hostname: string; mac: string; ip: string; machineId: string; vmgenid: string; ports: Record<string, number>; generation: number; timings: Record<string, number>; runDir: string; agentSocket: string; pid: number }

/** Check a template can be forked by this QEMU with this line-up; fail clearly if not. */
export async function checkTemplate(tdir: string): Promise<TemplateMeta> {
  const meta = await templateMeta(tdir);
  const v = qemuVersion();
  if (meta.qemuVersion !== v) throw new VmError('E_TEMPLATE_QEMU', `template ${meta.name} was frozen with "${meta.qemuVersion}", this host runs "${v}"`, { hint: 'boot and freeze the template again with this QEMU' });
  for (const f of meta.memory === 'ram' ? ['state'] : ['mem', 'state']) {
    try { await access(join(tdir, f)); } catch { throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: ${join(tdir, f)} is missing`, { hint: 'freeze the template again' }); }
  }
  try { await access(meta.kernel); } catch { throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: kernel ${meta.kernel} is missing`, { hint: 'freeze the template again' }); }
  const st = meta.memory === 'ram' ? { size: meta.ramMB * 1024 * 1024 } : await stat(join(tdir, 'mem'));
  if (st.size !== meta.ramMB * 1024 * 1024) throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: memory file is ${st.size} bytes, expected ${meta.ramMB} MiB`);
  return meta;
}

/** Clone indices in use by any clone (MACs and addresses are unique across templates). */
export async function usedIndices(): Promise<Set<number>> {
  const used = new Set<number>();
  for (const n of await listRunDirs()) {
    const r = await readRecord(n);
    if (r?.role === 'clone' && r.identity) used.add(r.identity.index);
  }
  return used;
}

export async function fork(templateName: string, opts: ForkOptions): Promise<CloneResult[]> {
  const tdir = join(templateRoot(), templateName);
  const meta = await checkTemplate(tdir);
  const indices = freeIndices(await usedIndices(), opts.n);
  const results: CloneResult[] = new Array(indices.length);
  let next = 0;
  const errors: Error[] = [];
  const worker = async () => {
    while (next < indices.length) {
      const k = next++;
      try { results[k] = await forkOne(tdir, meta, indices[k], opts); } catch (e) { errors.push(e as Error); }
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.parallel ?? 4, indices.length) }, worker));
  if (errors.length) {
    // all or nothing: a fork that fails leaves no clone of this call behind
    for (const r of results) if (r) await removeVm(r.name).catch(() => {});
    throw errors[0];
  }
  return results;
}

async function forkOne(tdir: string, meta: TemplateMeta, index: number, opts: ForkOptions): Promise<CloneResult> {
  const t0 = performance.now();
  const netMode: NetMode = meta.net ?? { mode: 'user' };
  const id = allocateIdentity(index, opts.hostname ?? `${meta.name.replace(/-tpl$/, '')}-{n}`, undefined, netParams(netMode));
  const name = `${opts.namePrefix ?? meta.name.replace(/-tpl$/, '')}-c${index}`;
  const p = paths(name);
  if (existsSync(p.dir)) await removeRunDir(name);
  await makeRunDir(name);
  const forwards = netMode.mode === 'user' ? await Promise.all(meta.ports.map(async (g) => ({ guestPort: g, hostPort: await freePort() }))) : [];
  const net: NetConfig = netMode.mode === 'user' ? { mode: 'user', guestIp: id.ip, forwards } : netMode.mode === 'bridge' ? { mode: 'bridge', tap: await createTap(netMode) } : { mode: 'none' };
  const netns = netMode.mode === 'bridge' ? netMode.netns : undefined;
  const desc: VmDescription = {
    mode: 'clone', accel: meta.accel, ramMB: meta.ramMB, cpus: 1, memory: meta.memory ?? 'file', memPath: join(tdir, 'mem'), kernel: meta.kernel, cmdline: meta.cmdline,
    vmgenid: id.vmgenid, mac: id.mac, net, qmpSocket: p.qmp, agentSocket: p.agent, consoleLog: p.console, consoleSocket: p.consoleSocket, incoming: true,
    // TCG's translation cache is private to each clone and fills up: a knob between speed and memory
    tbSizeMB: Number(process.env.SCION_TB_SIZE_MB) || undefined,
    disk: meta.disk ? join(p.dir, 'disk.qcow2') : undefined,
  };
  if (meta.disk) await qcow2Overlay(meta.disk, desc.disk!);
  const lineup = deviceLineup(desc);
  if (JSON.stringify(lineup) !== JSON.stringify(meta.lineup)) {
    if (net.mode === 'bridge') await deleteTap(net.tap, netns);
    await removeRunDir(name);
    throw new VmError('E_TEMPLATE_LINEUP', `template ${meta.name} was frozen with another device line-up`, { hint: 'freeze it again with this scion' });
  }
  const record: VmRecord = {
    name, role: 'clone', image: meta.image, accel: meta.accel, createdAt: new Date().toISOString(), template: meta.name, templateDir: tdir,
    generation: meta.generation, identity: id, ports: Object.fromEntries(forwards.map((f) => [String(f.guestPort), f.hostPort])), desc, netns, netMode,
    making: { ownerPid: process.pid, phase: 'fork' },
  };
  const timings: Record<string, number> = {};
  let t = t0;
  const mark = (k: string) => { const n = performance.now(); timings[k] = Math.round((n - t) * 10) / 10; t = n; };
  const proc = await startQemu(record, desc);
  let qmp: QmpClient | undefined, agent: AgentClient | undefined;
  try {
    qmp = await connectQmp(name, p.qmp, proc, 30_000); // generous: a loaded host starts QEMU slowly
    mark('spawn');
    if (desc.memory === 'file') await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await qmp.execute('migrate-incoming', { uri: `exec:cat ${join(tdir, 'state')}` });
    await waitRestored(qmp, name, proc);
    mark('restore');
    await qmp.execute('cont');
    mark('resume');
    agent = new AgentClient(`${name}/agent`);
    await agent.connect(p.agent);
    // sync and identity.apply go out back to back: the agent reads them in order, and the
    // marker before the sync clears anything stale, so no round trip is spent waiting
    const synced = agent.sync(30_000);
    const generation = meta.generation + 1;
    const applying = agent.call('identity.apply', {
      generation, hostname: id.hostname, machineId: id.machineId, rngSeed: id.rngSeed, time: Date.now(), vmgenid: id.vmgenid,
      interfaces: [{ mac: id.mac, address: id.ip, prefix: id.prefix, gateway: id.gateway }], dns: id.dns,
    }, 120_000);
    applying.catch(() => {});
    await synced;
    mark('agentSync');
    const applied = await applying;
    const s = applied.stepsMs ?? {};
    const total = performance.now() - t;
    timings.identity = s.identity ?? 0;
    timings.containers = (s.containers ?? 0) + (s.health ?? 0);
    timings.ready = Math.round((performance.now() - t0) * 10) / 10;
    timings.applyRoundTrip = Math.round(total * 10) / 10;
    record.generation = generation;
    record.timings = timings;
    record.making = undefined;
    await writeRecord(record);
    return { name, hostname: id.hostname, mac: id.mac, ip: id.ip, machineId: id.machineId, vmgenid: id.vmgenid, ports: record.ports, generation, timings, runDir: p.dir, agentSocket: p.agent, pid: proc.pid };
  } catch (e) {
    killPid(proc.pid);
    await exitOf(proc);
    if (net.mode === 'bridge') await deleteTap(net.tap, netns);
    if (!opts.keepOnFailure) await removeRunDir(name);
    throw e instanceof ScionError ? e : new VmError('E_FORK_FAILED', `${name}: ${(e as Error).message}`, { cause: e });
  } finally {
    qmp?.close(); agent?.close();
  }
}

export type VmState = 'running' | 'starting' | 'frozen' | 'dead' | 'incomplete';
export interface VmListing { name: string; role: string; state: VmState; pid?: number; runDir: string; agentSocket: string; template?: string; hostname?: string; ip?: string; mac?: string; ports: Record<string, number>; generation: number; accel?: string }

export async function list(): Promise<VmListing[]> {
  const out: VmListing[] = [];
  for (const n of await listRunDirs()) {
    const p = paths(n);
    const r = await readRecord(n);
    if (!r) { out.push({ name: n, role: 'unknown', state: 'incomplete', runDir: p.dir, agentSocket: p.agent, ports: {}, generation: 0 }); continue; }
    const alive = pidIsOurs(r.pid, n);
    const abandoned = r.making && !processAlive(r.making.ownerPid);
    const state: VmState = abandoned ? 'incomplete' : alive ? (r.making ? 'starting' : 'running') : r.frozen ? 'frozen' : 'dead';
    out.push({ name: n, role: r.role, state, pid: alive ? r.pid : undefined, runDir: p.dir, agentSocket: p.agent, template: r.template, hostname: r.identity?.hostname ?? (r.role === 'template' ? r.name : undefined), ip: r.identity?.ip, mac: r.identity?.mac, ports: r.ports, generation: r.generation, accel: r.accel });
  }
  return out;
}

export async function stopVm(name: string): Promise<void> {
  const r = await readRecord(name);
  if (!r && !existsSync(paths(name).dir)) throw new VmError('E_NO_VM', `no VM named ${name}`, { hint: 'scion ls' });
  if (r && pidIsOurs(r.pid, name)) {
    const q = new QmpClient(`${name}/qmp`);
    try { await q.connect(paths(name).qmp, 1000); await q.execute('quit', undefined, 2000); } catch {}
    q.close();
    await waitDead(r.pid, 3000);
  }
}

export async function removeVm(name: string): Promise<void> {
  await stopVm(name);
  const r = await readRecord(name);
  if (r?.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, r.netns);
  if (r?.role === 'template' && r.templateDir) await rm(r.templateDir, { recursive: true, force: true });
  await removeRunDir(name);
}

/** Remove run directories of dead VMs; kill QEMUs whose run directory is gone. */
export async function gc(): Promise<{ removed: string[]; killed: number[] }> {
  const removed: string[] = [];
  const killed: number[] = [];
  for (const n of await listRunDirs()) {
    const r = await readRecord(n);
    if (r?.making && processAlive(r.making.ownerPid)) continue; // still being made by a live scion
    const abandoned = r?.making !== undefined;
    if (r && !abandoned && (pidIsOurs(r.pid, n) || r.frozen)) continue;
    // dead, or abandoned mid-boot/fork by a scion that was killed: stop its QEMU, drop the run dir
    if (r && pidIsOurs(r.pid, n)) { killPid(r.pid); killed.push(r.pid!); await waitDead(r.pid); }
    if (r?.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, r.netns);
    if (r?.role === 'template' && abandoned && r.templateDir) await rm(r.templateDir, { recursive: true, force: true });
    // a run dir without a record is one whose maker died before writing it; its QEMU (if any) is found below
    await removeRunDir(n);
    removed.push(n);
  }
  for (const q of scionQemuPids()) {
    if (q.runDir && !existsSync(join(q.runDir, 'vm.json'))) { killPid(q.pid); killed.push(q.pid); }
  }
  return { removed, killed };
}

export async function connectAgent(name: string, timeoutMs = 10_000): Promise<AgentClient> {
  const r = await readRecord(name);
  if (!r) throw new VmError('E_NO_VM', `no VM named ${name}`, { hint: 'scion ls' });
  if (!pidIsOurs(r.pid, name)) throw new VmError('E_VM_NOT_RUNNING', `VM ${name} is not running`);
  const a = new AgentClient(`${name}/agent`);
  await a.connect(paths(name).agent);
  await a.sync(timeoutMs);
  return a;
}
