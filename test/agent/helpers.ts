/** Run the real agent on the host (tsx), serving on a unix socket, optionally inside namespaces. */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { UDHCPC_SCRIPT } from '../../builder/init.ts';

export const ROOT = resolve(import.meta.dirname, '../..');

export interface HostAgent { proc: ChildProcess; socket: string; root: string; stop: () => void; stderr: () => string }

export async function startHostAgent(opts: { wrap?: string[]; exec?: boolean; dhcp?: boolean } = {}): Promise<HostAgent> {
  const root = mkdtempSync(join(tmpdir(), 'scion-agent-'));
  mkdirSync(join(root, 'etc/scion'), { recursive: true });
  writeFileSync(join(root, 'etc/scion/image.json'), JSON.stringify({ name: 'hosttest', exec: opts.exec ?? true, network: { mode: opts.dhcp ? 'dhcp' : 'static', interface: 'eth0' }, containers: [] }));
  // the same udhcpc event script the builder puts in images
  mkdirSync(join(root, 'usr/lib/scion'), { recursive: true });
  writeFileSync(join(root, 'usr/lib/scion/udhcpc.script'), UDHCPC_SCRIPT, { mode: 0o755 });
  writeFileSync(join(root, 'etc/machine-id'), '');
  const socket = join(root, 'agent.sock');
  const argv = [...(opts.wrap ?? []), process.execPath, '--import', 'tsx', join(ROOT, 'guest-agent/main.ts'), '--listen', socket];
  const proc = spawn(argv[0], argv.slice(1), {
    cwd: ROOT,
    env: { ...process.env, SCION_AGENT_KMSG: '0', SCION_AGENT_ROOT: root, SCION_AGENT_SET_CLOCK: '0', SCION_AGENT_STATE: join(root, 'state.json'), SCION_AGENT_LOGS: join(root, 'logs') },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  proc.stderr!.on('data', (c) => (err += c));
  const end = Date.now() + 20_000;
  while (!existsSync(socket)) {
    if (proc.exitCode !== null || Date.now() > end) throw new Error(`agent did not start: ${err}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { proc, socket, root, stop: () => { proc.kill('SIGKILL'); rmSync(root, { recursive: true, force: true }); }, stderr: () => err };
}
