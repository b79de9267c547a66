/**
 * scion's library API: the package's `.` export, deliberately small (the
 * README's API section documents each name). Everything that makes or drives
 * a VM goes through `Machine`; the rest are the steps `up` is made of, the
 * builder, the registry and the front door. Importing it has no side effects.
 */
// build and check images
export { build, type BuildOptions, type BuildResult, type BuildOutput, type BuildEvent, type Compression } from '../builder/build.ts';
export { verify, type VerifyOptions, type VerifyResult, type Difference } from '../builder/verify.ts';
export { loadImage, type ImageArtifacts } from './image.ts';
export { resolveImage, type ImageSourceOptions, type ImageSourceKind } from './image-source.ts';
// the VMM
/** The QEMU this process runs (SCION_VMM: the pinned closure by default, or the host's): command, version, digest, machine type. */
export { currentVmm, type Vmm } from './machine/templates.ts';
/** Fetch, verify and extract the pinned QEMU closure vmm/qemu.scion.lock names, unless it is there already (`scion vmm fetch`). */
export { fetchPinnedVmm } from '../builder/vmm.ts';
// VMs
export {
  Machine,
  type MachineInfo,
  type BootOptions,
  type CloneOptions,
  type Owner,
  type NetMode,
  type TemplateMeta,
} from './machine/machine.ts';
export { up, ensureTemplate, type UpOptions, type UpResult, type TemplateOptions, type TemplateResult } from './up.ts';
export { bootTemplate, freeze, freezeClone } from './template.ts';
export { fork, type ForkOptions, type CloneResult } from './clone.ts';
export { list, stopVm, removeVm, gc, connectAgent, type VmListing, type VmState } from './lifecycle.ts';
export type { AgentClient } from './agent-client.ts';
export type { AgentCommands, AgentCommand, ArgsOf, ResultOf, AgentEvents, AgentEvent, AgentInfo, ContainerStatus, Identity } from '../common/agent-protocol.ts';
// images in registries
export { push, pull, type PushOptions, type PushResult, type PullOptions, type PullResult } from '../registry/transfer.ts';
export { parseReference, type Reference } from '../registry/reference.ts';
/** Frozen templates as snapshot artifacts: push one (chunked, deduplicated RAM), pull one as a local frozen template (or once per node and digest: ensureSnapshotTemplate), tell what a reference names (a template, a hibernated clone, else an image). */
export {
  pushTemplate,
  pullTemplate,
  snapshotKindOf,
  ensureSnapshotTemplate,
  type SnapshotTemplate,
  type SnapshotPushOptions,
  type SnapshotPushResult,
  type SnapshotPullOptions,
  type SnapshotPullResult,
} from './machine/snapshot.ts';
/** A hibernated clone to a registry, its template with it by digest, and back as a hibernated clone on another node (then Machine.resumeHibernated). */
export { pushHibernated, pullHibernated, type HibernatedPushResult, type HibernatedPullResult } from './machine/hibernated-snapshot.ts';
// the front door
export { serve, type ServeHandle } from './serve/server.ts';
export { serveOptions, type ServeOptions } from './serve/options.ts';
// names, errors, version
export { validName, NameError, type ValidName } from '../common/names.ts';
export { ScionError, DefinitionError, ArchiveError, BuildError, VmError, EXIT, exitCodeFor, type ErrorCode } from '../common/errors.ts';
export { RegistryError } from '../registry/client.ts';
export { AgentError } from './agent-client.ts';
export { QmpError } from './machine/machine.ts';
export { ConfigError, config, type ScionConfig } from '../common/config.ts';
export { SCION_VERSION } from '../common/version.ts';
