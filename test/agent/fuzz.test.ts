import { describe, it, expect, afterAll } from 'vitest';
import { randomInt } from 'node:crypto';
import { FrameDecoder } from '../../common/framing.ts';
import { spawnAgent, type SpawnedAgent } from './helpers.ts';

/**
 * The bundled agent under the image's qjs, on stdio, with exec off and a root that does not
 * exist: no system effect is reachable without a valid identity, and none with one either.
 */
const started: SpawnedAgent[] = [];
afterAll(() => {
  for (const a of started) a.stop();
});
async function harness() {
  const a = await spawnAgent({ exec: false, name: 'fuzz' });
  started.push(a);
  const dec = new FrameDecoder(1 << 22);
  const replies: any[] = [];
  const raw: Buffer[] = [];
  let booted = false;
  // answers only: the agent's events (its boot's `ready`) carry no id
  a.proc.stdout.on('data', (b: Buffer) => {
    raw.push(b);
    for (const e of dec.push(b))
      if ('frame' in e) {
        const m = JSON.parse(e.frame);
        if ('id' in m) replies.push(m);
        else if (m.event === 'ready' && m.data?.boot) booted = true;
      }
  });
  // the agent says it serves before its boot is done: its boot's `ready` comes after, and would land
  // among the answers of a test that starts at once (seen on a slower machine: the sync answered first)
  for (const end = Date.now() + 20_000; !booted; await new Promise((r) => setTimeout(r, 10))) {
    if (Date.now() > end) throw new Error(`the agent's boot sent no ready event within 20 s; stderr: ${a.stderr()}`);
  }
  const send = (b: Buffer | string) =>
    new Promise<void>((r) => {
      if (a.proc.stdin.write(b)) r();
      else a.proc.stdin.once('drain', () => r());
    });
  /** wait until a reply with this id came */
  const reply = async (id: string, ms = 20_000) => {
    const end = Date.now() + ms;
    for (;;) {
      const r = replies.find((x) => x.id === id);
      if (r) return r;
      if (Date.now() > end) throw new Error(`no reply "${id}" within ${ms} ms; stderr: ${a.stderr()}`);
      await new Promise((res) => setTimeout(res, 20));
    }
  };
  return { agent: a, send, replies, reply, raw };
}

const valid = [
  '{"id":1,"cmd":"ping"}',
  '{"id":"x","cmd":"info"}',
  '{"id":2,"cmd":"identity.apply","args":{"generation":1}}',
  '{"id":3,"cmd":"containers.logs","args":{"name":"web"}}',
  '{"id":4,"cmd":"exec","args":{"argv":["true"]}}',
  '{"id":5,"cmd":"time.set","args":{"time":1}}',
  '{"id":6,"cmd":"clock.step","args":{"deltaMs":5}}',
];

/** A small seeded generator (mulberry32): the same seed replays the same frames. */
function seeded(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  return { next, int, bytes };
}
const SEED = Number(process.env.SCION_FUZZ_SEED) || randomInt(1, 2 ** 31);
const rnd = seeded(SEED);

function mutate(s: string): Buffer {
  const b = Buffer.from(s);
  const r = rnd.next();
  if (r < 0.3) {
    const i = rnd.int(b.length);
    b[i] = rnd.int(256);
    return b;
  }
  if (r < 0.5) return b.subarray(0, rnd.int(b.length));
  if (r < 0.6) return Buffer.concat([b, rnd.bytes(rnd.int(64))]);
  if (r < 0.7)
    return Buffer.from(
      s.replace(
        /"args":\{[^}]*\}/,
        `"args":${JSON.stringify([null, 1, 'x', [], { generation: -1, hostname: 'a'.repeat(300) }, { deltaMs: 1e300 }][rnd.int(6)])}`,
      ),
    );
  return rnd.bytes(1 + rnd.int(200));
}

describe('agent under garbage', () => {
  it(`answers every malformed frame with an error and still answers ping (seed ${SEED}; replay with SCION_FUZZ_SEED=${SEED})`, async () => {
    const { send, replies, reply } = await harness();
    const N = 100_000;
    for (let i = 0; i < N; i += 1000) {
      // newline-terminated so each is one frame; the 0xff resync byte may appear in random data, which is fine
      const batch: Buffer[] = [];
      for (let k = i; k < i + 1000; k++) batch.push(mutate(valid[k % valid.length]), Buffer.from('\n'));
      await send(Buffer.concat(batch));
    }
    await send(Buffer.alloc(2 << 20, 0x41)); // an oversized frame
    await send('\n');
    await send('{"id":"final","cmd":"ping"}\n');
    const final = await reply('final', 120_000);
    console.log(
      `fuzz (seed ${SEED}): sent ${N} mutated frames + 1 oversized frame; ${replies.length} replies; ${replies.filter((r) => r.ok === false).length} errors`,
    );
    expect(final, `seed ${SEED}`).toMatchObject({ id: 'final', ok: true, result: { pong: true, protocol: 2, time: expect.any(Number) } });
    expect(replies.some((r) => r.error?.code === 'E_FRAME_TOO_LARGE')).toBe(true);
    expect(replies.some((r) => r.error?.code === 'E_BAD_JSON')).toBe(true);
    const codes = new Set(replies.filter((r) => !r.ok).map((r) => r.error.code));
    for (const c of codes)
      expect(['E_BAD_JSON', 'E_BAD_REQUEST', 'E_UNKNOWN_COMMAND', 'E_BAD_ARGS', 'E_FRAME_TOO_LARGE', 'E_EXEC_DISABLED', 'E_NO_CONTAINER']).toContain(c);
  });

  it('rejects invalid identities field by field', async () => {
    const { send, reply } = await harness();
    const base = { generation: 1, hostname: 'ok', machineId: 'a'.repeat(32), interfaces: [{ mac: '02:00:00:00:00:01', address: '10.0.0.2' }] };
    const cases: [string, object, RegExp][] = [
      ['mac', { interfaces: [{ mac: '02:00:00:00:00' }] }, /interfaces\[0\]\.mac: "02:00:00:00:00" is not a MAC address/],
      ['multicast', { interfaces: [{ mac: '01:00:00:00:00:01' }] }, /multicast/],
      ['ip', { interfaces: [{ mac: '02:00:00:00:00:01', address: '10.0.0.300' }] }, /interfaces\[0\]\.address: "10\.0\.0\.300" is not an IPv4 address/],
      ['host', { hostname: 'bad host' }, /hostname: must be a valid host name/],
      ['mid', { machineId: 'xyz' }, /machineId: must be 32 lowercase hex digits/],
      ['gen', { generation: 0 }, /generation: must be an integer >= 1/],
    ];
    for (const [id, patch] of cases) await send(JSON.stringify({ id, cmd: 'identity.apply', args: { ...base, ...patch } }) + '\n');
    for (const [id, , re] of cases) {
      const r = await reply(id);
      expect(r?.ok).toBe(false);
      expect(r.error.code).toBe('E_BAD_ARGS');
      expect(r.error.message).toMatch(re);
    }
  });

  it('resynchronises after stale bytes: 0xff, then sync, answered with a leading 0xff', async () => {
    const { send, reply, raw } = await harness();
    await send('{"id":1,"cmd":"pi'); // a stale half frame
    await send(Buffer.concat([Buffer.from([0xff]), Buffer.from('{"id":"s","cmd":"sync","args":{"nonce":77}}\n')]));
    await reply('s');
    // after the boot's ready event: the marker, then the answer, and nothing between
    const all = Buffer.concat(raw);
    const at = all.indexOf(0xff);
    expect(at).toBeGreaterThan(0);
    expect(all[at - 1]).toBe(0x0a); // the marker starts a line: the event before it was whole
    expect(JSON.parse(all.subarray(at + 1).toString())).toEqual({ id: 's', ok: true, result: { nonce: 77, protocol: 2 } });
  });
});
