/**
 * What the agent needs from its runtime, and nothing else: files, processes
 * with pipes and exit status, timers, the clock, the environment, a log.
 * The agent's logic (protocol, identity planning, container supervision,
 * the clock keeper) takes a Platform and so stays free of any runtime; the
 * guest's implementation is platform-qjs.ts, over QuickJS's std/os.
 */

/** An opaque timer handle. */
export type Timer = unknown;

/** A byte stream to one host (the virtio port, or stdio). */
export interface Transport {
  /** queue bytes; false once more is queued than the stream wants buffered (then wait for onDrain) */
  write(data: Uint8Array): boolean | undefined;
  onData(cb: (chunk: Uint8Array) => void): void;
  onDrain?(cb: () => void): void;
  pause?(): void;
  resume?(): void;
}

/** A child process started with pipes. */
export interface Child {
  readonly pid: number;
  /** write to its stdin (queued; never blocks the agent) */
  write(text: string): void;
  /** its stdout, as it comes */
  onStdout(cb: (chunk: Uint8Array) => void): void;
  /** its stderr, as it comes (only when started with stderr: 'pipe') */
  onStderr(cb: (chunk: Uint8Array) => void): void;
  /** write raw bytes to its stdin */
  writeBytes(data: Uint8Array): void;
  /** close its stdin once what is queued has gone (the process then reads EOF) */
  closeStdin(): void;
  /** resolves once its stdout (and stderr, if piped) reached EOF: all output has been delivered */
  readonly ended: Promise<void>;
  /** resolves with the exit status (128 + signal when killed) */
  readonly exited: Promise<number>;
  kill(signal?: number): void;
}

export interface RunResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** A child process started on descriptors the agent opened (a task's stdio ports): no pipes through the agent. */
export interface AttachedChild {
  readonly pid: number;
  /** resolves with the exit status (128 + signal when killed) */
  readonly exited: Promise<number>;
}

export interface Platform {
  readText(path: string): string;
  readBytes(path: string): Uint8Array;
  /** replace a file's contents (created with mode 0644 if missing) */
  writeText(path: string, text: string): void;
  writeBytes(path: string, data: Uint8Array): void;
  exists(path: string): boolean;
  mkdirp(path: string): void;
  readdir(path: string): string[];
  /** a symbolic link's target, or undefined if it cannot be read (gone, not a link) */
  readlink(path: string): string | undefined;
  /** size in bytes, or undefined if there is no such file */
  fileSize(path: string): number | undefined;
  /** start argv[0] (found on PATH) with stdin and stdout as pipes, stderr discarded unless piped too */
  spawn(argv: string[], opts?: { stderr?: 'discard' | 'pipe' }): Child;
  /**
   * start argv[0] (found on PATH) with `stdio` as its descriptors 0, 1 and 2
   * (the caller's copies stay open: close them with closeFd once it started)
   */
  spawnAttached(argv: string[], stdio: [number, number, number]): AttachedChild;
  /** open a file or device for reading or writing (blocking, as a child will use it); its descriptor */
  openFd(path: string, how: 'read' | 'write'): number;
  closeFd(fd: number): void;
  /** run argv to its end (or timeoutMs, then SIGKILL), capturing up to maxOutput bytes of each stream */
  run(argv: string[], opts?: { timeoutMs?: number; maxOutput?: number }): Promise<RunResult>;
  /** send `signal` to a process (one not started by spawn: a container's, by its pid); false if there is none */
  kill(pid: number, signal: number): boolean;
  setTimeout(cb: () => void, ms: number): Timer;
  clearTimeout(t: Timer | undefined): void;
  /** monotonic milliseconds (fractional) */
  monotonic(): number;
  env(name: string): string | undefined;
  log(msg: string): void;
  exit(code: number): never;
}

export const sleep = (p: Platform, ms: number): Promise<void> =>
  new Promise((r) => {
    p.setTimeout(r, ms);
  });
