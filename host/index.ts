/** scion's library API: what the CLI uses, for tests and other programs. */
export { build, type BuildOptions, type BuildResult } from '../builder/build.ts';
export { parseDefinition, type ImageDefinition } from '../builder/schema.ts';
export { bootTemplate, freeze, fork, list, stopVm, removeVm, gc, loadImage, connectAgent, checkTemplate, type CloneResult, type TemplateMeta } from './vm.ts';
export { QmpClient, QmpError } from './qmp.ts';
export { AgentClient, AgentError } from './agent-client.ts';
export { qemuArgv, deviceLineup, type VmDescription } from './qemu-argv.ts';
export { ScionError, DefinitionError, ArchiveError, BuildError, VmError } from '../common/errors.ts';
