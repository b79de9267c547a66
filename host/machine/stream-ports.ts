/**
 * Byte streams between the host and a process in the guest, off the agent's
 * channel: a virtio-serial port hot-added on the agent's bus (vser0, which
 * every VM has, so no device line-up changes and templates stay valid), its
 * chardev a unix socket QEMU listens on in the VM's jail. The guest's process
 * gets the port's device as its descriptor; the host connects to the socket.
 * Flow control is the transport's own: a host that stops reading stalls
 * QEMU's chardev, which throttles the port, whose full virtqueue blocks the
 * guest's writer; nothing is dropped and nothing piles up in between.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { VmError } from '../../common/errors.ts';
import type { QmpClient } from '../qemu/qmp.ts';

/** The streams of a process, by file descriptor. */
export type StreamFd = 0 | 1 | 2;

/** A process's stream key: 16 hex digits from what names the process (e.g. its task and exec id). Pure. */
export function streamKey(...parts: string[]): string {
  return createHash('sha256').update(parts.join('\0')).digest('hex').slice(0, 16);
}

/** What QEMU and the guest call a stream's port: the chardev and device ids, the socket file (in the jail), the port's name. Pure. */
export function streamPortNames(key: string, fd: StreamFd): { chardev: string; device: string; socket: string; port: string } {
  if (!/^[0-9a-f]{16}$/.test(key)) throw new VmError('E_STREAM_PORT', `stream key ${JSON.stringify(key).slice(0, 40)}: 16 hex digits`);
  return { chardev: `io-${key}-${fd}`, device: `p-${key}-${fd}`, socket: `io${key}${fd}.sock`, port: `scion.io.${key}.${fd}` };
}

/** Add a stream's port: QEMU listens on its socket (in `jail`) once this returns; the guest sees the port shortly after. */
export async function addStreamPort(qmp: QmpClient, jail: string, vm: string, key: string, fd: StreamFd): Promise<{ port: string; socket: string }> {
  const n = streamPortNames(key, fd);
  try {
    await qmp.execute('chardev-add', {
      id: n.chardev,
      backend: { type: 'socket', data: { addr: { type: 'unix', data: { path: n.socket } }, server: true, wait: false } },
    });
  } catch (e) {
    throw new VmError('E_STREAM_PORT', `${vm}: QEMU refused the socket for stream port ${n.port}: ${(e as Error).message}`);
  }
  try {
    await qmp.execute('device_add', { driver: 'virtserialport', bus: 'vser0.0', chardev: n.chardev, name: n.port, id: n.device });
  } catch (e) {
    await qmp.execute('chardev-remove', { id: n.chardev }).catch(() => undefined);
    // the bus holds 31 ports, the agent's among them
    throw new VmError('E_STREAM_PORT', `${vm}: QEMU refused stream port ${n.port}: ${(e as Error).message}`, {
      hint: 'a VM has 30 stream ports (3 per process with stdin, stdout and stderr): delete ended processes first',
    });
  }
  return { port: n.port, socket: join(jail, n.socket) };
}

/** Remove a stream's port and its socket (what the guest had not read of it is gone with it). Gone already: done. */
export async function removeStreamPort(qmp: QmpClient, key: string, fd: StreamFd, timeoutMs = 10_000): Promise<void> {
  const n = streamPortNames(key, fd);
  const gone = qmp.waitEvent('DEVICE_DELETED', (e) => (e.data as { device?: string })?.device === n.device, timeoutMs);
  gone.catch(() => undefined);
  const removed = await qmp.execute('device_del', { id: n.device }).then(
    () => true,
    () => false,
  ); // not there: nothing to wait for
  if (removed) await gone;
  await qmp.execute('chardev-remove', { id: n.chardev }).catch(() => undefined);
}
