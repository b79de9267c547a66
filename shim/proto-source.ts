/**
 * Where the shim's protobuf messages come from: containerd's and ttrpc's
 * .proto files as Debian installs them, loaded with protobufjs. Used to
 * generate shim/proto/descriptors.json (scripts/gen-proto.ts) and by the test
 * that holds the two equal; the shim itself reads the JSON (shim/proto.ts).
 */
import { accessSync } from 'node:fs';
import { join } from 'node:path';
import protobuf from 'protobufjs';

export const GOCODE = '/usr/share/gocode/src';
export const DESCRIPTOR_PATH = 'shim/proto/descriptors.json';
const SHIM_PROTO_DIR = join(import.meta.dirname, 'proto');

/** The files whose messages the shim speaks (their imports come along). */
export const PROTO_FILES = [
  'github.com/containerd/containerd/runtime/v2/task/shim.proto',
  'github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto',
  'github.com/containerd/containerd/api/events/task.proto',
  'github.com/containerd/containerd/api/types/task/task.proto',
  'github.com/containerd/cgroups/v2/stats/metrics.proto',
  'ttrpc.proto',
];

/** Import roots, in order: Debian's Go source tree, gogo's copies of google/protobuf and googleapis, ours. */
const INCLUDE = [
  GOCODE,
  `${GOCODE}/github.com/gogo/protobuf/protobuf`,
  `${GOCODE}/github.com/gogo/protobuf`,
  `${GOCODE}/github.com/gogo/googleapis`,
  SHIM_PROTO_DIR,
];

export async function loadProtoFiles(): Promise<protobuf.Root> {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    for (const base of INCLUDE) {
      const p = join(base, target);
      try {
        accessSync(p);
        return p;
      } catch {
        /* not under this root: try the next */
      }
    }
    throw new Error(`${target}: not found under ${INCLUDE.join(', ')} (scripts/setup.sh installs the packages that ship it)`);
  };
  await root.load(PROTO_FILES, { keepCase: false });
  root.resolveAll();
  return root;
}
