/**
 * containerd-shim-scion-v2: containerd's runtime v2 shim for scion. `start`
 * starts the serving process and prints its address; `delete` cleans up
 * after a shim that is gone; `serve` is the shim itself (shim/service.ts).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { config } from '../common/config.ts';
import { Machine } from '../host/index.ts';
import { parseShimArgs, serveArgs, ShimUsageError, type ShimArgs } from './args.ts';
import { TtrpcServer } from './ttrpc.ts';
import { EventPublisher } from './events.ts';
import { TaskService, VM_FILE, taskKind } from './service.ts';
import { encode, timestamp } from './proto.ts';

const shimDir = () => join(config().runDir, 'shim');

/** A socket path per namespace and task, short enough for sun_path. */
export function socketPath(namespace: string, id: string): string {
  return join(shimDir(), `${createHash('sha256').update(`${namespace}/${id}`).digest('hex').slice(0, 16)}.sock`);
}

async function start(a: ShimArgs, bin: string[]): Promise<number> {
  // a CRI container joins the shim of its pod sandbox (one shim, one VM per pod)
  const config = JSON.parse(await readFile(join(process.cwd(), 'config.json'), 'utf8').catch(() => '{}'));
  const { kind, sandboxId } = taskKind(config.annotations);
  if (kind === 'container' && sandboxId) {
    const podSock = socketPath(a.namespace, sandboxId);
    if (!existsSync(podSock)) { process.stderr.write(`scion shim: the pod sandbox ${sandboxId} of ${a.id} has no shim serving it\n`); return 1; }
    await writeFile(join(process.cwd(), 'address'), `unix://${podSock}`);
    process.stdout.write(`unix://${podSock}`);
    return 0;
  }
  const sock = socketPath(a.namespace, a.id);
  await mkdir(shimDir(), { recursive: true, mode: 0o700 });
  await rm(sock, { force: true });
  // detached and without containerd's stdout/stderr: containerd reads them to their end
  const child = spawn(bin[0], [...bin.slice(1), ...serveArgs(a, sock)], { cwd: process.cwd(), detached: true, stdio: 'ignore', env: process.env });
  child.unref();
  const end = Date.now() + 20_000;
  while (!existsSync(sock)) {
    if (child.exitCode !== null || Date.now() > end) { process.stderr.write(`scion shim: the serving process did not come up (exit ${child.exitCode})\n`); return 1; }
    await new Promise((r) => setTimeout(r, 20));
  }
  const address = `unix://${sock}`;
  await writeFile(join(process.cwd(), 'address'), address); // containerd finds the shim again through it after a restart
  process.stdout.write(address);
  return 0;
}

const alive = (pid: number) => { try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; } };

async function deleteAfter(a: ShimArgs): Promise<number> {
  const bundle = a.bundle ?? process.cwd();
  const vm = (await readFile(join(bundle, VM_FILE), 'utf8').catch(() => '')).trim();
  if (vm) {
    const m = await Machine.find(vm).catch(() => undefined);
    // only a VM whose shim is gone: containerd also runs this after an orderly shutdown
    const owner = m?.info().owner?.pid;
    if (m && !(owner && owner !== process.pid && alive(owner))) await m.remove({ force: true }).catch((e) => process.stderr.write(`scion shim: removing ${vm}: ${(e as Error).message}\n`));
  }
  await rm(socketPath(a.namespace, a.id), { force: true });
  process.stdout.write(encode('containerd.task.v2.DeleteResponse', { pid: 0, exitStatus: 137, exitedAt: timestamp(Date.now()) }));
  return 0;
}

async function serve(a: ShimArgs): Promise<number> {
  // shim logs go to the bundle's `log` FIFO, which containerd reads
  const logFifo = join(process.cwd(), 'log');
  const logStream = existsSync(logFifo) ? createWriteStream(logFifo, { flags: 'a' }).on('error', () => {}) : undefined;
  const log = (m: string) => logStream?.write(`time="${new Date().toISOString()}" level=info msg=${JSON.stringify(m)} runtime=io.containerd.scion.v2\n`);
  const ttrpcAddress = process.env.TTRPC_ADDRESS ?? `${a.address}.ttrpc`;
  const publisher = new EventPublisher(ttrpcAddress, a.namespace);
  publisher.onDropped = (topic, e) => log(`event ${topic} not delivered: ${e.message}`);
  const server = new TtrpcServer();
  let done!: () => void;
  const finished = new Promise<void>((r) => { done = r; });
  const service = new TaskService({ namespace: a.namespace, publisher, template: config().shimTemplate, workDir: shimDir(), log, onShutdown: done });
  server.onError = (e) => log(`internal error: ${e.stack ?? e.message}`);
  server.register('containerd.task.v2.Task', service.handlers, ['containerd.task.v3.Task']);
  await server.listen(a.socket!);
  const stop = async () => { await service.teardown().catch((e) => log(`teardown: ${(e as Error).message}`)); done(); };
  process.on('SIGTERM', () => void stop());
  process.on('SIGINT', () => void stop());
  await finished;
  server.close();
  publisher.close();
  await rm(a.socket!, { force: true });
  logStream?.end();
  return 0;
}

/** Run the shim with containerd's arguments; `self` is how to start this binary again (for `serve`). */
export async function runShim(argv: string[], self: string[]): Promise<number> {
  let a: ShimArgs;
  try { a = parseShimArgs(argv); } catch (e) {
    if (e instanceof ShimUsageError) { process.stderr.write(`containerd-shim-scion-v2: ${e.message}\nusage: containerd-shim-scion-v2 -namespace NS -id ID -address ADDR [-publish-binary BIN] [-bundle DIR] start|delete\n`); return 2; }
    throw e;
  }
  if (a.action === 'start') return start(a, self);
  if (a.action === 'delete') return deleteAfter(a);
  return serve(a);
}
