/**
 * `scion console <vm>`: the guest's serial console, interactive. QEMU serves
 * the serial port on <run dir>/console.sock (and logs it to console.log);
 * this connects the user's terminal to it, raw, until Ctrl-].
 */
import { connect } from 'node:net';
import { existsSync, readFileSync } from 'node:fs';
import { vmPaths, vmsDir } from './store/dirs.ts';
import { readRecord } from './store/records.ts';
import { isQemuIn } from './qemu/process.ts';
import type { ValidName } from '../common/names.ts';
import { VmError } from '../common/errors.ts';

export const DETACH_BYTE = 0x1d; // Ctrl-]

export async function consoleSession(name: ValidName): Promise<number> {
  const p = vmPaths(name, vmsDir());
  const r = await readRecord(name);
  if (!r) throw new VmError('E_NO_VM', `no VM named ${name}`, { hint: 'scion ls' });
  if (!isQemuIn(r.pid, p.jail) || !existsSync(p.consoleSocket)) throw new VmError('E_VM_NOT_RUNNING', `VM ${name} is not running (its console log is ${p.console})`);
  const sock = connect(p.consoleSocket);
  await new Promise<void>((res, rej) => { sock.once('connect', res); sock.once('error', (e) => rej(new VmError('E_CONNECT', `cannot connect to ${p.consoleSocket}: ${e.message}`))); });
  process.stderr.write(`[connected to ${name}'s serial console; Ctrl-] to leave]\r\n`);
  // show the last lines so the user sees where the console is
  try { process.stdout.write(readFileSync(p.console, 'utf8').split('\n').slice(-5).join('\r\n')); } catch { /* no log yet: nothing to show */ }
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
      if (i >= 0) { if (i > 0) sock.write(b.subarray(0, i)); done(0); return; }
      sock.write(b);
    });
    sock.on('data', (d) => process.stdout.write(d));
    sock.on('close', () => done(0));
    sock.on('error', () => done(1));
  });
}
