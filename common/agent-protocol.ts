/**
 * The agent protocol (guest-agent/PROTOCOL.md) as one typed map: command ->
 * arguments -> result, and events -> data. The agent's handlers and the
 * host's AgentClient are both checked against it, so neither can drift from
 * the other (or from the doc, which a test holds against COMMANDS). Types
 * only, plus the command list: no runtime, so the guest bundle can use it.
 */
import type { Identity, ContainerSpec } from './contracts.ts';

/** 2: task stdio on ports of their own (task.start/exec `stdio`, task-exit `sent`); task.input and task-output gone */
export const PROTOCOL_VERSION = 2;

/** Error codes the agent answers with (PROTOCOL.md "Error codes"). */
export const AGENT_ERROR_CODES = [
  'E_FRAME_TOO_LARGE',
  'E_BAD_JSON',
  'E_BAD_REQUEST',
  'E_UNKNOWN_COMMAND',
  'E_BAD_ARGS',
  'E_EXEC_DISABLED',
  'E_NO_CONTAINER',
  'E_APPLY_FAILED',
  'E_INTERNAL',
  'E_BUSY',
  'E_NO_TASK',
  'E_NO_DISK',
  'E_NO_TERMINAL',
  'E_NO_STREAM_PORT',
] as const;
export type AgentErrorCode = (typeof AGENT_ERROR_CODES)[number];

export type Steps = Record<string, number>;

export type ContainerStateName = 'created' | 'running' | 'stopped' | 'restarting';
/** One of the image's containers as the agent supervises it. */
export interface ContainerStatus {
  name: string;
  state: ContainerStateName;
  pid?: number;
  startedAt?: number;
  restarts: number;
  exitCode?: number;
  healthy?: boolean;
}

export interface ClockInfo {
  source: 'rtc' | 'off';
  /** system clock minus RTC at the RTC's second edges while the clock is right (ms, under 1000); measured in the template */
  rtcPhaseMs?: number;
  checks: number;
  steps: number;
  lastCheckAt?: number;
  /** the system clock's error found by the last check (ms, + = ahead), before it was corrected */
  lastDriftMs?: number;
  intervalMs: number;
  lastError?: string;
}

export interface ReadyInfo {
  generation: number;
  stepsMs: Steps;
  totalMs: number;
}

/** What the agent's `info` answers: protocol, image, generation, identity, containers, clock, last ready. */
export interface AgentInfo {
  agentVersion: string;
  protocol: number;
  kernel: string;
  uptimeS: number;
  agentUptimeS: number;
  image: string;
  generation: number;
  /** what the host applied last (the RNG seed is never reported), with the hostname and machine-id the guest has now */
  identity: Partial<Identity> & { hostname: string; machineId: string };
  vmForks: number;
  containers: ContainerStatus[];
  lastReady: ReadyInfo | null;
  /** the guest's wall clock (ms) when this answer was made */
  time: number;
  clock: ClockInfo;
}

/** `time`: the guest's clock when it answered (ms since the epoch) */
export interface AppliedIdentity {
  applied: true;
  generation: number;
  stepsMs: Steps;
  totalMs: number;
  healthy: boolean;
  time: number;
}
/**
 * A task process's stdio: the names of the virtio-serial ports the host
 * hot-added for its streams (scion.io.<16 hex>.<0|1|2>); a stream without one
 * is /dev/null.
 */
export interface TaskStdio {
  stdin?: string;
  stdout?: string;
  stderr?: string;
}
/** What a task's processes use now, summed over them (the guest's view; the VM's memory is their limit). */
export interface TaskStats {
  id: string;
  pids: number;
  cpuUserUsec: number;
  cpuSystemUsec: number;
  memoryBytes: number;
  anonBytes: number;
  fileBytes: number;
  limitBytes: number;
}

export interface IdentityNotApplied {
  applied: false;
  generation: number;
  info: AgentInfo;
}

/** Every command: its arguments and its result. */
export interface AgentCommands {
  sync: { args: { nonce: number | string }; result: { nonce: number | string; protocol: number } };
  ping: { args: Record<string, never>; result: { pong: true; protocol: number; time: number } };
  info: { args: Record<string, never>; result: AgentInfo };
  'identity.apply': { args: Identity; result: AppliedIdentity | IdentityNotApplied };
  'time.set': { args: { time: number }; result: { time: number; set: boolean } };
  'clock.step': {
    args: { deltaMs: number; calibrate?: boolean };
    result: {
      stepped: boolean /** whether the RTC's phase was measured (asked for and an edge could be trusted); why not: clock.lastError */;
      calibrated?: boolean;
      time?: number;
      clock: ClockInfo;
    };
  };
  'containers.list': { args: Record<string, never>; result: { containers: ContainerStatus[] } };
  'containers.start': { args: { name: string }; result: ContainerStatus };
  'containers.stop': { args: { name: string }; result: ContainerStatus };
  'containers.restart': { args: { name: string }; result: ContainerStatus };
  'containers.logs': { args: { name: string; tailBytes?: number }; result: { name: string; logs: string } };
  exec: { args: { argv: string[]; timeoutMs?: number }; result: { exitCode: number; stdout: string; stderr: string } };
  'freeze.prepare': { args: Record<string, never>; result: { prepared: true; ms: number; generation: number } };
  shutdown: { args: Record<string, never>; result: { shuttingDown: true } };
  'task.create': {
    args: { id: string; disk: string; spec: Record<string, unknown>; terminal?: boolean; podPid?: boolean };
    result: { id: string; device: string; rootfs: string; stepsMs?: { device: number; mount: number; podPid?: number } };
  };
  'task.start': { args: { id: string; stdio?: TaskStdio }; result: { id: string; pid: number } };
  'task.exec': {
    args: { id: string; execId: string; process: Record<string, unknown>; terminal?: boolean; stdio?: TaskStdio };
    result: { id: string; execId: string; pid: number };
  };
  'task.resize': { args: { id: string; execId?: string; width: number; height: number }; result: { id: string; tty: string } };
  'task.kill': { args: { id: string; execId?: string; signal: number; all?: boolean }; result: { id: string; signal: number } };
  'task.pids': { args: { id: string }; result: { id: string; pids: number[] } };
  'task.stats': { args: { id: string }; result: TaskStats };
  'task.delete': { args: { id: string }; result: { id: string; exitCode?: number } };
}

/** A command of the agent protocol (PROTOCOL.md). */
export type AgentCommand = keyof AgentCommands;
/** The arguments of agent command `C`. */
export type ArgsOf<C extends AgentCommand> = AgentCommands[C]['args'];
/** The result of agent command `C`. */
export type ResultOf<C extends AgentCommand> = AgentCommands[C]['result'];

/** The commands in PROTOCOL.md's order (the agent refuses any other). */
export const COMMANDS = [
  'sync',
  'ping',
  'info',
  'identity.apply',
  'time.set',
  'containers.list',
  'containers.start',
  'containers.stop',
  'containers.restart',
  'containers.logs',
  'exec',
  'freeze.prepare',
  'shutdown',
  'clock.step',
  'task.create',
  'task.start',
  'task.exec',
  'task.kill',
  'task.resize',
  'task.pids',
  'task.stats',
  'task.delete',
] as const satisfies readonly AgentCommand[];

/** Every event: its data. */
export interface AgentEvents {
  ready: ReadyInfo & { healthy: boolean; boot?: boolean };
  'identity-applied': { generation: number; stepsMs: Steps; totalMs: number };
  forked: { signal: 'vmgenid' | 'identity.apply'; generation: number; vmForks?: number };
  'container-exited': { name: string; exitCode: number | null };
  'container-restarted': { name: string; restarts: number; reason: 'exited' | 'identity' | 'request' };
  /** a task's output, base64 (execId '' for the task's own process) */
  /**
   * a task's process ended; `sent`: the bytes each of its output ports had
   * queued for the host by then (the host has its output once it read that many)
   */
  'task-exit': { id: string; execId: string; exitCode: number; pid: number; exitedAt: number; sent?: { stdout?: number; stderr?: number } };
}
export type AgentEventName = keyof AgentEvents;
/** An event the agent sends unasked (ready, forked, task-exit, …) with its data. */
export interface AgentEvent<E extends AgentEventName = AgentEventName> {
  event: E;
  data: AgentEvents[E];
  ts: number;
}

/** The wire shapes. */
export type AgentResponse =
  | { id: string | number; ok: true; result: unknown }
  | { id: string | number | null; ok: false; error: { code: AgentErrorCode; message: string } };

export type { Identity, ContainerSpec };
