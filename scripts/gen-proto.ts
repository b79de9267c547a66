/**
 * The shim's protobuf descriptors, from the .proto files Debian ships
 * (golang-github-containerd-containerd-dev, -ttrpc-dev, gogoprotobuf,
 * googleapis) and shim/proto/ttrpc.proto: loaded with protobufjs and written
 * as one JSON descriptor, so the installed shim needs no Go packages. A unit
 * test regenerates it and holds it equal.   npm run gen:proto
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadProtoFiles, DESCRIPTOR_PATH } from '../shim/proto-source.ts';

const root = await loadProtoFiles();
writeFileSync(join(import.meta.dirname, '..', DESCRIPTOR_PATH), JSON.stringify(root.toJSON(), null, 1) + '\n');
console.log(`wrote ${DESCRIPTOR_PATH}`);
