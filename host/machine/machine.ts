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
import { chmod, chown, copyFile, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { constants, existsSync, readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join, resolve as resolvePath } from 'node:path';
import { VmError, ScionError } from '../../common/errors.ts';
import { config } from '../../common/config.ts';
import { validName, templateName, templateBase, type ValidName } from '../../common/names.ts';
import type { Identity } from '../../common/contracts.ts';
import type { AppliedIdentity } from '../../common/agent-protocol.ts';
import { AgentClient } from '../agent-client.ts';
import type { ImageArtifacts } from '../image.ts';
import { QmpClient } from '../qemu/qmp.ts';
import { deviceLineup, kernelStub, HOTPLUG_PORTS, type VmDescription, type Accel, type NetConfig } from '../qemu/argv.ts';
import { chooseAccel, qemuVersion } from '../qemu/accel.ts';
import {
  spawnQemu,
  connectQmp,
  restoreFromFd,
  migrateToFile,
  exitOf,
  killPid,
  waitDead,
  isQemuIn,
  qemuDied,
  processAlive,
  type Credentials,
  type QemuFiles,
  type QemuProcess,
} from '../qemu/process.ts';
import { vmPaths, vmsDir, templatePaths } from '../store/dirs.ts';
import { writeRecord, writeTemplateMeta, readRecord, TEMPLATE_FORMAT, VM_FORMAT, type VmRecord, type TemplateMeta } from '../store/records.ts';
import { slotName, release } from '../store/slots.ts';
import { allocateIdentity, withPodNetwork, withDns, type CloneIdentity } from './identity.ts';
import type { DnsConfig } from '../../common/contracts.ts';
import { syncGuestClock, measureOffset } from './clock.ts';
import {
  createTap,
  createPodTap,
  createLooseTap,
  movePodTap,
  hasTap,
  deleteTap,
  netParams,
  netnsOf,
  readPodNetwork,
  type NetMode,
  type PodNetSpec,
} from './net.ts';
import { POOL_OWNER, addEntry, dropClaim, readyEntries, takeEntry, takeFillLock } from '../store/pool.ts';
import { qcow2Overlay } from './disk.ts';
import { addStreamPort, removeStreamPort, type StreamFd } from './stream-ports.ts';
import { claimClone, claimNamed, reservePorts } from './claim.ts';
import { checkTemplate, makeTemplateDir, makeMemFile, memMode, baseDiskOf, templateDir, type FrozenTemplate } from './templates.ts';
import { readRecordOrThrow, removeVm, quitQemu, makingElsewhere } from './inventory.ts';

export type { TemplateMeta, NetMode, Accel, VmDescription, FrozenTemplate, CloneIdentity };
export { RecordError } from '../store/records.ts';
export { QmpError } from '../qemu/qmp.ts';

export interface Owner {
  pid: number;
  kind: string;
}

export interface BootOptions {
  name?: string;
  net?: NetMode;
  accel?: Accel;
  timeoutMs?: number;
  log?: (m: string) => void;
  /** its hostname (default: the image's name) */
  hostname?: string;
  /** the resolver configuration it gets instead of its network's (a pod's) */
  dns?: DnsConfig;
  /** 'ram': an ordinary VM whose freeze saves RAM into the state stream (the baseline scion is compared with) */
  memory?: 'file' | 'ram';
  /** stop at the agent's boot ready, without the template identity (cold-boot measurements) */
  skipIdentity?: boolean;
  /** a qcow2 disk: the template writes to an overlay on it, clones to overlays on that */
  disk?: string;
  /** a process that owns this template (shown by ls; `scion gc` removes it once that process is gone) */
  owner?: Owner;
  /** keep a failed VM's run directory for inspection */
  keepOnFailure?: boolean;
}

export interface ForkOptions {
  /** clone names are <prefix>-c<index> */
  prefix: ValidName;
  /** hostname pattern with {n} for the clone index (default <template without -tpl>-{n}) */
  hostname?: string;
  owner?: Owner;
  keepOnFailure?: boolean;
  /** QEMU's TCG translation buffer (MiB); default SCION_TB_SIZE_MB, else QEMU's */
  tbSizeMB?: number;
  /** how long the agent may take to answer after the resume (default 30 s) */
  agentTimeoutMs?: number;
  /** a pod's network namespace (CNI's): the VM's tap goes there, joined to `dev`, and the VM takes its addresses */
  pod?: PodNetSpec;
  /** the resolver configuration the VM gets instead of its network's (a pod's) */
  dns?: DnsConfig;
  /**
   * Do not send identity.apply: the clone keeps the template's hostname,
   * machine-id, addresses and RNG state. Only for showing that an identity
   * test fails when re-identification is broken; never in real use.
   */
  skipIdentityApply?: boolean;
  log?: (m: string) => void;
}

export interface PoolFillOptions {
  /** how many ready VMs the pool holds */
  size: number;
  /** pooled VMs are named <prefix>-c<index> */
  prefix: string;
  log?: (m: string) => void;
  /** stops the fill: no fork starts after it, and a VM forked meanwhile is removed, not pooled */
  signal?: AbortSignal;
}

export interface PoolClaimOptions {
  /** its new hostname (default: the one it was pooled with) */
  hostname?: string;
  /** a pod's network namespace: the VM's tap moves there, and the VM takes the pod's addresses */
  pod?: PodNetSpec;
  dns?: DnsConfig;
  /** who owns it from now on (gc removes it once that process is gone) */
  owner?: Owner;
  log?: (m: string) => void;
}

/** What a caller may read of a VM (a copy of its record's public part). */
export interface MachineInfo {
  name: ValidName;
  role: 'template' | 'clone';
  pid?: number;
  accel: Accel;
  generation: number;
  template?: string;
  identity?: CloneIdentity;
  ports: Record<string, number>;
  netMode: NetMode;
  runDir: string;
  agentSocket: string;
  console: string;
  frozen: boolean;
  timings: Record<string, number>;
  /** the built image directory it was booted from */
  image: string;
  owner?: Owner;
  /** set while a scion process is still making it */
  making?: { ownerPid: number; phase: string };
}

/** One construction: what differs between boot, fork and making a template from a clone. */
interface Plan {
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
  finish(m: Machine, proc: QemuProcess): Promise<void>;
  keepOnFailure?: boolean;
  /** told when QEMU answers QMP ('spawn'), has loaded the state ('restore') and runs ('resume') */
  mark?(step: 'spawn' | 'restore' | 'resume'): void;
}

const credOf = (r: VmRecord): Credentials | undefined => (r.uid !== undefined && r.gid !== undefined ? { uid: r.uid, gid: r.gid } : undefined);

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
   * (a pod's container rootfs: shim/). The file is moved into the VM's jail,
   * the only place its QEMU can open anything, and given to the VM's uid,
   * read-only; the guest finds the disk by `serial` (/sys/block/vd*\/serial).
   */
  async attachDisk(file: string, serial: string): Promise<{ port: string }> {
    if (!/^[a-z0-9][a-z0-9-]{0,19}$/.test(serial))
      throw new VmError('E_DISK_ATTACH', `disk serial ${JSON.stringify(serial)}: 1-20 lowercase letters, digits or -`);
    this.assertRunning('attach a disk to');
    const name = `disk-${serial}.img`;
    const dest = join(vmPaths(this.name, vmsDir()).jail, name);
    await rename(file, dest).catch(async () => {
      await copyFile(file, dest, constants.COPYFILE_EXCL);
      await rm(file, { force: true });
    });
    const cred = credOf(this.record);
    if (cred) await chown(dest, cred.uid, cred.gid);
    await chmod(dest, 0o400);
    const qmp = await this.qmp();
    try {
      await qmp.execute('blockdev-add', {
        driver: 'raw',
        'node-name': `n-${serial}`,
        'read-only': true,
        file: { driver: 'file', filename: name, 'read-only': true },
      });
    } catch (e) {
      await rm(dest, { force: true });
      throw new VmError('E_DISK_ATTACH', `${this.name}: QEMU refused disk ${serial}: ${(e as Error).message}`);
    }
    const errors: string[] = [];
    for (const p of HOTPLUG_PORTS) {
      try {
        // slot 0 only: a root port's link holds one device (QEMU would take another at a slot the guest never sees)
        await qmp.execute('device_add', { driver: 'virtio-blk-pci', id: `d-${serial}`, drive: `n-${serial}`, bus: p.id, addr: '0', serial });
        return { port: p.id };
      } catch (e) {
        errors.push(`${p.id}: ${(e as Error).message}`);
      } // taken: the next port
    }
    await qmp.execute('blockdev-del', { 'node-name': `n-${serial}` }).catch(() => undefined);
    await rm(dest, { force: true });
    throw new VmError('E_DISK_ATTACH', `${this.name}: no free hotplug port for disk ${serial} (${errors.join('; ')})`, {
      hint: `a VM has ${HOTPLUG_PORTS.length} ports; detach a disk first`,
    });
  }

  /** Unplug a disk attach() plugged (the guest must have let go of it), and remove its file. */
  async detachDisk(serial: string, timeoutMs = 20_000): Promise<void> {
    const qmp = await this.qmp();
    const gone = qmp.waitEvent('DEVICE_DELETED', (e) => (e.data as { device?: string })?.device === `d-${serial}`, timeoutMs);
    try {
      await qmp.execute('device_del', { id: `d-${serial}` });
    } catch (e) {
      gone.catch(() => undefined);
      throw new VmError('E_DISK_DETACH', `${this.name}: ${(e as Error).message}`);
    }
    await gone;
    await qmp.execute('blockdev-del', { 'node-name': `n-${serial}` });
    await rm(join(vmPaths(this.name, vmsDir()).jail, `disk-${serial}.img`), { force: true });
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
      if (hasTap(record.netMode)) {
        const n = record.netMode;
        record.desc.net = {
          mode: 'bridge',
          tap: n.mode === 'pod' ? await createPodTap(n, cred) : n.mode === 'bridge' ? await createTap(n, cred) : await createLooseTap(cred),
        };
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
      await plan.finish(m, proc);
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
    const name = o.name !== undefined ? validName(o.name, 'template') : templateName(img.name);
    const accel = o.accel ? { accel: o.accel, reason: 'requested' } : await chooseAccel(img.vmlinuz, o.log);
    o.log?.(`accelerator: ${accel.accel} (${accel.reason})`);
    const netMode: NetMode = o.net ?? { mode: 'user' };
    const baseDisk = o.disk ? resolvePath(o.disk) : undefined;
    if (
      baseDisk &&
      !(await stat(baseDisk).then(
        (s) => s.isFile(),
        () => false,
      ))
    )
      throw new VmError('E_DISK', `disk ${o.disk} does not exist or is not a file`);
    // the template's own identity (index 0, generation 1): clones start from a known state; a pod's VM takes what CNI gave the pod
    const podNet = netMode.mode === 'pod' ? await readPodNetwork(netMode) : undefined;
    const id = withDns(withPodNetwork(allocateIdentity(0, o.hostname ?? img.name, undefined, netParams(netMode)), podNet), o.dns);
    const memory = o.memory ?? 'file';
    const timeout = o.timeoutMs ?? 180_000;
    return Machine.construct({
      doing: 'booting',
      qmpTimeoutMs: 10_000,
      resume: false,
      keepOnFailure: o.keepOnFailure,
      claim: () =>
        claimNamed(name, (cred) => ({
          format: VM_FORMAT,
          name,
          role: 'template',
          image: img.dir,
          accel: accel.accel,
          createdAt: new Date().toISOString(),
          generation: 0,
          ports: {},
          netMode,
          desc: {
            name,
            mode: 'template',
            accel: accel.accel,
            ramMB: img.ramMB,
            cpus: 1,
            memory,
            cmdline: img.cmdline,
            initrd: true,
            vmgenid: id.vmgenid,
            mac: id.mac,
            net: netMode.mode === 'user' ? { mode: 'user', guestIp: id.ip, forwards: [] } : { mode: 'none' },
            sandbox: true,
            disk: baseDisk ? { layers: ['base', 'template'] } : undefined,
          },
          uid: cred?.uid,
          gid: cred?.gid,
          slots: [],
          making: { ownerPid: process.pid, phase: 'boot' },
          owner: o.owner,
        })),
      files: async (_r, cred) => {
        const t = await makeTemplateDir(name);
        if (memory === 'file') await makeMemFile(t.mem, img.ramMB, cred?.gid);
        if (baseDisk) await qcow2Overlay(baseDisk, t.disk);
        return {
          mem: memory === 'file' ? t.mem : undefined,
          kernel: img.vmlinuz,
          initrd: img.initrd,
          diskBase: baseDisk,
          diskTemplate: baseDisk ? t.disk : undefined,
        };
      },
      finish: async (m, proc) => {
        const tSpawn = performance.now();
        const console = vmPaths(name, vmsDir()).console;
        const agent = new AgentClient(`${name}/agent`);
        m.#agent = agent;
        await agent.connect(vmPaths(name, vmsDir()).agent);
        const died = proc.exited.then(() => {
          throw new VmError(
            'E_BOOT_FAILED',
            `${name}: QEMU exited during boot${proc.stderrTail() ? ` (${proc.stderrTail()})` : ''}; console:\n${consoleTail(console)}`,
          );
        });
        died.catch(() => undefined); // raced below; a later exit is not this call's error
        await Promise.race([agent.sync(timeout), died]).catch((e) => {
          if (e instanceof VmError) throw e;
          throw new VmError('E_BOOT_TIMEOUT', `${name}: the agent did not answer within ${timeout / 1000} s; last console lines:\n${consoleTail(console)}`, {
            cause: e,
          });
        });
        const info = await agent.call('info');
        if (!info.lastReady) await agent.waitEvent('ready', () => true, timeout);
        const timings = { bootReadyMs: Math.round(performance.now() - tSpawn) };
        if (!o.skipIdentity) {
          const applied = await agent.call('identity.apply', identityArgs(id, 1));
          m.record.generation = applied.generation;
          // the clones' clock reference: the template's clock stepped onto the host's, and the RTC's phase against it
          const c = await syncGuestClock(agent);
          o.log?.(
            `guest clock was ${c.offsetMs.toFixed(0)} ms off (±${c.errorMs.toFixed(0)}); now ${c.after.offsetMs.toFixed(0)} ms (±${c.after.errorMs.toFixed(0)})${c.calibrationError ? `; its RTC keeper is off: ${c.calibrationError}` : ''}`,
          );
        }
        await m.finished(timings);
      },
    });
  }

  /** Fork one clone of the template named `template` (checked first), named <prefix>-c<n>. */
  static async forkTemplate(template: string, o: Omit<ForkOptions, 'prefix'> & { prefix: string }): Promise<Machine> {
    return Machine.fork(await checkTemplate(template), { ...o, prefix: validName(o.prefix, 'clone prefix') });
  }

  /** Fork one running clone of a frozen template: mapped copy-on-write, restored, resumed, re-identified. */
  static async fork(tpl: FrozenTemplate, o: ForkOptions): Promise<Machine> {
    const t0 = performance.now();
    const { meta, dir: tdir, files: t } = tpl;
    if (o.pod && meta.net.mode !== 'bridge' && meta.net.mode !== 'tap')
      throw new VmError(
        'E_NET',
        `${meta.name}: a pod's VM needs a template booted with a tap (networking \`tap\`, or scion up … --bridge BR), not ${meta.net.mode} networking`,
        { hint: "the tap in the pod's namespace must match the template's device line-up" },
      );
    const netMode: NetMode = o.pod ? { mode: 'pod', ...o.pod } : meta.net;
    // a pod's VM takes what CNI gave the pod's interface
    const podNet = o.pod ? await readPodNetwork(o.pod) : undefined;
    // host ports first (they go into the record the run directory is made with); only user-mode
    // networking forwards ports: a bridged clone is reached at its own address
    const ports = netMode.mode === 'user' ? await reservePorts(meta.ports.length, `${o.prefix}-c?`) : [];
    const forwards = ports.map((hostPort, i) => ({ guestPort: meta.ports[i], hostPort }));
    const tbSizeMB = o.tbSizeMB ?? config().tbSizeMB;
    const timings: Record<string, number> = {};
    let tm = t0;
    const mark = (k: string): void => {
      const n = performance.now();
      timings[k] = Math.round((n - tm) * 10) / 10;
      tm = n;
    };
    const generation = meta.generation + 1;
    const cloneDisk = (name: ValidName) => join(vmPaths(name, vmsDir()).dir, 'disk.qcow2');
    return Machine.construct({
      doing: 'restoring the template',
      qmpTimeoutMs: 30_000 /* generous: a loaded host starts QEMU slowly */,
      restore: { ignoreShared: meta.memory === 'file' },
      resume: true,
      lineup: meta.lineup,
      keepOnFailure: o.keepOnFailure,
      mark,
      claim: async () => {
        try {
          const r = await claimClone(
            o.prefix,
            (index, name) => {
              const id = withDns(
                withPodNetwork(allocateIdentity(index, o.hostname ?? `${templateBase(meta.name)}-{n}`, undefined, netParams(netMode)), podNet),
                o.dns,
              );
              const net: NetConfig = netMode.mode === 'user' ? { mode: 'user', guestIp: id.ip, forwards } : { mode: 'none' };
              return {
                format: VM_FORMAT,
                name,
                role: 'clone',
                image: meta.image,
                accel: meta.accel,
                createdAt: new Date().toISOString(),
                template: meta.name,
                generation: meta.generation,
                identity: id,
                ports: Object.fromEntries(forwards.map((f) => [String(f.guestPort), f.hostPort])),
                netMode,
                desc: {
                  name,
                  mode: 'clone',
                  accel: meta.accel,
                  ramMB: meta.ramMB,
                  cpus: 1,
                  memory: meta.memory,
                  cmdline: meta.cmdline,
                  initrd: false,
                  vmgenid: id.vmgenid,
                  mac: id.mac,
                  net,
                  incoming: true,
                  sandbox: true,
                  tbSizeMB,
                  disk: meta.disk ? { layers: ['base', 'template', 'clone'] } : undefined,
                },
                slots: ports.map((p) => slotName('port', p)),
                making: { ownerPid: process.pid, phase: 'fork' },
                owner: o.owner,
              };
            },
            meta.gid,
          );
          return r;
        } catch (e) {
          for (const p of ports) await release(slotName('port', p));
          throw e;
        }
      },
      files: async (r) => {
        if (meta.disk) await qcow2Overlay(join(tdir, meta.disk), cloneDisk(r.name as ValidName));
        return {
          mem: meta.memory === 'file' ? t.mem : undefined,
          kernel: join(tdir, meta.kernel),
          state: t.state,
          diskBase: meta.baseDisk,
          diskTemplate: meta.disk ? join(tdir, meta.disk) : undefined,
          diskClone: meta.disk ? cloneDisk(r.name as ValidName) : undefined,
        };
      },
      finish: async (m) => {
        const id = m.record.identity!;
        const agent = new AgentClient(`${m.name}/agent`);
        m.#agent = agent;
        await agent.connect(vmPaths(m.name, vmsDir()).agent);
        // identity.apply goes out once the sync is answered, not pipelined behind it: the host's
        // time in it is then taken while the agent reads, so the clock the agent steps from it is
        // not late by the resumed guest's first read (~250 ms here). Measured, 8 forks each: a
        // round trip more, and the clock check below no longer fires on an idle host.
        await agent.sync(o.agentTimeoutMs ?? 30_000).catch((e) => {
          throw new VmError('E_AGENT_TIMEOUT', `${m.name}: the agent did not answer after the resume (${(e as Error).message})`, { cause: e });
        });
        mark('agentSync');
        const applied = o.skipIdentityApply ? await agent.call('ping', {}).then(() => undefined) : await m.sendIdentity(generation);
        if (applied) timings.clockFix = await clockRightAtReady(agent, applied.time, Date.now());
        const s = applied?.stepsMs ?? {};
        timings.identity = s.identity ?? 0;
        timings.containers = (s.containers ?? 0) + (s.health ?? 0);
        timings.applyRoundTrip = Math.round((performance.now() - tm) * 10) / 10;
        timings.ready = Math.round((performance.now() - t0) * 10) / 10;
        m.record.generation = generation;
        await m.finished(timings);
        o.log?.(`forked ${m.name} (${id.hostname}, ${id.ip}) in ${timings.ready.toFixed(0)} ms`);
      },
    });
  }

  /**
   * Fill the pool of `template` up to `size` paused, ready forks (forked,
   * re-identified, then paused: no CPU while they wait). One filler per
   * template at a time: with another at work this returns 0 at once.
   * Returns the number of VMs it added.
   */
  static async fillPool(template: string, o: PoolFillOptions): Promise<number> {
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
  static async claimPooled(template: string, o: PoolClaimOptions): Promise<Machine | undefined> {
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
        await m.adopt(o);
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
  private async adopt(o: PoolClaimOptions): Promise<void> {
    const t0 = performance.now();
    const r = this.record;
    if (r.owner?.kind !== POOL_OWNER || !r.identity) throw new VmError('E_VM_BUSY', `${this.name} is not a pooled VM`);
    this.assertRunning('claim');
    let id: CloneIdentity = { ...r.identity, hostname: o.hostname ?? r.identity.hostname, rngSeed: randomBytes(32).toString('hex') };
    const tap = r.desc.net.mode === 'bridge' ? r.desc.net.tap : undefined;
    if (o.pod && !tap) throw new VmError('E_NET', `${this.name}: a pooled VM without a tap cannot join a pod's network`);
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
    await (await this.qmp()).execute('cont');
    const tResumed = performance.now();
    const applied = await this.sendIdentity(r.generation + 1);
    const clockFix = await clockRightAtReady(await this.agent(), applied.time, Date.now());
    r.timings = {
      claimNet: Math.round(tMoved - t0),
      resume: Math.round(tResumed - tMoved),
      identity: applied.stepsMs.identity ?? 0,
      clockFix,
      ready: Math.round(performance.now() - t0),
    };
    await writeRecord(r);
    o.log?.(`claimed pooled ${this.name} (${r.identity.hostname}, ${r.identity.ip}) in ${r.timings.ready} ms`);
  }

  /**
   * Freeze this running template: the agent prepares, the CPU stops, device
   * state goes to the template directory (RAM stays in the memory file), QEMU
   * quits. Returns the template's metadata.
   */
  async freeze(img: ImageArtifacts, log?: (m: string) => void): Promise<TemplateMeta> {
    const r = this.record;
    if (r.role !== 'template')
      throw new VmError('E_NO_VM', `${this.name} is a clone; freeze it as a new template with a name (scion freeze ${this.name} --name T)`);
    if (r.frozen) throw new VmError('E_FROZEN', `template ${this.name} is already frozen`, { hint: `scion fork ${this.name} -n 3` });
    const t = templatePaths(templateDir(this.name));
    const t0 = performance.now();
    const agent = await this.agent();
    const qmp = await this.qmp();
    await agent.call('freeze.prepare', {}, 120_000);
    const tPrepared = performance.now();
    await qmp.execute('stop');
    const shared = r.desc.memory !== 'ram';
    // shared: RAM stays in the memory file, only device state is saved; 'ram': the ordinary full snapshot
    await this.saveState(t.state, shared);
    const freezeMs = Math.round(performance.now() - tPrepared);
    await this.endAfterFreeze();
    if (shared) await chmod(t.mem, memMode());
    await writeFile(t.kernel, kernelStub(await readFile(img.vmlinuz)), { mode: 0o644, flag: constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL });
    if (r.desc.disk) await chmod(t.disk, 0o400); // now the base of every clone's overlay
    const meta: TemplateMeta = {
      format: TEMPLATE_FORMAT,
      memory: shared ? 'file' : 'ram',
      net: r.netMode,
      name: this.name,
      qemuVersion: await qemuVersion(),
      lineup: deviceLineup(r.desc),
      accel: r.accel,
      image: img.dir,
      manifestSha256: img.manifestSha256,
      kernel: 'kernel-stub',
      cmdline: r.desc.cmdline,
      ramMB: r.desc.ramMB,
      generation: r.generation,
      disk: r.desc.disk ? 'disk.qcow2' : undefined,
      baseDisk: r.desc.disk ? await baseDiskOf(t.disk) : undefined,
      gid: r.gid,
      frozenAt: new Date().toISOString(),
      freezeMs,
      ports: img.ports,
    };
    await writeTemplateMeta(t.dir, meta);
    r.frozen = true;
    r.pid = undefined;
    r.timings = { prepareMs: Math.round(tPrepared - t0), freezeMs };
    await writeRecord(r);
    log?.(`froze ${this.name} in ${freezeMs} ms (prepare ${Math.round(tPrepared - t0)} ms)`);
    return meta;
  }

  /**
   * Freeze this running clone as a new template `newName` (a fork of a
   * fork). A clone's RAM is a private copy-on-write mapping, so it is saved
   * whole, then loaded into a fresh shared memory file by a paused template
   * QEMU (constructed like any VM) that saves the device state the usual way.
   * The new template's clones carry the clone's generation + 1.
   */
  async freezeAsTemplate(newName: string, log?: (m: string) => void): Promise<TemplateMeta> {
    const r = this.record;
    const tname = validName(newName, 'template');
    if (r.role !== 'clone' || !r.template) throw new VmError('E_NO_VM', `no clone named ${this.name}`, { hint: 'scion ls' });
    if (r.desc.disk) throw new VmError('E_UNSUPPORTED', `${this.name} has a disk; freezing a clone with a disk is not supported yet`);
    this.assertRunning('freeze');
    const { meta: parent, dir: parentDir } = await checkTemplate(r.template);
    const t0 = performance.now();
    const desc: VmDescription = {
      ...r.desc,
      name: tname,
      mode: 'template',
      memory: 'file',
      incoming: true,
      initrd: false,
      tbSizeMB: undefined,
      net: r.desc.net.mode === 'user' ? { ...r.desc.net, forwards: [] } : r.desc.net,
    };
    let full: string | undefined;
    let meta: TemplateMeta | undefined;
    await Machine.construct({
      doing: `making the template from ${this.name}`,
      qmpTimeoutMs: 10_000,
      restore: { ignoreShared: false },
      resume: false,
      claim: () =>
        claimNamed(tname, (cred) => ({
          format: VM_FORMAT,
          name: tname,
          role: 'template',
          image: r.image,
          accel: r.accel,
          createdAt: new Date().toISOString(),
          generation: r.generation,
          ports: {},
          desc,
          netMode: r.netMode,
          uid: cred?.uid,
          gid: cred?.gid,
          slots: [],
          making: { ownerPid: process.pid, phase: 'freeze' },
        })),
      files: async (_nr, cred) => {
        const t = await makeTemplateDir(tname);
        full = join(t.dir, 'full-state');
        // 1. the running clone's whole RAM and devices, then it goes on running
        await this.saveWhole(full);
        await makeMemFile(t.mem, desc.ramMB, cred?.gid);
        return { mem: t.mem, kernel: join(parentDir, parent.kernel), state: full };
      },
      // 2. the loader, paused with the clone's RAM in the shared file, saves device state only
      finish: async (m) => {
        const t = templatePaths(templateDir(tname));
        await m.saveState(t.state, true);
        await m.endAfterFreeze();
        await rm(full!, { force: true });
        await chmod(t.mem, memMode());
        const freezeMs = Math.round(performance.now() - t0);
        await copyFile(join(parentDir, parent.kernel), t.kernel, constants.COPYFILE_EXCL);
        meta = {
          ...parent,
          name: tname,
          memory: 'file',
          kernel: 'kernel-stub',
          generation: r.generation,
          frozenAt: new Date().toISOString(),
          freezeMs,
          lineup: deviceLineup(desc),
          gid: m.record.gid,
        };
        await writeTemplateMeta(t.dir, meta);
        m.record.frozen = true;
        m.record.pid = undefined;
        await m.finished({ freezeMs });
        log?.(`froze clone ${this.name} as template ${tname} in ${freezeMs} ms`);
      },
    });
    return meta!;
  }

  /** Save this running VM's whole state (RAM included) to `dest`; it runs on afterwards. */
  private async saveWhole(dest: string): Promise<void> {
    const agent = await this.agent();
    const qmp = await this.qmp();
    await agent.call('freeze.prepare', {}, 120_000);
    await qmp.execute('stop');
    // a clone restored with x-ignore-shared on; its private RAM must now go into the stream
    try {
      await this.saveState(dest, false);
    } finally {
      await qmp.execute('cont');
      this.close();
    }
  }

  /**
   * Save this stopped VM's migration stream to `dest`: device state only
   * (`ignoreShared`: RAM stays in the shared memory file), or with its RAM.
   * The capability is set both ways: a clone was restored with it on.
   */
  private async saveState(dest: string, ignoreShared: boolean): Promise<void> {
    const qmp = await this.qmp();
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: ignoreShared }] });
    await migrateToFile(qmp, this.name, vmPaths(this.name, vmsDir()).jail, credOf(this.record), dest);
  }

  /** End this VM's QEMU after a freeze (its state is saved) and delete its tap; the run directory stays. */
  private async endAfterFreeze(): Promise<void> {
    await (await this.qmp()).execute('quit').catch(() => undefined); // QEMU may close the monitor before answering
    this.close();
    await waitDead(this.record.pid);
    if (this.record.desc.net.mode === 'bridge') await deleteTap(this.record.desc.net.tap, netnsOf(this.record.netMode));
  }
}

/**
 * A clone reports ready only with its clock within 100 ms of the host's. The
 * agent stepped it when the identity arrived, by the host's time in it; but
 * under TCG a freshly forked guest's clock then falls behind while it works
 * through its first second (measured: 20-76 ms behind at the answer, four
 * forks in a row on an idle host; more under load). Its answer carries its
 * clock: within CLOCK_READY_MS of the moment the answer came (the return trip
 * only makes it look further behind), nothing more is done; otherwise the
 * offset is measured over a few round trips and stepped away (~75 ms: a
 * phc_ctl exec in the guest). The clock keeper holds it to a few ms a second
 * later either way. Returns the ms spent.
 */
export const CLOCK_READY_MS = 80;
async function clockRightAtReady(agent: AgentClient, guestMs: number, receivedMs: number): Promise<number> {
  if (Math.abs(guestMs - receivedMs) <= CLOCK_READY_MS) return 0;
  const t0 = performance.now();
  const off = await measureOffset(agent, 3);
  if (Math.abs(off.offsetMs) > off.errorMs + 5) await agent.call('clock.step', { deltaMs: -off.offsetMs, calibrate: false }, 30_000);
  return Math.round(performance.now() - t0);
}

/** identity.apply's arguments for a clone identity. Pure. */
export function identityArgs(id: CloneIdentity, generation: number): Identity {
  return {
    generation,
    hostname: id.hostname,
    machineId: id.machineId,
    rngSeed: id.rngSeed,
    time: Date.now(),
    vmgenid: id.vmgenid,
    interfaces: [{ mac: id.mac, address: id.ip, prefix: id.prefix, gateway: id.gateway }],
    dns: id.dns,
    dnsSearch: id.dnsSearch,
    dnsOptions: id.dnsOptions,
  };
}

function consoleTail(file: string, lines = 15): string {
  try {
    return readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l.trim())
      .slice(-lines)
      .join('\n');
  } catch {
    return '(no console output)';
  } // QEMU died before writing any
}
