/**
 * Hibernating a clone and bringing it back: `scion hibernate` saves the
 * clone's migration stream, cuts it to the RAM that differs from its
 * template (ram-diff.ts; the whole stream if the cut refuses it), writes it
 * under the state root on disk, and ends its QEMU: the clone's memory is
 * freed, its name, identity, generation and host ports stay its own.
 * `scion resume` constructs it again like a fork (the template's memory
 * mapped private, the saved stream restored over it), reconnects its agent
 * and corrects its clock; a failed resume leaves it hibernated.
 */
import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { atomicWrite } from '../../common/safe-fs.ts';
import { readSync } from 'node:fs';
import { join } from 'node:path';
import { VmError } from '../../common/errors.ts';
import { validName } from '../../common/names.ts';
import { AgentClient } from '../agent-client.ts';
import { migrateToFile, processAlive, waitDead } from '../qemu/process.ts';
import { hibernationDir, vmPaths, vmsDir } from '../store/dirs.ts';
import { readRecord, writeRecord, type VmRecord } from '../store/records.ts';
import { stepClockToHost } from './clock.ts';
import { constructMachine, credOf, internalsOf, type Machine } from './machine.ts';
import { deleteTap, netnsOf } from './net.ts';
import { diffAgainstTemplate, RamDiffError, PAGE_BYTES } from './ram-diff.ts';
import { checkTemplate } from './templates.ts';
import { assertNotBusy } from './inventory.ts';

/** What a hibernation wrote: the state's size, the RAM pages that differ from the template (all pages when the stream could not be cut), how long it took. */
export interface HibernateResult {
  name: string;
  stateBytes: number;
  pages: number;
  ms: number;
}

/** Hibernate the running clone `m` (see the header). */
export async function hibernateClone(m: Machine, log?: (msg: string) => void): Promise<HibernateResult> {
  const b = internalsOf(m);
  const r = b.record;
  if (r.role !== 'clone' || !r.template) throw new VmError('E_NO_VM', `${m.name} is not a clone: only clones hibernate (a template is frozen)`);
  if (r.desc.disk || r.desc.memory !== 'file' || r.netMode.mode === 'pod')
    throw new VmError(
      'E_UNSUPPORTED',
      `${m.name}: hibernating a clone with ${r.desc.disk ? 'a disk' : r.netMode.mode === 'pod' ? "a pod's network" : 'its RAM in the stream'} is not supported yet`,
    );
  b.assertRunning('hibernate');
  const onDisk = await readRecord(m.name);
  assertNotBusy(onDisk, m.name, 'hibernate');
  if (onDisk?.owner)
    throw new VmError('E_VM_BUSY', `cannot hibernate ${m.name}: it belongs to ${onDisk.owner.kind} process ${onDisk.owner.pid}`, {
      hint: 'a clone of the front door or of the node pool comes and goes with its owner',
    });
  const tpl = await checkTemplate(r.template);
  const t0 = performance.now();
  const dir = hibernationDir(m.name);
  // one hibernation at a time: its directory is made exclusively, never taken over
  await mkdir(dir, { mode: 0o700 }).catch((e) => {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    throw new VmError('E_VM_BUSY', `cannot hibernate ${m.name}: ${dir} exists (a hibernation under way, or one cut short)`, {
      hint: 'wait for it; if no scion process is at it, scion gc removes it',
    });
  });
  r.making = { ownerPid: process.pid, phase: 'hibernate' };
  await writeRecord(r);
  const qmp = await m.qmp();
  const full = join(dir, 'full');
  let cut: { data: Buffer; pages: number };
  try {
    await qmp.execute('stop');
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: false }] });
    await migrateToFile(qmp, m.name, vmPaths(m.name, vmsDir()).jail, credOf(r), full);
    cut = await cutToTemplate(full, tpl.files.mem, log);
    await atomicWrite(join(dir, 'state'), cut.data, 0o600);
    await rm(full, { force: true });
  } catch (e) {
    await qmp.execute('cont').catch(() => undefined); // it runs on as it was
    await rm(dir, { recursive: true, force: true });
    r.making = undefined;
    await writeRecord(r);
    throw e;
  }
  await qmp.execute('quit').catch(() => undefined); // QEMU may close the monitor before answering
  m.close();
  await waitDead(r.pid);
  if (r.desc.net.mode === 'bridge') await deleteTap(r.desc.net.tap, netnsOf(r.netMode));
  r.pid = undefined;
  r.making = undefined;
  r.hibernated = { at: new Date().toISOString(), stateBytes: cut.data.length, pages: cut.pages };
  await writeRecord(r);
  const ms = Math.round(performance.now() - t0);
  log?.(`hibernated ${m.name}: ${cut.pages} pages differ from ${r.template}, ${cut.data.length} bytes on disk, in ${ms} ms`);
  return { name: m.name, stateBytes: cut.data.length, pages: cut.pages, ms };
}

/** The saved stream cut to the pages that differ from the template's memory file, or whole if the cut refuses it. */
async function cutToTemplate(full: string, mem: string, log?: (m: string) => void): Promise<{ data: Buffer; pages: number }> {
  const stream = await readFile(full);
  const fh = await open(mem, 'r');
  try {
    // the template read 2 MiB at a time (synchronously: the cut is a pure function over its page lookup);
    // page records come in address order, so one window serves nearly every page, and a miss only reads again
    const CHUNK = 2 * 1024 * 1024;
    const window = { at: -1, buf: Buffer.alloc(CHUNK) };
    const page = (offset: number) => {
      const at = offset - (offset % CHUNK);
      if (window.at !== at) {
        window.buf.fill(0, readSync(fh.fd, window.buf, 0, CHUNK, at));
        window.at = at;
      }
      return window.buf.subarray(offset - at, offset - at + PAGE_BYTES);
    };
    const { out, stats } = diffAgainstTemplate(stream, 'mem', page);
    return { data: Buffer.concat(out), pages: stats.kept };
  } catch (e) {
    if (!(e instanceof RamDiffError)) throw e;
    log?.(`the stream is kept whole (${e.message})`);
    return { data: stream, pages: Math.floor(stream.length / PAGE_BYTES) };
  } finally {
    await fh.close();
  }
}

/** Bring the hibernated clone `name` back (see the header). */
export async function resumeHibernated(name: string, log?: (msg: string) => void): Promise<Machine> {
  const n = validName(name);
  const before = await readRecord(n);
  if (!before) throw new VmError('E_NO_VM', `no VM named ${n}`, { hint: 'scion ls' });
  assertNotBusy(before, n, 'resume'); // a pull laying it out
  if (!before.hibernated) throw new VmError('E_NOT_HIBERNATED', `${n} is not hibernated`, { hint: 'scion hibernate <clone> first' });
  const tpl = await checkTemplate(before.template!);
  const dir = hibernationDir(n);
  const state = await takeState(dir, n);
  const t0 = performance.now();
  try {
    const m = await constructMachine({
      doing: 'resuming the hibernated clone',
      qmpTimeoutMs: 30_000,
      restore: { ignoreShared: false },
      resume: true,
      lineup: tpl.meta.lineup,
      keepOnFailure: true,
      claim: async () => {
        const r = (await readRecord(n))!;
        r.making = { ownerPid: process.pid, phase: 'resume' };
        return r;
      },
      files: async () => ({ mem: tpl.files.mem, kernel: join(tpl.dir, tpl.meta.kernel), state }),
      finish: async (b) => {
        const agent = new AgentClient(`${n}/agent`);
        b.setAgent(agent);
        await agent.connect(vmPaths(n, vmsDir()).agent);
        await agent.sync(30_000).catch((e) => {
          throw new VmError('E_AGENT_TIMEOUT', `${n}: the agent did not answer after the resume (${(e as Error).message})`, { cause: e });
        });
        // the guest's clock stood still while it slept: stepped to the host's
        const clock = await stepClockToHost(agent);
        b.record.hibernated = undefined;
        await b.finished({ ready: Math.round(performance.now() - t0), clockStepMs: Math.round(clock.offsetMs) });
        log?.(
          `resumed ${n} in ${Math.round(performance.now() - t0)} ms (its clock was ${Math.round(clock.offsetMs)} ms off; now ${clock.afterMs.toFixed(0)} ms)`,
        );
      },
    });
    await rm(dir, { recursive: true, force: true });
    return m;
  } catch (e) {
    // still hibernated: its QEMU gone, its saved state kept
    await rename(state, join(dir, 'state')).catch(() => undefined);
    const r = await readRecord(n);
    if (r) await writeRecord({ ...r, pid: undefined, making: undefined, hibernated: before.hibernated } as VmRecord);
    throw e;
  }
}

/**
 * The saved state taken for this resume: renamed to the resumer's own name
 * (atomic), so a second resume at once finds none and is refused; one cut
 * short (its process gone) is taken over.
 */
async function takeState(dir: string, n: string): Promise<string> {
  const mine = join(dir, `state.resuming-${process.pid}`);
  const busy = (pid: string) => new VmError('E_VM_BUSY', `cannot resume ${n}: scion process ${pid} is resuming it`, { hint: 'wait for it to finish' });
  try {
    await rename(join(dir, 'state'), mine);
    return mine;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  for (const f of await readdir(dir).catch(() => [] as string[])) {
    const held = /^state\.resuming-(\d+)$/.exec(f)?.[1];
    if (!held) continue;
    if (processAlive(Number(held))) throw busy(held);
    await rename(join(dir, f), mine).catch(() => {
      throw busy('another'); // taken over by another resume just now
    });
    return mine;
  }
  throw new VmError('E_HIBERNATED', `${n}: its saved state ${join(dir, 'state')} is missing`, { hint: 'the clone cannot be resumed; scion rm it' });
}
