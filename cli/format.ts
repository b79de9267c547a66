/** Progress lines for long steps on stderr (the CLI's; --json turns them off). */
import type { BuildEvent } from '../host/index.ts';

export const fmtBytes = (n: number) => (n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`);

export function buildProgress(err: (s: string) => void) {
  const isTty = process.stderr.isTTY;
  return (ev: BuildEvent) => {
    if (ev.type === 'step') err(`[build] ${ev.step} done in ${(ev.ms / 1000).toFixed(1)} s`);
    else if (ev.type === 'log') err(`[build] ${ev.message}`);
    else if (ev.type === 'download' && (ev.done || isTty)) {
      const rate = (ev.received / Math.max(ev.ms, 1)) * 1000;
      const name = ev.url.split('/').pop();
      const line = `[fetch] ${name} ${fmtBytes(ev.received)}${ev.total ? `/${fmtBytes(ev.total)}` : ''} ${fmtBytes(rate)}/s${ev.done ? '' : '…'}`;
      if (ev.done) err(line);
      else process.stderr.write(`\r${line}\x1b[K`);
    }
  };
}

/** A plain-text table: columns padded to their widest cell. */
export function table(rows: string[][]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((c, i) => (c ?? '').padEnd(w[i]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
