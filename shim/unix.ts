/** A unix socket connection with a bound on how long connecting may take. Light: spares load it before the shim. */
import { connect, type Socket } from 'node:net';

/** A connection to the unix socket at `path`; rejects if it is refused, fails or is not made within `timeoutMs`. */
export function connectUnix(path: string, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`${path}: no connection within ${timeoutMs} ms`));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(t);
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}
