/**
 * `serve`: the front door. An HTTP/1.1 server (keep-alive; WebSocket upgrades
 * pass through) that hands each request to a clone from the Fleet, holds
 * requests while clones fork (bounded queue and wait), answers 503 with
 * Retry-After past either bound and 502 when a clone dies mid-request, and
 * an admin server with Prometheus metrics and /healthz. It is a client of the
 * host core's library API: everything it forks, `scion ls` shows as owned
 * by it and `scion gc` can clean after a SIGKILL.
 */
import { createServer, request as httpRequest, type IncomingMessage, type ServerResponse, type Server } from 'node:http';
import { connect, createServer as createTcpServer, type Socket } from 'node:net';
import { Registry, Counter, Gauge, Histogram, collectDefaultMetrics } from 'prom-client';
import { ScionError } from '../../common/errors.ts';
import { validName } from '../../common/names.ts';
import { checkTemplate } from '../template.ts';
import { up } from '../up.ts';
import { Fleet, type Member, type MemberState } from './fleet.ts';
import type { ServeOptions } from './options.ts';

/** Fork times stats() keeps: a front door forks clones all its life. */
export const FORK_TIMES_KEPT = 1000;

/** A running front door: its addresses and template, `stats()`, and `close()`. */
export interface ServeHandle {
  address: { host: string; port: number };
  admin?: { host: string; port: number };
  template: string;
  /** forkMs: the last FORK_TIMES_KEPT fork-to-ready times (the histogram in /metrics has them all) */
  stats(): { clones: Record<MemberState, number>; queue: number; requests: Record<string, number>; forkMs: number[]; maxClones: number };
  /** stop accepting, drain in-flight requests (bounded by drainMs), remove every clone */
  close(): Promise<void>;
}

const HOP_BY_HOP = ['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade'];

function metrics() {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'scion_serve_process_' });
  return {
    registry,
    requests: new Counter({ name: 'scion_serve_requests_total', help: 'Requests by outcome', labelNames: ['outcome'], registers: [registry] }),
    queue: new Gauge({ name: 'scion_serve_queue_depth', help: 'Requests waiting for a clone', registers: [registry] }),
    clones: new Gauge({ name: 'scion_serve_clones', help: 'Clones by state', labelNames: ['state'], registers: [registry] }),
    forkSeconds: new Histogram({
      name: 'scion_serve_fork_seconds',
      help: 'Fork to ready, seconds',
      buckets: [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30],
      registers: [registry],
    }),
    pool: new Counter({
      name: 'scion_serve_pool_claims_total',
      help: 'Pool claims: hit (a paused clone was there) or miss',
      labelNames: ['result'],
      registers: [registry],
    }),
    scale: new Counter({
      name: 'scion_serve_scale_events_total',
      help: 'Clones added (up) or removed (down)',
      labelNames: ['direction'],
      registers: [registry],
    }),
  };
}

function listen(server: Server | import('node:net').Server, addr: { host: string; port: number }): Promise<{ host: string; port: number }> {
  return new Promise((resolve, reject) => {
    server.once('error', (e) =>
      reject(
        new ScionError('E_LISTEN', `cannot listen on ${addr.host}:${addr.port}: ${(e as Error).message}`, { hint: 'choose another --listen/--admin address' }),
      ),
    );
    server.listen(addr.port, addr.host, () => {
      const a = server.address();
      resolve({ host: addr.host, port: typeof a === 'object' && a ? a.port : addr.port });
    });
  });
}

/** The outcome label of a request no clone was found for. */
function refused(e: unknown): string {
  const code = (e as ScionError).code;
  return code === 'E_QUEUE_FULL' ? 'queue_full' : code === 'E_QUEUE_TIMEOUT' ? 'queue_timeout' : 'unavailable';
}

/** Forward one request to a clone; retries a refused connection for a clone that just became ready (no body sent yet). */
function forward(req: IncomingMessage, res: ServerResponse, m: Member): Promise<'ok' | 'clone-died' | 'client-gone'> {
  return new Promise((resolve) => {
    let settled = false;
    const done = (r: 'ok' | 'clone-died' | 'client-gone') => {
      if (!settled) {
        settled = true;
        resolve(r);
      }
    };
    const headers = { ...req.headers };
    for (const h of HOP_BY_HOP) delete headers[h];
    headers['x-forwarded-for'] = req.socket.remoteAddress ?? '';
    const bodyless = (req.method === 'GET' || req.method === 'HEAD') && !req.headers['content-length'];
    let tries = 0;
    let current: ReturnType<typeof httpRequest> | undefined;
    // the client went away before the response was complete: the clone's side is dropped, its slot freed
    res.on('close', () => {
      if (!res.writableFinished) {
        current?.destroy();
        done('client-gone');
      }
    });
    const attempt = () => {
      const up = (current = httpRequest({ host: m.host, port: m.port, method: req.method, path: req.url, headers, agent: m.http }, (r) => {
        res.writeHead(r.statusCode ?? 502, r.statusMessage, Object.fromEntries(Object.entries(r.headers).filter(([k]) => !HOP_BY_HOP.includes(k))));
        r.pipe(res);
        r.on('end', () => done('ok'));
        r.on('error', () => {
          res.destroy();
          done('clone-died');
        });
      }));
      up.on('error', (e: NodeJS.ErrnoException) => {
        if (settled) return;
        if (bodyless && e.code === 'ECONNREFUSED' && tries++ < 50 && !res.headersSent) {
          setTimeout(attempt, 20);
          return;
        }
        // the request body may be unread: close the connection after this answer rather than keep it alive
        if (!res.headersSent) {
          res.writeHead(502, { 'content-type': 'text/plain', connection: 'close' });
          res.end(`clone ${m.name} failed: ${e.message}\n`);
        } else res.destroy();
        done('clone-died');
      });
      if (bodyless) up.end();
      else req.pipe(up);
    };
    attempt();
  });
}

/**
 * The template a front door serves: made from an image definition or an
 * image's reference (the up policy reuses a frozen one), pulled from a
 * template snapshot's reference (once per node), or named; checked to be servable.
 */
async function servedTemplate(o: ServeOptions, log: (line: string) => void): Promise<string> {
  let template: string;
  // a name has no '/': anything with one is a path or a registry reference
  if (/\.ya?ml$/.test(o.source) || o.source.includes('/')) {
    const r = await up(o.source, { clones: 0, log: (m) => log(o.json ? JSON.stringify({ event: 'prepare', message: m }) : `[serve] ${m}`) });
    template = r.template.name;
  } else template = (await checkTemplate(validName(o.source, 'template'))).meta.name;
  const { meta } = await checkTemplate(template);
  // user-mode: each clone's guest port is forwarded to a host port; bridge: the host reaches the clone's address
  // on the bridge, which it can only from the namespace the bridge is in
  if (meta.net.mode === 'bridge' && meta.net.netns)
    throw new ScionError(
      'E_UNSUPPORTED',
      `template ${template}'s bridge ${meta.net.bridge} is in network namespace ${meta.net.netns}, which this process cannot reach`,
      { hint: 'serve a template whose bridge is in the host namespace (with an address in its network), or user-mode networking' },
    );
  if (meta.net.mode === 'none') throw new ScionError('E_UNSUPPORTED', `template ${template} has no network`);
  if (!meta.ports.includes(o.guestPort))
    throw new ScionError('E_USAGE', `--port ${o.guestPort}: the image serves ${meta.ports.join(', ') || 'no ports'}`, {
      hint: `use one of: ${meta.ports.join(', ')}`,
    });
  return template;
}

/** What each front end (HTTP, upgrades, plain TCP) shares: the fleet, the outcome counter, the set of work in flight. */
interface FrontEnd {
  fleet: Fleet;
  outcome: (k: string) => void;
  track: (p: Promise<unknown>) => void;
}

/**
 * One connection or request served by a clone: acquired from the fleet (or
 * refused: counted, and `refuse` answers the client), used, released (as
 * dead if it failed), its outcome counted. The one path of all front ends.
 */
function withClone(f: FrontEnd, use: (m: Member) => Promise<{ outcome: string; dead?: boolean }>, refuse: (e: unknown) => void): void {
  f.track(
    (async () => {
      let m: Member;
      try {
        m = await f.fleet.acquire();
      } catch (e) {
        f.outcome(refused(e));
        refuse(e);
        return;
      }
      const r = await use(m);
      f.fleet.release(m, r.dead === true);
      f.outcome(r.outcome);
    })(),
  );
}

/** A plain TCP connection piped both ways to a clone; resolves false if the clone's side failed. */
function pipeTcp(client: Socket, m: Member): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const up = connect(m.port, m.host, () => {
      up.pipe(client);
      client.pipe(up);
      client.resume();
    });
    let failed = false;
    up.on('error', () => {
      failed = true;
    });
    const end = () => {
      up.destroy();
      client.destroy();
      resolve(!failed);
    };
    up.on('close', end);
    client.on('close', end);
  });
}

/** An upgraded connection (a WebSocket) passed through to a clone: its request line and headers, then bytes both ways. */
function pipeUpgrade(req: IncomingMessage, socket: Socket, head: Buffer, m: Member): Promise<void> {
  return new Promise<void>((resolve) => {
    const up = connect(m.port, m.host, () => {
      up.write(
        `${req.method} ${req.url} HTTP/1.1\r\n${Object.entries(req.headers)
          .map(([k, v]) => `${k}: ${v}`)
          .join('\r\n')}\r\n\r\n`,
      );
      if (head.length) up.write(head);
      up.pipe(socket);
      socket.pipe(up);
    });
    const done = () => {
      up.destroy();
      socket.destroy();
      resolve();
    };
    up.on('error', done);
    socket.on('error', done);
    up.on('close', done);
    socket.on('close', done);
  });
}

/** Plain TCP: a fresh clone per connection, the bytes passed through both ways. */
function tcpFrontEnd(f: FrontEnd, sockets: Set<Socket>): import('node:net').Server {
  return createTcpServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.pause();
    client.on('error', () => undefined); // a reset client ends its own piping
    withClone(
      f,
      async (m) => {
        const ok = await pipeTcp(client, m);
        return { outcome: ok ? 'ok' : 'clone_died', dead: !ok };
      },
      () => client.destroy(),
    );
  });
}

/** HTTP/1.1 with keep-alive: each request to a clone (503 with Retry-After when none can be had), upgrades passed through. */
function httpFrontEnd(f: FrontEnd, o: ServeOptions): Server {
  const server = createServer((req, res) => {
    withClone(
      f,
      async (m) => {
        const r = await forward(req, res, m);
        return { outcome: r === 'ok' ? 'ok' : r === 'client-gone' ? 'client_gone' : 'clone_died', dead: r === 'clone-died' };
      },
      (e) => {
        res.writeHead(503, { 'retry-after': String(Math.max(1, Math.ceil(o.queueTimeoutMs / 1000))), 'content-type': 'text/plain' });
        res.end(`${(e as Error).message}\n`);
      },
    );
  });
  server.keepAliveTimeout = 5000;
  server.on('upgrade', (req, socket: Socket, head) => {
    withClone(
      f,
      async (m) => {
        await pipeUpgrade(req, socket, head, m);
        return { outcome: 'upgraded' };
      },
      (e) =>
        socket.end(
          `HTTP/1.1 503 Service Unavailable\r\nRetry-After: ${Math.ceil(o.queueTimeoutMs / 1000)}\r\nConnection: close\r\n\r\n${(e as Error).message}\n`,
        ),
    );
  });
  return server;
}

/** The admin server: Prometheus metrics and /healthz. */
function adminServerFor(fleet: Fleet, mt: ReturnType<typeof metrics>, template: string): Server {
  const refreshGauges = () => {
    mt.queue.set(fleet.queueDepth);
    for (const [k, v] of Object.entries(fleet.counts())) mt.clones.set({ state: k }, v);
  };
  return createServer(async (req, res) => {
    if (req.url === '/metrics') {
      refreshGauges();
      res.writeHead(200, { 'content-type': mt.registry.contentType });
      res.end(await mt.registry.metrics());
      return;
    }
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ok: true, template, ...fleet.counts(), queue: fleet.queueDepth }) + '\n');
      return;
    }
    res.writeHead(404);
    res.end();
  });
}

/** Start the front door: a clone per request (or per connection), forked on demand, scaled to zero, metrics on the admin address. */
export async function serve(o: ServeOptions, log: (line: string) => void = () => undefined): Promise<ServeHandle> {
  const template = await servedTemplate(o, log);
  const mt = metrics();
  const say = (ev: Record<string, unknown>, text: string) => log(o.json ? JSON.stringify({ ts: new Date().toISOString(), ...ev }) : `[serve] ${text}`);
  const counted: Record<string, number> = {};
  const forkMs: number[] = [];
  let maxClones = 0;
  const fleet = new Fleet(template, o, {
    scale: (e) => {
      maxClones = Math.max(maxClones, fleet.total());
      mt.scale.inc({ direction: e.direction });
      say({ event: 'scale', ...e }, `scale ${e.direction}: ${e.clone} (${e.reason}); ${e.clones} clone(s)${e.ms ? `; forked in ${e.ms} ms` : ''}`);
    },
    forkFailed: (e) => say({ event: 'error', message: e.message }, `fork failed: ${e.message}`),
    forked: (ms) => {
      mt.forkSeconds.observe(ms / 1000);
      forkMs.push(ms);
      if (forkMs.length > FORK_TIMES_KEPT) forkMs.shift();
    },
    claim: (hit) => mt.pool.inc({ result: hit ? 'hit' : 'miss' }),
  });
  const inflight = new Set<Promise<unknown>>();
  const f: FrontEnd = {
    fleet,
    outcome: (k) => {
      mt.requests.inc({ outcome: k });
      counted[k] = (counted[k] ?? 0) + 1;
    },
    track: (p) => {
      inflight.add(p);
      p.finally(() => inflight.delete(p));
    },
  };
  const tcpSockets = new Set<Socket>();
  const tcpServer = o.tcp ? tcpFrontEnd(f, tcpSockets) : undefined;
  const server = httpFrontEnd(f, o);
  const address = await listen(tcpServer ?? server, o.listen);
  const adminServer = o.admin ? adminServerFor(fleet, mt, template) : undefined;
  const admin = adminServer && o.admin ? await listen(adminServer, o.admin) : undefined;
  fleet.start();
  say(
    { event: 'listening', address, admin, template, mode: o.tcp ? 'tcp-per-connection' : o.mode },
    `listening on ${address.host}:${address.port} (${o.tcp ? 'plain TCP, a clone per connection' : o.mode}, template ${template})${admin ? `; metrics on http://${admin.host}:${admin.port}/metrics` : ''}`,
  );

  let closing: Promise<void> | undefined;
  return {
    address,
    admin,
    template,
    stats: () => ({
      clones: fleet.counts(),
      queue: fleet.queueDepth,
      requests: { ...counted },
      forkMs: [...forkMs],
      maxClones: Math.max(maxClones, fleet.total()),
    }),
    close: () =>
      (closing ??= (async () => {
        server.close(); // no new connections
        tcpServer?.close();
        server.closeIdleConnections();
        let t: NodeJS.Timeout | undefined;
        await Promise.race([Promise.allSettled([...inflight]), new Promise((r) => (t = setTimeout(r, o.drainMs)))]);
        clearTimeout(t);
        server.closeAllConnections();
        for (const sock of tcpSockets) sock.destroy();
        await fleet.close();
        adminServer?.close();
        say({ event: 'closed', requests: counted }, `closed; every clone removed`);
      })()),
  };
}
