/**
 * Machine: the one handle on a VM, and the one construction path for it.
 *
 * Three ways make a VM, as Firecracker's builder has one path for boot and
 * for restore: from a built image (a template, booted), from a frozen
 * template (a clone, restored copy-on-write) and from a running clone (a new
 * template, its RAM copied into a shared memory file). Each is a plan run by
 * `construct`: claim the name and numbers, make the run directory, prepare
 * files and tap, spawn QEMU, connect QMP, restore, resume, then the plan's
 * own finish (agent ready and identity, or the freeze of the loader). Any
 * failure on the way undoes all of it: QEMU killed, tap deleted, template
 * directory, reservations and run directory removed.
 *
 * `Machine.open(name)` gives the handle of an existing VM. Everything above
 * this layer (template, clone, lifecycle, serve, the CLI, the fixtures, the
 * shim) drives VMs through these handles and never touches QMP sockets, run
 * directories or records itself.
 */
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { VmError, ScionError } from '../../common/errors.ts';
import { validName, type ValidName } from '../../common/names.ts';
import type { AppliedIdentity } from '../../common/agent-protocol.ts';
import { AgentClient } from '../agent-client.ts';
import type { ImageArtifacts } from '../image.ts';
import { QmpClient } from '../qemu/qmp.ts';
import { deviceLineup, type VmDescription, type Accel } from '../qemu/argv.ts';
import { spawnQemu, connectQmp, restoreFromFd, exitOf, killPid, isQemuIn, qemuDied, type Credentials, type QemuProcess } from '../qemu/process.ts';
import { vmPaths, vmsDir } from '../store/dirs.ts';
import { writeRecord, readRecord, type VmRecord, type TemplateMeta } from '../store/records.ts';
import { identityArgs, type CloneIdentity } from './identity.ts';
import { tapFor, deleteTap, netnsOf, type NetMode } from './net.ts';
import { addStreamPort, removeStreamPort, type StreamFd } from './stream-ports.ts';
import { checkTemplate, type FrozenTemplate } from './templates.ts';
import { readRecordOrThrow, removeVm, quitQemu, makingElsewhere } from './inventory.ts';
import type { BootOptions, CloneOptions, MachineInfo, PoolClaimOptions, PoolFillOptions } from './options.ts';
import type { Building, Plan } from './plan.ts';
import { bootPlan } from './boot-plan.ts';
import { forkPlan } from './fork-plan.ts';
import { hibernateClone, resumeHibernated, type HibernateResult } from './hibernate.ts';
import { fillPool, claimPooled } from './node-pool.ts';
import { attachDisk, detachDisk } from './hotplug.ts';
import { freezeTemplate, freezeCloneAsTemplate } from './freeze.ts';

export type { TemplateMeta, NetMode, Accel, VmDescription, FrozenTemplate, CloneIdentity };
export { RecordError } from '../store/records.ts';
export { QmpError } from '../qemu/qmp.ts';
export type { Owner, BootOptions, CloneOptions, PoolFillOptions, PoolClaimOptions, MachineInfo } from './options.ts';

/** A handle's insides, for the Machine layer's own modules (plan.ts); never exported by the package. */
export let internalsOf: (m: Machine) => Building;
/** The one construction path, for a plan made outside this module (freeze.ts's loader). */
export let constructMachine: (plan: Plan) => Promise<Machine>;

export const credOf = (r: VmRecord): Credentials | undefined => (r.uid !== undefined && r.gid !== undefined ? { uid: r.uid, gid: r.gid } : undefined);

/** The one handle on a VM: made by boot, fork or a clone's freeze (one construction path, undone whole on failure), or opened by name; then info, agent, QMP, pause, resume, identity, freeze, console, hot-plug, stop, remove. */
export class Machine {
  #qmp?: QmpClient;
  #agent?: AgentClient;

  private constructor(private record: VmRecord) {}

  get name(): ValidName {
    return this.record.name as ValidName;
  }
  get pid(): number | undefined {
    return this.record.pid;
  }

  info(): MachineInfo {
    const r = this.record;
    const p = vmPaths(this.name, vmsDir());
    return {
      name: this.name,
      role: r.role,
      pid: r.pid,
      accel: r.accel,
      generation: r.generation,
      template: r.template,
      identity: r.identity ? { ...r.identity } : undefined,
      ports: { ...r.ports },
      netMode: r.netMode,
      runDir: p.dir,
      agentSocket: p.agent,
      console: p.console,
      frozen: !!r.frozen,
      timings: { ...(r.timings ?? {}) },
      image: r.image,
      owner: r.owner,
      making: r.making,
    };
  }

  /** The handle of an existing VM, by name (E_NO_VM if there is none). */
  static async open(vm: string): Promise<Machine> {
    const name = validName(vm);
    const r = await readRecordOrThrow(name);
    if (!r) throw new VmError('E_NO_VM', `VM ${name} is still being made (it has no record yet)`, { hint: 'scion ls' });
    return new Machine(r);
  }

  /**
   * The handle of `vm` if it exists with a record; undefined if there is no
   * such VM (or it is still being made and has no record yet). A record that
   * cannot be trusted throws a RecordError.
   */
  static async find(vm: string): Promise<Machine | undefined> {
    const r = await readRecord(validName(vm));
    return r ? new Machine(r) : undefined;
  }

  /** Whether another live scion process is still making this VM. */
  beingMadeElsewhere(): boolean {
    return makingElsewhere(this.record);
  }

  /** Whether this VM's QEMU runs now. */
  running(): boolean {
    return isQemuIn(this.record.pid, vmPaths(this.name, vmsDir()).jail);
  }

  private assertRunning(doing: string): void {
    if (!this.running()) throw new VmError('E_VM_NOT_RUNNING', `cannot ${doing} ${this.name}: it is not running`, { hint: 'scion ls' });
  }

  /** Its QMP connection (made on first use, kept until close()). */
  async qmp(timeoutMs = 5000): Promise<QmpClient> {
    if (this.#qmp) return this.#qmp;
    this.assertRunning('reach the monitor of');
    const q = new QmpClient(`${this.name}/qmp`);
    try {
      await q.connect(vmPaths(this.name, vmsDir()).qmp, timeoutMs);
    } catch (e) {
      q.close();
      throw e;
    }
    return (this.#qmp = q);
  }

  /** Its agent, resynchronised (made on first use, kept until close()). */
  async agent(timeoutMs = 10_000): Promise<AgentClient> {
    if (this.#agent) return this.#agent;
    this.assertRunning('reach the agent of');
    const a = new AgentClient(`${this.name}/agent`);
    try {
      await a.connect(vmPaths(this.name, vmsDir()).agent);
      await a.sync(timeoutMs);
    } catch (e) {
      a.close();
      throw e;
    }
    return (this.#agent = a);
  }

  /** Stop its vCPUs (QMP stop): it costs no CPU while paused. Its clock stands still meanwhile. */
  async pause(): Promise<void> {
    await (await this.qmp()).execute('stop');
  }

  /** Resume (QMP cont) and set its clock to the host's at once (it stood still while paused), unless `setClock` is false. */
  async resume(o: { setClock?: boolean } = {}): Promise<void> {
    await (await this.qmp()).execute('cont');
    if (o.setClock !== false) await (await this.agent()).call('time.set', { time: Date.now() }, 5000);
  }

  /** Send this VM its identity (the one its record holds) as generation `generation`; its record keeps the generation. */
  async applyIdentity(generation: number, timeoutMs = 120_000): Promise<Record<string, number>> {
    const applied = await this.sendIdentity(generation, timeoutMs);
    await writeRecord(this.record);
    return applied.stepsMs;
  }

  /** identity.apply with the record's identity; E_IDENTITY_REFUSED if the guest refuses it or is past that generation. */
  private async sendIdentity(generation: number, timeoutMs = 120_000): Promise<AppliedIdentity> {
    const id = this.record.identity;
    if (!id) throw new VmError('E_NO_VM', `${this.name} has no identity to apply (a template takes its own at boot)`);
    const applied = await (await this.agent()).call('identity.apply', identityArgs(id, generation), timeoutMs).catch((e) => {
      throw new VmError('E_IDENTITY_REFUSED', `${this.name}: the guest refused its identity: ${(e as Error).message}`, {
        cause: e,
        hint: 'the agent names the field it refused',
      });
    });
    if (!applied.applied)
      throw new VmError('E_IDENTITY_REFUSED', `${this.name}: the agent is already at generation ${applied.generation}; identity ${generation} was not applied`);
    this.record.generation = generation;
    return applied;
  }

  /** Its serial console log so far (QEMU appends to it in the jail). */
  async consoleLog(): Promise<string> {
    const file = vmPaths(this.name, vmsDir()).console;
    return readFile(file, 'utf8').catch((e) => {
      throw new VmError('E_NO_VM', `no console log for ${this.name} (${file})`, { hint: 'scion ls', cause: e });
    });
  }

  /** A connection to its serial console, which QEMU serves on a socket in the jail; the caller owns it. */
  async openConsole(): Promise<Socket> {
    const sockPath = vmPaths(this.name, vmsDir()).consoleSocket;
    if (!this.running() || !existsSync(sockPath))
      throw new VmError('E_VM_NOT_RUNNING', `VM ${this.name} is not running (its console log is ${vmPaths(this.name, vmsDir()).console})`);
    const sock = connect(sockPath);
    await new Promise<void>((res, rej) => {
      sock.once('connect', res);
      sock.once('error', (e) => rej(new VmError('E_CONNECT', `cannot connect to ${sockPath}: ${e.message}`)));
    });
    return sock;
  }

  /** Close the QMP connection only (QEMU serves one monitor client at a time); the agent's stays. */
  closeMonitor(): void {
    this.#qmp?.close();
    this.#qmp = undefined;
  }

  /** Close the connections this handle holds (the VM runs on). */
  close(): void {
    this.#qmp?.close();
    this.#agent?.close();
    this.#qmp = undefined;
    this.#agent = undefined;
  }

  /**
   * Plug a read-only disk image into a free hotplug port of the running VM
   * (a pod's container rootfs: shim/; hotplug.ts). The guest finds it by `serial`.
   */
  attachDisk(file: string, serial: string): Promise<{ port: string }> {
    return attachDisk(this, file, serial);
  }

  /** Unplug a disk attachDisk plugged (the guest must have let go of it), and remove its file. */
  detachDisk(serial: string, timeoutMs = 20_000): Promise<void> {
    return detachDisk(this, serial, timeoutMs);
  }

  /**
   * A byte stream to a process in the guest (stream-ports.ts): a virtio-serial
   * port named for `key` and `fd`, whose unix socket (returned) QEMU listens on.
   */
  async addStreamPort(key: string, fd: StreamFd): Promise<{ port: string; socket: string }> {
    this.assertRunning('add a stream port to');
    return addStreamPort(await this.qmp(), vmPaths(this.name, vmsDir()).jail, this.name, key, fd);
  }

  /** Remove a stream port addStreamPort made (gone already: done). */
  async removeStreamPort(key: string, fd: StreamFd): Promise<void> {
    await removeStreamPort(await this.qmp(), key, fd);
  }

  /** Stop its QEMU (the run directory stays). */
  async stop(): Promise<void> {
    this.close();
    await quitQemu(this.name, this.record);
  }

  /** Stop and remove it: QEMU, tap, reservations, run directory (and a template's directory). */
  async remove(o: { force?: boolean } = {}): Promise<void> {
    this.close();
    await removeVm(this.name, o);
  }

  // ---- construction ----

  /** The one construction path; undoes everything it made if any step fails. */
  private static async construct(plan: Plan): Promise<Machine> {
    const record = await plan.claim();
    const m = new Machine(record);
    const cred = credOf(record);
    const netns = netnsOf(record.netMode);
    let proc: QemuProcess | undefined;
    try {
      await writeRecord(record);
      const files = await plan.files(record, cred);
      const tap = await tapFor(record.netMode, cred);
      if (tap) {
        record.desc.net = { mode: 'bridge', tap };
        await writeRecord(record); // before QEMU: removing the VM deletes the tap its record names
      }
      if (plan.lineup && JSON.stringify(deviceLineup(record.desc)) !== JSON.stringify(plan.lineup))
        throw new VmError('E_TEMPLATE_LINEUP', `${record.template ?? record.name}: the template was frozen with another device line-up`, {
          hint: 'freeze it again with this scion',
        });
      const p = vmPaths(m.name, vmsDir());
      proc = await spawnQemu(record.desc, { jail: p.jail, cred, netns, files });
      record.pid = proc.pid;
      await writeRecord(record);
      m.#qmp = await connectQmp(m.name, p.qmp, proc, plan.qmpTimeoutMs);
      plan.mark?.('spawn');
      if (plan.restore) {
        await restoreFromFd(m.#qmp, m.name, proc, plan.restore.ignoreShared);
        plan.mark?.('restore');
      }
      if (plan.resume && plan.restore) {
        await m.#qmp.execute('cont');
        plan.mark?.('resume');
      }
      await plan.finish(internalsOf(m), proc);
      return m;
    } catch (e) {
      m.close();
      if (proc) {
        killPid(proc.pid);
        await exitOf(proc);
      }
      const err =
        e instanceof ScionError
          ? e
          : proc?.isDead()
            ? qemuDied(m.name, proc, plan.doing)
            : new VmError(plan.restore ? 'E_FORK_FAILED' : 'E_BOOT_FAILED', `${m.name}: ${(e as Error).message}`, { cause: e });
      if (!plan.keepOnFailure)
        await removeVm(m.name, { force: true }).catch(() => undefined); // ours, made by this call; gc finds it if this fails too
      else if (record.desc.net.mode === 'bridge') await deleteTap(record.desc.net.tap, netns).catch(() => undefined); // best effort: the construction's own error is what the caller needs
      throw err;
    }
  }

  /** Mark construction done: clear `making`, keep timings. */
  private async finished(timings: Record<string, number>): Promise<void> {
    this.record.making = undefined;
    this.record.timings = timings;
    await writeRecord(this.record);
  }

  /** Boot a template VM from a built image and wait for its agent's ready (and, unless skipped, give it the template identity). */
  static async boot(img: ImageArtifacts, o: BootOptions = {}): Promise<Machine> {
    return Machine.construct(await bootPlan(img, o));
  }

  /**
   * Fork one running clone, named <prefix>-c<n>, of a frozen template (its
   * name, checked first, or a template already checked): mapped
   * copy-on-write, restored, resumed, re-identified. (`fork` makes N.)
   */
  static async fork(template: string | FrozenTemplate, o: Omit<CloneOptions, 'prefix'> & { prefix: string }): Promise<Machine> {
    const tpl = typeof template === 'string' ? await checkTemplate(template) : template;
    return Machine.construct(await forkPlan(tpl, { ...o, prefix: validName(o.prefix, 'clone prefix') }));
  }

  /**
   * Fill the pool of `template` up to `size` paused, ready forks (node-pool.ts).
   * One filler per template at a time: with another at work this returns 0 at
   * once. Returns the number of VMs it added.
   */
  static fillPool(template: string, o: PoolFillOptions): Promise<number> {
    return fillPool(template, o);
  }

  /** A paused fork out of the pool of `template`, made the caller's (node-pool.ts); undefined when the pool has none. */
  static claimPooled(template: string, o: PoolClaimOptions): Promise<Machine | undefined> {
    return claimPooled(template, o);
  }

  /**
   * Freeze this running template: the agent prepares, the CPU stops, device
   * state goes to the template directory (RAM stays in the memory file), QEMU
   * quits (freeze.ts). Returns the template's metadata.
   */
  freeze(img: ImageArtifacts, log?: (m: string) => void): Promise<TemplateMeta> {
    return freezeTemplate(this, img, log);
  }

  /** Hibernate this running clone: its state (the RAM that differs from its template) saved on disk, its QEMU ended (hibernate.ts). */
  hibernate(log?: (m: string) => void): Promise<HibernateResult> {
    return hibernateClone(this, log);
  }

  /** Bring the hibernated clone `name` back: restored over its template's memory, its agent reached, its clock corrected (hibernate.ts). */
  static resumeHibernated(name: string, log?: (m: string) => void): Promise<Machine> {
    return resumeHibernated(name, log);
  }

  /** Freeze this running clone as a new template `newName`, a fork of a fork (freeze.ts). */
  freezeAsTemplate(newName: string, log?: (m: string) => void): Promise<TemplateMeta> {
    return freezeCloneAsTemplate(this, newName, log);
  }

  static {
    internalsOf = (m) => ({
      m,
      get record() {
        return m.record;
      },
      setAgent: (a) => {
        m.#agent = a;
      },
      assertRunning: (doing) => m.assertRunning(doing),
      sendIdentity: (generation, timeoutMs) => m.sendIdentity(generation, timeoutMs),
      finished: (timings) => m.finished(timings),
    });
    constructMachine = (plan) => Machine.construct(plan);
  }
}
