/**
 * Run directories are the only state: one per VM under $SCION_RUN_DIR/vms,
 * holding vm.json (written last, atomically), the QMP and agent sockets and
 * the console log. `ls` and `gc` rebuild the picture from them alone.
 */
import { mkdir, readdir, readFile, rm, chmod } from 'node:fs/promises';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { atomicWrite } from '../builder/cache.ts';
import type { VmDescription } from './qemu-argv.ts';
import type { CloneIdentity } from './identity.ts';

export function runRoot(): string {
  if (process.env.SCION_RUN_DIR) return process.env.SCION_RUN_DIR;
  if (process.getuid?.() === 0) return '/run/scion';
  return join(process.env.XDG_RUNTIME_DIR ?? '/tmp', 'scion');
}
/** Template memory files must be on tmpfs so clones share page cache. */
export function templateRoot(): string {
  return process.env.SCION_TEMPLATE_DIR ?? join('/dev/shm', `scion-${process.getuid?.() ?? 0}`, 'templates');
}

export interface VmRecord {
  name: string;
  role: 'template' | 'clone';
  image: string;
  pid?: number;
  accel: string;
  createdAt: string;
  template?: string; // clones: the template they were forked from
  templateDir?: string;
  generation: number;
  identity?: CloneIdentity;
  ports: Record<string, number>;
  desc: VmDescription;
  netns?: string;
  netMode?: import('./net.ts').NetMode;
  frozen?: boolean;
  /** set while a scion process is still making this VM; cleared when it is ready */
  making?: { ownerPid: number; phase: string };
  timings?: Record<string, number>;
}

export const vmDir = (name: string) => join(runRoot(), 'vms', name);
export const paths = (name: string) => ({
  dir: vmDir(name),
  record: join(vmDir(name), 'vm.json'),
  qmp: join(vmDir(name), 'qmp.sock'),
  agent: join(vmDir(name), 'agent.sock'),
  console: join(vmDir(name), 'console.log'),
  consoleSocket: join(vmDir(name), 'console.sock'),
  pid: join(vmDir(name), 'pid'),
});

export async function makeRunDir(name: string): Promise<void> {
  await mkdir(join(runRoot(), 'vms'), { recursive: true, mode: 0o700 });
  await mkdir(vmDir(name), { mode: 0o700 });
  await chmod(vmDir(name), 0o700);
}

export async function writeRecord(r: VmRecord): Promise<void> {
  await atomicWrite(paths(r.name).record, JSON.stringify(r, null, 2) + '\n', 0o600);
}

export async function readRecord(name: string): Promise<VmRecord | undefined> {
  try { return JSON.parse(await readFile(paths(name).record, 'utf8')); } catch { return undefined; }
}

export async function listRunDirs(): Promise<string[]> {
  try { return (await readdir(join(runRoot(), 'vms'))).sort(); } catch { return []; }
}

export async function removeRunDir(name: string): Promise<void> {
  await rm(vmDir(name), { recursive: true, force: true });
}

/** Is this pid a live QEMU of ours (its command line names our run dir)? */
export function pidIsOurs(pid: number | undefined, name: string): boolean {
  if (!pid) return false;
  try {
    const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (/\) Z /.test(stat)) return false;
    return cmd.includes(vmDir(name) + '/');
  } catch { return false; }
}

/** QEMU processes started by scion (anything whose argv points into our run root). */
export function scionQemuPids(): { pid: number; runDir?: string }[] {
  const out: { pid: number; runDir?: string }[] = [];
  for (const d of safeReaddir('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const argv = readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
      if (!argv[0]?.includes('qemu-system')) continue;
      const q = argv.find((x) => x.startsWith('unix:') && x.includes('/vms/') && x.includes('qmp.sock'));
      if (!q) continue;
      const dir = q.slice(5).split(',')[0].replace(/\/qmp\.sock$/, '');
      if (!dir.startsWith(join(runRoot(), 'vms') + '/')) continue;
      out.push({ pid: Number(d), runDir: dir });
    } catch {}
  }
  return out;
}
function safeReaddir(p: string): string[] { try { return readdirSync(p); } catch { return []; } }

export function processAlive(pid: number | undefined): boolean {
  if (!pid) return false;
  try { process.kill(pid, 0); } catch { return false; }
  try { return !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8')); } catch { return false; }
}
