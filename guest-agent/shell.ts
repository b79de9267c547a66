/**
 * A long-lived shell that runs command batches for the agent. It is started
 * once (in the template, before the freeze), so a clone inherits it running:
 * the post-fork path spawns no process from Node, whose fork of a 100+ MB
 * process is what costs under TCG; the shell's own forks of busybox are cheap.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';

export class ShellWorker {
  private proc?: ChildProcessWithoutNullStreams;
  private seq = 0;
  private out = '';
  private waiting = new Map<number, (r: { code: number; output: string }) => void>();
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly shell = 'sh') {}

  private ensure(): ChildProcessWithoutNullStreams {
    if (this.proc && this.proc.exitCode === null && !this.proc.killed) return this.proc;
    const p = spawn(this.shell, [], { stdio: ['pipe', 'pipe', 'pipe'] });
    p.stdout.setEncoding('utf8');
    p.stdout.on('data', (c: string) => this.onOut(c));
    p.stderr.on('data', () => {});
    p.on('exit', () => {
      for (const [, w] of this.waiting) w({ code: 127, output: 'shell worker exited' });
      this.waiting.clear();
    });
    p.stdin.on('error', () => {});
    this.proc = p;
    return p;
  }

  private onOut(c: string) {
    this.out += c;
    for (;;) {
      const m = /__SCION_DONE_(\d+)_(\d+)__\n/.exec(this.out);
      if (!m) break;
      const output = this.out.slice(0, m.index);
      this.out = this.out.slice(m.index + m[0].length);
      const w = this.waiting.get(Number(m[1]));
      this.waiting.delete(Number(m[1]));
      w?.({ code: Number(m[2]), output });
    }
    if (this.out.length > 1 << 20) this.out = this.out.slice(-65536);
  }

  /** Run a script in a subshell (so `set -e` and `exit` stay inside); resolves with its status and output. */
  run(script: string): Promise<{ code: number; output: string }> {
    const job = this.queue.then(() => new Promise<{ code: number; output: string }>((resolve) => {
      const n = ++this.seq;
      this.waiting.set(n, resolve);
      const p = this.ensure();
      p.stdin.write(`(\n${script}\n) </dev/null 2>&1\necho "__SCION_DONE_${n}_$?__"\n`);
    }));
    this.queue = job.catch(() => undefined); // the caller sees the job's error; the queue only orders jobs
    return job;
  }

  async runOrThrow(script: string, what: string): Promise<string> {
    const r = await this.run(script);
    if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.output.trim().slice(-500)}`);
    return r.output;
  }

  /** Start the shell now (the template does this before it is frozen). */
  warm(): Promise<unknown> { return this.run('true'); }

  close() { this.proc?.kill(); }
}
