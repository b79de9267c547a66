/**
 * The shim's protobuf descriptors, from the .proto files Debian ships
 * (golang-github-containerd-containerd-dev, -ttrpc-dev, gogoprotobuf,
 * googleapis) and shim/proto/ttrpc.proto: loaded with protobufjs and written
 * as one JSON descriptor, so the installed shim needs no Go packages; and
 * the Task service's request and response types from them
 * (shim/proto/task-types.ts), so the handlers read requests without casts.
 * A unit test regenerates both and holds them equal.   npm run gen:proto
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadProtoFiles, DESCRIPTOR_PATH, TASK_TYPES_PATH, taskTypesText } from '../shim/proto-source.ts';

const root = await loadProtoFiles();
const base = join(import.meta.dirname, '..');
writeFileSync(join(base, DESCRIPTOR_PATH), JSON.stringify(root.toJSON(), null, 1) + '\n');
writeFileSync(join(base, TASK_TYPES_PATH), taskTypesText(root));
console.log(`wrote ${DESCRIPTOR_PATH} and ${TASK_TYPES_PATH}`);
