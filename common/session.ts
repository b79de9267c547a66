/**
 * A JSON-lines session over a stream socket: the one framing/session layer
 * under both the QMP client and the agent client. Explicit run state; calls
 * in the wrong state fail with a state error; pending calls fail when the
 * connection drops.
 */
import { connect, type Socket } from 'node:net';
import { EventEmitter } from 'node:events';
import { FrameDecoder, encodeFrame, DEFAULT_MAX_FRAME } from './framing.ts';
import { ScionError } from './errors.ts';

export type SessionState = 'idle' | 'connecting' | 'running' | 'closed';

export class SessionError extends ScionError {}

export class JsonSession extends EventEmitter {
  state: SessionState = 'idle';
  protected socket?: Socket;
  private decoder: FrameDecoder;
  constructor(
    readonly label: string,
    maxFrame = DEFAULT_MAX_FRAME,
  ) {
    super();
    this.decoder = new FrameDecoder(maxFrame);
  }

  async open(path: string, timeoutMs = 5000): Promise<void> {
    if (this.state !== 'idle') throw new SessionError('E_STATE', `${this.label}: open() needs state idle, found ${this.state}`);
    this.state = 'connecting';
    try {
      this.socket = await new Promise<Socket>((resolve, reject) => {
        const s = connect(path);
        const t = setTimeout(() => {
          s.destroy();
          reject(new Error('timed out'));
        }, timeoutMs);
        s.once('connect', () => {
          clearTimeout(t);
          resolve(s);
        });
        s.once('error', (e) => {
          clearTimeout(t);
          reject(e);
        });
      });
    } catch (e) {
      this.state = 'idle'; // session guard: no half-connected client
      throw new SessionError('E_CONNECT', `${this.label}: cannot connect to ${path}: ${(e as Error).message}`, { cause: e });
    }
    this.state = 'running';
    this.socket.on('data', (chunk) => {
      for (const ev of this.decoder.push(chunk)) {
        if ('frame' in ev) {
          let msg: unknown;
          try {
            msg = JSON.parse(ev.frame);
          } catch {
            this.emit('garbage', ev.frame);
            continue;
          }
          this.emit('message', msg);
        } else if ('resync' in ev) this.emit('resync');
      }
    });
    this.socket.on('close', () => {
      this.state = 'closed';
      this.emit('closed');
    });
    this.socket.on('error', () => undefined); // a reset is followed by 'close', which fails the pending calls
  }

  sendRaw(data: Uint8Array) {
    if (this.state !== 'running' || !this.socket) throw new SessionError('E_STATE', `${this.label}: send needs state running, found ${this.state}`);
    this.socket.write(data);
  }
  send(msg: unknown) {
    this.sendRaw(encodeFrame(msg));
  }

  close() {
    this.socket?.destroy();
    this.state = 'closed';
  }
}

/** Request/response correlation by id, with timeouts; shared by QMP and the agent client. */
export class Pending<T> {
  private map = new Map<string | number, { resolve: (v: T) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  add(id: string | number, timeoutMs: number, what: string): Promise<T> {
    const p = new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.map.delete(id);
        reject(new SessionError('E_TIMEOUT', `${what} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.map.set(id, { resolve, reject, timer });
    });
    // a caller whose send() then throws never awaits this; its later timeout must not be an unhandled rejection
    p.catch(() => undefined);
    return p;
  }

  /** Forget a call whose request could not be sent. */
  drop(id: string | number) {
    const p = this.map.get(id);
    if (p) {
      clearTimeout(p.timer);
      this.map.delete(id);
    }
  }
  settle(id: string | number, v: T): boolean {
    const p = this.map.get(id);
    if (!p) return false;
    clearTimeout(p.timer);
    this.map.delete(id);
    p.resolve(v);
    return true;
  }
  failAll(e: Error) {
    for (const [id, p] of this.map) {
      clearTimeout(p.timer);
      p.reject(e);
      this.map.delete(id);
    }
  }
}
