/**
 * What a shim keeps of each task and process: containerd's view of them
 * (status, pid, exit, its FIFOs), and the stdio joined to the guest.
 */
import type { ProcessStdio } from './stdio.ts';
import type { TaskKind } from './kinds.ts';

/** containerd.v1.types.Status */
export const Status = { UNKNOWN: 0, CREATED: 1, RUNNING: 2, STOPPED: 3 } as const;
/** A process containerd knows: a task's own (execId "") or an exec's. */
export interface Proc {
  execId: string;
  pid: number;
  status: number;
  exitStatus: number;
  exitedAt?: number;
  stdin: string;
  stdout: string;
  stderr: string;
  /** on a pty in the guest (containerd then gives one output FIFO: stdout) */
  terminal: boolean;
  spec?: Record<string, unknown>;
  exited: Promise<void>;
  resolveExit: () => void;
  /** its streams' ports and FIFOs, from its start */
  io?: ProcessStdio;
}
/** A task: the pod sandbox (its VM), a container of the pod, or a lone task (a pod of its own). */
export interface Task {
  id: string;
  bundle: string;
  kind: TaskKind;
  procs: Map<string, Proc>;
  disk?: string;
}

/** A process of a task, recorded as created (its start, exec or the sandbox's VM sets its pid). */
export function newProc(t: Task, execId: string, io: { stdin: string; stdout: string; stderr: string; terminal?: boolean }): Proc {
  let resolveExit!: () => void;
  const exited = new Promise<void>((r) => {
    resolveExit = r;
  });
  const p: Proc = {
    execId,
    pid: 0,
    status: Status.CREATED,
    exitStatus: 0,
    stdin: io.stdin,
    stdout: io.stdout,
    stderr: io.stderr,
    terminal: io.terminal === true,
    exited,
    resolveExit,
  };
  t.procs.set(execId, p);
  return p;
}
