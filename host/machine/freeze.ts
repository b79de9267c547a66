/**
 * Freezing: a running template's device state saved beside its shared
 * memory file (Machine.freeze), or a running clone made into a new template
 * through a loader VM constructed like any other (Machine.freezeAsTemplate).
 */
import { chmod, copyFile, readFile, rm, writeFile } from 'node:fs/promises';
import { constants } from 'node:fs';
import { join } from 'node:path';
import { VmError } from '../../common/errors.ts';
import { validName } from '../../common/names.ts';
import type { ImageArtifacts } from '../image.ts';
import { deviceLineup, kernelStub, type VmDescription } from '../qemu/argv.ts';
import { currentVmm } from '../qemu/vmm.ts';
import { cpuModel } from '../qemu/vmm-plan.ts';
import { migrateToFile, waitDead } from '../qemu/process.ts';
import { vmPaths, vmsDir, templatePaths } from '../store/dirs.ts';
import { writeRecord, writeTemplateMeta, TEMPLATE_FORMAT, type TemplateMeta } from '../store/records.ts';
import { deleteTap, netnsOf } from './net.ts';
import { claimNamed } from './claim.ts';
import { checkTemplate, makeTemplateDir, makeMemFile, memMode, baseDiskOf, templateDir } from './templates.ts';
import { constructMachine, credOf, internalsOf, type Machine } from './machine.ts';
import { newVmRecord } from './plan.ts';

/**
 * Freeze this running template: the agent prepares, the CPU stops, device
 * state goes to the template directory (RAM stays in the memory file), QEMU
 * quits. Returns the template's metadata.
 */
export async function freezeTemplate(m: Machine, img: ImageArtifacts, log?: (msg: string) => void): Promise<TemplateMeta> {
  const r = internalsOf(m).record;
  if (r.role !== 'template') throw new VmError('E_NO_VM', `${m.name} is a clone; freeze it as a new template with a name (scion freeze ${m.name} --name T)`);
  if (r.frozen) throw new VmError('E_FROZEN', `template ${m.name} is already frozen`, { hint: `scion fork ${m.name} -n 3` });
  const t = templatePaths(templateDir(m.name));
  const t0 = performance.now();
  const agent = await m.agent();
  const qmp = await m.qmp();
  await agent.call('freeze.prepare', {}, 120_000);
  const tPrepared = performance.now();
  await qmp.execute('stop');
  const shared = r.desc.memory !== 'ram';
  // shared: RAM stays in the memory file, only device state is saved; 'ram': the ordinary full snapshot
  await saveState(m, t.state, shared);
  const freezeMs = Math.round(performance.now() - tPrepared);
  await endAfterFreeze(m);
  const vmm = await currentVmm();
  if (shared) await chmod(t.mem, memMode(vmm.version));
  await writeFile(t.kernel, kernelStub(await readFile(img.vmlinuz)), { mode: 0o644, flag: constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL });
  if (r.desc.disk) await chmod(t.disk, 0o400); // now the base of every clone's overlay
  const meta: TemplateMeta = {
    format: TEMPLATE_FORMAT,
    memory: shared ? 'file' : 'ram',
    net: r.netMode,
    name: m.name,
    vmm: { kind: vmm.kind, version: vmm.version, digest: vmm.digest },
    machine: r.desc.machine ?? vmm.machine,
    cpu: r.desc.cpu ?? cpuModel(r.accel),
    lineup: deviceLineup(r.desc),
    accel: r.accel,
    image: img.dir,
    manifestSha256: img.manifestSha256,
    kernel: 'kernel-stub',
    cmdline: r.desc.cmdline,
    ramMB: r.desc.ramMB,
    generation: r.generation,
    disk: r.desc.disk ? 'disk.qcow2' : undefined,
    baseDisk: r.desc.disk ? await baseDiskOf(t.disk) : undefined,
    gid: r.gid,
    frozenAt: new Date().toISOString(),
    freezeMs,
    ports: img.ports,
  };
  await writeTemplateMeta(t.dir, meta);
  r.frozen = true;
  r.pid = undefined;
  r.timings = { prepareMs: Math.round(tPrepared - t0), freezeMs };
  await writeRecord(r);
  log?.(`froze ${m.name} in ${freezeMs} ms (prepare ${Math.round(tPrepared - t0)} ms)`);
  return meta;
}

/**
 * Freeze this running clone as a new template `newName` (a fork of a
 * fork). A clone's RAM is a private copy-on-write mapping, so it is saved
 * whole, then loaded into a fresh shared memory file by a paused template
 * QEMU (constructed like any VM) that saves the device state the usual way.
 * The new template's clones carry the clone's generation + 1.
 */
export async function freezeCloneAsTemplate(m: Machine, newName: string, log?: (msg: string) => void): Promise<TemplateMeta> {
  const b = internalsOf(m);
  const r = b.record;
  const tname = validName(newName, 'template');
  if (r.role !== 'clone' || !r.template) throw new VmError('E_NO_VM', `no clone named ${m.name}`, { hint: 'scion ls' });
  if (r.desc.disk) throw new VmError('E_UNSUPPORTED', `${m.name} has a disk; freezing a clone with a disk is not supported yet`);
  b.assertRunning('freeze');
  const { meta: parent, dir: parentDir } = await checkTemplate(r.template);
  const t0 = performance.now();
  const desc: VmDescription = {
    ...r.desc,
    name: tname,
    mode: 'template',
    memory: 'file',
    incoming: true,
    initrd: false,
    tbSizeMB: undefined,
    memReadonly: undefined, // the new template's own memory file: written through a shared mapping
    net: r.desc.net.mode === 'user' ? { ...r.desc.net, forwards: [] } : r.desc.net,
  };
  let full: string | undefined;
  let meta: TemplateMeta | undefined;
  await constructMachine({
    doing: `making the template from ${m.name}`,
    qmpTimeoutMs: 10_000,
    restore: { ignoreShared: false },
    resume: false,
    claim: () =>
      claimNamed(tname, () =>
        newVmRecord({
          name: tname,
          role: 'template',
          image: r.image,
          accel: r.accel,
          generation: r.generation,
          ports: {},
          desc,
          netMode: r.netMode,
          slots: [],
          making: { ownerPid: process.pid, phase: 'freeze' },
        }),
      ),
    files: async (_nr, cred) => {
      const t = await makeTemplateDir(tname);
      full = join(t.dir, 'full-state');
      // 1. the running clone's whole RAM and devices, then it goes on running
      await saveWhole(m, full);
      await makeMemFile(t.mem, desc.ramMB, cred?.gid);
      return { mem: t.mem, kernel: join(parentDir, parent.kernel), state: full };
    },
    // 2. the loader, paused with the clone's RAM in the shared file, saves device state only
    finish: async (nb) => {
      const t = templatePaths(templateDir(tname));
      await saveState(nb.m, t.state, true);
      await endAfterFreeze(nb.m);
      await rm(full!, { force: true });
      await chmod(t.mem, memMode(parent.vmm.version));
      const freezeMs = Math.round(performance.now() - t0);
      await copyFile(join(parentDir, parent.kernel), t.kernel, constants.COPYFILE_EXCL);
      meta = {
        ...parent,
        name: tname,
        memory: 'file',
        kernel: 'kernel-stub',
        generation: r.generation,
        frozenAt: new Date().toISOString(),
        freezeMs,
        lineup: deviceLineup(desc),
        gid: nb.record.gid,
      };
      await writeTemplateMeta(t.dir, meta);
      nb.record.frozen = true;
      nb.record.pid = undefined;
      await nb.finished({ freezeMs });
      log?.(`froze clone ${m.name} as template ${tname} in ${freezeMs} ms`);
    },
  });
  return meta!;
}

/** Save this running VM's whole state (RAM included) to `dest`; it runs on afterwards. */
async function saveWhole(m: Machine, dest: string): Promise<void> {
  const agent = await m.agent();
  const qmp = await m.qmp();
  await agent.call('freeze.prepare', {}, 120_000);
  await qmp.execute('stop');
  // a clone restored with x-ignore-shared on; its private RAM must now go into the stream
  try {
    await saveState(m, dest, false);
  } finally {
    await qmp.execute('cont');
    m.close();
  }
}

/**
 * Save this stopped VM's migration stream to `dest`: device state only
 * (`ignoreShared`: RAM stays in the shared memory file), or with its RAM.
 * The capability is set both ways: a clone was restored with it on.
 */
async function saveState(m: Machine, dest: string, ignoreShared: boolean): Promise<void> {
  const qmp = await m.qmp();
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: ignoreShared }] });
  await migrateToFile(qmp, m.name, vmPaths(m.name, vmsDir()).jail, credOf(internalsOf(m).record), dest);
}

/** End this VM's QEMU after a freeze (its state is saved) and delete its tap; the run directory stays. */
async function endAfterFreeze(m: Machine): Promise<void> {
  await (await m.qmp()).execute('quit').catch(() => undefined); // QEMU may close the monitor before answering
  m.close();
  const r = internalsOf(m).record;
  await waitDead(r.pid);
  if (r.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, netnsOf(r.netMode));
}
