/**
 * The shim's wire: ttrpc framing, and protobuf messages from the .proto files
 * Debian ships (containerd's, ttrpc's struct tags), a server and a client over
 * a real unix socket.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TaskMethods } from '../../shim/proto/task-types.ts';
import { loadProtoFiles, GOCODE, DESCRIPTOR_PATH, TASK_TYPES_PATH, taskTypesText } from '../../shim/proto-source.ts';
import { encode, decode, methods, protoRoot } from '../../shim/proto.ts';
import { FrameReader, encodeFrame, MAX_PAYLOAD, MessageType } from '../../shim/ttrpc-frame.ts';
import { TtrpcServer, TtrpcClient, TtrpcError, Code } from '../../shim/ttrpc.ts';

const ROOT = join(import.meta.dirname, '../..');
const dir = mkdtempSync(join(tmpdir(), 'scion-ttrpc-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('protobuf messages from the .proto files', () => {
  it("the shipped descriptors are exactly what Debian's .proto files give today", async () => {
    const fresh = JSON.parse(JSON.stringify((await loadProtoFiles()).toJSON()));
    expect(JSON.parse(readFileSync(join(ROOT, DESCRIPTOR_PATH), 'utf8'))).toEqual(fresh);
  });
  it("the Task handlers' request and response types are exactly what the descriptors give today", async () => {
    const text = taskTypesText(await loadProtoFiles());
    expect(readFileSync(join(ROOT, TASK_TYPES_PATH), 'utf8')).toBe(text);
    // what the handlers rely on: a request's fields typed, not left as unknown
    expect(text).toMatch(/export interface CreateTaskRequest \{[^}]*rootfs: ContainerdTypesMount\[\];[^}]*terminal: boolean;/);
    expect(text).toMatch(/Exec: \{ request: ExecProcessRequest; response: GoogleProtobufEmpty \};/);
  });
  it("shim/proto/ttrpc.proto restates ttrpc's Go structs field for field (their protobuf tags)", () => {
    const go = readFileSync(join(GOCODE, 'github.com/containerd/ttrpc/types.go'), 'utf8');
    const structs = [...go.matchAll(/type (\w+) struct \{([^}]*)\}/g)];
    expect(structs.map((s) => s[1]).sort()).toEqual(['KeyValue', 'Request', 'Response', 'StringList']);
    for (const [, name, body] of structs) {
      const t = protoRoot().lookupType(`ttrpc.${name}`);
      const tags = [...body.matchAll(/`protobuf:"(\w+),(\d+),(opt|rep),name=(\w+)/g)].map((m) => ({
        wire: m[1],
        id: Number(m[2]),
        repeated: m[3] === 'rep',
        name: m[4],
      }));
      expect(tags.length).toBe(t.fieldsArray.length);
      for (const tag of tags) {
        const f = t.fieldsArray.find((x) => x.id === tag.id)!;
        expect(f, `${name}.${tag.name}`).toBeDefined();
        expect(f.repeated).toBe(tag.repeated);
        expect(tag.wire === 'varint' ? ['int64', 'uint32', 'int32', 'bool'] : ['string', 'bytes', 'KeyValue', 'google.rpc.Status']).toContain(f.type);
      }
    }
  });
  it('the Task service has the methods containerd calls, with their request types', () => {
    const m = methods('containerd.task.v2.Task');
    expect([...m.keys()].sort()).toEqual(
      [
        'Checkpoint',
        'CloseIO',
        'Connect',
        'Create',
        'Delete',
        'Exec',
        'Kill',
        'Pause',
        'Pids',
        'ResizePty',
        'Resume',
        'Shutdown',
        'Start',
        'State',
        'Stats',
        'Update',
        'Wait',
      ].sort(),
    );
    expect(m.get('Create')).toEqual({ request: 'containerd.task.v2.CreateTaskRequest', response: 'containerd.task.v2.CreateTaskResponse' });
    const req = { id: 'c1', bundle: '/b', rootfs: [{ type: 'overlay', source: 'overlay', options: ['lowerdir=/x'] }], stdout: '/fifo/out', terminal: false };
    expect(decode('containerd.task.v2.CreateTaskRequest', encode('containerd.task.v2.CreateTaskRequest', req))).toMatchObject(req);
  });
});

describe('ttrpc framing', () => {
  it('round-trips frames cut at every byte', () => {
    const a = encodeFrame({ streamId: 1, type: MessageType.Request, payload: Buffer.from('hello') });
    const b = encodeFrame({ streamId: 3, type: MessageType.Response, payload: Buffer.alloc(0) });
    expect([...a.subarray(0, 10)]).toEqual([0, 0, 0, 5, 0, 0, 0, 1, 1, 0]);
    const both = Buffer.concat([a, b]);
    for (let cut = 0; cut <= both.length; cut++) {
      const r = new FrameReader();
      const frames = [...r.push(both.subarray(0, cut)), ...r.push(both.subarray(cut))];
      expect(frames).toEqual([
        { streamId: 1, type: 1, flags: 0, payload: Buffer.from('hello') },
        { streamId: 3, type: 2, flags: 0, payload: Buffer.alloc(0) },
      ]);
    }
  });
  it('skips an oversized payload as it streams past, reports its stream, and reads on', () => {
    const big = Buffer.alloc(10 + MAX_PAYLOAD + 1);
    big.writeUInt32BE(MAX_PAYLOAD + 1, 0);
    big.writeUInt32BE(5, 4);
    big[8] = 1;
    const next = encodeFrame({ streamId: 7, type: 1, payload: Buffer.from('x') });
    const r = new FrameReader();
    const out = [];
    for (let o = 0; o < big.length; o += 65536) out.push(...r.push(big.subarray(o, o + 65536)));
    out.push(...r.push(next));
    expect(out).toEqual([{ oversize: { streamId: 5, type: 1, length: MAX_PAYLOAD + 1 } }, { streamId: 7, type: 1, flags: 0, payload: Buffer.from('x') }]);
    expect(() => encodeFrame({ streamId: 1, type: 1, payload: Buffer.alloc(MAX_PAYLOAD + 1) })).toThrow(/over the/);
  });
});

describe('a ttrpc server and client on a unix socket', () => {
  it('calls a handler, answers Unimplemented for the rest, and carries handler errors as status codes', async () => {
    const server = new TtrpcServer();
    server.register<TaskMethods>(
      'containerd.task.v2.Task',
      {
        State: (req) => ({ id: req.id, pid: 42, status: 2, exitStatus: 0 }),
        Kill: () => {
          throw new TtrpcError(Code.NOT_FOUND, 'no such process');
        },
      },
      ['containerd.task.v3.Task'],
    );
    const path = join(dir, 's.sock');
    await server.listen(path);
    const client = new TtrpcClient(path);
    try {
      expect(await client.call('containerd.task.v2.Task', 'State', { id: 'abc' })).toMatchObject({ id: 'abc', pid: 42, status: 2 });
      // containerd 2.x's name for the same service
      const v3 = await client.call('containerd.task.v2.Task', 'State', { id: 'v3' }, { as: 'containerd.task.v3.Task' });
      expect(v3.id).toBe('v3');
      await expect(client.call('containerd.task.v2.Task', 'State', { id: 'x' }, { as: 'containerd.task.v9.Nope' })).rejects.toMatchObject({
        grpcCode: Code.UNIMPLEMENTED,
      });
      await expect(client.call('containerd.task.v2.Task', 'Pause', { id: 'abc' })).rejects.toMatchObject({ grpcCode: Code.UNIMPLEMENTED });
      await expect(client.call('containerd.task.v2.Task', 'Kill', { id: 'abc', signal: 9 })).rejects.toMatchObject({
        grpcCode: Code.NOT_FOUND,
        message: 'no such process',
      });
      // many calls in flight on one connection, answered by stream id
      const many = await Promise.all(Array.from({ length: 200 }, (_, i) => client.call('containerd.task.v2.Task', 'State', { id: `n${i}` })));
      expect(many.map((m) => m.id)).toEqual(Array.from({ length: 200 }, (_, i) => `n${i}`));
    } finally {
      client.close();
      server.close();
    }
  });
});
