/** Host side of the agent protocol (guest-agent/PROTOCOL.md) over the VM's agent socket. */
import { randomInt } from 'node:crypto';
import { JsonSession, Pending, SessionError } from '../common/session.ts';
import { ScionError } from '../common/errors.ts';
import { RESYNC_BYTE, encodeFrame } from '../common/framing.ts';

export class AgentError extends ScionError {}

export interface AgentEvent { event: string; data: any; ts: number }

export class AgentClient {
  private s: JsonSession;
  private pending = new Pending<any>();
  private seq = 0;
  readonly events: AgentEvent[] = [];
  private listeners: ((e: AgentEvent) => void)[] = [];

  constructor(readonly label = 'agent') {
    this.s = new JsonSession(label);
    this.s.on('message', (m: any) => {
      if (m?.event) { this.events.push(m); for (const l of this.listeners) l(m); return; }
      if (m && m.id !== undefined && m.id !== null) this.pending.settle(m.id, m);
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
  async sync(timeoutMs = 30_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const nonce = randomInt(1, 2 ** 47);
      const id = `sync-${nonce}`;
      const p = this.pending.add(id, Math.min(1000, Math.max(50, end - Date.now())), `${this.label}: sync`);
      try { this.s.sendRaw(Buffer.concat([Buffer.from([RESYNC_BYTE]), encodeFrame({ id, cmd: 'sync', args: { nonce } })])); } catch (e) { this.pending.drop(id); throw e; }
      try {
        const r = await p;
        if (r.ok && r.result?.nonce === nonce) return;
      } catch (e) {
        if ((e as ScionError).code !== 'E_TIMEOUT') throw e;
      }
    }
    throw new AgentError('E_AGENT_TIMEOUT', `${this.label}: the agent did not answer within ${timeoutMs} ms`);
  }

  async call<T = any>(cmd: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> {
    const id = ++this.seq;
    const p = this.pending.add(id, timeoutMs, `${this.label}: ${cmd}`);
    try { this.s.send({ id, cmd, args }); } catch (e) { this.pending.drop(id); throw e; }
    const r = await p;
    if (!r.ok) throw new AgentError(r.error?.code ?? 'E_AGENT', `${this.label}: ${cmd}: ${r.error?.message ?? 'failed'}`);
    return r.result as T;
  }

  onEvent(l: (e: AgentEvent) => void) { this.listeners.push(l); }

  waitEvent(name: string, pred: (e: AgentEvent) => boolean = () => true, timeoutMs = 60_000): Promise<AgentEvent> {
    const seen = this.events.find((e) => e.event === name && pred(e));
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const l = (e: AgentEvent) => { if (e.event === name && pred(e)) { clearTimeout(t); this.listeners.splice(this.listeners.indexOf(l), 1); resolve(e); } };
      const t = setTimeout(() => { this.listeners.splice(this.listeners.indexOf(l), 1); reject(new AgentError('E_AGENT_TIMEOUT', `${this.label}: no ${name} event within ${timeoutMs} ms`)); }, timeoutMs);
      this.listeners.push(l);
    });
  }

  close() { this.s.close(); }
}
