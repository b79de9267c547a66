/**
 * A task process's stdio between containerd's FIFOs and the guest, on a path
 * made for bytes: each stream a virtio-serial port hot-added for it
 * (host/machine/stream-ports.ts), the shim joined to the port's unix socket
 * by a Node pipe. Backpressure all the way: a reader that stalls on the FIFO
 * pauses the socket, QEMU stops taking the port's buffers, the writer in the
 * guest blocks; nothing is dropped or piled up in the shim. The process's
 * end comes with the bytes the guest had queued on each output port
 * (task-exit's `sent`): its exit is told only once they have all been
 * written to the FIFOs, as a process's output comes before its exit.
 */
import { constants, createWriteStream, openSync } from 'node:fs';
import { Socket } from 'node:net';
import { connectUnix } from './unix.ts';
import type { Readable, Writable } from 'node:stream';
import type { TaskStdio } from '../common/agent-protocol.ts';

/**
 * A FIFO's write end as a non-blocking stream (epoll, not the thread pool: a
 * reader that stalls must not hold one of Node's four pool threads in a
 * write). containerd has its read end open before a task starts; if not,
 * an ordinary file stream waits for one.
 */
function fifoWriter(path: string): Writable {
  try {
    return new Socket({ fd: openSync(path, constants.O_WRONLY | constants.O_NONBLOCK), readable: false, writable: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENXIO') throw e; // ENXIO: no reader yet
    return createWriteStream(path, { flags: 'w' });
  }
}

/** A FIFO's read end as a non-blocking stream (its writer, containerd or its client, has it open before a task starts). */
function fifoReader(path: string): Readable {
  return new Socket({ fd: openSync(path, constants.O_RDONLY | constants.O_NONBLOCK), readable: true, writable: false });
}

/** containerd's FIFO paths for a process (empty: the stream is not wanted). */
export interface FifoPaths {
  stdin: string;
  stdout: string;
  stderr: string;
}

/** The streams a process gets a port for: those containerd gave a FIFO. Pure. */
export function wantedStreams(f: FifoPaths): (0 | 1 | 2)[] {
  return (
    [
      [0, f.stdin],
      [1, f.stdout],
      [2, f.stderr],
    ] as const
  )
    .filter(([, p]) => !!p)
    .map(([fd]) => fd);
}

/** What the shim needs of the pod's VM for stdio. */
export interface StreamHost {
  addStreamPort(key: string, fd: 0 | 1 | 2): Promise<{ port: string; socket: string }>;
  removeStreamPort(key: string, fd: 0 | 1 | 2): Promise<void>;
}

const NAMES = ['stdin', 'stdout', 'stderr'] as const;
/** After CloseIO, how long a stdin FIFO that is still open may stay without data before the input is closed anyway. */
const INPUT_QUIET_MS = 1000;

/** One output stream: the port's socket into the FIFO, with the bytes counted. */
class Output {
  received = 0;
  closed = false;
  private waiters: (() => void)[] = [];
  private fifo?: Writable;
  constructor(
    readonly name: string,
    readonly sock: Socket,
    fifoPath: string,
    log: (m: string) => void,
  ) {
    try {
      this.fifo = fifoWriter(fifoPath);
    } catch (e) {
      log(`${name}: ${(e as Error).message}; its output is dropped`);
    }
    this.fifo?.on('error', (e) => {
      // its reader went away: the rest is read and dropped, so the guest's writer never blocks on nobody
      log(`${name}: ${e.message}; its further output is dropped`);
      this.fifo = undefined;
      sock.resume();
    });
    sock.on('data', (c: Buffer) => {
      this.received += c.length;
      if (this.fifo && !this.fifo.write(c)) {
        sock.pause();
        this.fifo.once('drain', () => sock.resume());
      }
      this.wake();
    });
    sock.on('error', (e) => log(`${name}: ${e.message}`));
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }
  private wake() {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  /** Resolves once `n` bytes came (or the socket closed, or `cancel` fired). */
  async until(n: number, cancel: Promise<void>): Promise<void> {
    let stop = false;
    void cancel.then(() => {
      stop = true;
      this.wake();
    });
    while (this.received < n && !this.closed && !stop) await new Promise<void>((r) => this.waiters.push(r));
  }
  /** Flush what was written to the FIFO and close it (containerd sees the end). */
  end(): Promise<void> {
    const f = this.fifo;
    this.fifo = undefined;
    if (!f) return Promise.resolve();
    return new Promise((r) => {
      f.once('error', () => r());
      f.end(() => {
        f.destroy();
        r();
      });
    });
  }
}

export class ProcessStdio {
  private constructor(
    private readonly host: StreamHost,
    private readonly key: string,
    /** the port names, for the agent */
    readonly stdio: TaskStdio,
    private readonly sockets: Map<0 | 1 | 2, Socket>,
    private readonly outputs: Partial<Record<'stdout' | 'stderr', Output>>,
    private readonly input?: Readable,
  ) {}

  /**
   * Ports for the process's wanted streams, each socket connected (an input
   * port is read by the guest only once the host is connected), the FIFOs
   * joined to them. On failure, the ports made so far go again.
   */
  static async open(host: StreamHost, key: string, fifos: FifoPaths, log: (m: string) => void): Promise<ProcessStdio> {
    const made: (0 | 1 | 2)[] = [];
    const sockets = new Map<0 | 1 | 2, Socket>();
    const stdio: TaskStdio = {};
    try {
      for (const fd of wantedStreams(fifos)) {
        const { port, socket } = await host.addStreamPort(key, fd);
        made.push(fd);
        sockets.set(fd, await connectUnix(socket, 5000));
        stdio[NAMES[fd]] = port;
      }
    } catch (e) {
      for (const s of sockets.values()) s.destroy();
      for (const fd of made) await host.removeStreamPort(key, fd).catch(() => undefined);
      throw e;
    }
    const outputs: Partial<Record<'stdout' | 'stderr', Output>> = {};
    for (const fd of [1, 2] as const) {
      const s = sockets.get(fd);
      if (s) outputs[NAMES[fd] as 'stdout' | 'stderr'] = new Output(NAMES[fd], s, fifos[NAMES[fd]], log);
    }
    let input: Readable | undefined;
    const inSock = sockets.get(0);
    if (inSock) {
      // the FIFO's end (or CloseIO) closes the port's host side: the guest reads an end of file after the data
      try {
        input = fifoReader(fifos.stdin);
      } catch (e) {
        log(`stdin: ${(e as Error).message}`);
        inSock.end();
      }
      input?.on('error', (e) => {
        log(`stdin: ${e.message}`);
        inSock.end();
      });
      inSock.on('error', (e) => log(`stdin: ${e.message}`));
      input?.pipe(inSock);
    }
    return new ProcessStdio(host, key, stdio, sockets, outputs, input);
  }

  /**
   * The process ended having queued `sent` bytes on its output ports: wait
   * until they all came (or `cancel`: the VM went), then close the FIFOs.
   * A count the guest could not give is not waited for.
   */
  async drain(sent: { stdout?: number; stderr?: number } | undefined, cancel: Promise<void>): Promise<void> {
    await Promise.all(
      (['stdout', 'stderr'] as const).map(async (k) => {
        const o = this.outputs[k];
        if (o && sent?.[k] !== undefined) await o.until(sent[k]!, cancel);
      }),
    );
    await Promise.all(Object.values(this.outputs).map((o) => o.end()));
  }

  /**
   * Close the process's stdin (CloseIO): containerd's client says it wrote
   * all it will, but what it wrote may still be in the FIFO: that is read to
   * the FIFO's end first (or until the FIFO is quiet for INPUT_QUIET_MS, if a
   * writer keeps it open), then the port's host side closes and the guest
   * reads an end of file after the data.
   */
  closeInput(): void {
    const input = this.input,
      sock = this.sockets.get(0);
    if (!input || !sock) {
      sock?.end();
      return;
    }
    if (input.readableEnded || input.destroyed) {
      sock.end();
      return;
    }
    let quiet: NodeJS.Timeout;
    const finish = () => {
      clearTimeout(quiet);
      input.unpipe(sock);
      input.destroy();
      sock.end();
    };
    const rearm = () => {
      clearTimeout(quiet);
      quiet = setTimeout(finish, INPUT_QUIET_MS);
    };
    input.on('data', rearm);
    input.once('end', () => clearTimeout(quiet)); // the pipe ends the socket
    rearm();
  }

  /**
   * Everything of its stdio goes: sockets, FIFO ends, and (`removePorts`, the
   * default) its ports; a VM about to be removed keeps them, they go with it.
   */
  async close(removePorts = true): Promise<void> {
    this.input?.destroy();
    for (const o of Object.values(this.outputs)) await o.end();
    for (const s of this.sockets.values()) s.destroy();
    if (removePorts) for (const fd of this.sockets.keys()) await this.host.removeStreamPort(this.key, fd).catch(() => undefined);
    this.sockets.clear();
  }
}
