/**
 * Forking a clone of a frozen template: the plan `Machine.fork` runs.
 */
import { join } from 'node:path';
import { VmError } from '../../common/errors.ts';
import { config } from '../../common/config.ts';
import { templateBase, type ValidName } from '../../common/names.ts';
import { AgentClient } from '../agent-client.ts';
import type { NetConfig } from '../qemu/argv.ts';
import type { TemplateMeta, VmRecord } from '../store/records.ts';
import { vmPaths, vmsDir } from '../store/dirs.ts';
import { slotName } from '../store/slots.ts';
import { newIdentity, type CloneIdentity } from './identity.ts';
import { clockRightAtReady } from './clock.ts';
import { netParams, readPodNetwork, type NetMode } from './net.ts';
import { qcow2Overlay } from './disk.ts';
import { claimClone, releasePorts, reserveForwards, type PortForward } from './claim.ts';
import type { FrozenTemplate } from './templates.ts';
import { readonlyPrivateMemory } from '../qemu/vmm-plan.ts';
import type { CloneOptions, Owner } from './options.ts';
import { newVmRecord, type Building, type Plan } from './plan.ts';

/** The plan that forks one running clone of a frozen template: mapped copy-on-write, restored, resumed, re-identified. */
export async function forkPlan(tpl: FrozenTemplate, o: CloneOptions): Promise<Plan> {
  const t0 = performance.now();
  const { meta, dir: tdir, files: t } = tpl;
  if (o.pod && meta.net.mode !== 'bridge' && meta.net.mode !== 'tap')
    throw new VmError(
      'E_NET',
      `${meta.name}: a pod's VM needs a template booted with a tap (networking \`tap\`, or scion up … --bridge BR), not ${meta.net.mode} networking`,
      { hint: "the tap in the pod's namespace must match the template's device line-up" },
    );
  const netMode: NetMode = o.pod ? { mode: 'pod', ...o.pod } : meta.net;
  // a pod's VM takes what CNI gave the pod's interface
  const podNet = o.pod ? await readPodNetwork(o.pod) : undefined;
  // host ports first (they go into the record the run directory is made with); only user-mode
  // networking forwards ports: a bridged clone is reached at its own address
  const { ports, forwards } = netMode.mode === 'user' ? await reserveForwards(meta.ports, `${o.prefix}-c?`) : { ports: [], forwards: [] };
  const tbSizeMB = o.tbSizeMB ?? config().tbSizeMB;
  const phases = new Phases(t0);
  const generation = meta.generation + 1;
  const cloneDisk = (name: ValidName) => join(vmPaths(name, vmsDir()).dir, 'disk.qcow2');
  return {
    doing: 'restoring the template',
    qmpTimeoutMs: 30_000 /* generous: a loaded host starts QEMU slowly */,
    restore: { ignoreShared: meta.memory === 'file' },
    resume: true,
    lineup: meta.lineup,
    keepOnFailure: o.keepOnFailure,
    mark: (k) => phases.mark(k),
    claim: async () => {
      try {
        const r = await claimClone(
          o.prefix,
          (index, name) =>
            cloneRecord(meta, name, newIdentity(index, o.hostname ?? `${templateBase(meta.name)}-{n}`, netParams(netMode), podNet, o.dns), {
              netMode,
              forwards,
              ports,
              tbSizeMB,
              owner: o.owner,
            }),
          meta.gid,
        );
        return r;
      } catch (e) {
        await releasePorts(ports);
        throw e;
      }
    },
    files: async (r) => {
      if (meta.disk) await qcow2Overlay(join(tdir, meta.disk), cloneDisk(r.name as ValidName));
      return {
        mem: meta.memory === 'file' ? t.mem : undefined,
        kernel: join(tdir, meta.kernel),
        state: t.state,
        diskBase: meta.baseDisk,
        diskTemplate: meta.disk ? join(tdir, meta.disk) : undefined,
        diskClone: meta.disk ? cloneDisk(r.name as ValidName) : undefined,
      };
    },
    finish: (b) => forkFinish(b, o, generation, phases),
  };
}

/** A fork's last step: its agent reached, its identity applied as the next generation, its clock right at ready. */
async function forkFinish(b: Building, o: CloneOptions, generation: number, phases: Phases): Promise<void> {
  const timings = phases.timings;
  const m = b.m;
  const id = b.record.identity!;
  const agent = new AgentClient(`${m.name}/agent`);
  b.setAgent(agent);
  await agent.connect(vmPaths(m.name, vmsDir()).agent);
  // identity.apply goes out once the sync is answered, not pipelined behind it: the host's
  // time in it is then taken while the agent reads, so the clock the agent steps from it is
  // not late by the resumed guest's first read (~250 ms here). Measured, 8 forks each: a
  // round trip more, and the clock check below no longer fires on an idle host.
  await agent.sync(o.agentTimeoutMs ?? 30_000).catch((e) => {
    throw new VmError('E_AGENT_TIMEOUT', `${m.name}: the agent did not answer after the resume (${(e as Error).message})`, { cause: e });
  });
  phases.mark('agentSync');
  const applied = o.skipIdentityApply ? await agent.call('ping', {}).then(() => undefined) : await b.sendIdentity(generation);
  if (applied) timings.clockFix = await clockRightAtReady(agent, applied.time, Date.now());
  const s = applied?.stepsMs ?? {};
  timings.identity = s.identity ?? 0;
  timings.containers = (s.containers ?? 0) + (s.health ?? 0);
  timings.applyRoundTrip = phases.sinceLast();
  timings.ready = phases.total();
  b.record.generation = generation;
  await b.finished(timings);
  o.log?.(`forked ${m.name} (${id.hostname}, ${id.ip}) in ${timings.ready.toFixed(0)} ms`);
}

/** The times of a fork's steps (ms, one decimal), each from the step before. */
class Phases {
  readonly timings: Record<string, number> = {};
  private last: number;
  constructor(readonly t0: number) {
    this.last = t0;
  }
  mark(k: string): void {
    const n = performance.now();
    this.timings[k] = Math.round((n - this.last) * 10) / 10;
    this.last = n;
  }
  sinceLast(): number {
    return Math.round((performance.now() - this.last) * 10) / 10;
  }
  total(): number {
    return Math.round((performance.now() - this.t0) * 10) / 10;
  }
}

/** A clone's record: its template's machine with its own identity, forwards and reservations. Pure but for the time it names. */
export function cloneRecord(
  meta: TemplateMeta,
  name: ValidName,
  id: CloneIdentity,
  x: { netMode: NetMode; forwards: PortForward[]; ports: number[]; tbSizeMB?: number; owner?: Owner },
): VmRecord {
  const { netMode, forwards, ports, tbSizeMB } = x;
  const net: NetConfig = netMode.mode === 'user' ? { mode: 'user', guestIp: id.ip, forwards } : { mode: 'none' };
  return newVmRecord({
    name,
    role: 'clone',
    image: meta.image,
    accel: meta.accel,
    template: meta.name,
    generation: meta.generation,
    identity: id,
    ports: Object.fromEntries(forwards.map((f) => [String(f.guestPort), f.hostPort])),
    netMode,
    desc: {
      name,
      mode: 'clone',
      accel: meta.accel,
      machine: meta.machine,
      cpu: meta.cpu,
      ramMB: meta.ramMB,
      cpus: 1,
      memory: meta.memory,
      cmdline: meta.cmdline,
      initrd: false,
      vmgenid: id.vmgenid,
      mac: id.mac,
      net,
      incoming: true,
      // the template's memory file is opened read-only (its mode gives the clones' group no write)
      memReadonly: meta.memory === 'file' && readonlyPrivateMemory(meta.vmm.version),
      sandbox: true,
      tbSizeMB,
      disk: meta.disk ? { layers: ['base', 'template', 'clone'] } : undefined,
    },
    slots: ports.map((p) => slotName('port', p)),
    making: { ownerPid: process.pid, phase: 'fork' },
    owner: x.owner,
  });
}
