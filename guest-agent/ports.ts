/**
 * virtio-serial ports by name. A task's stdio are ports the host hot-adds on
 * the agent's bus (one per stream, named by the host): the container's
 * process gets the port's device as its descriptor, so its bytes go to the
 * host through the kernel and QEMU, never through the agent. The guest has
 * no udev: ports are found through sysfs, and what the kernel says of a port
 * (is a host connected, how many bytes it queued for the host) through
 * virtio_console's debugfs files.
 */
import { sleep, type Platform } from './platform.ts';
import type { ShellWorker } from './shell.ts';

const SYSFS = '/sys/class/virtio-ports';
export const PORT_DEBUGFS = '/sys/kernel/debug/virtio-ports';
/** A port name the host gives a stream (see host/machine/stdio.ts). */
export const STREAM_PORT = /^scion\.io\.[0-9a-f]{16}\.[012]$/;

/** The device (vportNpM) of the port named `name`, if the guest has it now. */
export function portDevice(p: Platform, name: string): string | undefined {
  let devs: string[];
  try {
    devs = p.readdir(SYSFS);
  } catch {
    return undefined;
  } // no ports yet
  for (const d of devs) {
    try {
      if (p.readText(`${SYSFS}/${d}/name`).trim() === name) return d;
    } catch {
      /* going away meanwhile */
    }
  }
  return undefined;
}

/** What virtio_console's debugfs file says of a port ("key: value" lines). Pure. */
export function parsePortStats(text: string): { hostConnected: boolean; bytesSent: number } | undefined {
  const v = (k: string) => {
    const m = new RegExp(`^${k}: (\\d+)$`, 'm').exec(text);
    return m ? Number(m[1]) : undefined;
  };
  const host = v('host_connected'),
    sent = v('bytes_sent');
  return host === undefined || sent === undefined ? undefined : { hostConnected: host === 1, bytesSent: sent };
}

export class StreamPorts {
  private debugfs = false;
  constructor(
    private readonly p: Platform,
    private readonly shell: ShellWorker,
  ) {}

  /** debugfs mounted once (the kernel keeps virtio_console's files there whether or not it is mounted). */
  private async ensureDebugfs(): Promise<void> {
    if (this.debugfs || this.p.exists(PORT_DEBUGFS)) {
      this.debugfs = true;
      return;
    }
    await this.shell.runOrThrow('mount -t debugfs debugfs /sys/kernel/debug', "mounting debugfs (for the stdio ports' counters)");
    this.debugfs = true;
  }

  /** The port's counters now; undefined if the kernel shows none (no debugfs, the port gone). */
  stats(dev: string): { hostConnected: boolean; bytesSent: number } | undefined {
    try {
      return parsePortStats(this.p.readText(`${PORT_DEBUGFS}/${dev}`));
    } catch {
      return undefined;
    }
  }

  /**
   * The device of the port `name` once the guest has it, and (`connected`)
   * once the host side is connected: a reader opening it before would read
   * an end of file at once.
   */
  async wait(name: string, o: { connected: boolean; timeoutMs?: number }): Promise<string> {
    if (!STREAM_PORT.test(name)) throw new Error(`${JSON.stringify(name).slice(0, 80)} is not a stream port name`);
    await this.ensureDebugfs();
    const end = Date.now() + (o.timeoutMs ?? 10_000);
    for (;;) {
      const dev = portDevice(this.p, name);
      if (dev && (!o.connected || this.stats(dev)?.hostConnected)) return dev;
      if (Date.now() > end)
        throw new Error(
          dev ? `port ${name} (${dev}): no host connected within ${o.timeoutMs ?? 10_000} ms` : `no port ${name} appeared within ${o.timeoutMs ?? 10_000} ms`,
        );
      await sleep(this.p, 5);
    }
  }
}
