/** scion's library API: what the CLI uses, for tests and other programs. Importing it has no side effects. */
export { build, OUTPUT_FILES, type BuildOptions, type BuildResult, type BuildOutput, type BuildEvent } from '../builder/build.ts';
export { verify, type VerifyOptions, type VerifyResult, type Difference } from '../builder/verify.ts';
export { stripElf } from '../builder/strip.ts';
export { parseDefinition, type ImageDefinition } from '../builder/schema.ts';
export { loadImage, type ImageArtifacts } from './image.ts';
export { bootTemplate, freeze, freezeClone, checkTemplate, type BootOptions, type Handle, type TemplateMeta } from './template.ts';
export { fork, type ForkOptions, type CloneResult } from './clone.ts';
export { list, stopVm, removeVm, gc, connectAgent, type VmListing, type VmState } from './lifecycle.ts';
export { up, templateDecision, type UpOptions, type UpResult } from './up.ts';
export { serve, type ServeHandle } from './serve/server.ts';
export { serveOptions, parseDuration, type ServeOptions } from './serve/options.ts';
export { QmpClient, QmpError } from './qemu/qmp.ts';
export { AgentClient, AgentError } from './agent-client.ts';
export { qemuArgv, deviceLineup, type VmDescription } from './qemu/argv.ts';
export { validName, NAME_RULE, NameError, type ValidName } from '../common/names.ts';
export { ScionError, DefinitionError, ArchiveError, BuildError, VmError, EXIT, exitCodeFor } from '../common/errors.ts';
export { SCION_VERSION } from '../common/version.ts';
