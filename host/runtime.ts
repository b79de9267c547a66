/**
 * The Machine layer alone, for a runtime that must start fast (the
 * containerd shim, `scion/runtime`): the VM handle, the names of stream
 * ports, images by directory. Loading it brings in no builder, registry or
 * front door (the shim's serving process imports only this; making a
 * template from an image is the full API's `ensureTemplate`, loaded when a
 * pod first asks for it).
 */
export { Machine, type MachineInfo, type Owner, type NetMode } from './machine/machine.ts';
export { streamKey, type StreamFd } from './machine/stream-ports.ts';
export { loadImage, type ImageArtifacts } from './image.ts';
export type { AgentClient } from './agent-client.ts';
