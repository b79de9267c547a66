/**
 * ttrpc over unix sockets: a server for the Task service containerd calls,
 * and a client for the events the shim publishes back to containerd. The
 * messages are protobufjs's, from containerd's .proto files (shim/proto.ts).
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { FrameReader, encodeFrame, MessageType } from './ttrpc-frame.ts';
import { encode, decode, methods, type Msg } from './proto.ts';

/** gRPC status codes (google.rpc.Code) that containerd maps to its errdefs. */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  FAILED_PRECONDITION: 9,
  RESOURCE_EXHAUSTED: 8,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
} as const;

/** A failed call: its gRPC code and message go back in the response's status. */
export class TtrpcError extends Error {
  constructor(
    readonly grpcCode: number,
    message: string,
  ) {
    super(message);
  }
}

export type HandlerContext = { service: string; method: string; metadata: { key: string; value: string }[] };
export type Handler = (req: Msg, ctx: HandlerContext) => Promise<Msg> | Msg;

/** Handlers for a service whose methods are typed (shim/proto/task-types.ts): each reads its request and answers its response, fields it leaves out taking their defaults. */
export type TypedHandlers<M extends MethodTypes<M>> = {
  [K in keyof M]?: (req: M[K]['request'], ctx: HandlerContext) => Promise<Answer<M[K]['response']>> | Answer<M[K]['response']>;
};
type MethodTypes<M> = { [K in keyof M]: { request: object; response: object } };
/** A response as a handler may give it: any field, at any depth, left to its default. */
export type Answer<T> = T extends Buffer ? T : T extends (infer U)[] ? Answer<U>[] : T extends object ? { [K in keyof T]?: Answer<T[K]> } : T;

interface Registered {
  request: string;
  response: string;
  handler?: Handler;
}

export class TtrpcServer {
  private readonly services = new Map<string, Map<string, Registered>>();
  private server?: Server;
  private readonly sockets = new Set<Socket>();
  onError: (e: Error) => void = () => {};
  /** Called when the last open connection closes. */
  onLastClose: () => void = () => {};

  /** Serve `service` (a fully qualified name from the .proto files) with `handlers`; methods without one answer Unimplemented. */
  register<M extends MethodTypes<M>>(service: string, typed: TypedHandlers<M>, alias: string[] = []): void {
    // decode gives each request as its type says (defaults filled): the one place the typed table meets the wire
    const handlers = typed as Record<string, Handler>;
    const table = new Map<string, Registered>();
    for (const [name, types] of methods(service)) table.set(name, { ...types, handler: handlers[name] });
    for (const n of Object.keys(handlers)) if (!table.has(n)) throw new Error(`${service} has no method ${n}`);
    for (const s of [service, ...alias]) this.services.set(s, table);
  }

  listen(path: string): Promise<void> {
    this.server = createServer((s) => this.serveConnection(s));
    return new Promise((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(path, () => resolve());
    });
  }

  close(): void {
    this.server?.close();
    for (const s of this.sockets) s.destroy();
  }

  get connections(): number {
    return this.sockets.size;
  }

  private serveConnection(sock: Socket) {
    this.sockets.add(sock);
    const reader = new FrameReader();
    sock.on('close', () => {
      this.sockets.delete(sock);
      if (!this.sockets.size) this.onLastClose();
    });
    sock.on('error', () => {});
    const reply = (streamId: number, response: Msg) => {
      if (!sock.destroyed) sock.write(encodeFrame({ streamId, type: MessageType.Response, payload: encode('ttrpc.Response', response) }));
    };
    sock.on('data', (chunk) => {
      let frames: ReturnType<typeof reader.push>;
      try {
        frames = reader.push(chunk);
      } catch (e) {
        this.onError(e as Error);
        sock.destroy();
        return;
      }
      for (const f of frames) {
        if ('oversize' in f) {
          reply(f.oversize.streamId, { status: { code: Code.RESOURCE_EXHAUSTED, message: `message of ${f.oversize.length} bytes is over the 4 MiB limit` } });
          continue;
        }
        if (f.type !== MessageType.Request) continue; // data frames belong to streaming calls, which the Task service has none of
        void this.call(f.payload).then((r) => reply(f.streamId, r));
      }
    });
  }

  private async call(payload: Uint8Array): Promise<Msg> {
    let req: { service: string; method: string; payload: Buffer; metadata: { key: string; value: string }[] };
    try {
      req = decode('ttrpc.Request', payload);
    } catch (e) {
      return { status: { code: Code.INVALID_ARGUMENT, message: `not a ttrpc request: ${(e as Error).message}` } };
    }
    const m = this.services.get(req.service)?.get(req.method);
    if (!m?.handler) return { status: { code: Code.UNIMPLEMENTED, message: `${req.service}/${req.method} is not implemented by the scion shim` } };
    try {
      const args = decode(m.request, req.payload);
      const out = await m.handler(args, { service: req.service, method: req.method, metadata: req.metadata });
      return { payload: encode(m.response, out) };
    } catch (e) {
      const err = e as Error;
      if (!(err instanceof TtrpcError)) this.onError(err);
      return { status: { code: err instanceof TtrpcError ? err.grpcCode : Code.INTERNAL, message: err.message } };
    }
  }
}

/** A ttrpc client: one connection, calls matched to answers by stream id. */
export class TtrpcClient {
  private sock?: Socket;
  private nextStream = 1;
  private readonly pending = new Map<number, { resolve: (m: Msg) => void; reject: (e: Error) => void }>();

  constructor(readonly path: string) {}

  private connection(): Promise<Socket> {
    if (this.sock && !this.sock.destroyed) return Promise.resolve(this.sock);
    return new Promise((resolve, reject) => {
      const s = connect(this.path);
      const reader = new FrameReader();
      s.once('connect', () => {
        this.sock = s;
        resolve(s);
      });
      s.once('error', (e) => {
        reject(e);
        this.fail(e);
      });
      s.on('close', () => this.fail(new Error(`ttrpc connection to ${this.path} closed`)));
      s.on('data', (c) => {
        for (const f of reader.push(c)) {
          const streamId = 'oversize' in f ? f.oversize.streamId : f.streamId;
          const p = this.pending.get(streamId);
          if (!p) continue;
          this.pending.delete(streamId);
          if ('oversize' in f) {
            p.reject(new TtrpcError(Code.RESOURCE_EXHAUSTED, 'answer over the 4 MiB limit'));
            continue;
          }
          const r = decode<{ status?: { code: number; message: string }; payload: Buffer }>('ttrpc.Response', f.payload);
          if (r.status && r.status.code !== Code.OK) p.reject(new TtrpcError(r.status.code, r.status.message));
          else p.resolve({ payload: r.payload });
        }
      });
    });
  }

  private fail(e: Error) {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.sock = undefined;
  }

  /** Call service/method with `request` (typed by the service's .proto); resolves with the decoded answer. `as`: the service name on the wire, if another. */
  async call(service: string, method: string, request: Msg, opts: { metadata?: { key: string; value: string }[]; as?: string } = {}): Promise<Msg> {
    const m = methods(service).get(method);
    if (!m) throw new Error(`${service} has no method ${method}`);
    const s = await this.connection();
    const streamId = this.nextStream;
    this.nextStream += 2;
    const answer = new Promise<Msg>((resolve, reject) => this.pending.set(streamId, { resolve, reject }));
    s.write(
      encodeFrame({
        streamId,
        type: MessageType.Request,
        payload: encode('ttrpc.Request', { service: opts.as ?? service, method, payload: encode(m.request, request), metadata: opts.metadata ?? [] }),
      }),
    );
    const r = await answer;
    return decode(m.response, r.payload as Uint8Array);
  }

  close(): void {
    this.sock?.destroy();
    this.fail(new Error('closed'));
  }
}
