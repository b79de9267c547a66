/**
 * The front door's clones: forked on demand through the host core's library
 * API (so `scion ls` sees them, owned by this process, and `scion gc` can
 * clean them), kept paused in a pool, handed to requests, removed when idle
 * or dead. Decisions (which clone, whether to fork) are pure functions; the
 * Fleet applies them.
 */
import { Agent as HttpAgent } from 'node:http';
import { fork, type CloneResult } from '../clone.ts';
import { removeVm } from '../lifecycle.ts';
import { Machine } from '../machine/machine.ts';
import { ScionError } from '../../common/errors.ts';
import { templateBase } from '../../common/names.ts';
import type { ServeOptions } from './options.ts';

export type MemberState = 'starting' | 'ready' | 'busy' | 'pooled' | 'stopping';

export interface Member {
  name: string;
  hostname: string;
  /** where the guest port is reached from the host: 127.0.0.1 and a forwarded port (user-mode), or the clone's address (bridge) */
  host: string;
  port: number;
  state: MemberState;
  active: number;
  lastUsed: number;
  /** per-request mode: taken by one request, removed after it */
  exclusive: boolean;
  http: HttpAgent;
  /** pooled clones keep their handle (and its agent connection), to resume and set the clock at once when claimed */
  machine?: Machine;
  paused?: boolean;
}

export class QueueFullError extends ScionError {}

/** Shared mode: the least busy clone with room for one more request. Pure. */
export function pickShared(members: Iterable<Member>, concurrency: number): Member | undefined {
  let best: Member | undefined;
  for (const m of members) {
    if ((m.state !== 'ready' && m.state !== 'busy') || m.exclusive || m.active >= concurrency) continue;
    if (!best || m.active < best.active) best = m;
  }
  return best;
}

/** Per-request mode: a ready clone no request has taken yet. Pure. */
export function pickFresh(members: Iterable<Member>): Member | undefined {
  for (const m of members) if (m.state === 'ready' && m.active === 0 && !m.exclusive) return m;
  return undefined;
}

/**
 * How many clones to fork now for `waiting` requests: enough for them, within
 * --max, and no more at once than `parallel` (forks share the host's cores:
 * two at a time finish, and start serving the queue, long before eight would). Pure.
 */
export function forksNeeded(o: { waiting: number; starting: number; total: number; max: number; perClone: number; parallel?: number }): number {
  const coming = o.starting * o.perClone;
  const want = Math.ceil(Math.max(0, o.waiting - coming) / o.perClone);
  return Math.max(0, Math.min(want, o.max - o.total, (o.parallel ?? Infinity) - o.starting));
}

/** Shared-mode clones to remove: idle past the limit, beyond the minimum, oldest first. Pure. */
export function idleToRemove(members: Member[], now: number, idleMs: number, min: number): Member[] {
  const live = members.filter((m) => m.state === 'ready' || m.state === 'busy');
  const idle = live.filter((m) => m.active === 0 && now - m.lastUsed >= idleMs).sort((a, b) => a.lastUsed - b.lastUsed);
  return idle.slice(0, Math.max(0, live.length - min));
}

interface Waiter {
  resolve: (m: Member) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  exclusive: boolean;
}

export interface FleetEvents {
  scale(ev: { direction: 'up' | 'down'; reason: string; clone: string; clones: number; ms?: number }): void;
  forkFailed(e: Error): void;
  forked(ms: number): void;
  claim(hit: boolean): void;
}

export class Fleet {
  readonly members = new Map<string, Member>();
  private waiting: Waiter[] = [];
  private starting = 0;
  private closed = false;
  private timer?: NodeJS.Timeout;

  constructor(
    readonly template: string,
    readonly o: ServeOptions,
    private readonly ev: FleetEvents,
  ) {}

  get queueDepth(): number {
    return this.waiting.length;
  }
  total(): number {
    return this.members.size + this.starting;
  }
  counts(): Record<MemberState, number> {
    const c: Record<MemberState, number> = { starting: this.starting, ready: 0, busy: 0, pooled: 0, stopping: 0 };
    for (const m of this.members.values()) c[m.state]++;
    return c;
  }

  start(): void {
    this.timer = setInterval(() => this.tick(), 250);
    this.timer.unref();
    this.tick();
  }

  /** A clone for one request (shared: a slot on a clone; per-request: a fresh clone of its own). */
  acquire(): Promise<Member> {
    if (this.closed) return Promise.reject(new ScionError('E_CLOSED', 'the front door is shutting down'));
    const exclusive = this.o.mode === 'per-request';
    const shared = exclusive ? pickFresh(this.members.values()) : pickShared(this.members.values(), this.o.concurrency);
    if (shared) {
      this.take(shared, exclusive);
      return Promise.resolve(shared);
    }
    const pooled = this.takeParked(exclusive);
    if (pooled) return pooled;
    if (this.waiting.length >= this.o.queue)
      return Promise.reject(new QueueFullError('E_QUEUE_FULL', `${this.waiting.length} requests are already waiting for a clone (--queue ${this.o.queue})`));
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        resolve,
        reject,
        exclusive,
        timer: setTimeout(() => {
          this.waiting = this.waiting.filter((x) => x !== w);
          reject(new QueueFullError('E_QUEUE_TIMEOUT', `no clone within ${this.o.queueTimeoutMs} ms (--queue-timeout)`));
        }, this.o.queueTimeoutMs),
      };
      this.waiting.push(w);
      if (this.o.pool > 0) this.ev.claim(false);
      this.scaleForWaiters();
    });
  }

  release(m: Member, failed = false): void {
    m.active = Math.max(0, m.active - 1);
    m.lastUsed = Date.now();
    if (failed || m.exclusive) {
      void this.remove(m, failed ? 'died mid-request' : 'request done');
      return;
    }
    if (m.state === 'busy' && m.active === 0) m.state = 'ready';
    this.serveWaiters();
  }

  private take(m: Member, exclusive: boolean): void {
    m.active++;
    m.lastUsed = Date.now();
    m.exclusive = m.exclusive || exclusive;
    m.state = 'busy';
  }

  /** One of the front door's parked (paused, pre-forked) clones, resumed (QMP cont) with its clock set and taken for one request; undefined if none is parked. (The node-wide pool of the shim is Machine.claimPooled.) */
  private takeParked(exclusive: boolean): Promise<Member> | undefined {
    const m = [...this.members.values()].find((x) => x.state === 'pooled');
    if (!m) return undefined;
    m.state = 'busy'; // not pooled any more: nobody else claims it
    this.take(m, exclusive);
    this.ev.claim(true);
    this.tick(); // refill the pool in the background
    return this.resume(m).then(
      () => m,
      async (e) => {
        await this.remove(m, 'could not be resumed');
        throw e;
      },
    );
  }

  /** Resume a pooled clone: cont, then set its clock (it stood still while paused). */
  private async resume(m: Member): Promise<void> {
    if (!m.paused || !m.machine) return;
    try {
      await m.machine.resume({ setClock: true });
      m.paused = false;
    } finally {
      m.machine.close();
      m.machine = undefined;
    }
  }

  private scaleForWaiters(): void {
    const perClone = this.o.mode === 'per-request' ? 1 : this.o.concurrency;
    const n = forksNeeded({
      waiting: this.waiting.length,
      starting: this.starting,
      total: this.total(),
      max: this.o.max,
      perClone,
      parallel: this.o.forkParallel,
    });
    for (let i = 0; i < n; i++) void this.forkOne('demand');
  }

  private serveWaiters(): void {
    while (this.waiting.length) {
      const w = this.waiting[0];
      const shared = w.exclusive ? undefined : pickShared(this.members.values(), this.o.concurrency);
      if (shared) {
        this.waiting.shift();
        clearTimeout(w.timer);
        this.take(shared, false);
        w.resolve(shared);
        continue;
      }
      // a fresh clone (per-request) or a new shared one: any ready clone nobody uses, else a pooled one
      const fresh = w.exclusive ? pickFresh(this.members.values()) : undefined;
      if (fresh) {
        this.waiting.shift();
        clearTimeout(w.timer);
        this.take(fresh, true);
        w.resolve(fresh);
        continue;
      }
      const pooled = this.takeParked(w.exclusive);
      if (!pooled) break;
      this.waiting.shift();
      clearTimeout(w.timer);
      pooled.then(w.resolve, w.reject);
    }
    this.scaleForWaiters();
  }

  private forking = new Set<Promise<void>>();
  private forks = 0;

  /** Fork one clone; close() waits for every fork under way, so none outlives the fleet. */
  private forkOne(reason: string, pooled = false): Promise<void> {
    const p = this.forkOneNow(reason, pooled);
    this.forking.add(p);
    return p.finally(() => this.forking.delete(p));
  }

  private async forkOneNow(reason: string, pooled: boolean): Promise<void> {
    if (this.closed) return;
    this.starting++;
    const t0 = performance.now();
    let c: CloneResult;
    try {
      // clone indices (and so MACs, IPs, names) are reused once freed; the hostname also carries
      // this front door's own count, so two requests in a row never see the same one
      [c] = await fork(this.template, {
        n: 1,
        owner: { pid: process.pid, kind: 'serve' },
        hostname: `${templateBase(this.template).slice(0, 30)}-{n}-${++this.forks}`,
      });
    } catch (e) {
      this.starting--;
      this.ev.forkFailed(e as Error);
      // a waiting request learns at its timeout; try again on the next tick
      return;
    }
    this.starting--;
    const ms = Math.round(performance.now() - t0);
    this.ev.forked(ms);
    const bridged = !(String(this.o.guestPort) in c.ports);
    const m: Member = {
      name: c.name,
      hostname: c.hostname,
      host: bridged ? c.ip : '127.0.0.1',
      port: bridged ? this.o.guestPort : c.ports[String(this.o.guestPort)],
      state: 'ready',
      active: 0,
      lastUsed: Date.now(),
      exclusive: false,
      http: new HttpAgent({ keepAlive: true, maxSockets: this.o.concurrency }),
    };
    if (pooled) {
      // paused before anyone can see it: a request never lands on a clone that is being stopped
      this.starting++;
      try {
        await this.pause(m);
      } catch (e) {
        this.ev.forkFailed(e as Error);
        this.members.set(m.name, m);
        this.starting--;
        await this.remove(m, 'could not be paused');
        return;
      }
      this.starting--;
    }
    this.members.set(m.name, m);
    if (this.closed) {
      await this.remove(m, 'shutting down');
      return;
    }
    this.ev.scale({ direction: 'up', reason, clone: m.name, clones: this.members.size, ms });
    this.serveWaiters(); // serves the queue, and forks the next clones while requests still wait
  }

  /**
   * Pause a fresh clone for the pool: QMP stop, so it costs no CPU while it
   * waits. Its handle keeps the agent connection (synced now) for the claim's
   * clock; the claim reconnects QMP (QEMU serves one monitor client at a time,
   * so it is not held meanwhile: others may look).
   */
  private async pause(m: Member): Promise<void> {
    const machine = await Machine.open(m.name);
    try {
      await machine.agent(10_000);
      await machine.pause();
      machine.closeMonitor();
    } catch (e) {
      machine.close();
      throw e;
    }
    m.machine = machine;
    m.paused = true;
    m.state = 'pooled';
  }

  private removals = new Map<string, Promise<void>>();

  /** Remove a clone (once: a second call waits for the first). */
  remove(m: Member, reason: string): Promise<void> {
    const under = this.removals.get(m.name);
    if (under) return under;
    const p = this.removeNow(m, reason).finally(() => this.removals.delete(m.name));
    this.removals.set(m.name, p);
    return p;
  }

  private async removeNow(m: Member, reason: string): Promise<void> {
    m.state = 'stopping';
    m.machine?.close();
    m.machine = undefined;
    m.http.destroy();
    try {
      await removeVm(m.name, { force: true });
    } catch (e) {
      this.ev.forkFailed(e as Error);
    }
    this.members.delete(m.name);
    this.ev.scale({ direction: 'down', reason, clone: m.name, clones: this.members.size });
    if (!this.closed) this.tick();
  }

  /** Keep the minimum and the pool, remove what idled too long. */
  private tick(): void {
    if (this.closed) return;
    const c = this.counts();
    for (const m of idleToRemove([...this.members.values()], Date.now(), this.o.idleMs, this.o.min))
      void this.remove(m, `idle ${Math.round((Date.now() - m.lastUsed) / 1000)} s`);
    if (this.o.mode === 'shared') {
      const live = c.ready + c.busy + c.starting - this.poolStarting;
      for (let i = live; i < this.o.min && this.total() < this.o.max; i++) void this.forkOne('min');
    }
    const poolMissing = this.o.pool - c.pooled - this.poolStarting;
    for (let i = 0; i < poolMissing && this.total() < this.o.max; i++) {
      this.poolStarting++;
      void this.forkOne('pool', true).finally(() => this.poolStarting--);
    }
  }
  private poolStarting = 0;

  /** Stop taking requests; fail the waiting ones; remove every clone this fleet made. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    for (const w of this.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new ScionError('E_CLOSED', 'the front door is shutting down'));
    }
    // a fork under way ends by removing its clone (it sees `closed`)
    await Promise.allSettled([...this.forking]);
    await Promise.all([...this.members.values()].map((m) => this.remove(m, 'shutting down')));
    await Promise.allSettled([...this.removals.values()]);
  }
}
