/**
 * Every error code scion reports, as one union: a script matches on these
 * (`--json` prints `{ok: false, error: {code, …}}`), so they are a contract.
 * Grouped by the exit status the CLI gives them (README "Exit codes"); a code
 * outside these lists does not type-check.
 */
import { AGENT_ERROR_CODES } from './agent-protocol.ts';

/** exit 2 */
export const USAGE_CODES = ['E_USAGE'] as const;
/** exit 3: the image definition or its lock */
export const DEFINITION_CODES = ['E_DEFINITION', 'E_DEFINITION_MISSING', 'E_LOCK_INVALID', 'E_FILE_SOURCE', 'E_IMAGE_REF', 'E_LOCK_CHANGED'] as const;
/** exit 4: a mirror, npm or a registry unreachable or answering an error */
export const NETWORK_CODES = [
  'E_NETWORK',
  'E_HTTP',
  'E_REGISTRY_UNREACHABLE',
  'E_REGISTRY_HTTP',
  'E_REGISTRY_STALLED',
  'E_REGISTRY_RESPONSE_TOO_LARGE',
  'E_NO_MIRROR',
] as const;
/** exit 5: something does not match what it must */
export const VERIFICATION_CODES = ['E_HASH_MISMATCH', 'E_SIGNATURE', 'E_DIGEST_MISMATCH', 'E_NOT_REPRODUCIBLE', 'E_OCI_DIGEST'] as const;
/** exit 1 */
export const OTHER_CODES = [
  // builder
  'E_DEB_FORMAT',
  'E_DECOMPRESS',
  'E_COMPRESS',
  'E_DEP_UNSATISFIABLE',
  'E_INDEX_MISSING',
  'E_KERNEL_MISSING',
  'E_LIBRARY_MISSING',
  'E_LOCK_STALE',
  'E_MODULE_CYCLE',
  'E_MODULE_UNKNOWN',
  'E_OCI_FORMAT',
  'E_OCI_MISSING',
  'E_PKG_UNKNOWN',
  'E_IMAGE_KERNEL',
  'E_BUILD_OUTPUT',
  // processes and files
  'E_COMMAND_FAILED',
  'E_COMMAND_MISSING',
  'E_TOOL_MISSING',
  'E_SPAWN',
  'E_UNTRUSTED_DIR',
  'E_NOT_TMPFS',
  'E_CONFIG',
  'E_BAD_NAME',
  'E_CLEANUP',
  // images and records
  'E_IMAGE_DIR',
  'E_IMAGE_INVALID',
  'E_IMAGE_MISSING',
  'E_NOT_SCION_IMAGE',
  'E_RECORD_INVALID',
  'E_RECORD_VERSION',
  // registry
  'E_REGISTRY_AUTH',
  'E_REGISTRY_DENIED',
  'E_UNKNOWN_TAG',
  'E_BLOB_UNKNOWN',
  'E_DOCKER_CONFIG',
  // VMs
  'E_NO_VM',
  'E_VM_BUSY',
  'E_VM_EXISTS',
  'E_VM_NOT_RUNNING',
  'E_FROZEN',
  'E_UNSUPPORTED',
  'E_DISK',
  'E_DISK_ATTACH',
  'E_DISK_DETACH',
  'E_STREAM_PORT',
  'E_NET',
  'E_NO_BRIDGE',
  'E_NO_SLOTS',
  'E_NO_PORT',
  'E_BOOT_FAILED',
  'E_BOOT_TIMEOUT',
  'E_FORK_FAILED',
  'E_FREEZE_FAILED',
  'E_RESTORE_FAILED',
  'E_IDENTITY_REFUSED',
  'E_QEMU_EXITED',
  'E_QEMU_TIMEOUT',
  'E_QMP',
  'E_TEMPLATE_INCOMPLETE',
  'E_TEMPLATE_LINEUP',
  'E_TEMPLATE_MISSING',
  'E_TEMPLATE_INCOMPATIBLE',
  'E_VMM_MISSING',
  'E_VMM_LOCK',
  'E_NOT_SCION_SNAPSHOT',
  'E_RAM_DIFF',
  'E_HIBERNATED',
  'E_NOT_HIBERNATED',
  'E_TEMPLATE_IN_USE',
  // sessions (QMP, agent)
  'E_AGENT',
  'E_AGENT_TIMEOUT',
  'E_CLOSED',
  'E_CONNECT',
  'E_PROTOCOL',
  'E_STATE',
  'E_TIMEOUT',
  // the front door
  'E_LISTEN',
  'E_QUEUE_FULL',
  'E_QUEUE_TIMEOUT',
] as const;

/** Every code a ScionError may carry (one union, listed once each). */
export type ErrorCode =
  | (typeof USAGE_CODES)[number]
  | (typeof DEFINITION_CODES)[number]
  | (typeof NETWORK_CODES)[number]
  | (typeof VERIFICATION_CODES)[number]
  | (typeof OTHER_CODES)[number]
  | (typeof AGENT_ERROR_CODES)[number];

export const ERROR_CODES: readonly ErrorCode[] = [
  ...USAGE_CODES,
  ...DEFINITION_CODES,
  ...NETWORK_CODES,
  ...VERIFICATION_CODES,
  ...OTHER_CODES,
  ...AGENT_ERROR_CODES,
];
