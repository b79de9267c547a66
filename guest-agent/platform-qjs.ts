/**
 * The Platform over QuickJS's `std` and `os` modules (the guest has no
 * Node): files, the transports (stdio, the virtio port), the kernel log.
 * What QuickJS lacks is made in qjs-io.ts (non-blocking writes, whole reads)
 * and qjs-spawn.ts (children with pipes, exit statuses by SIGCHLD);
 * UTF-8 in common/utf8.ts.
 */
import * as os from 'os';
import * as std from 'std';
import type { Platform, Transport } from './platform.ts';
import { utf8Decode, utf8Encode } from '../common/utf8.ts';
import { EPIPE, EEXIST, O_CLOEXEC, O_NONBLOCK, OsError, FdWriter, check, readAll, writeAll, nonBlockingWriteEnd, readChunk } from './qjs-io.ts';
import { exitOf, spawnWith, runToEnd } from './qjs-spawn.ts';

export { O_NONBLOCK, O_CLOEXEC, OsError, FdWriter };

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
