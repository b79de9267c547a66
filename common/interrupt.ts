/**
 * Temporary paths to remove if the process is interrupted (SIGINT, SIGTERM)
 * while a long step (a build, a verify, a pull) has them half-made. The
 * library only registers paths; the CLI decides to install the handlers, so
 * a program embedding scion keeps its own signal handling.
 */
import { rmSync } from 'node:fs';

const pending = new Set<string>();

/** Remove `path` on interrupt until the returned function is called. */
export function removeOnInterrupt(path: string): () => void {
  pending.add(path);
  return () => {
    pending.delete(path);
  };
}

/** SIGINT/SIGTERM: remove every registered path, then exit 130/143 as a shell would report. */
export function installInterruptCleanup(log: (m: string) => void = () => undefined): void {
  for (const [sig, code] of [
    ['SIGINT', 130],
    ['SIGTERM', 143],
  ] as const) {
    process.once(sig, () => {
      for (const p of pending) {
        try {
          rmSync(p, { recursive: true, force: true });
          log(`interrupted: removed ${p}`);
        } catch (e) {
          log(`interrupted: could not remove ${p}: ${(e as Error).message}`);
        }
      }
      process.exit(code);
    });
  }
}
