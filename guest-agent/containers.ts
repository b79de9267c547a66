/**
 * Containers run by crun from the OCI bundles in the image. Each runs under a
 * foreground `crun run` started detached from the agent, with its output in a
 * per-container log file, so it survives an agent restart; a new agent adopts
 * running containers from crun's state instead of starting duplicates.
 */
import { spawn, execFile } from 'node:child_process';
import { readFile, writeFile, open, stat, truncate, mkdir } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { request } from 'node:http';
import { join } from 'node:path';
import { ProtocolError } from './protocol.ts';

export interface HealthCheck { http?: { port: number; path: string }; tcp?: { port: number }; command?: string[]; intervalMs: number; timeoutMs: number }
export interface ContainerSpec { name: string; restart: 'always' | 'on-failure' | 'no'; healthcheck?: HealthCheck; ports: number[]; bundle: string }
export type ContainerStateName = 'created' | 'running' | 'stopped' | 'restarting';
export interface ContainerStatus { name: string; state: ContainerStateName; pid?: number; startedAt?: number; restarts: number; exitCode?: number; healthy?: boolean }

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
  constructor(readonly spec: ContainerSpec, readonly sup: ContainerSupervisor) {
    this.status = { name: spec.name, state: 'created', restarts: 0 };
  }
  get logPath() { return join(this.sup.logDir, `${this.spec.name}.log`); }

  async start(): Promise<void> {
    this.stopping = false;
    await mkdir(this.sup.logDir, { recursive: true });
    await crun(['delete', '-f', this.spec.name], this.sup.crunBin).catch(() => {});
    try { if ((await stat(this.logPath)).size > LOG_LIMIT) await truncate(this.logPath, 0); } catch {}
    const log = await open(this.logPath, 'a');
    const p = spawn(this.sup.crunBin, ['run', '--bundle', this.spec.bundle, this.spec.name], { stdio: ['ignore', log.fd, log.fd], detached: true });
    await log.close();
    this.status = { ...this.status, state: 'running', startedAt: Date.now(), pid: p.pid, exitCode: undefined, healthy: undefined };
    p.on('exit', (code, sig) => this.exited(code ?? (sig ? 128 : 1)));
    p.unref();
  }

  /** Adopt a container found running in crun's state (after an agent restart). */
  adopt(pid: number, startedAt?: number) {
    this.status = { ...this.status, state: 'running', pid, startedAt: startedAt ?? Date.now() };
    this.watch = setInterval(() => {
      if (!existsSync(`/proc/${pid}`) || /\) Z /.test(safeRead(`/proc/${pid}/stat`))) { clearInterval(this.watch); this.exited(undefined); }
    }, 500);
    this.watch.unref();
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
    await crun(['kill', this.spec.name, 'KILL'], this.sup.crunBin).catch(() => {});
    await crun(['delete', '-f', this.spec.name], this.sup.crunBin).catch(() => {});
    this.status = { ...this.status, state: 'stopped', pid: undefined };
  }

  async healthy(): Promise<boolean> {
    const h = this.spec.healthcheck;
    if (!h) return this.status.state === 'running';
    if (h.http) return httpOk(h.http.port, h.http.path, h.timeoutMs);
    if (h.tcp) return tcpOk(h.tcp.port, h.timeoutMs);
    return crun(['exec', this.spec.name, ...h.command!], this.sup.crunBin).then(() => true, () => false);
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
  constructor(specs: ContainerSpec[], readonly emit: (event: string, data: unknown) => void, readonly logDir = '/run/scion/logs', readonly crunBin = 'crun') {
    for (const s of specs) this.containers.set(s.name, new Container(s, this));
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
    try { running = JSON.parse(await crun(['list', '--format', 'json'], this.crunBin)) ?? []; } catch {}
    for (const c of this.containers.values()) {
      const r = running.find((x) => x.id === c.spec.name && x.status === 'running' && x.pid > 0);
      if (r) c.adopt(r.pid, r.created ? Date.parse(r.created) : undefined);
      else await c.start();
    }
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

  async restartAll(): Promise<void> {
    await Promise.all([...this.containers.values()].map(async (c) => {
      await c.stop();
      c.resetBackoff();
      await c.start();
      c.status.restarts++;
      this.emit('container-restarted', { name: c.spec.name, restarts: c.status.restarts, reason: 'identity' });
    }));
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
