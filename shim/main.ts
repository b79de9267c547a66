/**
 * containerd-shim-scion-v2: containerd's runtime v2 shim for scion. `start`
 * starts the serving process and prints its address; `delete` cleans up
 * after a shim that is gone; `serve` is the shim itself (shim/service.ts).
 */
import { createWriteStream, existsSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { createServer } from 'node:net';
import { hasSpare, spareKey, spareSocketName, SPARE_IDLE_MS } from './spare.ts';
import { watchContainerd, containerdSockets, ORPHAN_GRACE_MS, IDLE_ORPHAN_GRACE_MS } from './lifetime.ts';
import { config } from '../common/config.ts';
import { Machine } from '../host/runtime.ts';
import { parseShimArgs, ShimUsageError, TASK_ID, type ShimArgs } from './args.ts';
import { TtrpcServer } from './ttrpc.ts';
import { EventPublisher } from './events.ts';
import { TaskService } from './service.ts';
import { VM_FILE, parseVmFile } from './pod.ts';
import { shimDir, socketPath, start } from './start.ts';
import { processAlive } from '../common/proc.ts';
import { encode, timestamp } from './proto.ts';

async function deleteAfter(a: ShimArgs): Promise<number> {
  const bundle = a.bundle ?? process.cwd();
  const named = parseVmFile(await readFile(join(bundle, VM_FILE), 'utf8').catch(() => ''));
  if (named) {
    const m = await Machine.find(named.name).catch(() => undefined);
    const info = m?.info();
    // only the pod's own VM (a name may have been given to another VM since: the generation ID tells),
    // and only if its shim is gone: containerd also runs this after an orderly shutdown
    const same = !!info && info.identity?.vmgenid === named.vmgenid;
    const owner = info?.owner?.pid;
    if (m && same && !(owner && owner !== process.pid && processAlive(owner)))
      await m.remove({ force: true }).catch((e) => process.stderr.write(`scion shim: removing ${named.name}: ${(e as Error).message}\n`));
  }
  await rm(socketPath(a.namespace, a.id), { force: true });
  process.stdout.write(encode('containerd.task.v2.DeleteResponse', { pid: 0, exitStatus: 137, exitedAt: timestamp(Date.now()) }));
  return 0;
}

/** How long a shim told to go (or orphaned) takes at most to hand back what it holds. */
const ABANDON_MS = 20_000;

/** How long a serving shim waits for containerd's first connection. */
const UNCLAIMED_MS = 60_000;

async function serve(a: ShimArgs): Promise<number> {
  return serveTask(a, a.id, a.socket!);
}

/**
 * A spare (spare.ts): up before its task is known, waiting on a control
 * socket; the `start` that takes it names the task; it serves that task's
 * socket from the task's bundle, then goes on as any serving shim.
 */
async function spare(a: ShimArgs): Promise<number> {
  const dir = shimDir();
  const ttrpc = process.env.TTRPC_ADDRESS;
  const key = spareKey(a, ttrpc);
  if (await hasSpare(dir, key)) return 0; // another start made one meanwhile: one is enough
  const control = join(dir, spareSocketName(key, process.pid));
  const task = await new Promise<{ id: string; bundle: string; answer: (ok: boolean) => void } | undefined>((resolve) => {
    const server = createServer((c) => {
      let buf = '';
      c.on('data', (d) => {
        buf += d;
        const i = buf.indexOf('\n');
        if (i < 0) {
          if (buf.length > 8192) c.destroy();
          return;
        }
        let t: { id?: unknown; bundle?: unknown };
        try {
          t = JSON.parse(buf.slice(0, i));
        } catch {
          c.end('bad request\n');
          return;
        }
        // the task's id and bundle as containerd gave them to `start`: checked as containerd's own would be
        if (
          typeof t.id !== 'string' ||
          !TASK_ID.test(t.id) ||
          typeof t.bundle !== 'string' ||
          !isAbsolute(t.bundle) ||
          !existsSync(join(t.bundle, 'config.json'))
        ) {
          c.end('bad request\n');
          return;
        }
        finish({ id: t.id, bundle: t.bundle, answer: (ok) => c.end(ok ? 'ok\n' : 'failed\n') });
      });
      c.on('error', () => {});
    });
    const idle = setTimeout(() => finish(undefined), SPARE_IDLE_MS);
    // its containerd gone (its sockets dead or removed), or the shim directory: nobody will take it
    const watch = watchContainerd({
      sockets: Object.values(containerdSockets(a.address)),
      dirs: [dir],
      grace: () => IDLE_ORPHAN_GRACE_MS,
      onGone: () => finish(undefined),
    });
    const onSignal = () => finish(undefined);
    process.on('SIGTERM', onSignal).on('SIGINT', onSignal);
    let over = false;
    function finish(v: { id: string; bundle: string; answer: (ok: boolean) => void } | undefined) {
      if (over) return;
      over = true;
      clearTimeout(idle);
      watch.stop();
      process.off('SIGTERM', onSignal).off('SIGINT', onSignal);
      server.close();
      void rm(control, { force: true }).finally(() => resolve(v));
    }
    server.on('error', () => finish(undefined));
    server.listen(control);
  });
  if (!task) return 0;
  process.chdir(task.bundle);
  return serveTask({ ...a, id: task.id }, task.id, socketPath(a.namespace, task.id), task.answer);
}

async function serveTask(a: ShimArgs, id: string, socket: string, serving?: (ok: boolean) => void): Promise<number> {
  // shim logs go to the bundle's `log` FIFO, which containerd reads
  const logFifo = join(process.cwd(), 'log');
  const logStream = existsSync(logFifo) ? createWriteStream(logFifo, { flags: 'a' }).on('error', () => {}) : undefined;
  const log = (m: string) => logStream?.write(`time="${new Date().toISOString()}" level=info msg=${JSON.stringify(m)} runtime=io.containerd.scion.v2\n`);
  const containerd = containerdSockets(a.address);
  const publisher = new EventPublisher(containerd.ttrpc, a.namespace);
  publisher.onDropped = (topic, e) => log(`event ${topic} not delivered: ${e.message}`);
  const server = new TtrpcServer();
  let done!: () => void;
  const finished = new Promise<void>((r) => {
    done = r;
  });
  const service = new TaskService({
    namespace: a.namespace,
    publisher,
    template: config().shimTemplate,
    workDir: shimDir(),
    log,
    onShutdown: done,
    onIdleChange: () => server.onLastClose?.(),
  });
  server.onError = (e) => log(`internal error: ${e.stack ?? e.message}`);
  server.register('containerd.task.v2.Task', service.handlers, ['containerd.task.v3.Task']);
  // A shim with no task that containerd is not connected to can never be used again (containerd
  // reconnects only to shims with tasks): it goes, whether or not a Shutdown reached it.
  const stop = async () => {
    await service.teardown().catch((e) => log(`teardown: ${(e as Error).message}`));
    done();
  };
  // Told to go (SIGTERM), or its containerd gone for good: what it holds is handed back first
  // (shutdown), within a bound; a second signal, or the bound passed, ends it at once.
  let abandoning = false;
  const abandon = (why: string) => {
    if (abandoning) {
      log(`${why} again: exiting now`);
      process.exit(1);
    }
    abandoning = true;
    log(`${why}: removing what this shim holds and exiting`);
    setTimeout(() => {
      log(`not done within ${ABANDON_MS / 1000} s: exiting anyway`);
      process.exit(1);
    }, ABANDON_MS).unref();
    void service
      .shutdown()
      .catch((e) => log(`shutdown: ${(e as Error).message}`))
      .finally(done);
  };
  const watch = watchContainerd({
    sockets: Object.values(containerd),
    dirs: [process.cwd()],
    grace: () => (service.idle() ? IDLE_ORPHAN_GRACE_MS : ORPHAN_GRACE_MS),
    onGone: (why) => abandon(`its containerd is gone (${why})`),
  });
  server.onLastClose = () => {
    if (!server.connections && service.idle()) {
      log('containerd disconnected and no task is left: exiting');
      void stop();
    }
  };
  try {
    await server.listen(socket);
  } catch (e) {
    serving?.(false);
    throw e;
  }
  serving?.(true);
  log(`serving ${id} ${serving ? '(a spare, taken)' : `${(process.uptime() * 1000).toFixed(0)} ms after the process started`}`);
  const unclaimed = setTimeout(() => {
    if (!server.connections && service.idle()) {
      log(`containerd did not connect within ${UNCLAIMED_MS / 1000} s: exiting`);
      void stop();
    }
  }, UNCLAIMED_MS);
  unclaimed.unref();
  process.on('SIGTERM', () => abandon('SIGTERM'));
  process.on('SIGINT', () => abandon('SIGINT'));
  await finished;
  watch.stop();
  // a pool refill under way finishes first: the VM it makes is the node's, not this pod's
  await service.settled();
  server.close();
  publisher.close();
  await rm(socket, { force: true });
  logStream?.end();
  return 0;
}

/** Run the shim with containerd's arguments; `self` is how to start this binary again (for `serve`). */
export async function runShim(argv: string[], self: string[]): Promise<number> {
  let a: ShimArgs;
  try {
    a = parseShimArgs(argv);
  } catch (e) {
    if (e instanceof ShimUsageError) {
      process.stderr.write(
        `containerd-shim-scion-v2: ${e.message}\nusage: containerd-shim-scion-v2 -namespace NS -id ID -address ADDR [-publish-binary BIN] [-bundle DIR] start|delete\n`,
      );
      return 2;
    }
    throw e;
  }
  if (a.action === 'start') return start(a, self);
  if (a.action === 'delete') return deleteAfter(a);
  if (a.action === 'spare') return spare(a);
  return serve(a);
}
