/** `scion console`: the serial console, live, through a pty (node-pty) running tail, with Ctrl-] to leave. */
import { paths } from './rundir.ts';
import { existsSync } from 'node:fs';
import { VmError } from '../common/errors.ts';

export async function consoleSession(name: string): Promise<number> {
  const p = paths(name);
  if (!existsSync(p.console)) throw new VmError('E_NO_VM', `no console for ${name}`, { hint: 'scion ls' });
  const pty = await import('node-pty');
  const term = pty.spawn('tail', ['-n', '50', '-f', p.console], { cols: process.stdout.columns ?? 80, rows: process.stdout.rows ?? 24 });
  term.onData((d) => process.stdout.write(d));
  process.stderr.write(`[console ${name}: output of the serial console; Ctrl-] to leave]\n`);
  return new Promise((resolve) => {
    if (process.stdin.isTTY) process.stdin.setRawMode(true);
    process.stdin.on('data', (b: Buffer) => { if (b.includes(0x1d)) { term.kill(); resolve(0); } });
    term.onExit(() => resolve(0));
  });
}
