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
 */
import { open, readFile, rm, writeFile } from 'node:fs/promises';
import { constants } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Machine, loadImage, streamKey, type AgentClient } from '../host/runtime.ts';
import { TtrpcError, Code, type Handler } from './ttrpc.ts';
import type { EventPublisher } from './events.ts';
import { guestSpec, parseResolvConf, resolvConfSource, type OciSpec } from './spec.ts';
import type { DnsConfig } from '../common/contracts.ts';
import { packRootfs, type Mount } from './rootfs.ts';
import { ProcessStdio } from './stdio.ts';
import { any, timestamp } from './proto.ts';
import type { AgentEvents, TaskStats } from '../common/agent-protocol.ts';
import { HOSTNAME_PATTERN } from '../common/contracts.ts';

/** containerd.v1.types.Status */
export const Status = { UNKNOWN: 0, CREATED: 1, RUNNING: 2, STOPPED: 3 } as const;
/**
 * The file in a bundle naming the pod's VM, for `delete` after the shim is
 * gone: its name and its VM generation ID. Names are reused once a VM is
 * removed (a pooled VM may carry a gone pod's name), so `delete` removes a VM
 * only if its generation ID is the one written here.
 */
export const VM_FILE = 'scion-vm';

/** The VM_FILE line for a VM. Pure. */
export const vmFileLine = (name: string, vmgenid: string | undefined): string => `${name} ${vmgenid ?? '-'}\n`;

/** The VM name and generation ID a VM_FILE names; undefined if it is not such a line. Pure. */
export function parseVmFile(text: string): { name: string; vmgenid?: string } | undefined {
  const m = /^([a-z0-9][a-z0-9-]{0,62})(?: ([0-9a-f-]{36}|-))?\n?$/.exec(text);
  return m ? { name: m[1], vmgenid: m[2] && m[2] !== '-' ? m[2] : undefined } : undefined;
}
export { CRI_TYPE, CRI_SANDBOX, TEMPLATE_ANNOTATION, IMAGE_ANNOTATION, BOOT_ANNOTATION, taskKind, type TaskKind } from './kinds.ts';
import { TEMPLATE_ANNOTATION, IMAGE_ANNOTATION, BOOT_ANNOTATION, BOOT_MODES, bootMode, taskKind, imageAllowed, type TaskKind } from './kinds.ts';
import { config } from '../common/config.ts';
import { templateName } from '../common/names.ts';

/**
 * The network namespace CNI set up for a pod sandbox, by name (`ip netns`
 * keeps them in /var/run/netns): none for a pod on the node's network. Pure.
 */
export function podNetns(config: OciSpec): string | undefined {
  const ns = (config.linux?.namespaces ?? []).find((n: { type: string; path?: string }) => n.type === 'network' && n.path);
  const m = ns ? /^\/(?:var\/)?run\/netns\/([A-Za-z0-9_.-]{1,64})$/.exec(ns.path) : null;
  return m?.[1];
}

/** The DNS config containerd wrote for a pod (the file its config binds as /etc/resolv.conf; at most 64 KiB read). */
async function podDns(config: OciSpec): Promise<DnsConfig | undefined> {
  const src = resolvConfSource(config);
  if (!src) return undefined;
  const fh = await open(src, constants.O_RDONLY | constants.O_NOFOLLOW).catch(() => undefined);
  if (!fh) return undefined;
  try {
    const buf = Buffer.alloc(64 * 1024);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return parseResolvConf(buf.subarray(0, bytesRead).toString('utf8'));
  } finally {
    await fh.close();
  }
}

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

interface Proc {
  execId: string;
  pid: number;
  status: number;
  exitStatus: number;
  exitedAt?: number;
  stdin: string;
  stdout: string;
  stderr: string;
  /** on a pty in the guest (containerd then gives one output FIFO: stdout) */
  terminal: boolean;
  spec?: Record<string, unknown>;
  exited: Promise<void>;
  resolveExit: () => void;
  /** its streams' ports and FIFOs, from its start */
  io?: ProcessStdio;
}
interface Task {
  id: string;
  bundle: string;
  kind: TaskKind;
  procs: Map<string, Proc>;
  disk?: string;
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

/** The agent protocol a pod's VM must speak: 2 brought task stdio on ports of their own. */
const TASK_PROTOCOL = 2;

/** How long after its pod's VM is made a shim refills the pool if no container has started by then. */
const REFILL_AFTER_MS = 5000;
/** How long after the pod's first container started the pool is refilled (a fork takes the cores the container starts on). */
const REFILL_DELAY_MS = 1000;

export class TaskService {
  private machine?: Machine;
  private agent?: AgentClient;
  private forking?: Promise<Machine>;
  private readonly tasks = new Map<string, Task>();

  constructor(private readonly o: ShimOptions) {
    this.vmGone = new Promise((r) => {
      this.markVmGone = r;
    });
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

  private newProc(t: Task, execId: string, io: { stdin: string; stdout: string; stderr: string; terminal?: boolean }): Proc {
    let resolveExit!: () => void;
    const exited = new Promise<void>((r) => {
      resolveExit = r;
    });
    const p: Proc = {
      execId,
      pid: 0,
      status: Status.CREATED,
      exitStatus: 0,
      stdin: io.stdin,
      stdout: io.stdout,
      stderr: io.stderr,
      terminal: io.terminal === true,
      exited,
      resolveExit,
    };
    t.procs.set(execId, p);
    return p;
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
    p.io = await ProcessStdio.open(this.machine!, streamKey(t.id, p.execId), p, (m) => this.o.log(`${p.execId || t.id} ${m}`));
    if (Object.keys(p.io.stdio).length)
      this.o.log(`${p.execId || t.id}: stdio ports (${Object.keys(p.io.stdio).join(', ')}) added in ${(performance.now() - t0).toFixed(0)} ms`);
  }

  /**
   * The template a pod forks from: one made from the image its annotation
   * names (pulled, booted with a tap, frozen: once per node and image, named
   * after the image's manifest), else the one its annotation names, else the
   * shim's default.
   */
  private async templateFor(annotations: Record<string, string>): Promise<string> {
    const ref = annotations[IMAGE_ANNOTATION];
    if (!ref) return annotations[TEMPLATE_ANNOTATION] ?? this.o.template;
    if (annotations[TEMPLATE_ANNOTATION])
      throw new TtrpcError(Code.INVALID_ARGUMENT, `the annotations ${IMAGE_ANNOTATION} and ${TEMPLATE_ANNOTATION} name a pod's template two ways: keep one`);
    const allowed = config().shimImagePrefixes;
    if (!imageAllowed(ref, allowed))
      throw new TtrpcError(
        Code.PERMISSION_DENIED,
        `${IMAGE_ANNOTATION}: ${ref} is not under a reference this node allows (SCION_SHIM_IMAGES: ${allowed.length ? allowed.join(', ') : 'unset, so none'}); add its registry/repository prefix to SCION_SHIM_IMAGES in containerd's environment`,
      );
    // loaded only here: pulling and booting bring in what a fork does not need
    const { ensureTemplate } = await import('../host/index.ts');
    try {
      const t = await ensureTemplate(ref, {
        net: { mode: 'tap' },
        name: (img) => templateName(`${img.name.slice(0, 40)}-${img.manifestSha256.slice(0, 12)}`),
        log: (m) => this.o.log(`template of ${ref}: ${m}`),
      });
      return t.name;
    } catch (e) {
      const err = e as Error & { hint?: string };
      throw new TtrpcError(
        Code.FAILED_PRECONDITION,
        `cannot make a template of ${ref} (annotation ${IMAGE_ANNOTATION}): ${err.message}${err.hint ? ` (${err.hint})` : ''}`,
      );
    }
  }

  /** The pod's VM: made once, by its first task: out of the node's pool, else forked (or booted cold when asked). */
  private async pod(annotations: Record<string, string>, hostname?: string, netns?: string, dns?: DnsConfig): Promise<Machine> {
    if (this.machine) return this.machine;
    const mode = bootMode(annotations);
    if (!mode)
      throw new TtrpcError(
        Code.INVALID_ARGUMENT,
        `annotation ${BOOT_ANNOTATION}: ${JSON.stringify(annotations[BOOT_ANNOTATION])} is not one of ${BOOT_MODES.join(', ')}`,
      );
    this.forking ??= (async () => {
      const template = await this.templateFor(annotations);
      const pod = netns ? { netns, dev: 'eth0' } : undefined;
      const owner = { pid: process.pid, kind: 'shim' };
      const t0 = performance.now();
      const poolSize = config().shimPool;
      let how = mode === 'cold' ? 'booted' : 'forked';
      const make = async (): Promise<Machine> => {
        if (mode === 'cold') return this.coldBoot(template, { hostname, pod, owner, dns });
        const pooled = mode === 'pool' && poolSize > 0 ? await Machine.claimPooled(template, { hostname, pod, dns, owner, log: this.o.log }) : undefined;
        if (pooled) {
          how = 'taken from the pool';
          return pooled;
        }
        return Machine.forkTemplate(template, { prefix: 'pod', hostname, pod, owner, dns });
      };
      const m = await make().catch((e: Error & { hint?: string }) => {
        throw new TtrpcError(
          Code.FAILED_PRECONDITION,
          `cannot fork a pod VM from template ${template}: ${e.message}${e.hint ? ` (${e.hint}; the template comes from the annotation ${TEMPLATE_ANNOTATION}, else SCION_SHIM_TEMPLATE, else pod-tpl)` : ''}`,
        );
      });
      try {
        this.agent = await m.agent();
        // task stdio on ports needs an agent of protocol 2 (a template frozen with an older image's agent would lose every byte)
        if ((this.agent.protocol ?? 0) < TASK_PROTOCOL)
          throw new TtrpcError(
            Code.FAILED_PRECONDITION,
            `the agent of template ${template} speaks protocol ${this.agent.protocol ?? 'unknown'}; pods need ${TASK_PROTOCOL} (task stdio on ports): rebuild its image and freeze the template again`,
          );
      } catch (e) {
        await m.remove({ force: true }).catch(() => undefined);
        throw e;
      }
      this.o.log(`pod VM ${m.name} ${how} and its agent reached in ${(performance.now() - t0).toFixed(0)} ms`);
      this.agent.onEvent(this.onAgentEvent);
      // the VM went away under the pod (its QEMU killed, or removed): every process of it ended, as if SIGKILLed
      this.agent.onClosed(() => {
        if (this.machine !== m) return;
        this.markVmGone();
        for (const t of this.tasks.values()) for (const p of t.procs.values()) this.ended(t, p, 137, Date.now());
      });
      if (this.closing.signal.aborted) {
        await m.remove({ force: true }).catch(() => undefined);
        throw new TtrpcError(Code.UNAVAILABLE, 'the shim is shutting down');
      }
      this.machine = m;
      // the pool is refilled once this pod's first container has started (or a while after, if none does): off its path
      if (mode === 'pool' && poolSize > 0) {
        this.poolTemplate = template;
        this.refillIn(REFILL_AFTER_MS);
      }
      return m;
    })();
    try {
      return await this.forking;
    } finally {
      this.forking = undefined;
    }
  }

  private poolTemplate?: string;
  private refillTimer?: NodeJS.Timeout;
  private filling?: Promise<void>;

  /** Aborted when the shim goes: a refill under way stops, no pod VM is made any more. */
  private readonly closing = new AbortController();

  /** Refill the pool `ms` from now (the last call's time counts). */
  private refillIn(ms: number): void {
    if (this.closing.signal.aborted) return;
    clearTimeout(this.refillTimer);
    this.refillTimer = setTimeout(() => this.refillPool(), ms);
    this.refillTimer.unref();
  }

  /** Fill the node's pool of this pod's template (once per shim; another shim at it already makes this a no-op). */
  private refillPool(): void {
    clearTimeout(this.refillTimer);
    const template = this.poolTemplate;
    if (!template || this.filling) return;
    this.poolTemplate = undefined;
    const t0 = performance.now();
    this.filling = Machine.fillPool(template, { size: config().shimPool, prefix: 'pod', log: this.o.log, signal: this.closing.signal })
      .then((n) => {
        if (n) this.o.log(`pool of ${template}: ${n} VM${n > 1 ? 's' : ''} added in ${(performance.now() - t0).toFixed(0)} ms`);
      })
      .catch((e) => this.o.log(`pool of ${template} not refilled: ${(e as Error).message}`))
      .finally(() => {
        this.filling = undefined;
        this.o.onIdleChange?.();
      });
  }

  /** Wait for a pool refill under way (a shim about to exit lets it finish: the VM it makes is not the pod's). */
  async settled(): Promise<void> {
    clearTimeout(this.refillTimer);
    await this.filling;
  }

  /**
   * No template: boot the template's image afresh for this pod (annotation
   * io.scion.boot: cold), as a VM runtime without templating does: the
   * baseline bench:cri compares the fork with.
   */
  private async coldBoot(
    template: string,
    o: { hostname?: string; pod?: { netns: string; dev: string }; owner: { pid: number; kind: string }; dns?: DnsConfig },
  ): Promise<Machine> {
    const tpl = await Machine.find(template);
    if (!tpl) throw new TtrpcError(Code.FAILED_PRECONDITION, `no template ${template} to take the image of`);
    const img = await loadImage(tpl.info().image);
    tpl.close();
    return Machine.boot(img, {
      name: `pod-cold-${randomBytes(4).toString('hex')}`,
      hostname: o.hostname,
      net: o.pod ? { mode: 'pod', ...o.pod } : undefined,
      owner: o.owner,
      dns: o.dns,
    });
  }

  /** A container's rootfs into the pod's VM and its config into the agent. */
  private async createContainer(t: Task, config: OciSpec, rootfs: Mount[], terminal: boolean): Promise<void> {
    const m = this.machine!;
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
      const made = await this.agent!.call(
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

  readonly handlers: Record<string, Handler> = {
    Create: async (r) => {
      const req = r as { id: string; bundle: string; rootfs: Mount[]; terminal: boolean; stdin: string; stdout: string; stderr: string };
      if (this.tasks.has(req.id)) throw new TtrpcError(Code.ALREADY_EXISTS, `task ${req.id} exists`);
      const config = JSON.parse(await readFile(join(req.bundle, 'config.json'), 'utf8')) as OciSpec;
      const { kind } = taskKind(config.annotations);
      if (kind === 'container' && !this.machine) throw new TtrpcError(Code.FAILED_PRECONDITION, `${req.id}: its pod sandbox is not served by this shim`);
      const t: Task = { id: req.id, bundle: req.bundle, kind, procs: new Map(), disk: kind === 'sandbox' ? undefined : diskSerial(req.id) };
      this.tasks.set(t.id, t);
      try {
        // a pod sandbox's VM takes the pod's hostname (a DNS label, as Kubernetes gives it)
        const hostname = kind === 'sandbox' && typeof config.hostname === 'string' && HOSTNAME_PATTERN.test(config.hostname) ? config.hostname : undefined;
        const netns = kind === 'sandbox' ? podNetns(config) : undefined;
        // a pod on its own network resolves names as its DNS config says (containerd wrote it as the pod's resolv.conf)
        const dns = netns ? await podDns(config) : undefined;
        const m = await this.pod(config.annotations ?? {}, hostname, netns, dns);
        // the pod's owners (its sandbox, or a lone task) name its VM for `delete` after a crash; a container does not
        if (kind !== 'container') await writeFile(join(req.bundle, VM_FILE), vmFileLine(m.name, m.info().identity?.vmgenid));
        if (kind !== 'sandbox') await this.createContainer(t, config, req.rootfs, req.terminal === true);
      } catch (e) {
        this.tasks.delete(t.id);
        if (!this.tasks.size) await this.teardown();
        if (e instanceof TtrpcError) throw e;
        throw new TtrpcError(Code.INTERNAL, `${req.id}: ${(e as Error).message}`);
      }
      const p = this.newProc(t, '', req);
      if (kind === 'sandbox') p.pid = this.machine!.info().pid ?? 0; // the pod is the VM: its process is QEMU
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
      const execId = String(r.execId ?? '');
      const { t, p } = this.proc(String(r.id), execId);
      if (t.kind === 'sandbox') {
        p.status = Status.RUNNING;
      } else {
        await this.openStdio(t, p);
        const t0 = performance.now();
        const stdio = p.io!.stdio;
        let res: { pid: number };
        try {
          res = execId
            ? await this.agent!.call('task.exec', { id: t.id, execId, process: p.spec!, terminal: p.terminal || undefined, stdio }, 60_000)
            : await this.agent!.call('task.start', { id: t.id, stdio }, 60_000);
        } catch (e) {
          await p.io!.close();
          p.io = undefined;
          throw e;
        }
        p.pid = res.pid;
        this.o.log(`${execId || t.id}: started in the guest in ${(performance.now() - t0).toFixed(0)} ms`);
        // the pool is refilled a little after the pod's first container started: not while it starts serving
        if (!execId && this.poolTemplate) this.refillIn(REFILL_DELAY_MS);
        if (p.status !== Status.STOPPED) p.status = Status.RUNNING;
      }
      if (execId) await this.o.publisher.publish('/tasks/exec-started', { containerId: t.id, execId, pid: p.pid });
      else await this.o.publisher.publish('/tasks/start', { containerId: t.id, pid: p.pid });
      return { pid: p.pid };
    },
    Exec: async (r) => {
      const req = r as { id: string; execId: string; terminal: boolean; stdin: string; stdout: string; stderr: string; spec: { value: Buffer } };
      const t = this.task(req.id);
      if (t.kind === 'sandbox') throw new TtrpcError(Code.FAILED_PRECONDITION, `${t.id} is a pod sandbox: exec in one of its containers`);
      if (t.procs.has(req.execId)) throw new TtrpcError(Code.ALREADY_EXISTS, `exec ${req.execId} exists`);
      const p = this.newProc(t, req.execId, req);
      p.spec = JSON.parse(Buffer.from(req.spec.value).toString('utf8'));
      await this.o.publisher.publish('/tasks/exec-added', { containerId: t.id, execId: req.execId });
      return {};
    },
    State: (r) => {
      const { t, p } = this.proc(String(r.id), String(r.execId ?? ''));
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
      const { p } = this.proc(String(r.id), String(r.execId ?? ''));
      await p.exited;
      return { exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) };
    },
    Kill: async (r) => {
      const execId = String(r.execId ?? '');
      const { t, p } = this.proc(String(r.id), execId);
      const signal = Number(r.signal) || 15;
      if (p.status === Status.STOPPED) return {};
      // the sandbox ends when told to: its containers' processes stay until they are killed or the VM goes
      if (t.kind === 'sandbox') {
        this.ended(t, p, 128 + signal, Date.now());
        return {};
      }
      if (p.status !== Status.RUNNING) return {};
      await this.agent!.call('task.kill', { id: t.id, execId: execId || undefined, signal, all: r.all === true }, 15_000);
      return {};
    },
    Pids: async (r) => {
      const t = this.task(String(r.id));
      if (t.kind === 'sandbox') return { processes: [{ pid: t.procs.get('')?.pid ?? 0 }] };
      const res = await this.agent!.call('task.pids', { id: t.id }, 15_000);
      return { processes: res.pids.map((pid: number) => ({ pid })) };
    },
    CloseIO: async (r) => {
      const execId = String(r.execId ?? '');
      const { p } = this.proc(String(r.id), execId);
      if (r.stdin) p.io?.closeInput();
      return {};
    },
    Stats: async (r) => {
      const t = this.task(String(r.id));
      if (t.kind === 'sandbox') throw new TtrpcError(Code.UNIMPLEMENTED, `${t.id} is a pod sandbox (its VM): ask for the stats of its containers`);
      const s = await this.agent!.call('task.stats', { id: t.id }, 15_000);
      return { stats: any(METRICS_TYPE, metricsOf(s)) };
    },
    ResizePty: async (r) => {
      const execId = String(r.execId ?? '');
      const { t, p } = this.proc(String(r.id), execId);
      if (!p.terminal || t.kind === 'sandbox') throw new TtrpcError(Code.FAILED_PRECONDITION, `${execId || t.id} has no terminal`);
      if (p.status === Status.STOPPED) return {}; // ended: a resize that comes late sizes nothing
      await this.agent!.call('task.resize', { id: t.id, execId: execId || undefined, width: Number(r.width), height: Number(r.height) }, 15_000);
      return {};
    },
    Delete: async (r) => {
      const execId = String(r.execId ?? '');
      const { t, p } = this.proc(String(r.id), execId);
      const answer = { pid: p.pid, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) };
      if (execId) {
        t.procs.delete(execId);
        await p.io?.close();
        return answer;
      }
      for (const x of t.procs.values()) await x.io?.close();
      if (t.kind !== 'sandbox' && this.machine) {
        try {
          await this.agent?.call('task.delete', { id: t.id }, 20_000);
        } catch (e) {
          this.o.log(`task.delete ${t.id}: ${(e as Error).message}`);
        }
        if (t.kind === 'container') await this.machine.detachDisk(t.disk!).catch((e) => this.o.log(`unplugging ${t.id}'s rootfs: ${(e as Error).message}`));
      }
      this.tasks.delete(t.id);
      // the pod's VM goes with its sandbox (CRI) or its only task (ctr)
      if (t.kind !== 'container' || !this.tasks.size) await this.teardown();
      await this.o.publisher.publish('/tasks/delete', { containerId: t.id, id: t.id, pid: p.pid, exitStatus: p.exitStatus, exitedAt: answer.exitedAt });
      return answer;
    },
    Connect: (r) => ({ shimPid: process.pid, taskPid: this.tasks.get(String(r.id))?.procs.get('')?.pid ?? 0, version: '2' }),
    Shutdown: () => {
      if (this.tasks.size) return {}; // containerd asks after each delete; the shim stays while it has a task
      setTimeout(() => this.o.onShutdown(), 10);
      return {};
    },
  };

  /**
   * The shim is going (SIGTERM, or its containerd is gone): hand back what it
   * holds. A refill under way stops after the fork it is in (that VM is
   * removed; VMs already pooled are the node's and stay), a pod VM being made
   * is removed once made, the pod's VM goes. Its tasks' processes end with it.
   */
  async shutdown(): Promise<void> {
    this.closing.abort();
    clearTimeout(this.refillTimer);
    this.poolTemplate = undefined;
    await this.forking?.catch(() => undefined);
    await this.filling;
    await this.teardown();
  }

  /** Whether it serves no task (and is not making its pod VM). */
  idle(): boolean {
    return !this.tasks.size && !this.forking && !this.filling;
  }

  /** The pod VM and everything of it go. */
  async teardown(): Promise<void> {
    const m = this.machine;
    this.machine = undefined;
    if (!m) return;
    await m.remove({ force: true }).catch((e: Error & { code?: string }) => {
      if (e.code !== 'E_NO_VM') throw e;
    }); // gone already: nothing to do
    m.close();
  }
}
