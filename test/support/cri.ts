/**
 * A CRI client, as the kubelet is one: gRPC (@grpc/grpc-js) to containerd's
 * CRI plugin. Its messages come from the containerd the tests run: the
 * runtime.v1 api.proto descriptor that containerd's binary carries (Go's
 * protobuf registration keeps each file's FileDescriptorProto gzipped in the
 * binary), decoded with protobufjs; no CRI .proto is written by hand here.
 */
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import protobuf from 'protobufjs';
import descriptor from 'protobufjs/ext/descriptor/index.js';
import * as grpc from '@grpc/grpc-js';

let root: protobuf.Root | undefined;

/** runtime.v1 from `containerd` on PATH (the descriptor whose package is runtime.v1). */
export function criRoot(binary = '/usr/bin/containerd'): protobuf.Root {
  if (root) return root;
  const data = readFileSync(binary);
  const magic = Buffer.from([0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xff]);
  for (let i = data.indexOf(magic); i >= 0; i = data.indexOf(magic, i + 1)) {
    let raw: Buffer;
    try {
      raw = gunzipSync(data.subarray(i, i + 4_000_000), { finishFlush: 2 });
    } catch {
      continue;
    } // not a whole gzip member
    if (!raw.includes('RunPodSandbox') || !raw.subarray(0, 64).includes('runtime.v1\x1a')) continue;
    const fd = (descriptor as any).FileDescriptorProto.decode(raw);
    if (fd.package !== 'runtime.v1') continue;
    fd.dependency = []; // gogo.proto: options only
    root = (protobuf.Root as any).fromDescriptor({ file: [fd] }) as protobuf.Root;
    root.resolveAll();
    return root;
  }
  throw new Error(`no runtime.v1 CRI descriptor found in ${binary}`);
}

type Call = (req: Record<string, unknown>) => Promise<any>;

/** A client of runtime.v1.RuntimeService and ImageService on containerd's socket: method name -> call. */
export function criClient(socket: string): { runtime: Record<string, Call>; image: Record<string, Call>; close: () => void } {
  const r = criRoot();
  const make = (service: string) => {
    const svc = r.lookupService(`runtime.v1.${service}`);
    const def: Record<string, grpc.MethodDefinition<any, any>> = {};
    for (const m of svc.methodsArray) {
      m.resolve();
      const req = m.resolvedRequestType!,
        res = m.resolvedResponseType!;
      def[m.name] = {
        path: `/runtime.v1.${service}/${m.name}`,
        requestStream: false,
        responseStream: false,
        requestSerialize: (o: Record<string, unknown>) => Buffer.from(req.encode(req.fromObject(o)).finish()),
        requestDeserialize: (b: Buffer) => req.decode(b),
        responseSerialize: (o: Record<string, unknown>) => Buffer.from(res.encode(res.fromObject(o)).finish()),
        responseDeserialize: (b: Buffer) => res.toObject(res.decode(b), { longs: Number, enums: String, bytes: Buffer, defaults: true }),
      };
    }
    const Ctor = grpc.makeGenericClientConstructor(def as grpc.ServiceDefinition, service);
    const client = new Ctor(`unix://${socket}`, grpc.credentials.createInsecure()) as unknown as Record<
      string,
      (req: object, cb: (e: Error | null, r: unknown) => void) => void
    > &
      grpc.Client;
    const calls: Record<string, Call> = {};
    for (const m of svc.methodsArray) calls[m.name] = (req) => new Promise((res, rej) => client[m.name](req, (e, v) => (e ? rej(e) : res(v))));
    return { calls, client };
  };
  const rt = make('RuntimeService'),
    im = make('ImageService');
  return {
    runtime: rt.calls,
    image: im.calls,
    close: () => {
      rt.client.close();
      im.client.close();
    },
  };
}
