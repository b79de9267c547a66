/**
 * Container health checks without sockets (QuickJS has none). Pure: the
 * agent reads the files and runs the command.
 * - tcp: a socket LISTENing on the port in the container's network
 *   namespace, read from /proc/<pid>/net/tcp and tcp6: no process, no
 *   connection, so a check costs a file read.
 * - http: one busybox wget (it exits non-zero on a refused connection, a
 *   timeout or an HTTP status >= 400, and follows redirects).
 */

/** /proc/net/tcp state code of a listening socket. */
const TCP_LISTEN = '0A';

/** Whether a /proc/net/tcp or tcp6 table has a socket listening on `port` (any address). Pure. */
export function listeningOn(table: string, port: number): boolean {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of table.split('\n')) {
    // "  sl  local_address rem_address   st ..." ; local_address is ADDR:PORT in hex
    const f = line.trim().split(/\s+/);
    if (f.length < 4 || !f[1].includes(':')) continue;
    if (f[3] === TCP_LISTEN && f[1].slice(f[1].lastIndexOf(':') + 1) === hexPort) return true;
  }
  return false;
}

/** The tables to read for a container whose init has `pid` (its network namespace), or the agent's own. Pure. */
export function tcpTables(pid: number | undefined): string[] {
  const base = pid ? `/proc/${pid}/net` : '/proc/net';
  return [`${base}/tcp`, `${base}/tcp6`];
}

/** argv of an HTTP check against 127.0.0.1. wget's -T is whole seconds: rounded up, at least 1. Pure. */
export function httpCheckArgv(port: number, path: string, timeoutMs: number): string[] {
  return ['busybox', 'wget', '-q', '-O', '/dev/null', '-T', String(Math.max(1, Math.ceil(timeoutMs / 1000))), `http://127.0.0.1:${port}${path}`];
}
