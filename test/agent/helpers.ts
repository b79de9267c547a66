/**
 * Run the real agent on the host, on the runtime the guest gets: the agent
 * bundled exactly as for an image, under the image's own qjs and C library
 * (from the lock, through the build cache; builder/agent-runtime.ts).
 * Optionally inside namespaces. QuickJS has no sockets: the agent serves on
 * stdio, and a unix socket in the test process relays one client at a time
 * to it, as QEMU's chardev does for the virtio port.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { UDHCPC_SCRIPT, AGENT_COMMAND } from '../../builder/init.ts';
import { bundleAgentFromSource } from '../../builder/agent-bundle.ts';
import { hostAgentRuntime } from '../../builder/agent-runtime.ts';
import { config } from '../../common/config.ts';
import { sha256 } from '../../common/digest.ts';
import { atomicWrite } from '../../common/safe-fs.ts';

export const ROOT = resolve(import.meta.dirname, '../..');

let prepared: Promise<{ argv: string[] }> | undefined;
/** qjs (the image's) with the options init gives it, and the bundle, built once per test file. */
export function agentArgv(): Promise<{ argv: string[] }> {
  prepared ??= (async () => {
    const rt = await hostAgentRuntime(join(ROOT, 'images/minimal.yaml'));
    // in the cache, named by its content: every test file and run shares one file (written whole, by rename), none is left behind
    const code = await bundleAgentFromSource();
    const bundle = join(config().cacheDir, 'test-agent', `${sha256(code).slice(0, 24)}.mjs`);
    await atomicWrite(bundle, code, 0o644, { makeDirs: true });
    // the same options as the guest's init (builder/init.ts), with this bundle and --stdio
    const opts = AGENT_COMMAND.split(' ').slice(1, -1);
    return { argv: [...rt.argv, ...opts, bundle, '--stdio'] };
  })();
  return prepared;
}

export interface SpawnedAgent {
  proc: ChildProcessWithoutNullStreams;
  root: string;
  stderr: () => string;
  stop: () => void;
}

/** The agent on stdio, with a scratch root holding its image config. */
export async function spawnAgent(opts: { wrap?: string[]; exec?: boolean; dhcp?: boolean; name?: string } = {}): Promise<SpawnedAgent> {
  const root = mkdtempSync(join(tmpdir(), 'scion-agent-'));
  mkdirSync(join(root, 'etc/scion'), { recursive: true });
  writeFileSync(
    join(root, 'etc/scion/image.json'),
    JSON.stringify({
      name: opts.name ?? 'hosttest',
      exec: opts.exec ?? true,
      network: { mode: opts.dhcp ? 'dhcp' : 'static', interface: 'eth0' },
      containers: [],
    }),
  );
  // the same udhcpc event script the builder puts in images
  mkdirSync(join(root, 'usr/lib/scion'), { recursive: true });
  writeFileSync(join(root, 'usr/lib/scion/udhcpc.script'), UDHCPC_SCRIPT, { mode: 0o755 });
  writeFileSync(join(root, 'etc/machine-id'), '');
  const { argv: agent } = await agentArgv();
  const argv = [...(opts.wrap ?? []), ...agent];
  const proc = spawn(argv[0], argv.slice(1), {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH!,
      SCION_AGENT_KMSG: '0',
      SCION_AGENT_ROOT: root,
      SCION_AGENT_SET_CLOCK: '0',
      SCION_AGENT_STATE: join(root, 'state.json'),
      SCION_AGENT_LOGS: join(root, 'logs'),
    },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr.on('data', (c) => (err += c));
  proc.stdin.on('error', () => {}); // the agent was stopped while a test still wrote
  // serving once it says so on stderr
  const end = Date.now() + 20_000;
  while (!/serving on stdio/.test(err)) {
    if (proc.exitCode !== null || Date.now() > end) throw new Error(`agent did not start (${argv.join(' ')}): ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc,
    root,
    stderr: () => err,
    stop: () => {
      proc.kill('SIGKILL');
      rmSync(root, { recursive: true, force: true });
    },
  };
}

export interface HostAgent extends SpawnedAgent {
  socket: string;
  server: Server;
}

/** The agent behind a unix socket: one client at a time (a new one replaces the last), like the virtio port's chardev. */
export async function startHostAgent(opts: { wrap?: string[]; exec?: boolean; dhcp?: boolean } = {}): Promise<HostAgent> {
  const a = await spawnAgent(opts);
  const socket = join(a.root, 'agent.sock');
  let current: Socket | undefined;
  const server = createServer((sock) => {
    if (current) {
      a.proc.stdout.unpipe(current);
      current.destroy();
    }
    current = sock;
    a.proc.stdout.pipe(sock, { end: false });
    sock.pipe(a.proc.stdin, { end: false });
    sock.on('close', () => {
      a.proc.stdout.unpipe(sock);
      sock.unpipe(a.proc.stdin);
      if (current === sock) current = undefined;
    });
    sock.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(socket, r));
  return {
    ...a,
    socket,
    server,
    stop: () => {
      server.close();
      current?.destroy();
      a.stop();
    },
  };
}
