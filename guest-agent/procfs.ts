/**
 * The guest's processes as /proc shows them, for tasks (tasks.ts): every pid,
 * a process's child, the processes of a pid namespace, and what a set of
 * processes uses. A process that ends while it is read is left out.
 */
import type { Platform } from './platform.ts';
import type { TaskStats } from '../common/agent-protocol.ts';
import { statFields, cpuOfStat, kbField } from './task-spec.ts';

/** Every process of the guest, by pid, ascending. */
export function guestPids(p: Platform): number[] {
  return p
    .readdir('/proc')
    .filter((d) => /^[0-9]+$/.test(d))
    .map(Number)
    .sort((x, y) => x - y);
}

/** A child process of `pid` (the first found in /proc), if it has one. */
export function childOf(p: Platform, pid: number): number | undefined {
  return guestPids(p).find((d) => {
    try {
      return Number(statFields(p.readText(`/proc/${d}/stat`))[1]) === pid;
    } catch {
      return false;
    } // ended meanwhile
  });
}

/** The processes in the pid namespace of `init` (a task's own), as the guest numbers them; none once it is gone. */
export function namespacePids(p: Platform, init: number | undefined): number[] {
  const ns = init ? p.readlink(`/proc/${init}/ns/pid`) : undefined;
  if (!ns) return [];
  return guestPids(p).filter((pid) => p.readlink(`/proc/${pid}/ns/pid`) === ns); // unreadable: ended meanwhile
}

/** What `pids` use now: CPU time from /proc/<pid>/stat and resident memory from status, summed; the guest's memory the limit. */
export function usageOf(p: Platform, id: string, pids: number[]): TaskStats {
  const s: TaskStats = { id, pids: 0, cpuUserUsec: 0, cpuSystemUsec: 0, memoryBytes: 0, anonBytes: 0, fileBytes: 0, limitBytes: 0 };
  for (const pid of pids) {
    let stat: string, status: string;
    try {
      stat = p.readText(`/proc/${pid}/stat`);
      status = p.readText(`/proc/${pid}/status`);
    } catch {
      continue;
    } // ended meanwhile
    const cpu = cpuOfStat(stat);
    if (!cpu) continue;
    s.pids++;
    s.cpuUserUsec += cpu.userUsec;
    s.cpuSystemUsec += cpu.systemUsec;
    s.memoryBytes += kbField(status, 'VmRSS');
    s.anonBytes += kbField(status, 'RssAnon');
    s.fileBytes += kbField(status, 'RssFile');
  }
  try {
    s.limitBytes = kbField(p.readText('/proc/meminfo'), 'MemTotal');
  } catch {
    /* no /proc: no limit said */
  }
  return s;
}
