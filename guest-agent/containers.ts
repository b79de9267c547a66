/**
 * Containers run by crun from the OCI bundles in the image. Each runs under a
 * foreground `crun run` started detached from the agent, with its output in a
 * per-container log file, so it survives an agent restart; a new agent adopts
 * running containers from crun's state instead of starting duplicates.
 */
import { execFile } from 'node:child_process';
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { ShellWorker } from './shell.ts';
import { connect } from 'node:net';
import { request } from 'node:http';
import { join } from 'node:path';
import { ProtocolError } from './protocol.ts';

import type { ContainerSpec, HealthCheck } from '../common/contracts.ts';
export type { ContainerSpec, HealthCheck };
import type { ContainerStatus, ContainerStateName, AgentEventName, AgentEvents } from '../common/agent-protocol.ts';
export type { ContainerStatus, ContainerStateName };

const LOG_LIMIT = 256 * 1024;

function crun(args: string[], crunBin: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(crunBin, args, { timeout: 30_000 }, (err, stdout, stderr) => (err ? reject(new Error(`crun ${args[0]}: ${stderr.trim() || err.message}`)) : resolve(stdout)));
  });
}

class Container {
  status: ContainerStatus;
  stopping = false;
  private backoffMs = 200;
  private watch?: NodeJS.Timeout;
  private runSeq = 0;
  constructor(readonly spec: ContainerSpec, readonly sup: ContainerSupervisor) {
    this.status = { name: spec.name, state: 'created', restarts: 0 };
  }
  get logPath() { return join(this.sup.logDir, `${this.spec.name}.log`); }

  /**
   * Shell lines that (re)start this container: crun in the foreground inside
   * a background subshell that records crun's exit status; prints the
   * subshell's pid. Several containers' lines go into one batch.
   */
  startLines(): string[] {
    const n = this.spec.name;
    const exitFile = join(this.sup.logDir, `${n}.${++this.runSeq}.exit`);
    try { if (statSync(this.logPath).size > LOG_LIMIT) writeFileSync(this.logPath, ''); } catch { /* no log yet: nothing to trim */ }
    return [
      `${this.sup.crunBin} delete -f ${n} >/dev/null 2>&1 || true`,
      `rm -f ${join(this.sup.logDir, `${n}.*.exit`)}`,
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
    await mkdir(this.sup.logDir, { recursive: true });
    const out = await this.sup.shell.runOrThrow(this.startLines().join('\n'), `starting container ${this.spec.name}`);
    this.sup.trackFromOutput(out);
  }

  /** Adopt a container found running in crun's state (after an agent restart). */
  adopt(pid: number, startedAt?: number) {
    this.status = { ...this.status, state: 'running', pid, startedAt: startedAt ?? Date.now() };
    this.watchPid(pid);
  }

  private watchPid(pid: number, exitFile?: string) {
    clearInterval(this.watch);
    const w = setInterval(() => {
      if (existsSync(`/proc/${pid}`) && !/\) Z /.test(safeRead(`/proc/${pid}/stat`))) return;
      clearInterval(w);
      if (this.watch !== w) return;
      const code = exitFile ? Number(safeRead(exitFile).trim() || NaN) : NaN;
      this.exited(Number.isFinite(code) ? code : undefined);
    }, 250);
    w.unref();
    this.watch = w;
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
    setTimeout(() => {
      if (this.stopping) return;
      this.status.restarts++;
      this.start().then(() => this.sup.emit('container-restarted', { name: this.spec.name, restarts: this.status.restarts, reason: 'exited' }), () => {});
    }, delay).unref();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    clearInterval(this.watch);
    this.watch = undefined;
    await this.sup.shell.run(`${this.sup.crunBin} delete -f ${this.spec.name} >/dev/null 2>&1 || true`);
    this.status = { ...this.status, state: 'stopped', pid: undefined };
  }

  async healthy(): Promise<boolean> {
    const h = this.spec.healthcheck;
    if (!h) return this.status.state === 'running';
    if (h.http) return httpOk(h.http.port, h.http.path, h.timeoutMs);
    if (h.tcp) return tcpOk(h.tcp.port, h.timeoutMs);
    const q = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;
    return (await this.sup.shell.run(`${this.sup.crunBin} exec ${this.spec.name} ${h.command!.map(q).join(' ')} >/dev/null 2>&1`)).code === 0;
  }
  resetBackoff() { this.backoffMs = 200; }
}

function safeRead(p: string): string { try { return readFileSync(p, 'utf8'); } catch { return ''; } }

function httpOk(port: number, path: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ host: '127.0.0.1', port, path, timeout: timeoutMs, agent: false }, (res) => { res.resume(); resolve((res.statusCode ?? 500) < 400); });
    req.on('error', () => resolve(false));
    req.on('timeout', () => { req.destroy(); resolve(false); });
    req.end();
  });
}
function tcpOk(port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port, timeout: timeoutMs });
    s.on('connect', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
    s.on('timeout', () => { s.destroy(); resolve(false); });
  });
}

export class ContainerSupervisor {
  readonly containers = new Map<string, Container>();
  constructor(specs: ContainerSpec[], readonly emit: <E extends AgentEventName>(event: E, data: AgentEvents[E]) => void, readonly shell: ShellWorker, readonly logDir = '/run/scion/logs', readonly crunBin = 'crun', readonly crunRoot = '/run/crun') {
    for (const s of specs) this.containers.set(s.name, new Container(s, this));
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
    try { running = JSON.parse(await crun(['list', '--format', 'json'], this.crunBin)) ?? []; } catch { /* crun has no state yet (first boot): nothing to adopt */ }
    const toStart: Container[] = [];
    for (const c of this.containers.values()) {
      const r = running.find((x) => x.id === c.spec.name && x.status === 'running' && x.pid > 0);
      if (r) c.adopt(r.pid, r.created ? Date.parse(r.created) : undefined);
      else toStart.push(c);
    }
    if (!toStart.length) return;
    await mkdir(this.logDir, { recursive: true });
    this.trackFromOutput(await this.shell.runOrThrow(toStart.flatMap((c) => c.startLines()).join('\n'), 'starting containers'));
  }

  /** Point each bundle's UTS hostname at `hostname` (done before a restart after a fork). */
  async setHostname(hostname: string): Promise<void> {
    for (const c of this.containers.values()) {
      const p = join(c.spec.bundle, 'config.json');
      const cfg = JSON.parse(await readFile(p, 'utf8'));
      if (cfg.hostname === hostname) continue;
      cfg.hostname = hostname;
      await writeFile(p, JSON.stringify(cfg, null, 2) + '\n');
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
      if (pid) keep.push({ c, pid }); else again.push(c);
    }
    if (keep.length) {
      // the hostname is checked by the protocol (letters, digits, -): safe in a shell line
      const out = await this.shell.runOrThrow(keep.map(({ c, pid }) => `busybox nsenter -t ${pid} -u busybox hostname ${hostname} || echo "kept-failed ${c.spec.name}"`).join('\n'), 'updating kept containers');
      for (const m of out.matchAll(/^kept-failed (\S+)$/gm)) again.push(this.get(m[1]));
    }
    if (restart) await this.restart(again);
  }

  /** The container's init pid from crun's state (`<crun root>/<name>/status`), if it runs. */
  private initPid(name: string): number | undefined {
    try {
      const pid = Number(JSON.parse(readFileSync(join(this.crunRoot, name, 'status'), 'utf8')).pid);
      return Number.isInteger(pid) && pid > 1 && existsSync(`/proc/${pid}`) ? pid : undefined;
    } catch { return undefined; } // no state: not running under crun
  }

  /** Restart every container in one shell batch (one round trip, no spawn from Node). */
  async restartAll(): Promise<void> {
    await this.restart([...this.containers.values()]);
  }

  private async restart(cs: Container[]): Promise<void> {
    if (!cs.length) return;
    for (const c of cs) { c.stopping = true; c.resetBackoff(); }
    await mkdir(this.logDir, { recursive: true });
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
        if (await c.healthy()) { c.status.healthy = true; pending.delete(c); }
      }
      if (pending.size) await new Promise((r) => setTimeout(r, Math.min(...[...pending].map((c) => c.spec.healthcheck?.intervalMs ?? 100))));
    }
    for (const c of pending) c.status.healthy = false;
    return pending.size === 0;
  }

  list(): ContainerStatus[] {
    return [...this.containers.values()].map((c) => ({ ...c.status }));
  }

  async logs(name: string, tailBytes = 64 * 1024): Promise<string> {
    const c = this.get(name);
    try {
      const buf = await readFile(c.logPath);
      return buf.subarray(Math.max(0, buf.length - tailBytes)).toString('utf8');
    } catch { return ''; }
  }
}
