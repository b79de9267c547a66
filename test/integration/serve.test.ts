/**
 * The front door with real QEMU clones: from zero, scale out and back to
 * zero, a fresh clone per request, a paused pool, bounded queues, a clone
 * killed mid-request, and shutdown by SIGTERM and by SIGKILL + gc.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { $ } from 'zx';
import { randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import * as vm from '../../host/index.ts';
import { build } from '../../builder/build.ts';
import { serve, type ServeHandle } from '../../host/serve/server.ts';
import { serveOptions } from '../../host/serve/options.ts';
import { QmpClient } from '../../host/qemu/qmp.ts';
import { image, isolateRunDirs, ROOT, paths, scionQemuPids, frozenWebTemplate, removeEverything } from './helpers.ts';

const dirs = isolateRunDirs('serve');
const options = (v: Record<string, string>) => serveOptions('web-tpl', { port: '8080', listen: '127.0.0.1:0', ...v });
const get = async (h: ServeHandle, path = '/') => {
  const r = await fetch(`http://127.0.0.1:${h.address.port}${path}`);
  return { status: r.status, text: await r.text(), retryAfter: r.headers.get('retry-after') };
};
const clonesOwnedBy = async (pid: number) => (await vm.list()).filter((v) => v.role === 'clone' && v.owner?.pid === pid);
const waitFor = async (what: string, cond: () => Promise<boolean> | boolean, ms = 60_000) => {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
};
/** A request the front door has forwarded but the client has not finished (its body is incomplete): it holds a clone. */
function heldRequest(port: number): Promise<{ done: () => void; closed: Promise<string> }> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1', () => {
      s.write('POST /cgi-bin/wait HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nsome');
      let got = '';
      s.on('data', (c) => (got += c));
      const closed = new Promise<string>((r) => {
        s.on('close', () => r(got));
        s.on('error', () => r(got));
      });
      resolve({ done: () => s.destroy(), closed });
    });
  });
}

beforeAll(() => frozenWebTemplate());
afterAll(() => removeEverything(dirs));

describe('shared mode', () => {
  it('forks from zero on the first request, opens a second clone past K busy requests, and scales back to zero', async () => {
    const h = await serve(options({ concurrency: '1', idle: '3s', max: '3' }));
    try {
      const first = await get(h);
      expect(first.status).toBe(200);
      const [c1] = await clonesOwnedBy(process.pid);
      expect(c1.owner).toEqual({ pid: process.pid, kind: 'serve', alive: true });
      expect(first.text).toBe(`hello from ${c1.hostname}\n`);
      // the same clone serves the next request: what the last one left is still there
      expect((await get(h, '/cgi-bin/visit')).text).toBe('fresh\n');
      expect((await get(h, '/cgi-bin/visit')).text).toBe('seen\n');
      // hold the only slot of c1, then ask again: a second clone
      const held = await heldRequest(h.address.port);
      await waitFor('the held request to take its clone', () => h.stats().clones.busy === 1);
      const second = await get(h);
      const owned = await clonesOwnedBy(process.pid);
      expect(owned).toHaveLength(2);
      expect(second.text).toBe(`hello from ${owned.find((c) => c.name !== c1.name)!.hostname}\n`);
      held.done();
      // idle past --idle: no QEMU left, seen from /proc rather than from scion's state
      // (QEMU quits before its run directory is removed: wait for both, not one then the other)
      await waitFor('scale to zero', async () => (await scionQemuPids()).length === 0 && (await clonesOwnedBy(process.pid)).length === 0, 30_000);
      expect(await scionQemuPids()).toEqual([]);
      expect(await clonesOwnedBy(process.pid)).toEqual([]);
    } finally {
      await h.close();
    }
  });
});

describe('per-request mode', () => {
  it('gives every request a fresh clone: other hostnames, nothing the previous request left', async () => {
    const h = await serve(options({ mode: 'per-request' }));
    try {
      const a = await get(h, '/'),
        b = await get(h, '/');
      expect(a.text).toMatch(/^hello from web-\d+-\d+\n$/);
      expect(b.text).toMatch(/^hello from web-\d+-\d+\n$/);
      expect(a.text).not.toBe(b.text);
      // the visit file a request leaves behind is gone for the next one
      expect((await get(h, '/cgi-bin/visit')).text).toBe('fresh\n');
      expect((await get(h, '/cgi-bin/visit')).text).toBe('fresh\n');
      await waitFor('each clone removed after its request', async () => (await clonesOwnedBy(process.pid)).length === 0, 20_000);
    } finally {
      await h.close();
    }
  });

  it('keeps a pool of paused clones, and a request claims one without a fork', async () => {
    const h = await serve(options({ mode: 'per-request', pool: '1', max: '2' }));
    try {
      await waitFor('a pooled clone', () => h.stats().clones.pooled === 1);
      const [pooled] = await clonesOwnedBy(process.pid);
      const q = new QmpClient('test/qmp');
      await q.connect((await paths(pooled.name)).qmp);
      expect((await q.execute<{ status: string }>('query-status')).status).toBe('paused');
      q.close();
      const r = await get(h);
      expect(r.text).toBe(`hello from ${pooled.hostname}\n`); // served by the pooled clone: no fork on the request path
      const m = await (await fetch(`http://127.0.0.1:${h.address.port}/`)).text();
      expect(m).toMatch(/^hello from web-\d+-\d+\n$/);
    } finally {
      await h.close();
    }
    expect(await clonesOwnedBy(process.pid)).toEqual([]);
  });
});

describe('plain TCP', () => {
  it('gives every connection a fresh clone and passes the bytes through untouched', async () => {
    const h = await serve(options({ tcp: true as any }));
    const raw = (): Promise<string> =>
      new Promise((resolve, reject) => {
        const s = connect(h.address.port, '127.0.0.1', () => s.write('GET / HTTP/1.0\r\n\r\n'));
        let got = '';
        s.on('data', (c) => (got += c));
        s.on('close', () => resolve(got));
        s.on('error', reject);
      });
    try {
      const a = await raw(),
        b = await raw();
      expect(a).toMatch(/^HTTP\/1\.[01] 200 /);
      const host = (x: string) => /hello from (web-\d+-\d+)/.exec(x)?.[1];
      expect(host(a)).toBeDefined();
      expect(host(b)).toBeDefined();
      expect(host(a)).not.toBe(host(b));
    } finally {
      await h.close();
    }
    expect(await clonesOwnedBy(process.pid)).toEqual([]);
  });
});

describe('bridge networking', () => {
  it("routes to a clone's address on a bridge in the host namespace (the test's own bridge)", async () => {
    const br = `scsv${randomBytes(3).toString('hex')}`;
    await $`ip link add ${br} type bridge`;
    try {
      await $`ip addr add 10.47.0.1/24 dev ${br}`;
      await $`ip link set ${br} up`;
      const img = await vm.loadImage((await build({ definitionPath: image('web') })).dir);
      await vm.freeze(await vm.bootTemplate(img, { name: 'webbr-tpl', net: { mode: 'bridge', bridge: br, network: '10.47.0.0/24' } }), img);
      const h = await serve(serveOptions('webbr-tpl', { port: '8080', listen: '127.0.0.1:0' }));
      try {
        const r = await get(h);
        const [c] = await clonesOwnedBy(process.pid);
        expect(c.ip).toMatch(/^10\.47\.0\.\d+$/);
        expect(c.ports).toEqual({}); // nothing forwarded: a bridged clone is reached at its own address
        expect(r.text).toBe(`hello from ${c.hostname}\n`);
      } finally {
        await h.close();
      }
      await vm.removeVm('webbr-tpl');
    } finally {
      await $`ip link del ${br}`;
    }
  });
});

describe('bounds and failures', () => {
  it('answers 503 with Retry-After when the queue is full or the wait is too long', async () => {
    const full = await serve(options({ queue: '0' }));
    try {
      const r = await get(full);
      expect(r.status).toBe(503);
      expect(r.retryAfter).toBe('10');
      expect(r.text).toContain('--queue 0');
    } finally {
      await full.close();
    }
    const slow = await serve(options({ 'queue-timeout': '100ms' }));
    try {
      const r = await get(slow);
      expect(r.status).toBe(503);
      expect(r.text).toContain('no clone within 100 ms');
      expect(r.retryAfter).toBe('1');
    } finally {
      await slow.close();
    }
  });

  it('a clone whose QEMU is killed mid-request gives that request 502; the next request is served', async () => {
    const h = await serve(options({ concurrency: '1', max: '2' }));
    try {
      expect((await get(h)).status).toBe(200);
      const [c] = await clonesOwnedBy(process.pid);
      const held = await heldRequest(h.address.port);
      await waitFor('the held request to take its clone', () => h.stats().clones.busy === 1);
      process.kill(c.pid!, 'SIGKILL');
      expect(await held.closed).toMatch(/^HTTP\/1.1 502 /);
      const next = await get(h);
      expect(next.status).toBe(200);
      // (its name may come back: the replacement can take the freed index)
      await waitFor(
        'the dead clone removed',
        async () => !(await vm.list()).some((v) => v.pid === c.pid) && !(await scionQemuPids()).some((q) => q.pid === c.pid),
      );
    } finally {
      await h.close();
    }
  });
});

describe('shutdown', () => {
  const start = (port: number) => {
    const p = spawn(process.execPath, [join(ROOT, 'bin/scion.js'), 'serve', 'web-tpl', '--port', '8080', '--listen', `127.0.0.1:${port}`, '--json'], {
      env: process.env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    p.stdout.on('data', (c) => (out += c));
    p.stderr.on('data', (c) => (out += c));
    return { p, out: () => out, exited: new Promise<number | null>((r) => p.on('exit', (code) => r(code))) };
  };
  it('SIGTERM drains and leaves no clone, run directory or QEMU', async () => {
    const s = start(18190);
    await waitFor('listening', () => s.out().includes('"event":"listening"'));
    expect((await fetch('http://127.0.0.1:18190/')).status).toBe(200);
    expect(await clonesOwnedBy(s.p.pid!)).toHaveLength(1);
    s.p.kill('SIGTERM');
    expect(await s.exited).toBe(0);
    expect(s.out()).toContain('"event":"closed"');
    expect(await clonesOwnedBy(s.p.pid!)).toEqual([]);
    expect(readdirSync(join(dirs.run, 'vms'))).toEqual(['web-tpl']);
    expect(await scionQemuPids()).toEqual([]);
  });
  it('after SIGKILL, ls shows what the dead serve owned and gc removes it', async () => {
    const s = start(18191);
    await waitFor('listening', () => s.out().includes('"event":"listening"'));
    expect((await fetch('http://127.0.0.1:18191/')).status).toBe(200);
    s.p.kill('SIGKILL');
    await s.exited;
    const left = await clonesOwnedBy(s.p.pid!);
    expect(left).toHaveLength(1);
    expect(left[0].owner).toEqual({ pid: s.p.pid, kind: 'serve', alive: false });
    const r = await vm.gc();
    expect(r.removed).toContain(left[0].name);
    expect(readdirSync(join(dirs.run, 'vms'))).toEqual(['web-tpl']);
    expect(await scionQemuPids()).toEqual([]);
  });
});
