/**
 * Host side of the agent protocol (guest-agent/PROTOCOL.md) over the VM's
 * agent socket, typed by the protocol map in common/agent-protocol.ts: a call
 * names a command, its arguments are checked against that command's, and its
 * result has that command's type. Bounded over a long life: pending calls are
 * removed when they settle, and only the last few events are kept.
 */
import { randomInt } from 'node:crypto';
import { JsonSession, Pending, SessionError } from '../common/session.ts';
import { ScionError } from '../common/errors.ts';
import { RESYNC_BYTE, encodeFrame } from '../common/framing.ts';
import {
  AGENT_ERROR_CODES,
  type AgentCommand,
  type ArgsOf,
  type ResultOf,
  type AgentEvent,
  type AgentEventName,
  type AgentErrorCode,
} from '../common/agent-protocol.ts';

/** The guest agent answered with an error (its code from PROTOCOL.md) or not at all. */
export class AgentError extends ScionError {}

export type { AgentEvent };

/** Events kept for waitEvent() to find one that came before it was called. */
const RECENT_EVENTS = 32;

type CallArgs<C extends AgentCommand> =
  Record<string, never> extends ArgsOf<C> ? [args?: ArgsOf<C>, timeoutMs?: number] : [args: ArgsOf<C>, timeoutMs?: number];

interface WireResponse {
  id?: string | number | null;
  ok?: boolean;
  result?: unknown;
  error?: { code?: unknown; message?: unknown };
}

const agentCode = (c: unknown): AgentErrorCode | 'E_AGENT' => ((AGENT_ERROR_CODES as readonly unknown[]).includes(c) ? (c as AgentErrorCode) : 'E_AGENT');

/** The host's side of the agent protocol over a VM's agent socket: resync, typed calls (`call(cmd, args)`), events. */
export class AgentClient {
  private s: JsonSession;
  private pending = new Pending<WireResponse>();
  private seq = 0;
  private recent: AgentEvent[] = [];
  private listeners = new Set<(e: AgentEvent) => void>();

  constructor(readonly label = 'agent') {
    this.s = new JsonSession(label);
    this.s.on('message', (m: unknown) => {
      if (!m || typeof m !== 'object') return;
      if ('event' in m) {
        const e = m as AgentEvent;
        this.recent.push(e);
        if (this.recent.length > RECENT_EVENTS) this.recent.shift();
        for (const l of [...this.listeners]) l(e);
        return;
      }
      const r = m as WireResponse;
      if (r.id !== undefined && r.id !== null) this.pending.settle(r.id, r);
    });
    this.s.on('closed', () => this.pending.failAll(new SessionError('E_CLOSED', `${this.label}: connection closed`)));
  }

  async connect(path: string, timeoutMs = 5000) {
    await this.s.open(path, timeoutMs);
  }

  /**
   * Resynchronise: send the marker byte and a sync with a random nonce, and
   * ignore everything until the matching answer (stale bytes from an earlier
   * session, or from before a fork, are discarded). Retries until the deadline
   * since the guest may not be reading yet.
   */
  /** the protocol version the agent said at the last sync */
  protocol?: number;

  async sync(timeoutMs = 30_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const nonce = randomInt(1, 2 ** 47);
      const id = `sync-${nonce}`;
      const p = this.pending.add(id, Math.min(1000, Math.max(50, end - Date.now())), `${this.label}: sync`);
      try {
        this.s.sendRaw(Buffer.concat([Buffer.from([RESYNC_BYTE]), encodeFrame({ id, cmd: 'sync', args: { nonce } })]));
      } catch (e) {
        this.pending.drop(id);
        throw e;
      }
      try {
        const r = await p;
        const res = r.result as ResultOf<'sync'> | undefined;
        if (r.ok && res?.nonce === nonce) {
          this.protocol = res.protocol;
          return;
        }
      } catch (e) {
        if ((e as ScionError).code !== 'E_TIMEOUT') throw e;
      }
    }
    throw new AgentError('E_AGENT_TIMEOUT', `${this.label}: the agent did not answer within ${timeoutMs} ms`);
  }

  /** One command of the protocol; the agent's error comes back as an AgentError with the agent's code. */
  async call<C extends AgentCommand>(cmd: C, ...[args, timeoutMs = 60_000]: CallArgs<C>): Promise<ResultOf<C>> {
    const id = ++this.seq;
    const p = this.pending.add(id, timeoutMs, `${this.label}: ${cmd}`);
    try {
      this.s.send({ id, cmd, args: args ?? {} });
    } catch (e) {
      this.pending.drop(id);
      throw e;
    }
    const r = await p;
    if (!r.ok) throw new AgentError(agentCode(r.error?.code), `${this.label}: ${cmd}: ${typeof r.error?.message === 'string' ? r.error.message : 'failed'}`);
    return r.result as ResultOf<C>;
  }

  /** Call `l` once the connection has closed (the VM went away, or close() was called). */
  onClosed(l: () => void): void {
    this.s.on('closed', l);
  }

  /** Listen to every event; returns a function that stops listening. */
  onEvent(l: (e: AgentEvent) => void): () => void {
    this.listeners.add(l);
    return () => {
      this.listeners.delete(l);
    };
  }

  /** The next event of this name (or one of the last few already received) that `pred` accepts. */
  waitEvent<E extends AgentEventName>(name: E, pred: (e: AgentEvent<E>) => boolean = () => true, timeoutMs = 60_000): Promise<AgentEvent<E>> {
    const match = (e: AgentEvent): e is AgentEvent<E> => e.event === name && pred(e as AgentEvent<E>);
    const seen = this.recent.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const stop = this.onEvent((e) => {
        if (match(e)) {
          clearTimeout(t);
          stop();
          resolve(e);
        }
      });
      const t = setTimeout(() => {
        stop();
        reject(new AgentError('E_AGENT_TIMEOUT', `${this.label}: no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
    });
  }

  close() {
    this.s.close();
  }
}
