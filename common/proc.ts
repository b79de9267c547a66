/** Facts about host processes, from /proc (no child of ours needed). */
import { readFileSync } from 'node:fs';

/** Whether `pid` is a live process (a zombie counts as gone). */
export function processAlive(pid: number | undefined): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  } // ESRCH: no such process
  try {
    return !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  } // gone between the two looks
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
