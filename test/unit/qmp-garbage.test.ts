/**
 * The QMP client against a peer that misbehaves. QEMU does not send garbage,
 * so the peer here is a socket server of the test's own (the one fault this
 * suite cannot cause with a real QEMU); the client code under test is the real one.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { createServer, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { QmpClient } from '../../host/qemu/qmp.ts';

const dir = mkdtempSync(join(tmpdir(), 'scion-qmp-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const GREETING = '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": []}}\n';

/** A peer that greets, accepts qmp_capabilities, then answers each later command with `reply(id)`. */
async function peer(name: string, reply: (id: string, sock: Socket) => void, greeting = GREETING) {
  const path = join(dir, name);
  const server = createServer((sock) => {
    sock.write(greeting);
    let buf = '';
    sock.on('data', (c) => {
      buf += c;
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        const m = JSON.parse(buf.slice(0, i));
        buf = buf.slice(i + 1);
        if (m.execute === 'qmp_capabilities') sock.write(`{"return": {}, "id": "${m.id}"}\n`);
        else reply(m.id, sock);
      }
    });
    sock.on('error', () => undefined); // the client may hang up first; that is the point of some cases
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { path, close: () => server.close() };
}

describe('QMP client fed garbage', () => {
  it('skips garbage, non-objects and replies to nobody, then takes the real reply', async () => {
    const p = await peer('noise', (id, s) =>
      s.write(`not json\nnull\n42\n[1,2]\n{"id":"nobody","return":{}}\n\xff\x00garbage\n{"return": {"status": "running"}, "id": "${id}"}\n`),
    );
    const q = new QmpClient('noise');
    await q.connect(p.path);
    expect(await q.execute('query-status')).toEqual({ status: 'running' });
    q.close();
    p.close();
  });

  it('a reply with neither return nor error is a protocol error', async () => {
    const p = await peer('empty', (id, s) => s.write(`{"id": "${id}"}\n`));
    const q = new QmpClient('empty');
    await q.connect(p.path);
    await expect(q.execute('query-status')).rejects.toMatchObject({ code: 'E_PROTOCOL', message: expect.stringContaining('neither "return" nor "error"') });
    q.close();
    p.close();
  });

  it('a truncated reply followed by a hang-up fails the call with E_CLOSED', async () => {
    const p = await peer('cut', (_id, s) => {
      s.write(`{"return": {"status": "runn`);
      s.end();
    });
    const q = new QmpClient('cut');
    await q.connect(p.path);
    await expect(q.execute('query-status')).rejects.toMatchObject({ code: 'E_CLOSED' });
    q.close();
    p.close();
  });

  it('a peer that never answers times out with E_TIMEOUT', async () => {
    const p = await peer('mute', () => undefined);
    const q = new QmpClient('mute');
    await q.connect(p.path);
    await expect(q.execute('query-status', undefined, 200)).rejects.toMatchObject({ code: 'E_TIMEOUT' });
    q.close();
    p.close();
  });

  it('an oversized reply is dropped, not buffered without end, and the session goes on', async () => {
    const p = await peer('huge', (id, s) => s.write(`{"return": "${'x'.repeat(2 << 20)}", "id": "${id}"}\n{"return": {}, "id": "${id}"}\n`));
    const q = new QmpClient('huge');
    await q.connect(p.path);
    expect(await q.execute('query-status')).toEqual({});
    q.close();
    p.close();
  });

  it('a greeting that is not QMP is refused with E_PROTOCOL; an error reply is a QmpError', async () => {
    const bad = await peer('nogreet', () => undefined, '{"hello": 1}\n');
    const q = new QmpClient('nogreet');
    await expect(q.connect(bad.path)).rejects.toMatchObject({ code: 'E_PROTOCOL' });
    q.close();
    bad.close();
    const p = await peer('err', (id, s) => s.write(`{"error": {"class": "GenericError", "desc": "nope"}, "id": "${id}"}\n`));
    const q2 = new QmpClient('err');
    await q2.connect(p.path);
    await expect(q2.execute('cont')).rejects.toMatchObject({ code: 'E_QMP', message: 'QMP cont failed: GenericError: nope' });
    q2.close();
    p.close();
  });
});
