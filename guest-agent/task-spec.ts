/**
 * The pure half of the guest's tasks (tasks.ts): where a task lives in the
 * guest, the shell lines that mount and unmount its rootfs, the argv of crun,
 * script and stty, the arguments checked, /proc parsed. Nothing here touches
 * the system.
 */
import { ProtocolError } from './protocol.ts';
import { STREAM_PORT } from './ports.ts';
import type { TaskStdio } from '../common/agent-protocol.ts';

export const TASK_ROOT = '/run/scion/tasks';
export const ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
export const SERIAL = /^[a-z0-9][a-z0-9-]{0,19}$/;

/** The task's directory layout in the guest. Pure. */
export function taskPaths(id: string) {
  const dir = `${TASK_ROOT}/${id}`;
  return {
    dir,
    lower: `${dir}/lower`,
    upper: `${dir}/rw/upper`,
    work: `${dir}/rw/work`,
    rw: `${dir}/rw`,
    rootfs: `${dir}/rootfs`,
    config: `${dir}/config.json`,
    pidFile: `${dir}/init.pid`,
  };
}

/** Shell lines that mount the task's disk read-only and a writable overlay on it. Pure (ids and devices are checked by the caller). */
export function mountScript(id: string, device: string): string {
  const p = taskPaths(id);
  return [
    'set -e',
    `mkdir -p ${p.lower} ${p.rw} ${p.rootfs}`,
    `mount -t erofs -o ro ${device} ${p.lower}`,
    // the writable layer in the task's directory: /run is already a tmpfs (one mount less to make under TCG)
    `mkdir -p ${p.upper} ${p.work}`,
    `mount -t overlay -o lowerdir=${p.lower},upperdir=${p.upper},workdir=${p.work} overlay ${p.rootfs}`,
  ].join('\n');
}

export function unmountScript(id: string): string {
  const p = taskPaths(id);
  return [`umount ${p.rootfs} 2>/dev/null || true`, `umount ${p.lower} 2>/dev/null || true`, `rm -rf ${p.dir}`].join('\n');
}

/** The `stdio` argument of task.start and task.exec: port names by stream, checked. Pure. */
export function stdioArg(v: unknown): TaskStdio | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) throw new ProtocolError('E_BAD_ARGS', 'stdio: an object of port names (stdin, stdout, stderr)');
  const out: TaskStdio = {};
  for (const [k, name] of Object.entries(v as Record<string, unknown>)) {
    if (k !== 'stdin' && k !== 'stdout' && k !== 'stderr')
      throw new ProtocolError('E_BAD_ARGS', `stdio.${k.slice(0, 20)}: not a stream (stdin, stdout, stderr)`);
    if (name === undefined) continue;
    if (typeof name !== 'string' || !STREAM_PORT.test(name))
      throw new ProtocolError('E_BAD_ARGS', `stdio.${k}: a port name the host added (scion.io.<16 hex>.<0-2>)`);
    out[k] = name;
  }
  return out;
}

/** Where util-linux's script is (the image's bsdutils): what runs a task's process on a pty. */
export const SCRIPT_BIN = '/usr/bin/script';
/** Debian's crun: a guest without it runs no tasks, and needs no pod pid namespace made ahead. */
export const CRUN_PATH = '/usr/bin/crun';

/** A word for sh -c, quoted. Pure. */
const shq = (w: string): string => `'${w.replace(/'/g, `'\\''`)}'`;

/**
 * argv run on a new pty: util-linux script (QuickJS cannot open one: no ioctl;
 * crun's --console-socket passes the pty by SCM_RIGHTS, which it cannot read
 * either), quiet, with the command's exit status as its own, no echo of its
 * input (the pty's own echo is the program's to set), nothing written to a file. Pure.
 */
export function onTerminal(argv: string[]): string[] {
  return [SCRIPT_BIN, '--quiet', '--return', '--echo', 'never', '--command', argv.map(shq).join(' '), '/dev/null'];
}

/** stty's argv that sizes a pty. Pure. */
export function resizeArgv(tty: string, width: number, height: number): string[] {
  return ['busybox', 'stty', '-F', tty, 'rows', String(height), 'cols', String(width)];
}

/** Clock ticks per second in /proc/<pid>/stat: USER_HZ, 100 on x86 (QuickJS cannot ask sysconf). */
const USER_HZ = 100;

/**
 * The fields of a /proc/<pid>/stat line after the command name (which may hold
 * spaces and parentheses): [0] is field 3 (state), [1] the ppid. Pure.
 */
export function statFields(stat: string): string[] {
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** utime and stime (µs) from a /proc/<pid>/stat line. Pure. */
export function cpuOfStat(stat: string): { userUsec: number; systemUsec: number } | undefined {
  const f = statFields(stat);
  // utime is field 14, stime field 15
  const ut = Number(f[11]),
    st = Number(f[12]);
  if (!Number.isFinite(ut) || !Number.isFinite(st)) return undefined;
  return { userUsec: (ut * 1e6) / USER_HZ, systemUsec: (st * 1e6) / USER_HZ };
}

/** A /proc/<pid>/status or /proc/meminfo value in bytes (their kB), 0 if absent. Pure. */
export function kbField(text: string, key: string): number {
  const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
  return m ? Number(m[1]) * 1024 : 0;
}

/** The OCI `linux` section with its pid namespace the one at `path` (to join). Pure. */
export function withPidNamespace(linux: Record<string, unknown> | undefined, path: string): Record<string, unknown> {
  const ns = ((linux?.namespaces as { type: string; path?: string }[] | undefined) ?? []).filter((n) => n.type !== 'pid');
  return { ...linux, namespaces: [...ns, { type: 'pid', path }] };
}

/** The pod's pid namespace: its first process reaps what its containers orphan, as a pause process does. */
export const POD_PID_HOLDER = [
  'busybox',
  'unshare',
  '--pid',
  '--fork',
  'busybox',
  'sh',
  '-c',
  'trap "exit 0" TERM; while :; do busybox sleep 3600 & wait; done',
];

/** Whether an OCI config gives the container a new pid namespace of its own. Pure. */
export function hasOwnPidNamespace(spec: Record<string, unknown>): boolean {
  const ns = (spec.linux as { namespaces?: { type: string; path?: string }[] } | undefined)?.namespaces ?? [];
  return ns.some((n) => n.type === 'pid' && !n.path);
}

/**
 * crun's global options for a task. The VM is the pod's limit (the shim drops
 * the spec's resources), so a task in a pid namespace of its own runs without
 * a cgroup: making one costs ~120 ms of crun's ~450 ms under TCG (measured in
 * a pod VM), and the namespace finds its processes instead (ps, kill --all).
 * A task in the guest's pid namespace keeps its cgroup. Pure.
 */
export function crunGlobalArgs(ownPidNs: boolean): string[] {
  return ownPidNs ? ['--cgroup-manager=disabled'] : [];
}
