/**
 * The front door's options: parsed and checked once, at the edge, with
 * durations written as people write them (30s, 500ms, 2m). Pure.
 */
import { availableParallelism } from 'node:os';
import { ScionError } from '../../common/errors.ts';

export type ServeMode = 'shared' | 'per-request';

/** What `serve` takes: the source, listen and admin addresses, guest port, mode, pool and queue bounds, idle and drain times. */
export interface ServeOptions {
  /** an image definition (.yaml), a built image directory, an image's or a template snapshot's reference, or a frozen template's name */
  source: string;
  listen: { host: string; port: number };
  /** the guest port requests go to */
  guestPort: number;
  mode: ServeMode;
  /** plain TCP: every connection gets a fresh clone (per-connection), bytes passed through untouched */
  tcp: boolean;
  /** shared mode: requests one clone serves at once */
  concurrency: number;
  min: number;
  max: number;
  /** paused clones kept in reserve (count toward max) */
  pool: number;
  idleMs: number;
  queue: number;
  queueTimeoutMs: number;
  admin?: { host: string; port: number };
  /** clones forked at once for waiting requests (default: the host's cores) */
  forkParallel: number;
  /** SIGTERM: how long in-flight requests may take to finish */
  drainMs: number;
  json: boolean;
}

export class ServeOptionError extends ScionError {
  constructor(flag: string, value: unknown, why: string) {
    super('E_USAGE', `${flag} ${JSON.stringify(value)}: ${why}`, { hint: 'scion serve --help' });
  }
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "30s", "500ms", "2m", "1.5s", "1h" → ms. A bare number is refused: the unit is part of the value. */
export function parseDuration(flag: string, v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(v.trim());
  if (!m) throw new ServeOptionError(flag, v, 'write a duration with its unit, e.g. 500ms, 30s, 2m');
  return Math.round(Number(m[1]) * UNITS[m[2]]);
}

export function parseCount(flag: string, v: string | undefined, dflt: number, min: number, max: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isInteger(n) || n < min || n > max) throw new ServeOptionError(flag, v, `use a whole number from ${min} to ${max}`);
  return n;
}

/** "127.0.0.1:8080", ":8080" (loopback), "8080" → host and port. */
export function parseAddress(flag: string, v: string): { host: string; port: number } {
  const m = /^(?:(\d{1,3}(?:\.\d{1,3}){3}|localhost|\[[0-9a-f:]+\])?:)?(\d{1,5})$/i.exec(v.trim());
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) throw new ServeOptionError(flag, v, 'use HOST:PORT, e.g. 127.0.0.1:8080');
  return { host: (m[1] ?? '127.0.0.1').replace(/^\[|\]$/g, ''), port };
}

/** The front door's options from CLI-style flags, each checked (which flag, what was wrong). */
export function serveOptions(source: string | undefined, v: Record<string, string | boolean | undefined>): ServeOptions {
  if (!source)
    throw new ScionError('E_USAGE', 'scion serve needs an image definition or a template name', {
      hint: 'scion serve images/web.yaml --listen 127.0.0.1:8080 --port 8080',
    });
  const str = (k: string) => (typeof v[k] === 'string' ? (v[k] as string) : undefined);
  const mode = (str('mode') ?? 'shared') as ServeMode;
  if (mode !== 'shared' && mode !== 'per-request') throw new ServeOptionError('--mode', mode, 'use shared or per-request');
  if (!str('port')) throw new ScionError('E_USAGE', 'scion serve: --port (the guest port to send requests to) is required', { hint: 'e.g. --port 8080' });
  const o: ServeOptions = {
    source,
    listen: parseAddress('--listen', str('listen') ?? '127.0.0.1:8080'),
    guestPort: parseCount('--port', str('port'), 0, 1, 65535),
    mode: v.tcp ? 'per-request' : mode,
    tcp: !!v.tcp,
    concurrency: parseCount('--concurrency', str('concurrency'), 10, 1, 10_000),
    min: parseCount('--min', str('min'), 0, 0, 200),
    max: parseCount('--max', str('max'), 8, 1, 200),
    pool: parseCount('--pool', str('pool'), 0, 0, 200),
    idleMs: parseDuration('--idle', str('idle') ?? '30s'),
    queue: parseCount('--queue', str('queue'), 100, 0, 100_000),
    queueTimeoutMs: parseDuration('--queue-timeout', str('queue-timeout') ?? '10s'),
    admin: str('admin') ? parseAddress('--admin', str('admin')!) : undefined,
    drainMs: parseDuration('--drain', str('drain') ?? '10s'),
    forkParallel: parseCount('--fork-parallel', str('fork-parallel'), Math.max(1, availableParallelism()), 1, 64),
    json: !!v.json,
  };
  if (o.tcp && str('mode') === 'shared')
    throw new ServeOptionError('--mode', 'shared', 'plain TCP (--tcp) is per connection: each connection gets a fresh clone');
  if (o.min > o.max) throw new ServeOptionError('--min', o.min, `more than --max (${o.max})`);
  if (o.pool > o.max) throw new ServeOptionError('--pool', o.pool, `more than --max (${o.max}): pooled clones count toward it`);
  return o;
}
