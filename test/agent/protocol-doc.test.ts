/**
 * A client written only from guest-agent/PROTOCOL.md: a plain unix socket,
 * bytes and JSON, no scion code. It drives the real agent process.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { connect, type Socket } from 'node:net';
import { readFileSync, readlinkSync } from 'node:fs';
import { startHostAgent, type HostAgent } from './helpers.ts';

class PlainClient {
  buf = Buffer.alloc(0);
  waiting: ((b: Buffer) => void)[] = [];
  constructor(readonly s: Socket) {
    s.on('data', (c) => {
      this.buf = Buffer.concat([this.buf, c]);
      for (const w of this.waiting.splice(0)) w(this.buf);
    });
  }
  private more(): Promise<void> {
    return new Promise((r) => this.waiting.push(() => r()));
  }
  async line(): Promise<string> {
    for (;;) {
      const i = this.buf.indexOf(0x0a);
      if (i >= 0) {
        const l = this.buf.subarray(0, i).toString();
        this.buf = this.buf.subarray(i + 1);
        return l;
      }
      await this.more();
    }
  }
  /** PROTOCOL.md "Resynchronisation handshake", steps 1-3. */
  async sync(): Promise<any> {
    const nonce = Math.floor(Math.random() * 1e12);
    this.s.write(Buffer.concat([Buffer.from([0xff]), Buffer.from(JSON.stringify({ id: 'sync-1', cmd: 'sync', args: { nonce } }) + '\n')]));
    for (;;) {
      const i = this.buf.indexOf(0xff);
      if (i >= 0) {
        this.buf = this.buf.subarray(i + 1);
        break;
      }
      await this.more();
    }
    const answer = JSON.parse(await this.line());
    expect(answer.result.nonce).toBe(nonce);
    return answer;
  }
  async call(id: number, cmd: string, args?: object): Promise<any> {
    this.s.write(JSON.stringify(args ? { id, cmd, args } : { id, cmd }) + '\n');
    for (;;) {
      const m = JSON.parse(await this.line());
      if (m.id === id) return m;
    }
  }
}

describe('agent protocol, as documented', () => {
  let agent: HostAgent;
  let c: PlainClient;
  beforeAll(async () => {
    agent = await startHostAgent({ exec: true });
    const s = connect(agent.socket);
    await new Promise((r) => s.once('connect', r));
    c = new PlainClient(s);
  });
  afterAll(() => {
    c?.s.destroy();
    agent?.stop();
  });

  it("is the bundle running under the image's own qjs, not Node", () => {
    const argv = readFileSync(`/proc/${agent.proc.pid}/cmdline`, 'utf8').split('\0');
    expect(readlinkSync(`/proc/${agent.proc.pid}/exe`)).toMatch(/\/agent-runtime\/[^/]+\/usr\/lib\/x86_64-linux-gnu\/ld-linux-x86-64\.so\.2$/);
    expect(argv.find((a) => a.endsWith('/usr/bin/qjs'))).toMatch(/\/agent-runtime\//);
    expect(argv).toContain('--stdio');
  });

  it('handshake, commands, errors and events', async () => {
    // stale garbage before the handshake is discarded by the resync marker
    c.s.write('{"id":99,"cmd":"pin');
    expect(await c.sync()).toEqual({ id: 'sync-1', ok: true, result: { nonce: expect.any(Number), protocol: 2 } });
    expect(await c.call(1, 'ping')).toEqual({ id: 1, ok: true, result: { pong: true, protocol: 2, time: expect.any(Number) } });
    const info = await c.call(2, 'info');
    expect(info.result).toMatchObject({ protocol: 2, image: 'hosttest', generation: 0, containers: [] });
    expect((await c.call(3, 'no.such')).error.code).toBe('E_UNKNOWN_COMMAND');
    expect((await c.call(4, 'containers.logs', { name: 'nope' })).error.code).toBe('E_NO_CONTAINER');
    expect((await c.call(5, 'time.set', { time: 'soon' })).error).toEqual({ code: 'E_BAD_ARGS', message: 'time: must be milliseconds since the epoch' });
    const ex = await c.call(6, 'exec', { argv: ['sh', '-c', 'echo out; echo err >&2; exit 3'] });
    expect(ex.result).toEqual({ exitCode: 3, stdout: 'out\n', stderr: 'err\n' });
    c.s.write('not json\n');
    expect(JSON.parse(await c.line())).toMatchObject({ id: null, ok: false, error: { code: 'E_BAD_JSON' } });
    expect((await c.call(7, 'containers.list')).result).toEqual({ containers: [] });
  });

  it('10,000 requests pipelined on one connection get exactly one answer each, also when the client reads late', async () => {
    const s = connect(agent.socket);
    await new Promise((r) => s.once('connect', r));
    const p = new PlainClient(s);
    await p.sync();
    const N = 10_000;
    const rssKB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${agent.proc.pid}/status`, 'utf8'))![1]);
    const before = rssKB();
    // every request at once, then nothing read for a second: the agent must stop reading
    // (its answers back up) rather than drop answers or buffer without bound
    s.pause();
    s.write(Array.from({ length: N }, (_, i) => JSON.stringify({ id: 100_000 + i, cmd: 'ping' })).join('\n') + '\n');
    await new Promise((r) => setTimeout(r, 1000));
    const during = rssKB();
    s.resume();
    const seen = new Map<number, number>();
    while (seen.size < N) {
      const m = JSON.parse(await p.line());
      seen.set(m.id, (seen.get(m.id) ?? 0) + 1);
      expect(m.ok).toBe(true);
    }
    expect([...seen.keys()].sort((a, b) => a - b)).toEqual(Array.from({ length: N }, (_, i) => 100_000 + i));
    expect([...seen.values()].every((n) => n === 1)).toBe(true);
    // nothing more comes: one answer per request, not more
    const extra = await Promise.race([p.line().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 300))]);
    expect(extra).toBe(false);
    expect(during - before, 'agent RSS growth (KB) while its answers backed up').toBeLessThan(32 * 1024);
    s.destroy();
  });
});
