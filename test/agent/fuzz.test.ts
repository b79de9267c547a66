import { describe, it, expect } from 'vitest';
import { randomInt } from 'node:crypto';
import { Agent } from '../../guest-agent/agent.ts';
import { FrameDecoder } from '../../common/framing.ts';

/** An agent with no containers, attached to an in-memory transport (no system effects are reachable without a valid identity). */
function harness() {
  const agent = new Agent({ image: { name: 'fuzz', exec: false, network: { mode: 'static', interface: 'eth0' }, containers: [] }, system: { root: '/nonexistent', setClock: false, defaultInterface: 'eth0', dhcp: false } });
  let feed: (b: Buffer) => void = () => {};
  const dec = new FrameDecoder(1 << 22);
  const replies: any[] = [];
  agent.attach({ write: (b) => { for (const e of dec.push(b)) if ('frame' in e) replies.push(JSON.parse(e.frame)); }, onData: (cb) => (feed = cb) });
  return { agent, send: (b: Buffer | string) => feed(Buffer.isBuffer(b) ? b : Buffer.from(b)), replies };
}

const valid = [
  '{"id":1,"cmd":"ping"}', '{"id":"x","cmd":"info"}', '{"id":2,"cmd":"identity.apply","args":{"generation":1}}',
  '{"id":3,"cmd":"containers.logs","args":{"name":"web"}}', '{"id":4,"cmd":"exec","args":{"argv":["true"]}}', '{"id":5,"cmd":"time.set","args":{"time":1}}',
  '{"id":6,"cmd":"clock.step","args":{"deltaMs":5}}',
];

/** A small seeded generator (mulberry32): the same seed replays the same frames. */
function seeded(seed: number) {
  let a = seed >>> 0;
  const next = () => { a = (a + 0x6d2b79f5) >>> 0; let t = a; t = Math.imul(t ^ (t >>> 15), t | 1); t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
  const int = (n: number) => Math.floor(next() * n);
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  return { next, int, bytes };
}
const SEED = Number(process.env.SCION_FUZZ_SEED) || randomInt(1, 2 ** 31);
const rnd = seeded(SEED);

function mutate(s: string): Buffer {
  const b = Buffer.from(s);
  const r = rnd.next();
  if (r < 0.3) { const i = rnd.int(b.length); b[i] = rnd.int(256); return b; }
  if (r < 0.5) return b.subarray(0, rnd.int(b.length));
  if (r < 0.6) return Buffer.concat([b, rnd.bytes(rnd.int(64))]);
  if (r < 0.7) return Buffer.from(s.replace(/"args":\{[^}]*\}/, `"args":${JSON.stringify([null, 1, 'x', [], { generation: -1, hostname: 'a'.repeat(300) }, { deltaMs: 1e300 }][rnd.int(6)])}`));
  return rnd.bytes(1 + rnd.int(200));
}

describe('agent under garbage', () => {
  it(`answers every malformed frame with an error and still answers ping (seed ${SEED}; replay with SCION_FUZZ_SEED=${SEED})`, async () => {
    const { send, replies } = harness();
    const N = 100_000;
    for (let i = 0; i < N; i++) {
      const frame = mutate(valid[i % valid.length]);
      // newline-terminated so each is one frame; the 0xff resync byte may appear in random data, which is fine
      send(Buffer.concat([frame, Buffer.from('\n')]));
      if (i % 1000 === 0) await new Promise((r) => setImmediate(r));
    }
    send(Buffer.alloc(2 << 20, 0x41)); // an oversized frame
    send('\n');
    await new Promise((r) => setTimeout(r, 200));
    send('{"id":"final","cmd":"ping"}\n');
    await new Promise((r) => setTimeout(r, 100));
    const final = replies.find((r) => r.id === 'final');
    console.log(`fuzz (seed ${SEED}): sent ${N} mutated frames + 1 oversized frame; ${replies.length} replies; ${replies.filter((r) => r.ok === false).length} errors`);
    expect(final, `seed ${SEED}`).toMatchObject({ id: 'final', ok: true, result: { pong: true, protocol: 1, time: expect.any(Number) } });
    expect(replies.some((r) => r.error?.code === 'E_FRAME_TOO_LARGE')).toBe(true);
    expect(replies.some((r) => r.error?.code === 'E_BAD_JSON')).toBe(true);
    const codes = new Set(replies.filter((r) => !r.ok).map((r) => r.error.code));
    for (const c of codes) expect(['E_BAD_JSON', 'E_BAD_REQUEST', 'E_UNKNOWN_COMMAND', 'E_BAD_ARGS', 'E_FRAME_TOO_LARGE', 'E_EXEC_DISABLED', 'E_NO_CONTAINER']).toContain(c);
  });

  it('rejects invalid identities field by field', async () => {
    const { send, replies } = harness();
    const base = { generation: 1, hostname: 'ok', machineId: 'a'.repeat(32), interfaces: [{ mac: '02:00:00:00:00:01', address: '10.0.0.2' }] };
    const cases: [string, object, RegExp][] = [
      ['mac', { interfaces: [{ mac: '02:00:00:00:00' }] }, /interfaces\[0\]\.mac: "02:00:00:00:00" is not a MAC address/],
      ['multicast', { interfaces: [{ mac: '01:00:00:00:00:01' }] }, /multicast/],
      ['ip', { interfaces: [{ mac: '02:00:00:00:00:01', address: '10.0.0.300' }] }, /interfaces\[0\]\.address: "10\.0\.0\.300" is not an IPv4 address/],
      ['host', { hostname: 'bad host' }, /hostname: must be a valid host name/],
      ['mid', { machineId: 'xyz' }, /machineId: must be 32 lowercase hex digits/],
      ['gen', { generation: 0 }, /generation: must be an integer >= 1/],
    ];
    for (const [id, patch] of cases) send(JSON.stringify({ id, cmd: 'identity.apply', args: { ...base, ...patch } }) + '\n');
    await new Promise((r) => setTimeout(r, 50));
    for (const [id, , re] of cases) {
      const r = replies.find((x) => x.id === id);
      expect(r?.ok).toBe(false);
      expect(r.error.code).toBe('E_BAD_ARGS');
      expect(r.error.message).toMatch(re);
    }
  });

  it('resynchronises after stale bytes: 0xff, then sync, answered with a leading 0xff', async () => {
    const agent = new Agent({ image: { name: 's', exec: false, network: { mode: 'static', interface: 'eth0' }, containers: [] }, system: { root: '/x', setClock: false, defaultInterface: 'eth0', dhcp: false } });
    const out: Buffer[] = [];
    let feed: (b: Buffer) => void = () => {};
    agent.attach({ write: (b) => { out.push(b); }, onData: (cb) => (feed = cb) });
    feed(Buffer.from('{"id":1,"cmd":"pi')); // a stale half frame
    feed(Buffer.concat([Buffer.from([0xff]), Buffer.from('{"id":"s","cmd":"sync","args":{"nonce":77}}\n')]));
    await new Promise((r) => setTimeout(r, 20));
    const all = Buffer.concat(out);
    expect(all[0]).toBe(0xff);
    expect(JSON.parse(all.subarray(1).toString())).toEqual({ id: 's', ok: true, result: { nonce: 77, protocol: 1 } });
  });
});
