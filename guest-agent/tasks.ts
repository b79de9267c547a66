/**
 * Tasks: the containers of a containerd pod (shim/). Each arrives as an OCI
 * runtime config from the host and a read-only erofs disk (its rootfs) the
 * host plugged in after the fork; it runs under crun over an overlay
 * (the image stays read-only and shared, writes stay in the guest). Its
 * stdio are virtio-serial ports the host hot-added for it (ports.ts): crun,
 * and so the container, gets the ports' devices as its descriptors, and its
 * bytes never pass through the agent. Its end is a `task-exit` event that
 * says how many bytes each output port had queued for the host, so the host
 * knows when it has them all. Execs run in it by crun exec.
 */
import { sleep, type AttachedChild, type Child, type Platform } from './platform.ts';
import type { ShellWorker } from './shell.ts';
import { ProtocolError } from './protocol.ts';
import { StreamPorts } from './ports.ts';
import {
  ID,
  SERIAL,
  CRUN_PATH,
  SCRIPT_BIN,
  POD_PID_HOLDER,
  taskPaths,
  mountScript,
  unmountScript,
  stdioArg,
  onTerminal,
  resizeArgv,
  withPidNamespace,
  hasOwnPidNamespace,
  crunGlobalArgs,
} from './task-spec.ts';
import { childOf, namespacePids, usageOf } from './procfs.ts';

import type { AgentEventName, AgentEvents, TaskStats, TaskStdio } from '../common/agent-protocol.ts';

/**
 * `terminal`: it runs on a pty (util-linux script holds the pty's master side; its child, the pty's first user).
 * `outputs`: the devices of its stdout and stderr ports, whose counters its exit reports.
 */
interface Proc {
  execId: string;
  child: AttachedChild;
  pid?: number;
  exitCode?: number;
  terminal: boolean;
  outputs: { stdout?: string; stderr?: string };
}
/** `ownPidNs`: it runs in a pid namespace of its own, which tells its processes apart (no cgroup needed) */
interface Task {
  id: string;
  device: string;
  ownPidNs: boolean;
  terminal: boolean;
  init?: Proc;
  starting?: boolean;
  execs: Map<string, Proc>;
  /** exec ids taken by an exec still starting (its ports being waited for): not given twice */
  startingExecs: Set<string>;
}

export class TaskRunner {
  private readonly tasks = new Map<string, Task>();
  /** the process whose children live in the pod's pid namespace (made at the first container that shares it) */
  private podPidHolder?: Child;

  private readonly ports: StreamPorts;

  constructor(
    private readonly p: Platform,
    private readonly shell: ShellWorker,
    private readonly emit: <E extends AgentEventName>(e: E, d: AgentEvents[E]) => void,
    readonly crunBin = 'crun',
  ) {
    this.ports = new StreamPorts(p, shell);
  }

  private get(id: string): Task {
    const t = this.tasks.get(id);
    if (!t) throw new ProtocolError('E_NO_TASK', `no task "${String(id).slice(0, 130)}"`);
    return t;
  }

  /** The guest's device for the disk the host plugged in with this serial (waits for the hotplug to be seen). */
  private async deviceFor(serial: string, timeoutMs = 10_000): Promise<string> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      try {
        for (const d of this.p.readdir('/sys/block')) {
          let s = '';
          try {
            s = this.p.readText(`/sys/block/${d}/serial`).trim();
          } catch {
            continue;
          } // not virtio-blk
          if (s === serial) return `/dev/${d}`;
        }
      } catch {
        /* no sysfs: reported below */
      }
      if (Date.now() > end) throw new ProtocolError('E_NO_DISK', `no disk with serial ${serial} appeared within ${timeoutMs} ms`);
      await sleep(this.p, 10);
    }
  }

  async create(
    a: Record<string, unknown>,
  ): Promise<{ id: string; device: string; rootfs: string; stepsMs: { device: number; mount: number; podPid: number } }> {
    const id = String(a.id ?? '');
    if (!ID.test(id)) throw new ProtocolError('E_BAD_ARGS', 'id: 1-128 letters, digits, _ . - (starting with a letter or digit)');
    if (a.terminal === true) this.assertTerminal();
    if (this.tasks.has(id)) throw new ProtocolError('E_BAD_ARGS', `task ${id} exists already`);
    const serial = String(a.disk ?? '');
    if (!SERIAL.test(serial)) throw new ProtocolError('E_BAD_ARGS', 'disk: the serial of a plugged-in disk (1-20 lowercase letters, digits, -)');
    if (!a.spec || typeof a.spec !== 'object' || Array.isArray(a.spec)) throw new ProtocolError('E_BAD_ARGS', 'spec: an OCI runtime config object');
    const t0 = this.p.monotonic();
    const device = await this.deviceFor(serial);
    const t1 = this.p.monotonic();
    const paths = taskPaths(id);
    await this.shell.runOrThrow(mountScript(id, device), `mounting the rootfs of task ${id}`);
    const t2 = this.p.monotonic();
    const spec: Record<string, unknown> = { ...(a.spec as Record<string, unknown>), root: { path: paths.rootfs, readonly: false } };
    if (a.podPid === true) spec.linux = withPidNamespace(spec.linux as Record<string, unknown> | undefined, await this.podPidNamespace());
    const t3 = this.p.monotonic();
    this.p.writeText(paths.config, JSON.stringify(spec));
    this.tasks.set(id, { id, device, ownPidNs: hasOwnPidNamespace(spec), terminal: a.terminal === true, execs: new Map(), startingExecs: new Set() });
    return { id, device, rootfs: paths.rootfs, stepsMs: { device: Math.round(t1 - t0), mount: Math.round(t2 - t1), podPid: Math.round(t3 - t2) } };
  }

  /** Report a process's end, with the bytes its output ports had queued for the host by then. */
  private watch(id: string, proc: Proc) {
    void proc.child.exited.then((code) => {
      proc.exitCode = code;
      // every writer of the ports is gone (crun and the container's processes): these counts are final
      const sent: { stdout?: number; stderr?: number } = {};
      for (const k of ['stdout', 'stderr'] as const) {
        const dev = proc.outputs[k];
        const n = dev ? this.ports.stats(dev)?.bytesSent : undefined;
        if (n !== undefined) sent[k] = n;
      }
      this.emit('task-exit', { id, execId: proc.execId, exitCode: code, pid: proc.pid ?? 0, exitedAt: Date.now(), sent });
    });
  }

  /**
   * The descriptors a process runs on: each stream's port (an input port once
   * its host side is connected), else /dev/null. The caller closes them once
   * the process started.
   */
  private async openStdio(stdio: TaskStdio | undefined): Promise<{ fds: [number, number, number]; outputs: Proc['outputs'] }> {
    const fds: number[] = [];
    const outputs: Proc['outputs'] = {};
    try {
      for (const k of ['stdin', 'stdout', 'stderr'] as const) {
        const name = stdio?.[k];
        const how = k === 'stdin' ? 'read' : 'write';
        if (!name) {
          fds.push(this.p.openFd('/dev/null', how));
          continue;
        }
        let dev: string;
        try {
          dev = await this.ports.wait(String(name), { connected: k === 'stdin' });
        } catch (e) {
          throw new ProtocolError('E_NO_STREAM_PORT', `stdio.${k}: ${(e as Error).message}`);
        }
        fds.push(this.p.openFd(`/dev/${dev}`, how));
        if (k !== 'stdin') outputs[k] = dev;
      }
    } catch (e) {
      for (const fd of fds) this.p.closeFd(fd);
      throw e;
    }
    return { fds: fds as [number, number, number], outputs };
  }

  /**
   * Start crun (run or exec) on the task's stdio ports. `proc` is there at
   * once (the caller records it before waiting, so a second start is
   * refused); `started` resolves with the container process's pid once crun's
   * pid file names it (0 if crun ended first).
   */
  private async launch(
    id: string,
    execId: string,
    argv: string[],
    pidFile: string,
    terminal: boolean,
    stdio: TaskStdio | undefined,
    record: (p: Proc) => void,
  ): Promise<number> {
    const { fds, outputs } = await this.openStdio(stdio);
    let child: AttachedChild;
    try {
      child = this.p.spawnAttached(terminal ? onTerminal(argv) : argv, fds);
    } finally {
      for (const fd of fds) this.p.closeFd(fd);
    }
    const proc: Proc = { execId, terminal, child, outputs };
    record(proc);
    this.watch(id, proc);
    return (proc.pid = await this.pidFrom(pidFile, child));
  }

  private async pidFrom(file: string, child: AttachedChild): Promise<number> {
    for (let i = 0; i < 400; i++) {
      try {
        const n = Number(this.p.readText(file).trim());
        if (n > 0) return n;
      } catch {
        /* not written yet */
      }
      const done = await Promise.race([child.exited.then(() => true), sleep(this.p, 10).then(() => false)]);
      if (done) return 0;
    }
    return 0;
  }

  async start(a: Record<string, unknown>): Promise<{ id: string; pid: number }> {
    const t = this.get(String(a.id));
    if (t.init || t.starting) throw new ProtocolError('E_BAD_ARGS', `task ${t.id} was started already`);
    const paths = taskPaths(t.id);
    t.starting = true;
    try {
      const pid = await this.launch(
        t.id,
        '',
        [this.crunBin, ...crunGlobalArgs(t.ownPidNs), 'run', '--no-pivot', '--pid-file', paths.pidFile, '--bundle', paths.dir, t.id],
        paths.pidFile,
        t.terminal,
        stdioArg(a.stdio),
        (p) => (t.init = p),
      );
      return { id: t.id, pid };
    } finally {
      t.starting = false;
    }
  }

  async exec(a: Record<string, unknown>): Promise<{ id: string; execId: string; pid: number }> {
    const t = this.get(String(a.id));
    const execId = String(a.execId ?? '');
    if (!ID.test(execId) || t.execs.has(execId) || t.startingExecs.has(execId))
      throw new ProtocolError('E_BAD_ARGS', 'execId: a new id (1-128 letters, digits, _ . -)');
    if (!a.process || typeof a.process !== 'object') throw new ProtocolError('E_BAD_ARGS', 'process: an OCI process object');
    if (a.terminal === true) this.assertTerminal();
    const file = `${taskPaths(t.id).dir}/exec-${execId}.json`;
    const pidFile = `${taskPaths(t.id).dir}/exec-${execId}.pid`;
    this.p.writeText(file, JSON.stringify({ ...(a.process as object), terminal: false }));
    t.startingExecs.add(execId);
    try {
      const pid = await this.launch(
        t.id,
        execId,
        [this.crunBin, 'exec', '--process', file, '--pid-file', pidFile, t.id],
        pidFile,
        a.terminal === true,
        stdioArg(a.stdio),
        (p) => t.execs.set(execId, p),
      );
      return { id: t.id, execId, pid };
    } finally {
      t.startingExecs.delete(execId);
    }
  }

  private proc(a: Record<string, unknown>): { t: Task; proc: Proc } {
    const t = this.get(String(a.id));
    const execId = String(a.execId ?? '');
    const proc = execId ? t.execs.get(execId) : t.init;
    if (!proc?.child) throw new ProtocolError('E_NO_TASK', `task ${t.id} has no ${execId ? `exec ${execId}` : 'started process'}`);
    return { t, proc };
  }

  async kill(a: Record<string, unknown>): Promise<{ id: string; signal: number }> {
    const { t, proc } = this.proc(a);
    const signal = Number(a.signal ?? 15);
    if (!Number.isInteger(signal) || signal < 1 || signal > 64) throw new ProtocolError('E_BAD_ARGS', 'signal: 1..64');
    if (proc.exitCode !== undefined) return { id: t.id, signal };
    if (proc === t.init && a.all === true && t.ownPidNs) {
      for (const pid of namespacePids(this.p, t.init?.pid)) this.p.kill(pid, signal);
    } else if (proc === t.init) {
      const r = await this.p.run([this.crunBin, 'kill', ...(a.all === true ? ['--all'] : []), t.id, String(signal)], { timeoutMs: 10_000 });
      if (r.exitCode !== 0 && proc.exitCode === undefined) throw new ProtocolError('E_INTERNAL', `crun kill ${t.id}: ${r.stderr.trim().slice(0, 300)}`);
    } else if (proc.pid) {
      this.p.kill(proc.pid, signal);
    }
    return { id: t.id, signal };
  }

  /** Before a template is frozen: make the pod's pid namespace if this guest can run tasks (crun is there). */
  async prepare(): Promise<void> {
    if (this.p.exists(CRUN_PATH)) await this.podPidNamespace();
  }

  /** The path of the pod's pid namespace, made on first use (unshare's child, the reaper, is its pid 1). */
  private async podPidNamespace(): Promise<string> {
    if (!this.podPidHolder) {
      const holder = (this.podPidHolder = this.p.spawn(POD_PID_HOLDER));
      void holder.exited.then(() => {
        if (this.podPidHolder === holder) this.podPidHolder = undefined;
      });
    }
    // the namespace of unshare's child, its pid 1, once it runs: a container joining before would become pid 1 itself
    const own = this.p.readlink('/proc/self/ns/pid');
    for (let i = 0; i < 500 && this.podPidHolder; i++) {
      const reaper = childOf(this.p, this.podPidHolder.pid);
      const path = reaper ? `/proc/${reaper}/ns/pid` : undefined;
      const ns = path ? this.p.readlink(path) : undefined;
      if (path && ns && ns !== own) return path;
      await sleep(this.p, 10);
    }
    throw new ProtocolError('E_INTERNAL', "the pod's pid namespace could not be made (busybox unshare --pid)");
  }

  private assertTerminal(): void {
    if (!this.p.exists(SCRIPT_BIN)) throw new ProtocolError('E_NO_TERMINAL', `a terminal needs ${SCRIPT_BIN} in the image (Debian package bsdutils)`);
  }

  /** Size the pty a process runs on (found as script's child's stdin). */
  async resize(a: Record<string, unknown>): Promise<{ id: string; tty: string }> {
    const { t, proc } = this.proc(a);
    const width = Number(a.width),
      height = Number(a.height);
    if (![width, height].every((n) => Number.isInteger(n) && n >= 1 && n <= 65535)) throw new ProtocolError('E_BAD_ARGS', 'width, height: 1..65535');
    if (!proc.terminal) throw new ProtocolError('E_BAD_ARGS', `${proc.execId || t.id} has no terminal`);
    if (proc.exitCode !== undefined) return { id: t.id, tty: '' }; // ended: nothing to size (a late resize is no fault)
    // script's child (crun) has the pty on its stdin
    const child = childOf(this.p, proc.child.pid);
    const fd0 = child ? this.p.readlink(`/proc/${child}/fd/0`) : undefined;
    const tty = fd0 && /^\/dev\/pts\/[0-9]+$/.test(fd0) ? fd0 : undefined;
    if (!tty) throw new ProtocolError('E_NO_TASK', `${proc.execId || t.id}: its terminal is gone`);
    const r = await this.p.run(resizeArgv(tty, width, height), { timeoutMs: 10_000 });
    if (r.exitCode !== 0) throw new ProtocolError('E_INTERNAL', `stty ${tty}: ${r.stderr.trim().slice(0, 200)}`);
    return { id: t.id, tty };
  }

  async pids(a: Record<string, unknown>): Promise<{ id: string; pids: number[] }> {
    const t = this.get(String(a.id));
    if (t.ownPidNs) return { id: t.id, pids: namespacePids(this.p, t.init?.pid) };
    const r = await this.p.run([this.crunBin, 'ps', '--format', 'json', t.id], { timeoutMs: 10_000 });
    let pids: number[] = [];
    try {
      pids = JSON.parse(r.stdout);
    } catch {
      /* not running: none */
    }
    return { id: t.id, pids: Array.isArray(pids) ? pids.filter((x) => typeof x === 'number') : [] };
  }

  /** What the task's processes use now: their CPU time and resident memory, summed (procfs.ts). */
  async stats(a: Record<string, unknown>): Promise<TaskStats> {
    const { id, pids } = await this.pids(a);
    return usageOf(this.p, id, pids);
  }

  async delete(a: Record<string, unknown>): Promise<{ id: string; exitCode?: number }> {
    const t = this.get(String(a.id));
    await this.p.run([this.crunBin, 'delete', '--force', t.id], { timeoutMs: 10_000 });
    if (t.init && t.init.exitCode === undefined) await Promise.race([t.init.child.exited, sleep(this.p, 5000)]);
    await this.shell.run(unmountScript(t.id));
    this.tasks.delete(t.id);
    return { id: t.id, exitCode: t.init?.exitCode };
  }
}
