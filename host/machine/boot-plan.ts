/**
 * Booting a template VM from a built image: the plan `Machine.boot` runs.
 */
import { stat } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import { VmError } from '../../common/errors.ts';
import { validName, templateName, type ValidName } from '../../common/names.ts';
import { AgentClient } from '../agent-client.ts';
import type { ImageArtifacts } from '../image.ts';
import { chooseAccel } from '../qemu/accel.ts';
import { currentVmm } from '../qemu/vmm.ts';
import { cpuModel } from '../qemu/vmm-plan.ts';
import { config } from '../../common/config.ts';
import { vmPaths, vmsDir } from '../store/dirs.ts';
import { newIdentity, identityArgs, type CloneIdentity } from './identity.ts';
import { syncGuestClock } from './clock.ts';
import { netParams, readPodNetwork, type NetMode } from './net.ts';
import { qcow2Overlay } from './disk.ts';
import { claimNamed } from './claim.ts';
import { makeTemplateDir, makeMemFile } from './templates.ts';
import type { BootOptions } from './options.ts';
import { newVmRecord, type Building, type Plan } from './plan.ts';
import type { QemuProcess } from '../qemu/process.ts';

/** The plan that boots a template VM from a built image and waits for its agent's ready (and, unless skipped, gives it the template identity). */
export async function bootPlan(img: ImageArtifacts, o: BootOptions = {}): Promise<Plan> {
  const name = o.name !== undefined ? validName(o.name, 'template') : templateName(img.name);
  const accel = o.accel ? { accel: o.accel, reason: 'requested' } : await chooseAccel(img.vmlinuz, o.log);
  const vmm = await currentVmm();
  o.log?.(`accelerator: ${accel.accel} (${accel.reason})`);
  const netMode: NetMode = o.net ?? { mode: 'user' };
  const baseDisk = o.disk ? resolvePath(o.disk) : undefined;
  if (
    baseDisk &&
    !(await stat(baseDisk).then(
      (s) => s.isFile(),
      () => false,
    ))
  )
    throw new VmError('E_DISK', `disk ${o.disk} does not exist or is not a file`);
  // the template's own identity (index 0, generation 1): clones start from a known state; a pod's VM takes what CNI gave the pod
  const podNet = netMode.mode === 'pod' ? await readPodNetwork(netMode) : undefined;
  const id = newIdentity(0, o.hostname ?? img.name, netParams(netMode), podNet, o.dns);
  const memory = o.memory ?? 'file';
  const timeout = o.timeoutMs ?? 180_000;
  return {
    doing: 'booting',
    qmpTimeoutMs: 10_000,
    resume: false,
    keepOnFailure: o.keepOnFailure,
    claim: () =>
      claimNamed(name, () =>
        newVmRecord({
          name,
          role: 'template',
          image: img.dir,
          accel: accel.accel,
          generation: 0,
          ports: {},
          netMode,
          desc: {
            name,
            mode: 'template',
            accel: accel.accel,
            machine: vmm.machine,
            cpu: cpuModel(accel.accel, config().cpu),
            ramMB: img.ramMB,
            cpus: 1,
            memory,
            cmdline: img.cmdline,
            initrd: true,
            vmgenid: id.vmgenid,
            mac: id.mac,
            net: netMode.mode === 'user' ? { mode: 'user', guestIp: id.ip, forwards: [] } : { mode: 'none' },
            sandbox: true,
            disk: baseDisk ? { layers: ['base', 'template'] } : undefined,
          },
          slots: [],
          making: { ownerPid: process.pid, phase: 'boot' },
          owner: o.owner,
        }),
      ),
    files: async (_r, cred) => {
      const t = await makeTemplateDir(name);
      if (memory === 'file') await makeMemFile(t.mem, img.ramMB, cred?.gid);
      if (baseDisk) await qcow2Overlay(baseDisk, t.disk);
      return {
        mem: memory === 'file' ? t.mem : undefined,
        kernel: img.vmlinuz,
        initrd: img.initrd,
        diskBase: baseDisk,
        diskTemplate: baseDisk ? t.disk : undefined,
      };
    },
    finish: (b, proc) => bootFinish(b, proc, { name, id, timeout, o }),
  };
}

/** A booted template's last step: its agent ready, then (unless skipped) its identity and its clock set. */
async function bootFinish(b: Building, proc: QemuProcess, x: { name: ValidName; id: CloneIdentity; timeout: number; o: BootOptions }): Promise<void> {
  const { name, id, timeout, o } = x;
  const tSpawn = performance.now();
  const console = vmPaths(name, vmsDir()).console;
  const agent = new AgentClient(`${name}/agent`);
  b.setAgent(agent);
  await agent.connect(vmPaths(name, vmsDir()).agent);
  const died = proc.exited.then(() => {
    throw new VmError(
      'E_BOOT_FAILED',
      `${name}: QEMU exited during boot${proc.stderrTail() ? ` (${proc.stderrTail()})` : ''}; console:\n${consoleTail(console)}`,
    );
  });
  died.catch(() => undefined); // raced below; a later exit is not this call's error
  await Promise.race([agent.sync(timeout), died]).catch((e) => {
    if (e instanceof VmError) throw e;
    throw new VmError('E_BOOT_TIMEOUT', `${name}: the agent did not answer within ${timeout / 1000} s; last console lines:\n${consoleTail(console)}`, {
      cause: e,
    });
  });
  const info = await agent.call('info');
  if (!info.lastReady) await agent.waitEvent('ready', () => true, timeout);
  const timings = { bootReadyMs: Math.round(performance.now() - tSpawn) };
  if (!o.skipIdentity) {
    const applied = await agent.call('identity.apply', identityArgs(id, 1));
    b.record.generation = applied.generation;
    // the clones' clock reference: the template's clock stepped onto the host's, and the RTC's phase against it
    const c = await syncGuestClock(agent);
    o.log?.(
      `guest clock was ${c.offsetMs.toFixed(0)} ms off (±${c.errorMs.toFixed(0)}); now ${c.after.offsetMs.toFixed(0)} ms (±${c.after.errorMs.toFixed(0)})${c.calibrationError ? `; its RTC keeper is off: ${c.calibrationError}` : ''}`,
    );
  }
  await b.finished(timings);
}

function consoleTail(file: string, lines = 15): string {
  try {
    return readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l.trim())
      .slice(-lines)
      .join('\n');
  } catch {
    return '(no console output)';
  } // QEMU died before writing any
}
