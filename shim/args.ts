/**
 * containerd's runtime v2 shim command line, Go flag style (-name value, or
 * -flag alone for booleans), then the action: `start`, `delete`, or ours,
 * `serve` (the long-lived process `start` leaves behind) and `spare` (one
 * made ahead, waiting for the next task: spare.ts). Pure.
 */
export interface ShimArgs {
  action: 'start' | 'delete' | 'serve' | 'spare';
  namespace: string;
  id: string;
  address: string;
  publishBinary?: string;
  bundle?: string;
  socket?: string;
  debug: boolean;
}

export class ShimUsageError extends Error {}

const VALUED = new Set(['namespace', 'id', 'address', 'publish-binary', 'bundle', 'socket']);
/** A containerd task id (and namespace name), as `start` and `spare` take them. */
export const TASK_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export function parseShimArgs(argv: string[]): ShimArgs {
  const v: Record<string, string> = {};
  let debug = false;
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('-')) {
      rest.push(a);
      continue;
    }
    const [k, inline] = a.replace(/^--?/, '').split(/=(.*)/s, 2);
    if (k === 'debug' || k === 'v') {
      debug = k === 'debug' ? inline !== 'false' : debug;
      continue;
    }
    if (!VALUED.has(k)) throw new ShimUsageError(`unknown flag -${k}`);
    const val = inline ?? argv[++i];
    if (val === undefined) throw new ShimUsageError(`-${k} needs a value`);
    v[k] = val;
  }
  const action = rest[0];
  if (action !== 'start' && action !== 'delete' && action !== 'serve' && action !== 'spare')
    throw new ShimUsageError(`unknown action ${JSON.stringify(action ?? '')}: start, delete (from containerd), serve or spare`);
  if (!v.namespace || !TASK_ID.test(v.namespace)) throw new ShimUsageError('-namespace: a containerd namespace name');
  if (!v.id || !TASK_ID.test(v.id)) throw new ShimUsageError('-id: a task id (1-128 of A-Za-z0-9_.-)');
  if (action === 'serve' && !v.socket) throw new ShimUsageError('serve needs -socket');
  return { action, namespace: v.namespace, id: v.id, address: v.address ?? '', publishBinary: v['publish-binary'], bundle: v.bundle, socket: v.socket, debug };
}

/** The serving process's argv (this binary's own flags plus the socket). Pure. */
export function serveArgs(a: ShimArgs, socket: string): string[] {
  return [
    '-namespace',
    a.namespace,
    '-id',
    a.id,
    '-address',
    a.address,
    ...(a.publishBinary ? ['-publish-binary', a.publishBinary] : []),
    '-socket',
    socket,
    ...(a.debug ? ['-debug'] : []),
    'serve',
  ];
}
