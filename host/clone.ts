/**
 * Clones: N running copies of a frozen template, each mapping its memory
 * file copy-on-write, each with a fresh identity, made through the Machine's
 * one construction path. All or nothing: a fork that fails leaves no clone
 * of this call behind.
 */
import { VmError } from '../common/errors.ts';
import { validName, templateBase, type ValidName } from '../common/names.ts';
import { Machine, type Owner } from './machine/machine.ts';
import { checkTemplate } from './machine/templates.ts';

/** What `fork` takes: how many clones, how many at once, their hostname pattern and name prefix, owner, TCG buffer. */
export interface ForkOptions {
  n: number;
  parallel?: number;
  hostname?: string;
  namePrefix?: string;
  log?: (m: string) => void;
  /** keep a failed clone's run directory for inspection */
  keepOnFailure?: boolean;
  /** a long-running process that owns these clones (shown by ls) */
  owner?: Owner;
  /** QEMU's TCG translation buffer per clone (MiB); default SCION_TB_SIZE_MB, else QEMU's */
  tbSizeMB?: number;
  /** how long each clone's agent may take to answer after the resume (default 30 s) */
  agentTimeoutMs?: number;
  /**
   * Do not send identity.apply: the clone keeps the template's hostname,
   * machine-id, addresses and RNG state. Only for showing that an identity
   * test fails when re-identification is broken (scion/testing's option of
   * the same name); never in real use.
   */
  skipIdentityApply?: boolean;
}
/** A forked clone as `fork` returns it: its name and identity (hostname, MAC, IP, machine-id, vmgenid) and more (see the fields). */
export interface CloneResult {
  name: ValidName;
  hostname: string;
  mac: string;
  ip: string;
  machineId: string;
  vmgenid: string;
  ports: Record<string, number>;
  generation: number;
  timings: Record<string, number>;
  runDir: string;
  agentSocket: string;
  pid: number;
}

/** What a caller gets of a forked clone. */
export function cloneResult(m: Machine): CloneResult {
  const i = m.info();
  const id = i.identity!;
  return {
    name: i.name,
    hostname: id.hostname,
    mac: id.mac,
    ip: id.ip,
    machineId: id.machineId,
    vmgenid: id.vmgenid,
    ports: i.ports,
    generation: i.generation,
    timings: i.timings,
    runDir: i.runDir,
    agentSocket: i.agentSocket,
    pid: i.pid!,
  };
}

/** Fork N running clones of a frozen template, all or nothing: each restored copy-on-write, resumed and re-identified. */
export async function fork(templateName: string, opts: ForkOptions): Promise<CloneResult[]> {
  const tpl = await checkTemplate(templateName);
  const prefix = validName(opts.namePrefix ?? templateBase(tpl.meta.name), 'clone prefix');
  if (opts.hostname !== undefined) validHostnamePattern(opts.hostname);
  const made: Machine[] = [];
  let started = 0;
  const errors: Error[] = [];
  const worker = async () => {
    while (started < opts.n && !errors.length) {
      started++;
      try {
        const m = await Machine.fork(tpl, {
          prefix,
          hostname: opts.hostname,
          owner: opts.owner,
          keepOnFailure: opts.keepOnFailure,
          tbSizeMB: opts.tbSizeMB,
          agentTimeoutMs: opts.agentTimeoutMs,
          skipIdentityApply: opts.skipIdentityApply,
          log: opts.log,
        });
        m.close();
        made.push(m);
      } catch (e) {
        errors.push(e as Error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.parallel ?? 4, opts.n) }, worker));
  if (errors.length) {
    // all or nothing: a fork that fails leaves no clone of this call behind
    for (const m of made) await m.remove({ force: true }).catch((e) => opts.log?.(`could not remove ${m.name} after the failed fork: ${(e as Error).message}`));
    throw errors[0];
  }
  return made.map(cloneResult).sort((a, b) => a.name.localeCompare(b.name, 'en', { numeric: true }));
}

function validHostnamePattern(h: string): void {
  if (!/^[a-z0-9]([a-z0-9-]{0,40})(\{n\})?([a-z0-9-]{0,20})$/.test(h))
    throw new VmError('E_BAD_NAME', `hostname pattern ${JSON.stringify(h)}: use a-z, 0-9 and "-", with {n} for the clone index`, { hint: 'e.g. web-{n}' });
}
