/**
 * The Platform over QuickJS's `std` and `os` modules (the guest has no
 * Node). What QuickJS lacks is made here: non-blocking writes (it has no
 * fcntl, so a pipe's write end is reopened through /proc/self/fd with
 * O_NONBLOCK; os.write would otherwise block the whole agent on a full
 * pipe or on a virtio port no host reads), child exit status (SIGCHLD +
 * waitpid), and UTF-8 (common/utf8.ts).
 */
import * as os from 'os';
import * as std from 'std';
import type { Platform, Child, RunResult, Transport } from './platform.ts';
import { utf8Decode, utf8Encode } from '../common/utf8.ts';
import { concatBytes } from '../common/framing.ts';

/** Linux x86-64 values QuickJS does not export. */
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
const EAGAIN = 11,
  EINTR = 4,
  EPIPE = 32,
  EEXIST = 17;

export class OsError extends Error {
  constructor(
    readonly op: string,
    readonly path: string,
    readonly errno: number,
  ) {
    super(`${op} ${path}: ${std.strerror(errno)}`);
  }
}

const check = (r: number, op: string, path: string): number => {
  if (r < 0) throw new OsError(op, path, -r);
  return r;
};

function readAll(fd: number, path: string): Uint8Array {
  const parts: Uint8Array[] = [];
  for (;;) {
    const buf = new ArrayBuffer(65536);
    const n = os.read(fd, buf, 0, buf.byteLength);
    if (n === -EINTR) continue;
    check(n, 'read', path);
    if (n === 0) break;
    parts.push(new Uint8Array(buf, 0, n));
  }
  return parts.length ? concatBytes(parts) : new Uint8Array(0);
}

function writeAll(fd: number, data: Uint8Array, path: string): void {
  let off = 0;
  while (off < data.length) {
    const n = os.write(fd, data.buffer as ArrayBuffer, data.byteOffset + off, data.length - off);
    if (n === -EINTR) continue;
    off += check(n, 'write', path);
  }
}

/**
 * A queued writer on a non-blocking fd: what the fd does not take now waits
 * for it to be writable (select); `write` says false past the high-water mark,
 * `onDrain` fires below the low one. Nothing is dropped until the fd fails.
 */
export class FdWriter {
  private queue: Uint8Array[] = [];
  private queued = 0;
  private waiting = false;
  private full = false;
  private drained: (() => void)[] = [];
  failed = false;
  constructor(
    readonly fd: number,
    readonly highWater = 256 * 1024,
    readonly lowWater = 64 * 1024,
  ) {}

  write(data: Uint8Array): boolean {
    if (this.failed) return true; // the stream is gone: the session ends; the host resyncs on reconnect
    this.queue.push(data);
    this.queued += data.length;
    if (!this.waiting) this.flush();
    if (this.queued > this.highWater) this.full = true;
    return !this.full;
  }
  onDrain(cb: () => void) {
    this.drained.push(cb);
  }
  /** close the fd once the queue is empty (a child's stdin: it then reads EOF) */
  end(): void {
    this.ending = true;
    if (!this.waiting) this.flush();
  }
  /** close the fd now, whatever is queued (its reader is gone) */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.wait(false);
    os.close(this.fd);
  }
  private ending = false;
  private closed = false;
  /** bytes not yet taken by the fd */
  pending(): number {
    return this.failed ? 0 : this.queued;
  }

  private flush = (): void => {
    while (this.queue.length) {
      const b = this.queue[0];
      const n = os.write(this.fd, b.buffer as ArrayBuffer, b.byteOffset, b.length);
      if (n === -EINTR) continue;
      if (n === -EAGAIN) {
        this.wait(true);
        return;
      }
      if (n < 0) {
        this.failed = true;
        this.queue = [];
        this.queued = 0;
        this.wait(false);
        return;
      }
      this.queued -= n;
      if (n < b.length) this.queue[0] = b.subarray(n);
      else this.queue.shift();
    }
    this.wait(false);
    if (this.full && this.queued <= this.lowWater) {
      this.full = false;
      for (const d of this.drained) d();
    }
    if (this.ending) this.close();
  };

  private wait(on: boolean) {
    if (on === this.waiting) return;
    this.waiting = on;
    os.setWriteHandler(this.fd, on ? this.flush : null);
  }
}

/** A write end that does not block: the same pipe (or tty, or device) reopened with O_NONBLOCK. */
function nonBlockingWriteEnd(fd: number): number {
  const nb = os.open(`/proc/self/fd/${fd}`, os.O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (nb < 0) return fd; // no /proc: a blocking write end still works, only less politely
  os.close(fd);
  return nb;
}

/** Exit statuses of our children: SIGCHLD reaps all that ended and resolves who waits for them. */
const exits = new Map<number, (status: number) => void>();
const early = new Map<number, number>();
let reaping = false;
function reap() {
  for (;;) {
    const [pid, status] = os.waitpid(-1, os.WNOHANG);
    if (pid <= 0) return;
    const code = (status & 0x7f) === 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f);
    const w = exits.get(pid);
    if (w) {
      exits.delete(pid);
      w(code);
    } else early.set(pid, code);
  }
}
function exitOf(pid: number): Promise<number> {
  if (!reaping) {
    reaping = true;
    os.signal(os.SIGCHLD, reap);
  }
  return new Promise((resolve) => {
    const e = early.get(pid);
    if (e !== undefined) {
      early.delete(pid);
      resolve(e);
    } else exits.set(pid, resolve);
    reap(); // it may have ended before the handler was in place
  });
}

/** One read of up to 64 KiB from a readable fd: its bytes, or nothing now (EINTR, EAGAIN), end of file, or an error. */
function readChunk(fd: number): Uint8Array | 'again' | 'eof' | 'error' {
  const buf = new ArrayBuffer(65536);
  const n = os.read(fd, buf, 0, buf.byteLength);
  if (n === -EINTR || n === -EAGAIN) return 'again';
  return n > 0 ? new Uint8Array(buf, 0, n) : n === 0 ? 'eof' : 'error';
}

/** Read an fd as it becomes readable until EOF; then close it. */
function readUntilEof(fd: number, onChunk: (c: Uint8Array) => void, onEnd?: () => void) {
  os.setReadHandler(fd, () => {
    const c = readChunk(fd);
    if (c === 'again') return;
    if (typeof c === 'string') {
      os.setReadHandler(fd, null);
      os.close(fd);
      onEnd?.();
      return;
    }
    onChunk(c);
  });
}

function spawnWith(argv: string[], stderr: 'discard' | 'pipe'): Child {
  const inPipe = os.pipe(),
    outPipe = os.pipe(),
    errPipe = stderr === 'pipe' ? os.pipe() : null;
  if (!inPipe || !outPipe || (stderr === 'pipe' && !errPipe)) throw new Error(`${argv[0]}: cannot make pipes (out of file descriptors?)`);
  const devnull = errPipe ? -1 : check(os.open('/dev/null', os.O_WRONLY), 'open', '/dev/null');
  // QuickJS's exec closes every fd above 2 in the child: no pipe end leaks into it
  const pid = os.exec(argv, { block: false, usePath: true, stdin: inPipe[0], stdout: outPipe[1], stderr: errPipe ? errPipe[1] : devnull });
  os.close(inPipe[0]);
  os.close(outPipe[1]);
  if (errPipe) os.close(errPipe[1]);
  else os.close(devnull);
  if (pid < 0) {
    os.close(inPipe[1]);
    os.close(outPipe[0]);
    if (errPipe) os.close(errPipe[0]);
    throw new Error(`${argv[0]}: cannot start: ${std.strerror(-pid)}`);
  }
  const stdin = new FdWriter(nonBlockingWriteEnd(inPipe[1]));
  const outListeners: ((c: Uint8Array) => void)[] = [];
  const errListeners: ((c: Uint8Array) => void)[] = [];
  let open = errPipe ? 2 : 1;
  let endStreams!: () => void;
  const ended = new Promise<void>((r) => {
    endStreams = r;
  });
  const done = () => {
    if (--open === 0) endStreams();
  };
  readUntilEof(
    outPipe[0],
    (c) => {
      for (const l of outListeners) l(c);
    },
    done,
  );
  if (errPipe)
    readUntilEof(
      errPipe[0],
      (c) => {
        for (const l of errListeners) l(c);
      },
      done,
    );
  const exited = exitOf(pid).then((code) => {
    stdin.close();
    return code;
  });
  return {
    pid,
    exited,
    ended,
    write: (text) => {
      stdin.write(utf8Encode(text));
    },
    writeBytes: (data) => {
      stdin.write(data);
    },
    closeStdin: () => stdin.end(),
    onStdout: (cb) => {
      outListeners.push(cb);
    },
    onStderr: (cb) => {
      errListeners.push(cb);
    },
    kill: (sig = os.SIGTERM) => {
      os.kill(pid, sig);
    },
  };
}

async function runToEnd(argv: string[], opts: { timeoutMs?: number; maxOutput?: number } = {}): Promise<RunResult> {
  const max = opts.maxOutput ?? 1 << 20;
  let c: Child;
  try {
    c = spawnWith(argv, 'pipe');
  } catch (e) {
    return { exitCode: 127, stdout: '', stderr: (e as Error).message };
  }
  const out: Uint8Array[] = [],
    err: Uint8Array[] = [];
  let outN = 0,
    errN = 0;
  c.onStdout((b) => {
    if (outN < max) {
      out.push(b.slice(0, max - outN));
      outN += b.length;
    }
  });
  c.onStderr((b) => {
    if (errN < max) {
      err.push(b.slice(0, max - errN));
      errN += b.length;
    }
  });
  c.closeStdin(); // nothing for its stdin
  const timer = os.setTimeout(() => c.kill(9), opts.timeoutMs ?? 30_000);
  const exitCode = await c.exited;
  os.clearTimeout(timer);
  await c.ended;
  return { exitCode, stdout: utf8Decode(concatBytes(out)), stderr: utf8Decode(concatBytes(err)) };
}

export const qjsPlatform: Platform = {
  readBytes(path) {
    const fd = check(os.open(path, os.O_RDONLY), 'open', path);
    try {
      return readAll(fd, path);
    } finally {
      os.close(fd);
    }
  },
  readText(path) {
    return utf8Decode(this.readBytes(path));
  },
  writeBytes(path, data) {
    const fd = check(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 'open', path);
    try {
      writeAll(fd, data, path);
    } finally {
      os.close(fd);
    }
  },
  writeText(path, text) {
    this.writeBytes(path, utf8Encode(text));
  },
  exists(path) {
    return os.stat(path)[1] === 0;
  },
  mkdirp(path) {
    let cur = '';
    for (const part of path.split('/')) {
      cur = cur ? `${cur}/${part}` : part || '/';
      if (!part) continue;
      const r = os.mkdir(cur, 0o755);
      if (r < 0 && -r !== EEXIST) check(r, 'mkdir', cur);
    }
  },
  readlink(path) {
    const [target, err] = os.readlink(path);
    return err ? undefined : target;
  },
  readdir(path) {
    const [names, err] = os.readdir(path);
    if (err) throw new OsError('readdir', path, err);
    return names.filter((n) => n !== '.' && n !== '..');
  },
  fileSize(path) {
    const [st, err] = os.stat(path);
    return err === 0 ? st.size : undefined;
  },
  spawn: (argv, opts) => spawnWith(argv, opts?.stderr ?? 'discard'),
  spawnAttached(argv, [stdin, stdout, stderr]) {
    // QuickJS's exec dup2s these onto 0-2 in the child and closes every other descriptor there
    const pid = os.exec(argv, { block: false, usePath: true, stdin, stdout, stderr });
    if (pid < 0) throw new Error(`${argv[0]}: cannot start: ${std.strerror(-pid)}`);
    return { pid, exited: exitOf(pid) };
  },
  openFd: (path, how) => check(os.open(path, (how === 'read' ? os.O_RDONLY : os.O_WRONLY) | O_CLOEXEC), 'open', path),
  closeFd: (fd) => {
    os.close(fd);
  },
  run: runToEnd,
  kill: (pid, signal) => os.kill(pid, signal) === 0,
  setTimeout: (cb, ms) => os.setTimeout(cb, ms),
  clearTimeout: (t) => {
    if (t !== undefined) os.clearTimeout(t);
  },
  monotonic: () => performance.now(),
  env: (name) => std.getenv(name) ?? undefined,
  log: (msg) => {
    std.err.puts(`scion-agent: ${msg}\n`);
    std.err.flush();
  },
  exit: (code) => std.exit(code),
};

/** Input ended (`--stdio`): exit once what is queued for the output has gone, or it failed, giving answers in progress 100 ms. */
function exitWhenFlushed(writer: FdWriter) {
  let quiet = 0;
  const look = () => {
    quiet = writer.pending() === 0 ? quiet + 1 : 0;
    if (quiet >= 2) std.exit(0);
    else os.setTimeout(look, 50);
  };
  os.setTimeout(look, 50);
}

/** A transport over a readable fd and a writable one (stdio; the port is one fd both ways). */
export function fdTransport(readFd: number, writeFd: number): Transport {
  const writer = new FdWriter(writeFd === readFd ? writeFd : nonBlockingWriteEnd(writeFd));
  const listeners: ((c: Uint8Array) => void)[] = [];
  let paused = false;
  const onReadable = () => {
    const c = readChunk(readFd);
    if (c === 'again') return;
    if (typeof c === 'string') {
      os.setReadHandler(readFd, null);
      exitWhenFlushed(writer);
      return;
    }
    for (const l of listeners) l(c);
  };
  os.setReadHandler(readFd, onReadable);
  return {
    write: (b) => writer.write(b),
    onData: (cb) => {
      listeners.push(cb);
    },
    onDrain: (cb) => writer.onDrain(cb),
    pause: () => {
      if (!paused) {
        paused = true;
        os.setReadHandler(readFd, null);
      }
    },
    resume: () => {
      if (paused) {
        paused = false;
        os.setReadHandler(readFd, onReadable);
      }
    },
  };
}

/**
 * The virtio-serial port, opened non-blocking. While no host is connected it
 * reads 0 bytes and select() calls it readable without end, so after a 0
 * the agent stops watching it and looks again by timer: fast right after a
 * disconnect (a fork resumes here and the host connects within ~100 ms),
 * then backing off so an idle clone costs its host little CPU.
 */
export function portTransport(path: string): Transport {
  const fd = check(os.open(path, os.O_RDWR | O_NONBLOCK | O_CLOEXEC), 'open', path);
  const writer = new FdWriter(fd);
  const listeners: ((c: Uint8Array) => void)[] = [];
  let paused = false,
    watching = false,
    idle = 0;
  let retry: unknown;
  const watch = (on: boolean) => {
    if (on !== watching) {
      watching = on;
      os.setReadHandler(fd, on ? onReadable : null);
    }
  };
  const onReadable = () => {
    const c = readChunk(fd);
    if (c === 'again') return;
    if (typeof c === 'string') {
      watch(false);
      idle++;
      retry = os.setTimeout(
        () => {
          retry = undefined;
          if (!paused) watch(true);
        },
        c === 'error' ? 100 : idle < 200 ? 10 : idle < 400 ? 50 : 250,
      );
      return;
    }
    idle = 0;
    for (const l of listeners) l(c);
  };
  watch(true);
  return {
    write: (b) => writer.write(b),
    onData: (cb) => {
      listeners.push(cb);
    },
    onDrain: (cb) => writer.onDrain(cb),
    pause: () => {
      paused = true;
      watch(false);
    },
    resume: () => {
      if (!paused) return;
      paused = false;
      if (retry === undefined) watch(true);
    },
  };
}

/** Lines of the kernel log from now on (records before are skipped), as the kernel writes them. */
export function watchKernelLog(onRecord: (text: string) => void): boolean {
  const fd = os.open('/dev/kmsg', os.O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return false;
  os.seek(fd, 0, std.SEEK_END);
  os.setReadHandler(fd, () => {
    for (let i = 0; i < 1000; i++) {
      const buf = new ArrayBuffer(8192);
      const n = os.read(fd, buf, 0, buf.byteLength);
      if (n === -EPIPE) continue; // records were overwritten before we read them: go on with the next
      if (n <= 0) return;
      onRecord(utf8Decode(new Uint8Array(buf, 0, n)));
    }
  });
  return true;
}
