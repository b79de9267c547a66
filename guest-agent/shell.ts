/**
 * A long-lived shell that runs command batches for the agent. It is started
 * once (in the template, before the freeze), so a clone inherits it running:
 * the post-fork path starts no shell of its own, and the shell's own forks
 * of busybox are cheap.
 */
import type { Child, Platform } from './platform.ts';
import { utf8Decode } from '../common/utf8.ts';

export interface ShellResult {
  code: number;
  output: string;
}

/** The marker that ends batch `n`'s output, with its status. Pure. */
export const DONE_MARKER = /__SCION_DONE_(\d+)_(\d+)__\n/;

/** The text sent to the shell for batch `n`: a subshell (so `set -e` and `exit` stay inside), then the marker. Pure. */
export function batchText(n: number, script: string): string {
  return `(\n${script}\n) </dev/null 2>&1\necho "__SCION_DONE_${n}_$?__"\n`;
}

export class ShellWorker {
  private proc?: Child;
  private alive = false;
  private seq = 0;
  private out = '';
  private waiting = new Map<number, (r: ShellResult) => void>();
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly platform: Platform,
    readonly shell = 'sh',
  ) {}

  private ensure(): Child {
    if (this.proc && this.alive) return this.proc;
    const p = this.platform.spawn([this.shell]);
    this.alive = true;
    p.onStdout((c) => this.onOut(utf8Decode(c)));
    void p.exited.then(() => {
      if (this.proc === p) this.alive = false;
      for (const [, w] of this.waiting) w({ code: 127, output: 'shell worker exited' });
      this.waiting.clear();
    });
    this.proc = p;
    return p;
  }

  private onOut(c: string) {
    this.out += c;
    for (;;) {
      const m = DONE_MARKER.exec(this.out);
      if (!m) break;
      const output = this.out.slice(0, m.index);
      this.out = this.out.slice(m.index + m[0].length);
      const w = this.waiting.get(Number(m[1]));
      this.waiting.delete(Number(m[1]));
      w?.({ code: Number(m[2]), output });
    }
    if (this.out.length > 1 << 20) this.out = this.out.slice(-65536);
  }

  /** Run a script in a subshell; resolves with its status and output (stdout and stderr). */
  run(script: string): Promise<ShellResult> {
    const job = this.queue.then(
      () =>
        new Promise<ShellResult>((resolve) => {
          const n = ++this.seq;
          this.waiting.set(n, resolve);
          this.ensure().write(batchText(n, script));
        }),
    );
    this.queue = job.catch(() => undefined); // the caller sees the job's error; the queue only orders jobs
    return job;
  }

  async runOrThrow(script: string, what: string): Promise<string> {
    const r = await this.run(script);
    if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.output.trim().slice(-500)}`);
    return r.output;
  }

  /** Start the shell now (the template does this before it is frozen). */
  warm(): Promise<unknown> {
    return this.run('true');
  }

  close() {
    this.proc?.kill();
  }
}
