/**
 * Spare serving processes. A pod's shim is a Node process, and one starting
 * takes ~0.2 s before it can serve (Node itself, then the Machine layer's
 * modules): on every pod's path, between containerd's `start` and its Create.
 * So `start` leaves one spare behind, per containerd and namespace: a serving
 * process already up, waiting for a task on a control socket in the shim
 * directory (root's, 0700). The next `start` takes it (renaming its socket:
 * exactly one `start` wins it), tells it the task (id and bundle), and the
 * spare serves that task as if started for it. The spare loads its modules a
 * while after it is spawned, off the pod that spawned it; it goes by itself
 * after SPARE_IDLE_MS unused, or once its containerd's sockets or the shim
 * directory are gone.
 * Light: `start` runs this module, so it imports no host library.
 */
import { createHash } from 'node:crypto';
import { connect } from 'node:net';
import { readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { ShimArgs } from './args.ts';

/** How long after it is spawned a spare loads the shim (the pod that spawned it is starting meanwhile). */
export const SPARE_DELAY_MS = 2000;
/** A spare nobody took goes after this long. */
export const SPARE_IDLE_MS = 10 * 60_000;

/** A key per containerd (its addresses) and namespace: a spare serves only the containerd and namespace it was made for. Pure. */
export function spareKey(a: Pick<ShimArgs, 'namespace' | 'address'>, ttrpcAddress: string | undefined): string {
  return createHash('sha256')
    .update(`${a.address}\n${ttrpcAddress ?? ''}\n${a.namespace}`)
    .digest('hex')
    .slice(0, 12);
}

/** The control socket's file name of the spare `pid` for `key`. Pure. */
export const spareSocketName = (key: string, pid: number): string => `spare-${key}-${pid}.sock`;

/** The spares' socket names for `key` in `names` (a directory listing). Pure. */
export function sparesOf(names: string[], key: string): string[] {
  const ours = new RegExp(`^spare-${key}-\\d+\\.sock$`);
  return names.filter((n) => ours.test(n));
}

/** The spare's argv (this binary's flags, the action `spare`). Pure. */
export function spareArgs(a: ShimArgs): string[] {
  return [
    '-namespace',
    a.namespace,
    '-id',
    'spare',
    '-address',
    a.address,
    ...(a.publishBinary ? ['-publish-binary', a.publishBinary] : []),
    ...(a.debug ? ['-debug'] : []),
    'spare',
  ];
}

/** One request line to a spare's control socket; its answer line. */
function ask(path: string, line: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    let buf = '';
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    s.on('connect', () => s.write(line));
    s.on('data', (c) => {
      buf += c;
      const i = buf.indexOf('\n');
      if (i >= 0) {
        clearTimeout(t);
        s.end();
        resolve(buf.slice(0, i));
      }
    });
    s.on('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
    s.on('close', () => {
      clearTimeout(t);
      if (!buf.includes('\n')) reject(new Error('the spare closed the connection'));
    });
  });
}

/**
 * Hand the task to a spare of this containerd and namespace, if one is up:
 * true once it serves the task's socket. A spare that fails is dropped.
 */
export async function adoptSpare(dir: string, key: string, task: { id: string; bundle: string }): Promise<boolean> {
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const n of sparesOf(names, key)) {
    const taken = join(dir, `taken-${process.pid}-${n}`);
    try {
      await rename(join(dir, n), taken);
    } catch {
      continue;
    } // another start took it
    try {
      if ((await ask(taken, JSON.stringify(task) + '\n', 10_000)) === 'ok') return true;
    } catch {
      /* gone or failed: the next one, or a process of its own */
    } finally {
      await rm(taken, { force: true });
    }
  }
  return false;
}

/** Whether a spare of `key` is up (its socket there) in `dir`. */
export async function hasSpare(dir: string, key: string): Promise<boolean> {
  return sparesOf(await readdir(dir).catch(() => [] as string[]), key).length > 0;
}
