/**
 * Accelerator choice: KVM only if it really runs a guest here, else TCG.
 * /dev/kvm can exist and still fail (a paravirtualised host: "KVM internal
 * error"), so the probe boots the image's kernel under KVM for a few seconds
 * and looks for the kernel's own words on the console. Cached per QEMU
 * version and kernel. SCION_ACCEL=kvm|tcg overrides.
 */
import { spawn } from 'node:child_process';
import { accessSync, constants, readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { atomicWrite } from '../../common/safe-fs.ts';
import { sha256 } from '../../common/digest.ts';
import type { Accel } from './argv.ts';
import { config } from '../../common/config.ts';
import { currentVmm, type Vmm } from './vmm.ts';
import { cpuModel } from './vmm-plan.ts';

/** The first line of the VMM's `--version` (vmm.ts: the pinned closure's, or the host's with SCION_VMM=system). */
export const qemuVersion = async (): Promise<string> => (await currentVmm()).version;

export async function chooseAccel(kernel: string, log?: (m: string) => void): Promise<{ accel: Accel; reason: string }> {
  const forced = config().accel;
  if (forced) return { accel: forced, reason: 'SCION_ACCEL' };
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is not usable' };
  }
  const key = sha256((await qemuVersion()) + sha256(readFileSync(kernel)));
  const cacheFile = join(config().cacheDir, `accel-${key.slice(0, 16)}.json`);
  try {
    return JSON.parse(await readFile(cacheFile, 'utf8'));
  } catch {
    /* no cached answer yet: probe below */
  }
  log?.('probing KVM with the guest kernel (once per QEMU and kernel)…');
  const ok = await probeKvm(kernel, await currentVmm());
  const r = ok.works
    ? { accel: 'kvm' as Accel, reason: 'KVM booted the guest kernel' }
    : { accel: 'tcg' as Accel, reason: `KVM does not run the guest here: ${ok.why}` };
  await atomicWrite(cacheFile, JSON.stringify(r), 0o644, { makeDirs: true });
  return r;
}

function probeKvm(kernel: string, vmm: Vmm): Promise<{ works: boolean; why: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'scion-kvm-'));
  const log = join(dir, 'console');
  return new Promise((resolve) => {
    const qemu = vmm.command[0];
    const p = spawn(
      qemu,
      [
        ...vmm.command.slice(1),
        ...vmm.args,
        '-accel',
        'kvm',
        '-M',
        'q35',
        '-cpu',
        cpuModel('kvm', config().cpu),
        '-m',
        '256M',
        '-nodefaults',
        '-display',
        'none',
        '-no-reboot',
        '-kernel',
        kernel,
        '-append',
        'console=ttyS0 panic=-1',
        '-serial',
        `file:${log}`,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...vmm.env } },
    );
    let err = '';
    p.stderr.on('data', (c) => (err += c));
    const done = (works: boolean, why: string) => {
      clearInterval(t);
      clearTimeout(to);
      p.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
      resolve({ works, why });
    };
    const t = setInterval(() => {
      let c = '';
      try {
        c = readFileSync(log, 'utf8');
      } catch {
        /* QEMU has not written the log yet */
      }
      if (/VFS: Unable to mount root|Kernel panic/.test(c)) done(true, 'ok');
      if (/KVM internal error/.test(err)) done(false, 'KVM internal error');
    }, 200);
    const to = setTimeout(() => done(false, 'no kernel output within 20 s'), 20_000);
    p.on('error', (e) => done(false, `cannot run ${qemu}: ${e.message}`));
    p.on('exit', () => {
      let c = '';
      try {
        c = readFileSync(log, 'utf8');
      } catch {
        /* QEMU exited before writing the log */
      }
      done(/VFS: Unable to mount root|Kernel panic/.test(c), err.trim().split('\n')[0] || 'QEMU exited');
    });
  });
}
