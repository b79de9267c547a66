/**
 * Child processes under QuickJS: started with pipes (qjs-io.ts reads and
 * writes them), their exit statuses by SIGCHLD and waitpid (QuickJS gives no
 * other way to learn them), run to their end with bounded output.
 */
import * as os from 'os';
import * as std from 'std';
import type { Child, RunResult } from './platform.ts';
import { utf8Decode, utf8Encode } from '../common/utf8.ts';
import { concatBytes } from '../common/framing.ts';
import { FdWriter, check, nonBlockingWriteEnd, readUntilEof } from './qjs-io.ts';

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
export function exitOf(pid: number): Promise<number> {
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

export function spawnWith(argv: string[], stderr: 'discard' | 'pipe'): Child {
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

export async function runToEnd(argv: string[], opts: { timeoutMs?: number; maxOutput?: number } = {}): Promise<RunResult> {
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
