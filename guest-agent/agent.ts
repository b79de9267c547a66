/**
 * The agent: protocol session over any duplex byte stream, command handlers,
 * fork handling. System effects go through identity.ts and containers.ts.
 */
import type { Platform, Transport } from './platform.ts';
import { PROTOCOL_VERSION, ProtocolError, validateIdentity, requireString, type Identity, type Request } from './protocol.ts';
import { applyIdentity, type SystemConfig, type Steps } from './identity.ts';
import { ContainerSupervisor } from './containers.ts';
import { ShellWorker } from './shell.ts';
import { TaskRunner } from './tasks.ts';
import { attachSession } from './session.ts';
export { MAX_IN_FLIGHT } from './session.ts';
import type { GuestImageConfig } from '../common/contracts.ts';
import type { AgentCommand, AgentEventName, AgentEvents, AgentInfo, AppliedIdentity, IdentityNotApplied, ResultOf } from '../common/agent-protocol.ts';
import { ClockKeeper, dateStepSeconds } from './clock.ts';

export const AGENT_VERSION = '0.1.0';

export type ImageConfig = GuestImageConfig;

/**
 * A byte stream to one host (platform.ts). Backpressure: `write` returns
 * false once the stream holds more than it wants buffered, and `onDrain`
 * fires when it took it; `pause`/`resume` stop and restart reading.
 */
export type { Transport };

/** How long after a pod VM's identity the clock keeper refines the step (its containers are being started then). */
export const POD_CLOCK_REFINE_DELAY_MS = 2000;

export interface AgentOptions {
  platform: Platform;
  image: ImageConfig;
  system: SystemConfig;
  /** file that survives an agent restart (not a fork: RAM is cloned, so it forks with the VM) */
  stateFile?: string;
  crunBin?: string;
  logDir?: string;
  log?: (msg: string) => void;
}

interface PersistentState {
  generation: number;
  identity?: Identity;
  vmForks?: number;
  vmForksAtLastApply?: number;
}

export class Agent {
  readonly containers: ContainerSupervisor;
  readonly shell: ShellWorker;
  /** a second shell for the clock keeper, so its steps never wait behind an identity batch */
  readonly clockShell: ShellWorker;
  private readonly p: Platform;
  readonly clock: ClockKeeper;
  readonly tasks: TaskRunner;
  private state: PersistentState = { generation: 0 };
  private sessions = new Set<(msg: unknown) => void>();
  private applying?: Promise<unknown>;
  private readonly started = Date.now();
  lastReady?: { generation: number; stepsMs: Steps; totalMs: number };

  constructor(readonly opts: AgentOptions) {
    this.p = opts.platform;
    this.shell = new ShellWorker(this.p);
    this.clockShell = new ShellWorker(this.p);
    this.containers = new ContainerSupervisor(this.p, opts.image.containers, (event, data) => this.emit(event, data), this.shell, opts.logDir, opts.crunBin);
    this.clock = new ClockKeeper(this.p, this.clockShell, opts.system.setClock);
    this.tasks = new TaskRunner(this.p, this.shell, (event, data) => this.emit(event, data), opts.crunBin);
    if (opts.stateFile && this.p.exists(opts.stateFile)) {
      try {
        this.state = JSON.parse(this.p.readText(opts.stateFile));
      } catch {
        // a state file cut short by a crash: start from generation 0, the host re-applies the identity
      }
    }
  }

  private persist() {
    if (this.opts.stateFile) {
      try {
        this.p.writeText(this.opts.stateFile, JSON.stringify(this.state));
      } catch {
        // the state file is a convenience for agent restarts (tmpfs); the host remains the source of identity
      }
    }
  }

  emit<E extends AgentEventName>(event: E, data: AgentEvents[E]) {
    const msg = { event, data, ts: Date.now() };
    for (const send of this.sessions) send(msg);
  }

  /** Start containers (adopting running ones) and announce readiness. */
  async boot(): Promise<void> {
    const t0 = this.p.monotonic();
    await this.shell.warm();
    await this.clockShell.warm();
    await this.containers.startAll();
    const t1 = this.p.monotonic();
    const healthy = await this.containers.waitHealthy(120_000);
    const stepsMs = { containers: Math.round(t1 - t0), health: Math.round(this.p.monotonic() - t1) };
    this.lastReady = { generation: this.state.generation, stepsMs, totalMs: Math.round(this.p.monotonic() - t0) };
    this.emit('ready', { ...this.lastReady, healthy, boot: true });
  }

  /** Attach a session to a transport (session.ts: framing, resync, flow control). Returns a detach function. */
  attach(t: Transport): () => void {
    const sender = attachSession(t, (req) => this.handle(req));
    this.sessions.add(sender);
    return () => {
      this.sessions.delete(sender);
    };
  }

  async handle(req: Request): Promise<unknown> {
    return this.handlers[req.cmd](req.args);
  }

  /**
   * One handler per command of the typed protocol map (common/agent-protocol.ts): a command
   * missing here, or a result of the wrong shape, fails the type check. Arguments arrive
   * untrusted and are validated by each handler.
   */
  private readonly handlers: { [C in AgentCommand]: (a: Record<string, unknown>) => ResultOf<C> | Promise<ResultOf<C>> } = {
    sync: (a) => {
      if (typeof a.nonce !== 'number' && typeof a.nonce !== 'string') throw new ProtocolError('E_BAD_ARGS', 'nonce: must be a number or string');
      return { nonce: a.nonce, protocol: PROTOCOL_VERSION };
    },
    ping: () => ({ pong: true, protocol: PROTOCOL_VERSION, time: Date.now() }),
    'clock.step': async (a) => {
      if (typeof a.deltaMs !== 'number' || !Number.isFinite(a.deltaMs) || Math.abs(a.deltaMs) > 1e12)
        throw new ProtocolError('E_BAD_ARGS', 'deltaMs: must be a finite number of milliseconds');
      if (!this.opts.system.setClock) return { stepped: false, clock: this.clock.state };
      await this.clock.step(a.deltaMs);
      // a calibration that found no edge to trust is reported, not thrown: the step itself took
      const calibrated = a.calibrate !== false ? (await this.clock.calibrate()) !== undefined : undefined;
      this.clock.kick();
      return { stepped: true, calibrated, time: Date.now(), clock: this.clock.state };
    },
    info: () => this.info(),
    'identity.apply': (a) => this.applyIdentity(validateIdentity(a)),
    'time.set': async (a) => {
      if (typeof a.time !== 'number' || !Number.isFinite(a.time) || a.time < 0)
        throw new ProtocolError('E_BAD_ARGS', 'time: must be milliseconds since the epoch');
      if (this.opts.system.setClock) {
        // busybox date (whole seconds) rather than phc_ctl: measured, phc_ctl's exec added
        // ~40 ms to a pool claim's first byte (bench:serve: 82 -> 123 ms p50)
        await this.shell.runOrThrow(`date -s @${dateStepSeconds(a.time)} >/dev/null`, 'setting the clock');
        this.clock.kick(1000); // refined against the RTC a little later, not during the request that follows a resume
      }
      return { time: Date.now(), set: this.opts.system.setClock };
    },
    'containers.list': () => ({ containers: this.containers.list() }),
    'containers.start': async (a) => {
      const c = this.containers.get(requireString(a, 'name'));
      await c.start();
      return c.status;
    },
    'containers.stop': async (a) => {
      const c = this.containers.get(requireString(a, 'name'));
      await c.stop();
      return c.status;
    },
    'containers.restart': async (a) => {
      const c = this.containers.get(requireString(a, 'name'));
      await c.stop();
      c.resetBackoff();
      await c.start();
      c.status.restarts++;
      this.emit('container-restarted', { name: c.spec.name, restarts: c.status.restarts, reason: 'request' });
      return c.status;
    },
    'containers.logs': async (a) => {
      const tail = a.tailBytes === undefined ? undefined : Number(a.tailBytes);
      if (tail !== undefined && (!Number.isInteger(tail) || tail < 1 || tail > 1 << 20)) throw new ProtocolError('E_BAD_ARGS', 'tailBytes: must be 1..1048576');
      const name = requireString(a, 'name');
      return { name, logs: this.containers.logs(name, tail) };
    },
    exec: (a) => {
      if (!this.opts.image.exec) throw new ProtocolError('E_EXEC_DISABLED', 'exec is disabled in this image; set agent.exec: true in the image definition');
      if (!Array.isArray(a.argv) || !a.argv.length || a.argv.some((x) => typeof x !== 'string'))
        throw new ProtocolError('E_BAD_ARGS', 'argv: must be a non-empty list of strings');
      const timeout = typeof a.timeoutMs === 'number' ? a.timeoutMs : 30_000;
      return this.p.run(a.argv as string[], { timeoutMs: timeout, maxOutput: 1 << 20 });
    },
    'freeze.prepare': () => this.freezePrepare(),
    // tasks run what the host sends, as exec does: only where exec is allowed
    'task.create': (a) => this.tasksAllowed().create(a),
    'task.start': (a) => this.tasksAllowed().start(a),
    'task.exec': (a) => this.tasksAllowed().exec(a),
    'task.kill': (a) => this.tasksAllowed().kill(a),
    'task.resize': (a) => this.tasksAllowed().resize(a),
    'task.pids': (a) => this.tasksAllowed().pids(a),
    'task.stats': (a) => this.tasksAllowed().stats(a),
    'task.delete': (a) => this.tasksAllowed().delete(a),
    shutdown: () => {
      this.p.setTimeout(() => {
        void this.p.run(['poweroff', '-f']).then((r) => {
          if (r.exitCode !== 0) this.p.exit(0);
        });
      }, 50);
      return { shuttingDown: true };
    },
  };

  private tasksAllowed(): TaskRunner {
    if (!this.opts.image.exec) throw new ProtocolError('E_EXEC_DISABLED', 'tasks are disabled in this image; set agent.exec: true in the image definition');
    return this.tasks;
  }

  info(): AgentInfo {
    const read = (path: string) => {
      try {
        return this.p.readText(path).trim();
      } catch {
        return '';
      }
    }; // not there (yet): reported empty
    const hostname = read('/proc/sys/kernel/hostname');
    const machineId = read(`${this.opts.system.root}/etc/machine-id`);
    return {
      agentVersion: AGENT_VERSION,
      protocol: PROTOCOL_VERSION,
      kernel: read('/proc/sys/kernel/osrelease'),
      uptimeS: Number(read('/proc/uptime').split(' ')[0]) || 0,
      agentUptimeS: (Date.now() - this.started) / 1000,
      image: this.opts.image.name,
      generation: this.state.generation,
      identity: { ...(this.state.identity ?? {}), hostname, machineId, rngSeed: undefined },
      vmForks: this.state.vmForks ?? 0,
      containers: this.containers.list(),
      lastReady: this.lastReady ?? null,
      /** the guest's wall clock (ms) when this answer was made, and how it is kept */
      time: Date.now(),
      clock: this.clock.state,
    };
  }

  private async applyIdentity(id: Identity): Promise<AppliedIdentity | IdentityNotApplied> {
    // one fork is handled once: a repeat of the applied generation answers with the current state
    if (this.applying) await this.applying.catch(() => undefined); // its caller gets its error; this one starts afresh
    if (id.generation <= this.state.generation) return { applied: false, generation: this.state.generation, info: this.info() };
    const work = this.doApply(id, false);
    this.applying = work;
    try {
      return { ...(await work), applied: true };
    } finally {
      this.applying = undefined;
    }
  }

  private async doApply(id: Identity, warmOnly: boolean) {
    const t0 = this.p.monotonic();
    let steps: Steps;
    try {
      steps = await applyIdentity(id, this.opts.system, this.shell, this.p);
    } catch (e) {
      throw new ProtocolError('E_APPLY_FAILED', (e as Error).message);
    }
    if (!warmOnly) {
      // a fork announced by the host alone (no vmgenid signal since the last apply)
      if ((this.state.vmForks ?? 0) === (this.state.vmForksAtLastApply ?? 0) && this.state.generation > 0)
        this.emit('forked', { signal: 'identity.apply', generation: id.generation });
      this.state.vmForksAtLastApply = this.state.vmForks ?? 0;
      this.state.generation = id.generation;
      this.state.identity = { ...id, rngSeed: undefined };
      this.persist();
    }
    const identityMs = Math.round(this.p.monotonic() - t0);
    this.emit('identity-applied', { generation: id.generation, stepsMs: steps, totalMs: identityMs });
    const tc = this.p.monotonic();
    await this.containers.setHostname(id.hostname);
    // the template's warm-up runs the kept containers' update too (same hostname: no change), so clones inherit it warm
    await this.containers.afterFork(id.hostname, !warmOnly);
    const containersMs = Math.round(this.p.monotonic() - tc);
    const th = this.p.monotonic();
    const healthy = warmOnly ? true : await this.containers.waitHealthy(60_000);
    const healthMs = Math.round(this.p.monotonic() - th);
    // refine the whole-second step against the RTC now that the containers are up: its short busy
    // poll of the RTC would otherwise compete with their restart for the one vCPU. A VM with no
    // containers of its own is a pod's: its containers come next, from the host (task.create,
    // task.start), so the refine waits for them (the step was exact to the ms; the host has checked it)
    if (!warmOnly && id.time !== undefined) this.clock.kick(this.containers.list().length ? 0 : POD_CLOCK_REFINE_DELAY_MS);
    // the guest's clock as it reports ready: the host checks it against its own (PROTOCOL.md)
    const result = {
      applied: !warmOnly,
      generation: id.generation,
      stepsMs: { ...steps, identity: identityMs, containers: containersMs, health: healthMs },
      totalMs: Math.round(this.p.monotonic() - t0),
      healthy,
      time: Date.now(),
    };
    if (!warmOnly) {
      this.lastReady = { generation: id.generation, stepsMs: result.stepsMs, totalMs: result.totalMs };
      this.emit('ready', { ...this.lastReady, healthy });
    }
    return result;
  }

  /** Before the template is frozen: flush, drop caches, and run the post-fork path once so clones inherit it warm (compiled, its pages touched). */
  private async freezePrepare(): Promise<ResultOf<'freeze.prepare'>> {
    const t0 = this.p.monotonic();
    await this.clock.settle();
    const cur = this.state.identity;
    if (cur)
      await this.doApply({ ...cur, time: undefined }, true).catch(() => undefined); // warming only: a failure here shows again, reported, at the real apply
    else validateIdentity({ generation: 1, hostname: 'warm', machineId: '0'.repeat(32), interfaces: [{ mac: '02:00:00:00:00:01' }] });
    this.info();
    // a pod's pid namespace (with its reaper) made now, so every clone has it: making it at a pod's first
    // container that shares it costs ~0.3-0.4 s under TCG. Only in a pod's image (tasks, no containers of its own)
    if (this.opts.image.exec && !this.containers.list().length) await this.tasks.prepare().catch(() => undefined); // made on first use, then
    await this.shell.run('sync');
    try {
      this.p.writeText('/proc/sys/vm/drop_caches', '3');
    } catch {
      /* fewer cached pages in the template is an optimisation, not a need */
    }
    return { prepared: true, ms: Math.round(this.p.monotonic() - t0), generation: this.state.generation };
  }

  /**
   * The kernel saw the VM generation ID change (vmgenid: it logs "crng
   * reseeded due to virtual machine fork"). The identity itself comes from the
   * host's identity.apply; this only announces the fork and counts it.
   */
  onVmFork(): void {
    this.state.vmForks = (this.state.vmForks ?? 0) + 1;
    this.persist();
    this.emit('forked', { signal: 'vmgenid', generation: this.state.generation, vmForks: this.state.vmForks });
  }
}
