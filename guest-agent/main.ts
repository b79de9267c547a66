/**
 * Entry point in the guest: find the virtio-serial port by name (no udev in
 * the guest, so through sysfs), read the image config, serve the protocol.
 * `--stdio` serves on stdin/stdout instead (tests, or a socket via socat).
 */
import { openSync, readFileSync, readdirSync, read, write, readSync, existsSync, mkdirSync, symlinkSync, constants } from 'node:fs';
import { Agent, type ImageConfig } from './agent.ts';
import { GUEST_IMAGE_CONFIG } from '../common/contracts.ts';
import { PORT_NAME } from './protocol.ts';

function findPort(): string | undefined {
  const link = `/dev/virtio-ports/${PORT_NAME}`;
  if (existsSync(link)) return link;
  try {
    for (const d of readdirSync('/sys/class/virtio-ports')) {
      if (readFileSync(`/sys/class/virtio-ports/${d}/name`, 'utf8').trim() === PORT_NAME) {
        try { mkdirSync('/dev/virtio-ports', { recursive: true }); symlinkSync(`/dev/${d}`, link); } catch { /* udev-less guest: the link exists already or the port is opened by its /dev name */ }
        return `/dev/${d}`;
      }
    }
  } catch { /* no virtio-ports in sysfs (a host-side test): the caller names the device */ }
  return undefined;
}

const args = process.argv.slice(2);
const root = process.env.SCION_AGENT_ROOT ?? '';
const imagePath = process.env.SCION_IMAGE_CONFIG ?? `${root}${GUEST_IMAGE_CONFIG}`;
const image: ImageConfig = JSON.parse(readFileSync(imagePath, 'utf8'));
const agent = new Agent({
  image,
  system: { root, setClock: process.env.SCION_AGENT_SET_CLOCK !== '0', defaultInterface: image.network?.interface ?? 'eth0', dhcp: image.network?.mode === 'dhcp' },
  stateFile: process.env.SCION_AGENT_STATE ?? '/run/scion-agent.state',
  logDir: process.env.SCION_AGENT_LOGS ?? '/run/scion/logs',
});
const log = (m: string) => process.stderr.write(`scion-agent: ${m}\n`);
process.on('uncaughtException', (e) => log(`uncaught: ${e.stack ?? e}`));
process.on('unhandledRejection', (e) => log(`unhandled: ${(e as Error)?.stack ?? e}`));

const listenAt = args.indexOf('--listen');
if (args.includes('--stdio')) {
  agent.attach({
    write: (b) => process.stdout.write(b), onData: (cb) => process.stdin.on('data', cb), onDrain: (cb) => process.stdout.on('drain', cb),
    pause: () => process.stdin.pause(), resume: () => process.stdin.resume(),
  });
} else if (listenAt >= 0) {
  // a unix socket standing in for the virtio port (host-side tests, or a VM-less agent)
  const path = args[listenAt + 1];
  const { createServer } = await import('node:net');
  const { rmSync } = await import('node:fs');
  rmSync(path, { force: true });
  createServer((sock) => {
    const detach = agent.attach({
      write: (b) => (sock.destroyed ? true : sock.write(b)), onData: (cb) => sock.on('data', cb), onDrain: (cb) => sock.on('drain', cb),
      pause: () => sock.pause(), resume: () => sock.resume(),
    });
    sock.on('close', detach);
    sock.on('error', () => {});
  }).listen(path, () => log(`serving on ${path}`));
} else {
  let port = findPort();
  while (!port) { Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 200); port = findPort(); }
  const fd = openSync(port, 'r+');
  // A virtio port reads 0 bytes while no host is connected: poll gently until one is.
  const listeners: ((b: Buffer) => void)[] = [];
  const drained: (() => void)[] = [];
  const buf = Buffer.alloc(65536);
  // Poll fast right after a disconnect (a fork resumes here and the host connects within
  // ~100 ms), then back off so idle clones cost the host little CPU.
  let idle = 0;
  let reading = false;
  let paused = false;
  const loop = () => {
    if (paused) { reading = false; return; }
    reading = true;
    read(fd, buf, 0, buf.length, null, (err, n) => {
      if (err || n === 0) { idle++; setTimeout(loop, err ? 100 : idle < 200 ? 10 : idle < 400 ? 50 : 250); return; }
      idle = 0;
      const chunk = Buffer.from(buf.subarray(0, n));
      for (const l of listeners) l(chunk);
      loop();
    });
  };
  // answers wait here for the port; past the high-water mark the session stops reading
  // requests (backpressure) until the queue is down to the low-water mark: nothing is dropped
  const HIGH_WATER = 256 * 1024, LOW_WATER = 64 * 1024;
  const queue: Buffer[] = [];
  let queued = 0;
  let writing = false;
  let full = false;
  const pump = () => {
    if (writing || !queue.length) return;
    writing = true;
    const b = queue.shift()!;
    write(fd, b, 0, b.length, null, () => {
      writing = false;
      queued -= b.length;
      if (full && queued <= LOW_WATER) { full = false; for (const d of drained) d(); }
      pump();
    });
  };
  agent.attach({
    write: (b) => { queue.push(b); queued += b.length; pump(); if (queued > HIGH_WATER) full = true; return !full; },
    onData: (cb) => listeners.push(cb), onDrain: (cb) => drained.push(cb),
    pause: () => { paused = true; }, resume: () => { if (!paused) return; paused = false; if (!reading) loop(); },
  });
  loop();
  log(`serving on ${port}`);
}
watchKmsg(() => agent.onVmFork());
agent.boot().catch((e) => log(`boot: ${e.message}`));

/** Watch the kernel log for the vmgenid fork notice (a non-blocking read every 250 ms; records before start are skipped). */
function watchKmsg(onFork: () => void) {
  if (process.env.SCION_AGENT_KMSG === '0') return;
  let fd: number;
  try { fd = openSync('/dev/kmsg', constants.O_RDONLY | constants.O_NONBLOCK); } catch { return; }
  const buf = Buffer.alloc(8192);
  const drain = (initial: boolean) => {
    for (let i = 0; i < 1000; i++) {
      let n: number;
      try { n = readSync(fd, buf, 0, buf.length, null); } catch (e: any) { if (e.code === 'EPIPE') continue; return; }
      if (!n) return;
      if (!initial && buf.toString('utf8', 0, n).includes('due to virtual machine fork')) onFork();
    }
  };
  drain(true);
  setInterval(() => drain(false), 250).unref();
}
