/**
 * Containers run by crun from the OCI bundles in the image. Each runs under a
 * foreground `crun run` started detached from the agent, with its output in a
 * per-container log file, so it survives an agent restart; a new agent adopts
 * running containers from crun's state instead of starting duplicates.
 */
import type { ShellWorker } from './shell.ts';
import { ProtocolError } from './protocol.ts';
import { sleep, type Platform, type Timer } from './platform.ts';
import { listeningOn, tcpTables, httpCheckArgv } from './health.ts';
import { utf8Decode } from '../common/utf8.ts';

import type { ContainerSpec, HealthCheck } from '../common/contracts.ts';
export type { ContainerSpec, HealthCheck };
import type { ContainerStatus, ContainerStateName, AgentEventName, AgentEvents } from '../common/agent-protocol.ts';
export type { ContainerStatus, ContainerStateName };

const LOG_LIMIT = 256 * 1024;

class Container {
  status: ContainerStatus;
  stopping = false;
  private backoffMs = 200;
  private watch?: Timer;
  private runSeq = 0;
  constructor(
    readonly spec: ContainerSpec,
    readonly sup: ContainerSupervisor,
  ) {
    this.status = { name: spec.name, state: 'created', restarts: 0 };
  }
  get logPath() {
    return `${this.sup.logDir}/${this.spec.name}.log`;
  }
  private get p() {
    return this.sup.platform;
  }

  /**
   * Shell lines that (re)start this container: crun in the foreground inside
   * a background subshell that records crun's exit status; prints the
   * subshell's pid. Several containers' lines go into one batch.
   */
  startLines(): string[] {
    const n = this.spec.name;
    const exitFile = `${this.sup.logDir}/${n}.${++this.runSeq}.exit`;
    try {
      if ((this.p.fileSize(this.logPath) ?? 0) > LOG_LIMIT) this.p.writeText(this.logPath, '');
    } catch {
      /* the log cannot be trimmed now: it is tried again at the next start */
    }
    return [
      `${this.sup.crunBin} delete -f ${n} >/dev/null 2>&1 || true`,
      `rm -f ${this.sup.logDir}/${n}.*.exit`,
      // --no-pivot: the root is the initramfs itself (rootfs cannot be pivot_root'ed; see builder/init.ts)
      `( ${this.sup.crunBin} run --no-pivot --bundle ${this.spec.bundle} ${n} >>${this.logPath} 2>&1; echo $? >${exitFile} ) >/dev/null 2>&1 &`,
      `echo "pid ${n} $! ${exitFile}"`,
    ];
  }

  /** Track the wrapper started by startLines (its pid and exit file come back in the batch output). */
  track(pid: number, exitFile: string) {
    this.stopping = false;
    this.status = { ...this.status, state: 'running', startedAt: Date.now(), pid, exitCode: undefined, healthy: undefined };
    this.watchPid(pid, exitFile);
  }

  async start(): Promise<void> {
    this.p.mkdirp(this.sup.logDir);
    const out = await this.sup.shell.runOrThrow(this.startLines().join('\n'), `starting container ${this.spec.name}`);
    this.sup.trackFromOutput(out);
  }

  /** Adopt a container found running in crun's state (after an agent restart). */
  adopt(pid: number, startedAt?: number) {
    this.status = { ...this.status, state: 'running', pid, startedAt: startedAt ?? Date.now() };
    this.watchPid(pid);
  }

  /** The wrapper is the shell's child, not the agent's: its end is seen from /proc, every 250 ms. */
  private watchPid(pid: number, exitFile?: string) {
    this.p.clearTimeout(this.watch);
    const tick = () => {
      if (this.watch !== w) return;
      if (this.p.exists(`/proc/${pid}`) && !/\) Z /.test(this.sup.safeRead(`/proc/${pid}/stat`))) {
        w = this.watch = this.p.setTimeout(tick, 250);
        return;
      }
      this.watch = undefined;
      const code = exitFile ? Number(this.sup.safeRead(exitFile).trim() || NaN) : NaN;
      this.exited(Number.isFinite(code) ? code : undefined);
    };
    let w: Timer = (this.watch = this.p.setTimeout(tick, 250));
  }

  private exited(code: number | undefined) {
    this.status = { ...this.status, state: 'stopped', exitCode: code, pid: undefined };
    this.sup.emit('container-exited', { name: this.spec.name, exitCode: code ?? null });
    if (this.stopping) return;
    const again = this.spec.restart === 'always' || (this.spec.restart === 'on-failure' && code !== 0);
    if (!again) return;
    this.status.state = 'restarting';
    const delay = this.backoffMs;
    this.backoffMs = Math.min(this.backoffMs * 2, 10_000);
    this.p.setTimeout(() => {
      if (this.stopping) return;
      this.status.restarts++;
      this.start().then(
        () => this.sup.emit('container-restarted', { name: this.spec.name, restarts: this.status.restarts, reason: 'exited' }),
        () => {},
      );
    }, delay);
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.p.clearTimeout(this.watch);
    this.watch = undefined;
    await this.sup.shell.run(`${this.sup.crunBin} delete -f ${this.spec.name} >/dev/null 2>&1 || true`);
    this.status = { ...this.status, state: 'stopped', pid: undefined };
  }

  async healthy(): Promise<boolean> {
    const h = this.spec.healthcheck;
    if (!h) return this.status.state === 'running';
    if (h.tcp) {
      const port = h.tcp.port;
      return tcpTables(this.sup.initPid(this.spec.name)).some((t) => listeningOn(this.sup.safeRead(t), port));
    }
    if (h.http)
      return (await this.p.run(httpCheckArgv(h.http.port, h.http.path, h.timeoutMs), { timeoutMs: h.timeoutMs + 1000, maxOutput: 4096 })).exitCode === 0;
    const q = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;
    return (await this.sup.shell.run(`${this.sup.crunBin} exec ${this.spec.name} ${h.command!.map(q).join(' ')} >/dev/null 2>&1`)).code === 0;
  }
  resetBackoff() {
    this.backoffMs = 200;
  }
}

export class ContainerSupervisor {
  readonly containers = new Map<string, Container>();
  constructor(
    readonly platform: Platform,
    specs: ContainerSpec[],
    readonly emit: <E extends AgentEventName>(event: E, data: AgentEvents[E]) => void,
    readonly shell: ShellWorker,
    readonly logDir = '/run/scion/logs',
    readonly crunBin = 'crun',
    readonly crunRoot = '/run/crun',
  ) {
    for (const s of specs) this.containers.set(s.name, new Container(s, this));
  }

  safeRead(p: string): string {
    try {
      return this.platform.readText(p);
    } catch {
      return '';
    }
  }

  /** Pick up the `pid <name> <pid> <exit file>` lines a start batch printed. */
  trackFromOutput(out: string) {
    for (const m of out.matchAll(/^pid (\S+) (\d+) (\S+)$/gm)) this.containers.get(m[1])?.track(Number(m[2]), m[3]);
  }

  get(name: string): Container {
    const c = this.containers.get(name);
    if (!c) throw new ProtocolError('E_NO_CONTAINER', `no container named "${name}"; the image has: ${[...this.containers.keys()].join(', ') || 'none'}`);
    return c;
  }

  /** Start every container, adopting those crun already runs. */
  async startAll(): Promise<void> {
    if (!this.containers.size) return;
    let running: { id: string; pid: number; status: string; created?: string }[] = [];
    const listed = await this.platform.run([this.crunBin, 'list', '--format', 'json'], { timeoutMs: 30_000 });
    try {
      if (listed.exitCode === 0) running = JSON.parse(listed.stdout) ?? [];
    } catch {
      /* crun has no state yet (first boot): nothing to adopt */
    }
    const toStart: Container[] = [];
    for (const c of this.containers.values()) {
      const r = running.find((x) => x.id === c.spec.name && x.status === 'running' && x.pid > 0);
      if (r) c.adopt(r.pid, r.created ? Date.parse(r.created) : undefined);
      else toStart.push(c);
    }
    if (!toStart.length) return;
    this.platform.mkdirp(this.logDir);
    this.trackFromOutput(await this.shell.runOrThrow(toStart.flatMap((c) => c.startLines()).join('\n'), 'starting containers'));
  }

  /** Point each bundle's UTS hostname at `hostname` (done before a restart after a fork). */
  async setHostname(hostname: string): Promise<void> {
    for (const c of this.containers.values()) {
      const p = `${c.spec.bundle}/config.json`;
      const cfg = JSON.parse(this.platform.readText(p));
      if (cfg.hostname === hostname) continue;
      cfg.hostname = hostname;
      this.platform.writeText(p, JSON.stringify(cfg, null, 2) + '\n');
    }
  }

  /**
   * After a fork (`restart` false: the template's warm-up before its freeze):
   * containers with `onFork: keep` keep running and get the new UTS hostname
   * in place (nsenter into their UTS namespace; with host networking they
   * see the new addresses already); the others are restarted with it. One
   * shell batch for all; a kept container that cannot be updated is restarted.
   */
  async afterFork(hostname: string, restart = true): Promise<void> {
    const keep: { c: Container; pid: number }[] = [];
    const again: Container[] = [];
    for (const c of this.containers.values()) {
      const pid = c.spec.onFork === 'keep' && c.status.state === 'running' ? this.initPid(c.spec.name) : undefined;
      if (pid) keep.push({ c, pid });
      else again.push(c);
    }
    if (keep.length) {
      // the hostname is checked by the protocol (letters, digits, -): safe in a shell line
      const out = await this.shell.runOrThrow(
        keep.map(({ c, pid }) => `busybox nsenter -t ${pid} -u busybox hostname ${hostname} || echo "kept-failed ${c.spec.name}"`).join('\n'),
        'updating kept containers',
      );
      for (const m of out.matchAll(/^kept-failed (\S+)$/gm)) again.push(this.get(m[1]));
    }
    if (restart) await this.restart(again);
  }

  /** The container's init pid from crun's state (`<crun root>/<name>/status`), if it runs. */
  initPid(name: string): number | undefined {
    try {
      const pid = Number(JSON.parse(this.platform.readText(`${this.crunRoot}/${name}/status`)).pid);
      return Number.isInteger(pid) && pid > 1 && this.platform.exists(`/proc/${pid}`) ? pid : undefined;
    } catch {
      return undefined;
    } // no state: not running under crun
  }

  /** Restart every container in one shell batch (one round trip). */
  async restartAll(): Promise<void> {
    await this.restart([...this.containers.values()]);
  }

  private async restart(cs: Container[]): Promise<void> {
    if (!cs.length) return;
    for (const c of cs) {
      c.stopping = true;
      c.resetBackoff();
    }
    this.platform.mkdirp(this.logDir);
    const out = await this.shell.runOrThrow(cs.flatMap((c) => c.startLines()).join('\n'), 'restarting containers');
    this.trackFromOutput(out);
    for (const c of cs) {
      c.status.restarts++;
      this.emit('container-restarted', { name: c.spec.name, restarts: c.status.restarts, reason: 'identity' });
    }
  }

  /** Wait until every container with a health check passes it (or the deadline). */
  async waitHealthy(deadlineMs: number): Promise<boolean> {
    const end = Date.now() + deadlineMs;
    const pending = new Set(this.containers.values());
    while (pending.size && Date.now() < end) {
      for (const c of [...pending]) {
        if (await c.healthy()) {
          c.status.healthy = true;
          pending.delete(c);
        }
      }
      if (pending.size) await sleep(this.platform, Math.min(...[...pending].map((c) => c.spec.healthcheck?.intervalMs ?? 100)));
    }
    for (const c of pending) c.status.healthy = false;
    return pending.size === 0;
  }

  list(): ContainerStatus[] {
    return [...this.containers.values()].map((c) => ({ ...c.status }));
  }

  logs(name: string, tailBytes = 64 * 1024): string {
    const c = this.get(name);
    let buf: Uint8Array;
    try {
      buf = this.platform.readBytes(c.logPath);
    } catch {
      return '';
    }
    return utf8Decode(buf.subarray(Math.max(0, buf.length - tailBytes)));
  }
}
