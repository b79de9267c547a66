/**
 * File descriptors under QuickJS, as the agent needs them: what QuickJS lacks
 * made here (non-blocking writes: it has no fcntl, so a pipe's write end is
 * reopened through /proc/self/fd with O_NONBLOCK; os.write would otherwise
 * block the whole agent on a full pipe or on a virtio port no host reads),
 * whole reads and writes, and reading as data comes.
 */
import * as os from 'os';
import * as std from 'std';
import { concatBytes } from '../common/framing.ts';

/** Linux x86-64 values QuickJS does not export. */
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const EAGAIN = 11,
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

export const check = (r: number, op: string, path: string): number => {
  if (r < 0) throw new OsError(op, path, -r);
  return r;
};

export function readAll(fd: number, path: string): Uint8Array {
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

export function writeAll(fd: number, data: Uint8Array, path: string): void {
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
export function nonBlockingWriteEnd(fd: number): number {
  const nb = os.open(`/proc/self/fd/${fd}`, os.O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (nb < 0) return fd; // no /proc: a blocking write end still works, only less politely
  os.close(fd);
  return nb;
}

/** One read of up to 64 KiB from a readable fd: its bytes, or nothing now (EINTR, EAGAIN), end of file, or an error. */
export function readChunk(fd: number): Uint8Array | 'again' | 'eof' | 'error' {
  const buf = new ArrayBuffer(65536);
  const n = os.read(fd, buf, 0, buf.byteLength);
  if (n === -EINTR || n === -EAGAIN) return 'again';
  return n > 0 ? new Uint8Array(buf, 0, n) : n === 0 ? 'eof' : 'error';
}

/** Read an fd as it becomes readable until EOF; then close it. */
export function readUntilEof(fd: number, onChunk: (c: Uint8Array) => void, onEnd?: () => void) {
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
