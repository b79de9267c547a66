/**
 * Small helpers the tests share: a shell script run in a VM through its
 * agent, a file's SHA-256, whether values are all different.
 */
import { readFileSync } from 'node:fs';
import { sha256 } from '../../common/digest.ts';

/** Run `script` with sh in VM `name` through its agent: its exit status and output, whatever the status. */
export async function guestExec(name: string, script: string, timeoutMs = 30_000): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  const vm = await import('../../host/index.ts');
  const a = await vm.connectAgent(name, timeoutMs);
  try {
    return await a.call('exec', { argv: ['sh', '-c', script] });
  } finally {
    a.close();
  }
}

/** Run `script` in VM `name`: its stdout; a non-zero exit fails, naming the script and its stderr. */
export async function guestSh(name: string, script: string, timeoutMs = 30_000): Promise<string> {
  const r = await guestExec(name, script, timeoutMs);
  if (r.exitCode !== 0) throw new Error(`${name}: ${script}: exit ${r.exitCode}: ${r.stderr}`);
  return r.stdout;
}

/** A file's SHA-256, hex. */
export const sha256File = (f: string): string => sha256(readFileSync(f));

/** Whether every value differs from every other. */
export const distinct = (xs: unknown[]): boolean => new Set(xs).size === xs.length;

/**
 * What a sleeping machine must keep: a process counting into /tmp/h/count
 * every 0.1 s and a file with a random mark in the guest's tmpfs (/tmp/h/mark).
 * Its pid, the mark, and the count after half a second (above zero).
 */
export async function startCounter(name: string): Promise<{ pid: string; mark: string; count: number }> {
  const pid = (
    await guestSh(
      name,
      'mkdir -p /tmp/h; echo mark-$RANDOM > /tmp/h/mark; (i=0; while :; do i=$((i+1)); echo $i > /tmp/h/count; sleep 0.1; done) >/dev/null 2>&1 & echo $!',
    )
  ).trim();
  const mark = await guestSh(name, 'cat /tmp/h/mark');
  await new Promise((r) => setTimeout(r, 500));
  const count = Number(await guestSh(name, 'cat /tmp/h/count'));
  if (!(count > 0)) throw new Error(`${name}: the counter did not count (${count})`);
  return { pid, mark, count };
}
