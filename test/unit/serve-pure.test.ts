/** The front door's pure parts: options as people write them, and the fleet's decisions. */
import { describe, it, expect } from 'vitest';
import { Agent } from 'node:http';
import { parseDuration, parseAddress, serveOptions } from '../../host/serve/options.ts';
import { pickShared, forksNeeded, idleToRemove, type Member } from '../../host/serve/fleet.ts';

describe('serve options', () => {
  it('reads durations with their unit', () => {
    expect(['500ms', '30s', '2m', '1.5s', '1h'].map((d) => parseDuration('--idle', d))).toEqual([500, 30_000, 120_000, 1500, 3_600_000]);
    for (const bad of ['30', '5 s', 's', '-1s', '2d'])
      expect(() => parseDuration('--idle', bad)).toThrow(`--idle ${JSON.stringify(bad)}: write a duration with its unit, e.g. 500ms, 30s, 2m`);
  });
  it('reads addresses, defaulting to loopback', () => {
    expect(parseAddress('--listen', '127.0.0.1:8080')).toEqual({ host: '127.0.0.1', port: 8080 });
    expect(parseAddress('--listen', ':9090')).toEqual({ host: '127.0.0.1', port: 9090 });
    expect(parseAddress('--listen', '8080')).toEqual({ host: '127.0.0.1', port: 8080 });
    expect(() => parseAddress('--listen', 'example.org:80')).toThrow(/use HOST:PORT/);
    expect(() => parseAddress('--listen', '1.2.3.4:70000')).toThrow(/use HOST:PORT/);
  });
  it('has the documented defaults and refuses what cannot work', () => {
    expect(serveOptions('web-tpl', { port: '8080' })).toMatchObject({
      mode: 'shared',
      concurrency: 10,
      min: 0,
      max: 8,
      pool: 0,
      idleMs: 30_000,
      queue: 100,
      queueTimeoutMs: 10_000,
      listen: { host: '127.0.0.1', port: 8080 },
    });
    expect(() => serveOptions('web-tpl', {})).toThrow(/--port .* is required/);
    expect(() => serveOptions('web-tpl', { port: '8080', mode: 'fast' })).toThrow('--mode "fast": use shared or per-request');
    expect(() => serveOptions('web-tpl', { port: '8080', min: '3', max: '2' })).toThrow('--min 3: more than --max (2)');
    expect(() => serveOptions('web-tpl', { port: '8080', pool: '9' })).toThrow(/pooled clones count toward it/);
    expect(() => serveOptions('web-tpl', { port: '8080', queue: '-1' })).toThrow(/whole number/);
    expect(() => serveOptions(undefined, { port: '8080' })).toThrow(/needs an image definition or a template name/);
    expect(serveOptions('web-tpl', { port: '8080', tcp: true })).toMatchObject({ tcp: true, mode: 'per-request' });
    expect(() => serveOptions('web-tpl', { port: '8080', tcp: true, mode: 'shared' })).toThrow(/plain TCP \(--tcp\) is per connection/);
  });
});

const member = (name: string, over: Partial<Member> = {}): Member => ({
  name,
  hostname: name,
  host: '127.0.0.1',
  port: 1,
  state: 'ready',
  active: 0,
  lastUsed: 0,
  exclusive: false,
  http: new Agent(),
  ...over,
});

describe('fleet decisions', () => {
  it('picks the least busy clone with room, never a pooled, stopping or exclusive one', () => {
    const ms = [
      member('a', { active: 2, state: 'busy' }),
      member('b', { active: 1, state: 'busy' }),
      member('p', { state: 'pooled' }),
      member('s', { state: 'stopping' }),
      member('x', { exclusive: true }),
    ];
    expect(pickShared(ms, 3)?.name).toBe('b');
    expect(pickShared(ms, 1)).toBeUndefined();
  });
  it('forks for waiting requests, counting clones already starting, up to max', () => {
    expect(forksNeeded({ waiting: 5, starting: 0, total: 0, max: 8, perClone: 1 })).toBe(5);
    expect(forksNeeded({ waiting: 5, starting: 2, total: 2, max: 8, perClone: 1 })).toBe(3);
    expect(forksNeeded({ waiting: 25, starting: 0, total: 6, max: 8, perClone: 10 })).toBe(2);
    expect(forksNeeded({ waiting: 200, starting: 0, total: 0, max: 8, perClone: 1 })).toBe(8);
    expect(forksNeeded({ waiting: 0, starting: 0, total: 0, max: 8, perClone: 1 })).toBe(0);
    // no more than `parallel` at once: the first ones finish sooner and serve the queue
    expect(forksNeeded({ waiting: 200, starting: 0, total: 0, max: 8, perClone: 10, parallel: 2 })).toBe(2);
    expect(forksNeeded({ waiting: 200, starting: 2, total: 2, max: 8, perClone: 10, parallel: 2 })).toBe(0);
  });
  it('removes clones idle past the limit, oldest first, keeping the minimum', () => {
    const ms = [
      member('old', { lastUsed: 0 }),
      member('mid', { lastUsed: 10_000 }),
      member('new', { lastUsed: 50_000 }),
      member('busy', { state: 'busy', active: 1, lastUsed: 0 }),
    ];
    expect(idleToRemove(ms, 60_000, 30_000, 0).map((m) => m.name)).toEqual(['old', 'mid']);
    expect(idleToRemove(ms, 60_000, 30_000, 3).map((m) => m.name)).toEqual(['old']);
    expect(idleToRemove(ms, 60_000, 30_000, 4)).toEqual([]);
  });
});
