/**
 * The shim's `start`: what containerd runs once per task, and waits for. Kept
 * to what it needs (no host library, no protobuf), so the process that does
 * it starts fast: bin/containerd-shim-scion-v2 runs this module alone for
 * `start`. A CRI container joins its pod sandbox's shim; anything else gets a
 * serving process of its own.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { config } from '../common/config.ts';
import { parseShimArgs, serveArgs, type ShimArgs } from './args.ts';
import { taskKind } from './kinds.ts';
import { adoptSpare, hasSpare, spareArgs, spareKey, SPARE_DELAY_MS } from './spare.ts';

/** Where shims keep their sockets and packed rootfs images. */
export const shimDir = (): string => join(config().runDir, 'shim');

/** A socket path per namespace and task, short enough for sun_path. */
export function socketPath(namespace: string, id: string): string {
  return join(shimDir(), `${createHash('sha256').update(`${namespace}/${id}`).digest('hex').slice(0, 16)}.sock`);
}

export async function start(a: ShimArgs, bin: string[]): Promise<number> {
  // a CRI container joins the shim of its pod sandbox (one shim, one VM per pod)
  const config = JSON.parse(await readFile(join(process.cwd(), 'config.json'), 'utf8').catch(() => '{}'));
  const { kind, sandboxId } = taskKind(config.annotations);
  if (kind === 'container' && sandboxId) {
    const podSock = socketPath(a.namespace, sandboxId);
    if (!existsSync(podSock)) {
      process.stderr.write(`scion shim: the pod sandbox ${sandboxId} of ${a.id} has no shim serving it\n`);
      return 1;
    }
    await writeFile(join(process.cwd(), 'address'), `unix://${podSock}`);
    process.stdout.write(`unix://${podSock}`);
    return 0;
  }
  const sock = socketPath(a.namespace, a.id);
  await mkdir(shimDir(), { recursive: true, mode: 0o700 });
  await rm(sock, { force: true });
  const key = spareKey(a, process.env.TTRPC_ADDRESS);
  // a spare already serving takes the task at once; else a process of its own
  if (!(await adoptSpare(shimDir(), key, { id: a.id, bundle: process.cwd() }))) {
    // detached and without containerd's stdout/stderr: containerd reads them to their end
    const child = spawn(bin[0], [...bin.slice(1), ...serveArgs(a, sock)], { cwd: process.cwd(), detached: true, stdio: 'ignore', env: process.env });
    child.unref();
    const end = Date.now() + 20_000;
    while (!existsSync(sock)) {
      if (child.exitCode !== null || Date.now() > end) {
        process.stderr.write(`scion shim: the serving process did not come up (exit ${child.exitCode})\n`);
        return 1;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  // one spare ready for the next pod (it loads the shim a while from now, off this pod's start)
  if (!(await hasSpare(shimDir(), key)))
    spawn(bin[0], [...bin.slice(1), ...spareArgs(a)], { cwd: shimDir(), detached: true, stdio: 'ignore', env: process.env }).unref();
  const address = `unix://${sock}`;
  await writeFile(join(process.cwd(), 'address'), address); // containerd finds the shim again through it after a restart
  process.stdout.write(address);
  return 0;
}

/** `start` alone, if that is what containerd asked for; undefined for any other action (the full shim does those). */
export async function runStartOnly(argv: string[], self: string[]): Promise<number | undefined> {
  let a: ShimArgs;
  try {
    a = parseShimArgs(argv);
  } catch {
    return undefined;
  } // the full shim reports usage errors
  if (a.action === 'spare') await new Promise((r) => setTimeout(r, SPARE_DELAY_MS)); // the shim's modules load after this
  return a.action === 'start' ? start(a, self) : undefined;
}
