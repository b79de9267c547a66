/**
 * `scion console <vm>`: the guest's serial console, interactive. QEMU serves
 * the serial port on a socket in the VM's jail (and logs it); this connects
 * the user's terminal to it, raw, until Ctrl-].
 */
import type { ValidName } from '../common/names.ts';
import { Machine } from '../host/index.ts';

export const DETACH_BYTE = 0x1d; // Ctrl-]

export async function consoleSession(name: ValidName): Promise<number> {
  const m = await Machine.open(name);
  const sock = await m.openConsole();
  process.stderr.write(`[connected to ${name}'s serial console; Ctrl-] to leave]\r\n`);
  // show the last lines so the user sees where the console is
  process.stdout.write((await m.consoleLog().catch(() => '')).split('\n').slice(-5).join('\r\n'));
  const stdin = process.stdin;
  if (stdin.isTTY) stdin.setRawMode(true);
  stdin.resume();
  return new Promise((resolve) => {
    const done = (code: number) => {
      if (stdin.isTTY) stdin.setRawMode(false);
      stdin.pause();
      sock.destroy();
      process.stderr.write('\r\n[left the console]\r\n');
      resolve(code);
    };
    stdin.on('data', (b: Buffer) => {
      const i = b.indexOf(DETACH_BYTE);
      if (i >= 0) {
        if (i > 0) sock.write(b.subarray(0, i));
        done(0);
        return;
      }
      sock.write(b);
    });
    sock.on('data', (d) => process.stdout.write(d));
    sock.on('close', () => done(0));
    sock.on('error', () => done(1));
  });
}
