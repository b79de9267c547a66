/**
 * The Task service containerd calls (containerd.task.v2.Task): each task a
 * pod VM forked from a frozen template through the host library's Machine,
 * its rootfs a hot-plugged erofs disk, its process run by the guest agent
 * under crun, its stdio relayed between containerd's FIFOs and the agent's
 * task-output events / task.input. One shim process serves one task (and
 * its execs), as `ctr run` starts them.
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import { createReadStream, type WriteStream, createWriteStream } from 'node:fs';
import { join } from 'node:path';
import { Machine } from '../host/index.ts';
import type { AgentClient } from '../host/index.ts';
import { base64Decode, base64Encode } from '../common/base64.ts';
import { TtrpcError, Code, type Handler } from './ttrpc.ts';
import { EventPublisher } from './events.ts';
import { guestSpec } from './spec.ts';
import { packRootfs, type Mount } from './rootfs.ts';
import { timestamp, decode, type Msg } from './proto.ts';

/** containerd.v1.types.Status */
export const Status = { UNKNOWN: 0, CREATED: 1, RUNNING: 2, STOPPED: 3 } as const;
/** The file in the bundle naming the task's VM, for `delete` after the shim is gone. */
export const VM_FILE = 'scion-vm';

interface Proc {
  execId: string; pid: number; status: number; exitStatus: number; exitedAt?: number;
  stdin: string; stdout: string; stderr: string; terminal: boolean;
  spec?: Record<string, unknown>;
  exited: Promise<void>; resolveExit: () => void;
  out?: WriteStream; err?: WriteStream;
}

export interface ShimOptions { namespace: string; id: string; publisher: EventPublisher; template: string; workDir: string; log: (m: string) => void; onShutdown: () => void }

export class TaskService {
  private machine?: Machine;
  private agent?: AgentClient;
  private bundle = '';
  private readonly procs = new Map<string, Proc>();

  constructor(private readonly o: ShimOptions) {}

  private proc(execId: string): Proc {
    const p = this.procs.get(execId);
    if (!p) throw new TtrpcError(Code.NOT_FOUND, `${this.o.id}: no ${execId ? `exec ${execId}` : 'task'}`);
    return p;
  }

  private newProc(execId: string, io: { stdin: string; stdout: string; stderr: string; terminal: boolean }): Proc {
    let resolveExit!: () => void;
    const exited = new Promise<void>((r) => { resolveExit = r; });
    const p: Proc = { execId, pid: 0, status: Status.CREATED, exitStatus: 0, ...io, exited, resolveExit };
    this.procs.set(execId, p);
    return p;
  }

  /** Output FIFOs are opened for writing once (containerd holds their read ends). */
  private openOutputs(p: Proc) {
    if (p.stdout) p.out = createWriteStream(p.stdout, { flags: 'w' }).on('error', (e) => this.o.log(`stdout of ${p.execId || this.o.id}: ${e.message}`));
    if (p.stderr) p.err = createWriteStream(p.stderr, { flags: 'w' }).on('error', (e) => this.o.log(`stderr of ${p.execId || this.o.id}: ${e.message}`));
  }

  /** Relay the stdin FIFO to the process; its end closes the process's stdin. */
  private relayInput(p: Proc) {
    if (!p.stdin) return;
    const s = createReadStream(p.stdin);
    s.on('data', (c) => { void this.agent?.call('task.input', { id: this.o.id, execId: p.execId || undefined, data: base64Encode(c as Buffer) }).catch((e) => this.o.log(`stdin: ${e.message}`)); });
    s.on('end', () => { void this.agent?.call('task.input', { id: this.o.id, execId: p.execId || undefined, data: '', close: true }).catch(() => undefined); });
    s.on('error', (e) => this.o.log(`stdin of ${p.execId || this.o.id}: ${e.message}`));
  }

  private onAgentEvent = (e: { event: string; data: unknown }) => {
    if (e.event === 'task-output') {
      const d = e.data as { id: string; execId: string; stream: string; data: string };
      const p = d.id === this.o.id ? this.procs.get(d.execId) : undefined;
      (d.stream === 'stderr' ? p?.err : p?.out)?.write(base64Decode(d.data));
    } else if (e.event === 'task-exit') {
      const d = e.data as { id: string; execId: string; exitCode: number; exitedAt: number };
      const p = d.id === this.o.id ? this.procs.get(d.execId) : undefined;
      if (!p || p.status === Status.STOPPED) return;
      p.status = Status.STOPPED; p.exitStatus = d.exitCode; p.exitedAt = d.exitedAt;
      const closed = Promise.all([p.out, p.err].map((s) => s && new Promise((r) => s.end(r))));
      void closed.then(() => this.o.publisher.publish('/tasks/exit', { containerId: this.o.id, id: p.execId || this.o.id, pid: p.pid, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt!) })).then(() => p.resolveExit());
    }
  };

  readonly handlers: Record<string, Handler> = {
    Create: async (r) => {
      const req = r as { id: string; bundle: string; rootfs: Mount[]; terminal: boolean; stdin: string; stdout: string; stderr: string };
      if (req.terminal) throw new TtrpcError(Code.UNIMPLEMENTED, 'a terminal (tty) is not supported by the scion shim yet: run without -t');
      if (this.procs.has('')) throw new TtrpcError(Code.ALREADY_EXISTS, `task ${req.id} exists`);
      this.bundle = req.bundle;
      const config = JSON.parse(await readFile(join(req.bundle, 'config.json'), 'utf8'));
      const template = config.annotations?.['io.scion.template'] ?? this.o.template;
      // the fork and the packing of the rootfs go side by side; whatever fails, neither stays
      const [forked, packed] = await Promise.allSettled([
        Machine.forkTemplate(template, { prefix: 'pod', owner: { pid: process.pid, kind: 'shim' } }),
        packRootfs(req.rootfs, this.o.workDir),
      ]);
      if (forked.status === 'rejected' || packed.status === 'rejected') {
        if (forked.status === 'fulfilled') await forked.value.remove({ force: true }).catch(() => undefined);
        if (packed.status === 'fulfilled') await rm(packed.value, { force: true });
        if (forked.status === 'rejected') {
          const e = forked.reason as Error & { hint?: string };
          throw new TtrpcError(Code.FAILED_PRECONDITION, `cannot fork a pod VM from template ${template}: ${e.message}${e.hint ? ` (${e.hint}; the template comes from the annotation io.scion.template, else SCION_SHIM_TEMPLATE, else ${this.o.template})` : ''}`);
        }
        throw new TtrpcError(Code.INTERNAL, `cannot pack the rootfs of ${req.id}: ${((packed as PromiseRejectedResult).reason as Error).message}`);
      }
      const m = forked.value;
      this.machine = m;
      try {
        await writeFile(join(req.bundle, VM_FILE), m.name + '\n');
        await m.attachDisk(packed.value, 'rootfs');
        this.agent = await m.agent();
        this.agent.onEvent(this.onAgentEvent);
        // the VM went away under the task (its QEMU killed, or removed): every process of it ended, as if SIGKILLed
        this.agent.onClosed(() => {
          if (!this.machine) return;
          for (const p of this.procs.values()) if (p.status !== Status.STOPPED) this.onAgentEvent({ event: 'task-exit', data: { id: this.o.id, execId: p.execId, exitCode: 137, exitedAt: Date.now() } });
        });
        const { spec, dropped } = guestSpec(config, { hostname: m.info().identity?.hostname });
        if (dropped.length) this.o.log(`${req.id}: left out in the guest: ${dropped.join('; ')}`);
        await this.agent.call('task.create', { id: req.id, disk: 'rootfs', spec }, 60_000);
      } catch (e) {
        this.machine = undefined;
        await m.remove({ force: true }).catch(() => undefined);
        await rm(packed.value, { force: true }); // if it was not moved into the VM's jail yet
        throw new TtrpcError(Code.INTERNAL, `${req.id}: ${(e as Error).message}`);
      }
      const p = this.newProc('', req);
      await this.o.publisher.publish('/tasks/create', { containerId: req.id, bundle: req.bundle, rootfs: req.rootfs, io: { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: false }, pid: p.pid });
      return { pid: p.pid };
    },
    Start: async (r) => {
      const execId = String(r.execId ?? '');
      const p = this.proc(execId);
      this.openOutputs(p);
      const res = execId
        ? await this.agent!.call('task.exec', { id: this.o.id, execId, process: p.spec! }, 60_000)
        : await this.agent!.call('task.start', { id: this.o.id }, 60_000);
      p.pid = res.pid; p.status = p.status === Status.STOPPED ? Status.STOPPED : Status.RUNNING;
      this.relayInput(p);
      if (execId) await this.o.publisher.publish('/tasks/exec-started', { containerId: this.o.id, execId, pid: p.pid });
      else await this.o.publisher.publish('/tasks/start', { containerId: this.o.id, pid: p.pid });
      return { pid: p.pid };
    },
    Exec: async (r) => {
      const req = r as { execId: string; terminal: boolean; stdin: string; stdout: string; stderr: string; spec: { value: Buffer } };
      if (req.terminal) throw new TtrpcError(Code.UNIMPLEMENTED, 'a terminal (tty) is not supported by the scion shim yet: exec without -t');
      if (this.procs.has(req.execId)) throw new TtrpcError(Code.ALREADY_EXISTS, `exec ${req.execId} exists`);
      this.proc('');
      const p = this.newProc(req.execId, req);
      p.spec = JSON.parse(Buffer.from(req.spec.value).toString('utf8'));
      await this.o.publisher.publish('/tasks/exec-added', { containerId: this.o.id, execId: req.execId });
      return {};
    },
    State: (r) => {
      const p = this.proc(String(r.execId ?? ''));
      return { id: p.execId || this.o.id, bundle: this.bundle, pid: p.pid, status: p.status, stdin: p.stdin, stdout: p.stdout, stderr: p.stderr, terminal: false, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? 0), execId: p.execId };
    },
    Wait: async (r) => {
      const p = this.proc(String(r.execId ?? ''));
      await p.exited;
      return { exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) };
    },
    Kill: async (r) => {
      const execId = String(r.execId ?? '');
      const p = this.proc(execId);
      if (p.status !== Status.RUNNING) return {};
      await this.agent!.call('task.kill', { id: this.o.id, execId: execId || undefined, signal: Number(r.signal) || 15, all: r.all === true }, 15_000);
      return {};
    },
    Pids: async () => {
      const r = await this.agent!.call('task.pids', { id: this.o.id }, 15_000);
      return { processes: r.pids.map((pid: number) => ({ pid })) };
    },
    CloseIO: async (r) => {
      const execId = String(r.execId ?? '');
      this.proc(execId);
      if (r.stdin) await this.agent!.call('task.input', { id: this.o.id, execId: execId || undefined, data: '', close: true }, 15_000);
      return {};
    },
    ResizePty: () => { throw new TtrpcError(Code.UNIMPLEMENTED, 'no terminal: the scion shim runs tasks without a tty'); },
    Delete: async (r) => {
      const execId = String(r.execId ?? '');
      const p = this.proc(execId);
      if (execId) { this.procs.delete(execId); return { pid: p.pid, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) }; }
      await this.teardown();
      await this.o.publisher.publish('/tasks/delete', { containerId: this.o.id, id: this.o.id, pid: p.pid, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) });
      this.procs.delete('');
      return { pid: p.pid, exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt ?? Date.now()) };
    },
    Connect: () => ({ shimPid: process.pid, taskPid: this.procs.get('')?.pid ?? 0, version: '2' }),
    Shutdown: () => {
      if (this.procs.size) return {}; // containerd asks after each delete; the shim stays while it has a task
      setTimeout(() => this.o.onShutdown(), 10);
      return {};
    },
  };

  /** The pod VM and everything of it go (the agent first lets go of the rootfs). */
  async teardown(): Promise<void> {
    const m = this.machine;
    this.machine = undefined;
    if (!m) return;
    try { await this.agent?.call('task.delete', { id: this.o.id }, 20_000); } catch (e) { this.o.log(`task.delete: ${(e as Error).message}`); }
    await m.remove({ force: true });
    m.close();
  }
}

export { decode, type Msg };
