/**
 * The Task service containerd calls (containerd.task.v2.Task). A shim
 * serves one pod: a VM forked from a frozen template through the host
 * library's Machine. Its tasks are
 * - the pod sandbox (CRI: annotation io.kubernetes.cri.container-type =
 *   sandbox): the VM itself; no process runs for it, its pid is QEMU's, it
 *   ends when killed;
 * - the pod's containers (container-type = container, same sandbox-id):
 *   each rootfs packed to erofs and hot-plugged, run by the agent under crun;
 * - a lone task (`ctr run`: no CRI annotations): a pod of its own.
 * Stdio goes between containerd's FIFOs and virtio-serial ports hot-added
 * per stream (stdio.ts), never through the agent; exits come from the
 * agent's task-exit events, told once the process's output is all written.
 * The pod's VM (pool, fork, cold boot, template, refill) is pod.ts's; what is
 * kept of each task and process, process.ts's; this module is the handler
 * table and what ties them together.
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { streamKey } from '../host/runtime.ts';
import { TtrpcError, Code, type TypedHandlers } from './ttrpc.ts';
import type { TaskMethods } from './proto/task-types.ts';
import type { EventPublisher } from './events.ts';
import { guestSpec, podDns, podNetns, type OciSpec } from './spec.ts';
import { PodVm, VM_FILE, vmFileLine } from './pod.ts';
import { packRootfs, type Mount } from './rootfs.ts';
import { ProcessStdio } from './stdio.ts';
import { Status, newProc, type Proc, type Task } from './process.ts';
export { Status } from './process.ts';
import { any, timestamp } from './proto.ts';
import type { AgentEvents, TaskStats } from '../common/agent-protocol.ts';
import { HOSTNAME_PATTERN } from '../common/contracts.ts';

export { CRI_TYPE, CRI_SANDBOX, TEMPLATE_ANNOTATION, IMAGE_ANNOTATION, BOOT_ANNOTATION, taskKind, type TaskKind } from './kinds.ts';
import { taskKind } from './kinds.ts';

/** The cgroup v2 metrics message containerd reads a task's stats as (`ctr tasks metrics`, CRI's ContainerStats). */
export const METRICS_TYPE = 'io.containerd.cgroups.v2.Metrics';

/** A task's usage in the guest as cgroup v2 metrics: its processes' CPU time and resident memory, the VM's memory the limit. Pure. */
export function metricsOf(s: TaskStats): Record<string, unknown> {
  const cpu = Math.round(s.cpuUserUsec + s.cpuSystemUsec);
  return {
    pids: { current: s.pids, limit: 0 },
    cpu: { usageUsec: cpu, userUsec: Math.round(s.cpuUserUsec), systemUsec: Math.round(s.cpuSystemUsec) },
    memory: { anon: s.anonBytes, file: s.fileBytes, usage: s.memoryBytes, usageLimit: s.limitBytes },
  };
}

/** The serial the guest finds a task's rootfs disk by (virtio-blk serials hold 20 bytes). Pure. */
export function diskSerial(id: string): string {
  return `r${createHash('sha256').update(id).digest('hex').slice(0, 16)}`;
}

export interface ShimOptions {
  namespace: string;
  publisher: EventPublisher;
  template: string;
  workDir: string;
  log: (m: string) => void;
  onShutdown: () => void;
  /** told when a pool refill ends (the shim may have become idle) */
  onIdleChange?: () => void;
}

export class TaskService {
  private readonly tasks = new Map<string, Task>();
  /** the pod's VM, its template and the node's pool (pod.ts) */
  private readonly pod: PodVm;

  constructor(private readonly o: ShimOptions) {
    this.vmGone = new Promise((r) => {
      this.markVmGone = r;
    });
    this.pod = new PodVm({
      template: o.template,
      log: o.log,
      onIdleChange: o.onIdleChange,
      onEvent: (e) => this.onAgentEvent(e),
      // the VM went away under the pod: every process of it ended, as if SIGKILLed
      onGone: () => {
        this.markVmGone();
        for (const t of this.tasks.values()) for (const p of t.procs.values()) this.ended(t, p, 137, Date.now());
      },
    });
  }

  /** Wait for a pool refill under way (a shim about to exit lets it finish: the VM it makes is not the pod's). */
  settled(): Promise<void> {
    return this.pod.settled();
  }

  private task(id: string): Task {
    const t = this.tasks.get(id);
    if (!t) throw new TtrpcError(Code.NOT_FOUND, `task ${id} not found`);
    return t;
  }

  private proc(id: string, execId: string): { t: Task; p: Proc } {
    const t = this.task(id);
    const p = t.procs.get(execId);
    if (!p) throw new TtrpcError(Code.NOT_FOUND, `${id}: no ${execId ? `exec ${execId}` : 'process'}`);
    return { t, p };
  }

  /** Resolved when the pod's VM went away: output still awaited from it never comes. */
  private vmGone!: Promise<void>;
  private markVmGone!: () => void;

  /**
   * A process ended: its output written out (all `sent` bytes came), then
   * containerd told, its waiters released.
   */
  private ended(t: Task, p: Proc, exitCode: number, exitedAt: number, sent?: { stdout?: number; stderr?: number }) {
    if (p.status === Status.STOPPED) return;
    p.status = Status.STOPPED;
    p.exitStatus = exitCode;
    p.exitedAt = exitedAt;
    const drained = p.io ? p.io.drain(sent, this.vmGone).catch((e) => this.o.log(`output of ${p.execId || t.id}: ${(e as Error).message}`)) : Promise.resolve();
    void drained
      .then(() =>
        this.o.publisher.publish('/tasks/exit', { containerId: t.id, id: p.execId || t.id, pid: p.pid, exitStatus: exitCode, exitedAt: timestamp(exitedAt) }),
      )
      .then(() => p.resolveExit());
  }

  private onAgentEvent = (e: { event: string; data: unknown }) => {
    if (e.event === 'task-exit') {
      const d = e.data as AgentEvents['task-exit'];
      const t = this.tasks.get(d.id);
      const p = t?.procs.get(d.execId);
      if (t && p) this.ended(t, p, d.exitCode, d.exitedAt, d.sent);
    }
  };

  /** The process's streams as ports on the pod's VM, joined to containerd's FIFOs (none wanted: none made). */
  private async openStdio(t: Task, p: Proc): Promise<void> {
    const t0 = performance.now();
    p.io = await ProcessStdio.open(this.pod.machine!, streamKey(t.id, p.execId), p, (m) => this.o.log(`${p.execId || t.id} ${m}`));
    if (Object.keys(p.io.stdio).length)
      this.o.log(`${p.execId || t.id}: stdio ports (${Object.keys(p.io.stdio).join(', ')}) added in ${(performance.now() - t0).toFixed(0)} ms`);
  }

  /** A container's rootfs into the pod's VM and its config into the agent. */
  private async createContainer(t: Task, config: OciSpec, rootfs: Mount[], terminal: boolean): Promise<void> {
    const m = this.pod.machine!;
    const t0 = performance.now();
    const image = await packRootfs(rootfs, this.o.workDir);
    const t1 = performance.now();
    try {
      await m.attachDisk(image, t.disk!);
    } catch (e) {
      await rm(image, { force: true });
      throw e;
    }
    const t2 = performance.now();
    const { spec, dropped, podPid } = guestSpec(config, { hostname: m.info().identity?.hostname });
    if (dropped.length) this.o.log(`${t.id}: left out in the guest: ${dropped.join('; ')}`);
    try {
      const made = await this.pod.agent!.call(
        'task.create',
        { id: t.id, disk: t.disk!, spec, terminal: terminal || undefined, podPid: podPid || undefined },
        60_000,
      );
      const s = made.stepsMs;
      this.o.log(
        `${t.id}: rootfs packed in ${(t1 - t0).toFixed(0)} ms, plugged in ${(t2 - t1).toFixed(0)} ms, created in the guest in ${(performance.now() - t2).toFixed(0)} ms${s ? ` (disk seen after ${s.device} ms, mounted in ${s.mount} ms${s.podPid ? `, the pod's pid namespace joined in ${s.podPid} ms` : ''})` : ''}`,
      );
    } catch (e) {
      // the pod lives on: its hotplug port and the disk file go back (a lone task's VM goes whole, by the caller)
      await m.detachDisk(t.disk!).catch((d) => this.o.log(`unplugging ${t.id}'s rootfs: ${(d as Error).message}`));
      throw e;
    }
  }

  readonly handlers: TypedHandlers<TaskMethods> = {
    Create: async (req) => {
      if (this.tasks.has(req.id)) throw new TtrpcError(Code.ALREADY_EXISTS, `task ${req.id} exists`);
      const config = JSON.parse(await readFile(join(req.bundle, 'config.json'), 'utf8')) as OciSpec;
      const { kind } = taskKind(config.annotations);
      if (kind === 'container' && !this.pod.machine) throw new TtrpcError(Code.FAILED_PRECONDITION, `${req.id}: its pod sandbox is not served by this shim`);
      const t: Task = { id: req.id, bundle: req.bundle, kind, procs: new Map(), disk: kind === 'sandbox' ? undefined : diskSerial(req.id) };
      this.tasks.set(t.id, t);
      try {
        // a pod sandbox's VM takes the pod's hostname (a DNS label, as Kubernetes gives it)
        const hostname = kind === 'sandbox' && typeof config.hostname === 'string' && HOSTNAME_PATTERN.test(config.hostname) ? config.hostname : undefined;
        const netns = kind === 'sandbox' ? podNetns(config) : undefined;
        // a pod on its own network resolves names as its DNS config says (containerd wrote it as the pod's resolv.conf)
        const dns = netns ? await podDns(config) : undefined;
        const m = await this.pod.get(config.annotations ?? {}, hostname, netns, dns);
        // the pod's owners (its sandbox, or a lone task) name its VM for `delete` after a crash; a container does not
        if (kind !== 'container') await writeFile(join(req.bundle, VM_FILE), vmFileLine(m.name, m.info().identity?.vmgenid));
        if (kind !== 'sandbox') await this.createContainer(t, config, req.rootfs, req.terminal === true);
      } catch (e) {
        this.tasks.delete(t.id);
        if (!this.tasks.size) await this.teardown();
        if (e instanceof TtrpcError) throw e;
        throw new TtrpcError(Code.INTERNAL, `${req.id}: ${(e as Error).message}`);
      }
      const p = newProc(t, '', req);
      if (kind === 'sandbox') p.pid = this.pod.machine!.info().pid ?? 0; // the pod is the VM: its process is QEMU
      await this.o.publisher.publish('/tasks/create', {
        containerId: req.id,
        bundle: req.bundle,
        rootfs: req.rootfs,
        io: { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: false },
        pid: p.pid,
      });
      return { pid: p.pid };
    },
    Start: async (r) => {
      const execId = r.execId;
      const { t, p } = this.proc(r.id, execId);
      if (t.kind === 'sandbox') {
        p.status = Status.RUNNING;
      } else {
        await this.openStdio(t, p);
        const t0 = performance.now();
        const stdio = p.io!.stdio;
        let res: { pid: number };
        try {
          res = execId
            ? await this.pod.agent!.call('task.exec', { id: t.id, execId, process: p.spec!, terminal: p.terminal || undefined, stdio }, 60_000)
            : await this.pod.agent!.call('task.start', { id: t.id, stdio }, 60_000);
        } catch (e) {
          await p.io!.close();
          p.io = undefined;
          throw e;
        }
        p.pid = res.pid;
        this.o.log(`${execId || t.id}: started in the guest in ${(performance.now() - t0).toFixed(0)} ms`);
        // the pool is refilled a little after the pod's first container started: not while it starts serving
        if (!execId) this.pod.containerStarted();
        if (p.status !== Status.STOPPED) p.status = Status.RUNNING;
      }
      if (execId) await this.o.publisher.publish('/tasks/exec-started', { containerId: t.id, execId, pid: p.pid });
      else await this.o.publisher.publish('/tasks/start', { containerId: t.id, pid: p.pid });
      return { pid: p.pid };
    },
    Exec: async (req) => {
      const t = this.task(req.id);
      if (t.kind === 'sandbox') throw new TtrpcError(Code.FAILED_PRECONDITION, `${t.id} is a pod sandbox: exec in one of its containers`);
      if (t.procs.has(req.execId)) throw new TtrpcError(Code.ALREADY_EXISTS, `exec ${req.execId} exists`);
      const p = newProc(t, req.execId, req);
      p.spec = JSON.parse(Buffer.from(req.spec.value).toString('utf8'));
      await this.o.publisher.publish('/tasks/exec-added', { containerId: t.id, execId: req.execId });
      return {};
    },
    State: (r) => {
      const { t, p } = this.proc(r.id, r.execId);
      return {
        id: p.execId || t.id,
        bundle: t.bundle,
        pid: p.pid,
        status: p.status,
        stdin: p.stdin,
        stdout: p.stdout,
        stderr: p.stderr,
        terminal: false,
        exitStatus: p.exitStatus,
        exitedAt: timestamp(p.exitedAt ?? 0),
        execId: p.execId,
      };
    },
    Wait: async (r) => {
      const { p } = this.proc(r.id, r.execId);
      await p.exited;
      return { exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) };
    },
    Kill: async (r) => {
      const execId = r.execId;
      const { t, p } = this.proc(r.id, execId);
      const signal = r.signal || 15;
      if (p.status === Status.STOPPED) return {};
      // the sandbox ends when told to: its containers' processes stay until they are killed or the VM goes
      if (t.kind === 'sandbox') {
        this.ended(t, p, 128 + signal, Date.now());
        return {};
      }
      if (p.status !== Status.RUNNING) return {};
      await this.pod.agent!.call('task.kill', { id: t.id, execId: execId || undefined, signal, all: r.all }, 15_000);
      return {};
    },
    Pids: async (r) => {
      const t = this.task(r.id);
      if (t.kind === 'sandbox') return { processes: [{ pid: t.procs.get('')?.pid ?? 0 }] };
      const res = await this.pod.agent!.call('task.pids', { id: t.id }, 15_000);
      return { processes: res.pids.map((pid: number) => ({ pid })) };
    },
    CloseIO: async (r) => {
      const execId = r.execId;
      const { p } = this.proc(r.id, execId);
      if (r.stdin) p.io?.closeInput();
      return {};
    },
    Stats: async (r) => {
      const t = this.task(r.id);
      if (t.kind === 'sandbox') throw new TtrpcError(Code.UNIMPLEMENTED, `${t.id} is a pod sandbox (its VM): ask for the stats of its containers`);
      const s = await this.pod.agent!.call('task.stats', { id: t.id }, 15_000);
      return { stats: any(METRICS_TYPE, metricsOf(s)) };
    },
    ResizePty: async (r) => {
      const execId = r.execId;
      const { t, p } = this.proc(r.id, execId);
      if (!p.terminal || t.kind === 'sandbox') throw new TtrpcError(Code.FAILED_PRECONDITION, `${execId || t.id} has no terminal`);
      if (p.status === Status.STOPPED) return {}; // ended: a resize that comes late sizes nothing
      await this.pod.agent!.call('task.resize', { id: t.id, execId: execId || undefined, width: r.width, height: r.height }, 15_000);
      return {};
    },
    Delete: async (r) => {
      const execId = r.execId;
      const { t, p } = this.proc(r.id, execId);
      const answer = { pid: p.pid, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) };
      if (execId) {
        t.procs.delete(execId);
        await p.io?.close();
        return answer;
      }
      // the pod's VM goes with its sandbox (CRI) or its only task (ctr): its ports then go with it
      const vmGoes = t.kind !== 'container' || (this.tasks.size === 1 && this.tasks.has(t.id));
      for (const x of t.procs.values()) await x.io?.close(!vmGoes);
      if (t.kind !== 'sandbox' && this.pod.machine) {
        try {
          await this.pod.agent?.call('task.delete', { id: t.id }, 20_000);
        } catch (e) {
          this.o.log(`task.delete ${t.id}: ${(e as Error).message}`);
        }
        // a pod that lives on gets its hotplug port back; a VM that goes takes the disk with it
        if (t.kind === 'container' && !vmGoes)
          await this.pod.machine.detachDisk(t.disk!).catch((e) => this.o.log(`unplugging ${t.id}'s rootfs: ${(e as Error).message}`));
      }
      this.tasks.delete(t.id);
      if (vmGoes) await this.teardown();
      await this.o.publisher.publish('/tasks/delete', { containerId: t.id, id: t.id, pid: p.pid, exitStatus: p.exitStatus, exitedAt: answer.exitedAt });
      return answer;
    },
    Connect: (r) => ({ shimPid: process.pid, taskPid: this.tasks.get(r.id)?.procs.get('')?.pid ?? 0, version: '2' }),
    Shutdown: () => {
      if (this.tasks.size) return {}; // containerd asks after each delete; the shim stays while it has a task
      setTimeout(() => this.o.onShutdown(), 10);
      return {};
    },
  };

  /** The shim is going (SIGTERM, or its containerd is gone): the pod's VM and what the shim holds handed back (pod.ts). */
  async shutdown(): Promise<void> {
    await this.pod.shutdown();
  }

  /** Whether it serves no task (and is not making its pod VM). */
  idle(): boolean {
    return !this.tasks.size && !this.pod.busy();
  }

  /** The pod VM and everything of it go. */
  async teardown(): Promise<void> {
    await this.pod.teardown();
  }
}
