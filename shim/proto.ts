/**
 * The shim's protobuf messages, from shim/proto/descriptors.json (generated
 * from Debian's .proto files: scripts/gen-proto.ts). Encode and decode by
 * fully qualified type name; field names are protobufjs's camelCase.
 */
import { existsSync, readFileSync } from 'node:fs';
import { packageRoot } from '../common/version.ts';
import { join } from 'node:path';
import protobuf from 'protobufjs';

let root: protobuf.Root | undefined;
export function protoRoot(): protobuf.Root {
  // a checkout's shim/proto/, or the package's dist/shim/proto/ (this module may be bundled elsewhere)
  const base = packageRoot();
  const file = [join(base, 'shim', 'proto', 'descriptors.json'), join(base, 'dist', 'shim', 'proto', 'descriptors.json')].find((f) => existsSync(f));
  if (!file) throw new Error(`the shim's protobuf descriptors are missing under ${base} (npm run gen:proto)`);
  root ??= protobuf.Root.fromJSON(JSON.parse(readFileSync(file, 'utf8')));
  return root;
}

export type Msg = Record<string, unknown>;

export function encode(type: string, value: Msg): Uint8Array {
  const t = protoRoot().lookupType(type);
  return t.encode(t.fromObject(value)).finish();
}

/** Decode to a plain object: 64-bit integers as numbers, enums as numbers, bytes as Buffers, defaults filled. */
export function decode<T = Msg>(type: string, bytes: Uint8Array): T {
  const t = protoRoot().lookupType(type);
  return t.toObject(t.decode(bytes), { longs: Number, enums: Number, bytes: Buffer, defaults: true, arrays: true, objects: true }) as T;
}

/** A google.protobuf.Any holding `value` of `type` (protobufjs keeps Any's field names as written: type_url). */
export function any(type: string, value: Msg): { type_url: string; value: Buffer } {
  return { type_url: type, value: Buffer.from(encode(type, value)) };
}

/** google.protobuf.Timestamp for a time in ms. */
export function timestamp(ms: number): { seconds: number; nanos: number } {
  return { seconds: Math.floor(ms / 1000), nanos: Math.round((ms % 1000) * 1e6) };
}

/** A service's methods: name -> fully qualified request and response type names. */
export function methods(service: string): Map<string, { request: string; response: string }> {
  const name = (t: protobuf.Type | null | undefined) => t!.fullName.replace(/^\./, '');
  return new Map(
    protoRoot()
      .lookupService(service)
      .methodsArray.map((m) => {
        m.resolve();
        return [m.name, { request: name(m.resolvedRequestType), response: name(m.resolvedResponseType) }];
      }),
  );
}
