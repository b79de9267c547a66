/**
 * QMP client (no maintained one on npm fits: the few there are unmaintained
 * or callback-era). Greeting, qmp_capabilities, commands with ids, events,
 * timeouts, typed errors.
 */
import { JsonSession, Pending, SessionError } from '../../common/session.ts';
import { ScionError } from '../../common/errors.ts';

/** QEMU's monitor refused a command: its error class and description. */
export class QmpError extends ScionError {
  constructor(
    readonly command: string,
    readonly qmpClass: string,
    desc: string,
  ) {
    super('E_QMP', `QMP ${command} failed: ${qmpClass}: ${desc}`);
  }
}

const RECENT_EVENTS = 32;

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** What QEMU sends on the monitor: its greeting, a command's answer (`return` or `error`, with the command's id), or an event. */
interface QmpMessage {
  QMP?: { version?: unknown; capabilities?: unknown };
  id?: string;
  return?: unknown;
  error?: { class?: unknown; desc?: unknown };
  event?: string;
  data?: Record<string, unknown>;
  timestamp?: QmpEvent['timestamp'];
}

export class QmpClient {
  private s: JsonSession;
  private pending = new Pending<QmpMessage>();
  private seq = 0;
  greeting?: QmpMessage;
  /** the last few events, for waitEvent() to find one that came before it was called (bounded: a VM emits events all its life) */
  private recent: QmpEvent[] = [];
  private waiters: { name: string; pred: (e: QmpEvent) => boolean; resolve: (e: QmpEvent) => void }[] = [];

  constructor(readonly label = 'qmp') {
    this.s = new JsonSession(label);
  }

  async connect(path: string, timeoutMs = 5000): Promise<void> {
    const greeted = new Promise<QmpMessage>((resolve, reject) => {
      const t = setTimeout(() => reject(new SessionError('E_TIMEOUT', `${this.label}: no QMP greeting within ${timeoutMs} ms`)), timeoutMs);
      this.s.once('message', (m: QmpMessage) => {
        clearTimeout(t);
        m?.QMP ? resolve(m) : reject(new SessionError('E_PROTOCOL', `${this.label}: expected a QMP greeting, got ${JSON.stringify(m).slice(0, 200)}`));
      });
    });
    greeted.catch(() => undefined); // observed below; never an unhandled rejection if open() fails first
    await this.s.open(path, timeoutMs);
    this.greeting = await greeted;
    this.s.on('message', (m: QmpMessage) => this.onMessage(m));
    this.s.on('closed', () => this.pending.failAll(new SessionError('E_CLOSED', `${this.label}: connection closed`)));
    await this.execute('qmp_capabilities');
  }

  private onMessage(m: QmpMessage) {
    if (!m || typeof m !== 'object' || Array.isArray(m)) return; // not a QMP message: ignored, as QEMU never sends one
    if (m.event) {
      const e = m as QmpEvent;
      this.recent.push(e);
      if (this.recent.length > RECENT_EVENTS) this.recent.shift();
      for (const w of [...this.waiters])
        if (w.name === e.event && w.pred(e)) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          w.resolve(e);
        }
      return;
    }
    if (m.id !== undefined) this.pending.settle(m.id, m);
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    const id = `q${++this.seq}`;
    const p = this.pending.add(id, timeoutMs, `${this.label}: ${command}`);
    try {
      this.s.send(args ? { execute: command, arguments: args, id } : { execute: command, id });
    } catch (e) {
      this.pending.drop(id);
      throw e;
    }
    const r = await p;
    if (r.error) throw new QmpError(command, String(r.error.class ?? 'GenericError'), String(r.error.desc ?? ''));
    if (!('return' in r))
      throw new SessionError('E_PROTOCOL', `${this.label}: ${command}: a reply with neither "return" nor "error": ${JSON.stringify(r).slice(0, 200)}`);
    return r.return as T;
  }

  /** Wait for an event (including one of the last few already received). */
  waitEvent(name: string, pred: (e: QmpEvent) => boolean = () => true, timeoutMs = 30_000): Promise<QmpEvent> {
    const seen = this.recent.find((e) => e.event === name && pred(e));
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = {
        name,
        pred,
        resolve: (e: QmpEvent) => {
          clearTimeout(t);
          resolve(e);
        },
      };
      const t = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new SessionError('E_TIMEOUT', `${this.label}: no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  close() {
    this.s.close();
  }
}
