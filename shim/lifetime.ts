/**
 * When a shim process must go because the containerd that made it went away.
 *
 * A runtime v2 shim outlives containerd restarts by design: containerd finds
 * its shims again through their bundles' address files. But a shim whose
 * containerd is gone for good (stopped, its state removed) can never be
 * used again, and would hold a VM, a spare process or a pool refill forever.
 * So every shim process watches its containerd:
 * - its directories gone (the task's bundle, or the shim directory): gone at once;
 * - none of its sockets (ttrpc, grpc) accepting a connection, as after a SIGTERM
 *   (containerd unlinks them) or a SIGKILL (the files stay, connect is refused),
 *   for longer than a grace that a restart fits in: gone.
 * Light: spares run this before loading the shim, so it imports no host library.
 */
import { connectUnix } from './unix.ts';
import { existsSync } from 'node:fs';

/** How long a shim serving a task waits for its containerd to come back (a restart) before it goes. */
export const ORPHAN_GRACE_MS = 5000;
/** How long a spare, or a shim with no task, waits: nothing of it is lost if it goes. */
export const IDLE_ORPHAN_GRACE_MS = 1000;
/** How often a shim looks at its containerd. */
export const WATCH_INTERVAL_MS = 1000;

/** What one look at containerd saw. */
export interface Sighting {
  at: number;
  dirsThere: boolean;
  reachable: boolean;
}

/**
 * Whether containerd is gone for good after this sighting, given when it was
 * last seen reachable (undefined: not since the watch began, which counts
 * from `since`). Pure.
 */
export function judge(s: Sighting, lastReachableAt: number | undefined, since: number, graceMs: number): 'alive' | 'away' | 'gone' {
  if (!s.dirsThere) return 'gone';
  if (s.reachable) return 'alive';
  return s.at - (lastReachableAt ?? since) >= graceMs ? 'gone' : 'away';
}

/** Whether a unix socket accepts a connection within `timeoutMs` (missing, refused or silent: no). */
export function reachable(path: string, timeoutMs = 1000): Promise<boolean> {
  if (!path || !existsSync(path)) return Promise.resolve(false);
  return connectUnix(path, timeoutMs).then(
    (s) => {
      s.destroy();
      return true;
    },
    () => false,
  );
}

/** The addresses of the containerd that started this shim: its ttrpc socket (TTRPC_ADDRESS, else beside -address) and its gRPC one. */
export function containerdSockets(address: string): { ttrpc: string; grpc: string } {
  return { ttrpc: process.env.TTRPC_ADDRESS ?? `${address}.ttrpc`, grpc: address };
}

export interface ContainerdWatch {
  stop(): void;
}

/**
 * Look at containerd every WATCH_INTERVAL_MS; call `onGone` once (with why)
 * when it is gone for good. `grace()` is asked at each look: a shim's grace
 * depends on whether it serves a task now.
 */
export function watchContainerd(o: {
  sockets: string[];
  dirs: string[];
  grace: () => number;
  onGone: (why: string) => void;
  intervalMs?: number;
}): ContainerdWatch {
  const since = Date.now();
  let lastReachableAt: number | undefined;
  let busy = false,
    over = false;
  const sockets = [...new Set(o.sockets.filter(Boolean))];
  const look = async () => {
    if (busy || over) return;
    busy = true;
    try {
      const missing = o.dirs.find((d) => !existsSync(d));
      let ok = false;
      // one at a time, the ttrpc socket first: a look costs containerd one accepted connection, not one per socket
      for (const p of missing ? [] : sockets) if ((ok = await reachable(p))) break;
      const at = Date.now();
      if (ok) lastReachableAt = at;
      const verdict = judge({ at, dirsThere: !missing, reachable: ok }, lastReachableAt, since, o.grace());
      if (verdict === 'gone' && !over) {
        over = true;
        clearInterval(timer);
        o.onGone(
          missing
            ? `${missing} is gone`
            : `containerd's sockets (${sockets.join(', ')}) accepted no connection for ${Math.round((at - (lastReachableAt ?? since)) / 1000)} s`,
        );
      }
    } finally {
      busy = false;
    }
  };
  const timer = setInterval(() => void look(), o.intervalMs ?? WATCH_INTERVAL_MS);
  return {
    stop: () => {
      over = true;
      clearInterval(timer);
    },
  };
}
