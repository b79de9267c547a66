/**
 * What scion keeps on disk about VMs and templates, versioned and parsed
 * (never cast), as Firecracker versions its snapshot state: vm.json in each
 * run directory, meta.json in each template directory. A file that is not
 * valid JSON, of another format or version, names another VM, or points
 * outside its own directory is refused with an error saying which file and
 * what is wrong: it is never half-trusted.
 */
import { join, isAbsolute } from 'node:path';
import { z } from 'zod';
import { ScionError } from '../../common/errors.ts';
import { describeIssues } from '../../common/validation.ts';
import { NAME_PATTERN, type ValidName } from '../../common/names.ts';
import { DNS_SEARCH_PATTERN, DNS_OPTION_PATTERN } from '../../common/contracts.ts';
import { atomicWrite, readNoFollow } from '../../common/safe-fs.ts';
import { vmPaths, vmsDir, templatePaths } from './dirs.ts';

export class RecordError extends ScionError {}

export const VM_FORMAT = 'scion.vm/1';
export const TEMPLATE_FORMAT = 'scion.template/2';

const name = z.string().regex(NAME_PATTERN, 'not a valid scion name');
/** interface names (bridge, tap) fit IFNAMSIZ and carry no shell or path characters */
const ifname = z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/, 'not a valid interface name');
const netnsName = z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'not a valid network namespace name');
const ipv4 = z.string().regex(/^(\d{1,3}\.){3}\d{1,3}$/, 'not an IPv4 address');
const cidr24 = z.string().regex(/^(\d{1,3}\.){3}0\/24$/, 'not a /24 network');
const mac = z.string().regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, 'not a MAC address');
const uuid = z.string().regex(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'not a UUID');
const hex = (n: number) => z.string().regex(new RegExp(`^[0-9a-f]{${n}}$`), `not ${n} hex digits`);
const port = z.number().int().min(1).max(65535);
const pid = z.number().int().positive();
/** a file name inside its own directory: no path */
const fileName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'must be a file name inside the template directory, not a path');

export const NetModeSchema = z.discriminatedUnion('mode', [
  z.object({ mode: z.literal('user') }).strict(),
  z.object({ mode: z.literal('none') }).strict(),
  z
    .object({
      mode: z.literal('bridge'),
      bridge: ifname,
      netns: netnsName.optional(),
      network: cidr24,
      gateway: ipv4.optional(),
      dns: z.array(ipv4).optional(),
    })
    .strict(),
  z.object({ mode: z.literal('pod'), netns: netnsName, dev: ifname }).strict(),
  z.object({ mode: z.literal('tap') }).strict(),
]);

const NetConfigSchema = z.discriminatedUnion('mode', [
  z.object({ mode: z.literal('user'), guestIp: ipv4, forwards: z.array(z.object({ hostPort: port, guestPort: port }).strict()) }).strict(),
  z.object({ mode: z.literal('bridge'), tap: ifname }).strict(),
  z.object({ mode: z.literal('none') }).strict(),
]);

/** A QEMU machine type or CPU model name (pc-q35-10.0, max, Westmere-v2): it goes into QEMU's argv. */
const MACHINE_OR_CPU = /^[A-Za-z0-9][\w.-]{0,63}$/;

export const VmDescriptionSchema = z
  .object({
    name,
    mode: z.enum(['template', 'clone']),
    accel: z.enum(['kvm', 'tcg']),
    machine: z.string().regex(MACHINE_OR_CPU).optional(),
    cpu: z.string().regex(MACHINE_OR_CPU).optional(),
    ramMB: z
      .number()
      .int()
      .min(16)
      .max(1 << 20),
    cpus: z.number().int().min(1).max(64),
    memory: z.enum(['file', 'ram']),
    cmdline: z.string().max(4096),
    initrd: z.boolean(),
    vmgenid: uuid,
    mac,
    net: NetConfigSchema,
    incoming: z.boolean().optional(),
    memReadonly: z.boolean().optional(),
    disk: z
      .object({
        layers: z
          .array(z.enum(['base', 'template', 'clone']))
          .min(1)
          .max(3),
      })
      .strict()
      .optional(),
    tbSizeMB: z.number().int().min(1).max(4096).optional(),
    sandbox: z.boolean(),
  })
  .strict();

export const IdentitySchema = z
  .object({
    index: z.number().int().min(0).max(65535),
    hostname: z.string().min(1).max(64),
    mac,
    ip: ipv4,
    prefix: z.number().int().min(0).max(32),
    gateway: ipv4,
    dns: z.array(ipv4),
    dnsSearch: z.array(z.string().regex(DNS_SEARCH_PATTERN)).max(6).optional(),
    dnsOptions: z.array(z.string().regex(DNS_OPTION_PATTERN)).max(16).optional(),
    machineId: hex(32),
    vmgenid: uuid,
    rngSeed: hex(64),
  })
  .strict();

export const VmRecordSchema = z
  .object({
    format: z.literal(VM_FORMAT),
    name,
    role: z.enum(['template', 'clone']),
    /** the built image directory (out/<image>) a template was booted from */
    image: z.string().refine(isAbsolute, 'must be an absolute path'),
    pid: pid.optional(),
    accel: z.enum(['kvm', 'tcg']),
    createdAt: z.string(),
    template: name.optional(),
    generation: z.number().int().min(0),
    identity: IdentitySchema.optional(),
    ports: z.record(z.string().regex(/^\d+$/), port),
    desc: VmDescriptionSchema,
    netMode: NetModeSchema,
    /** the uid and gid its QEMU runs as (when scion runs as root) */
    uid: z.number().int().min(0).optional(),
    gid: z.number().int().min(0).optional(),
    /** reservation files this VM holds (slots/<kind>-<n>), released when it is removed */
    slots: z.array(z.string().regex(/^[a-z]+-\d+$/)),
    frozen: z.boolean().optional(),
    /** a hibernated clone: its QEMU gone, its state saved under the state root (hibernate.ts) */
    hibernated: z
      .object({ at: z.string(), stateBytes: z.number().int().min(0), pages: z.number().int().min(0) })
      .strict()
      .optional(),
    /** set while a scion process is still making this VM; cleared when it is ready */
    making: z.object({ ownerPid: pid, phase: z.string() }).strict().optional(),
    /** a long-running scion process that owns this VM (the front door) */
    owner: z.object({ pid, kind: z.string() }).strict().optional(),
    timings: z.record(z.string(), z.number()).optional(),
  })
  .strict();

export type VmRecord = z.infer<typeof VmRecordSchema>;

export const TemplateMetaSchema = z
  .object({
    format: z.literal(TEMPLATE_FORMAT),
    name,
    /** the VMM it was frozen under: a restore needs the very same one */
    vmm: z.object({ kind: z.enum(['pinned', 'system']), version: z.string().max(200), digest: z.string().regex(/^sha256:[0-9a-f]{64}$/) }).strict(),
    /** the versioned machine type and the CPU model its clones must use */
    machine: z.string().regex(MACHINE_OR_CPU),
    cpu: z.string().regex(MACHINE_OR_CPU),
    lineup: z.array(z.string()),
    accel: z.enum(['kvm', 'tcg']),
    image: z.string().refine(isAbsolute, 'must be an absolute path'),
    manifestSha256: hex(64),
    /** the kernel stub clones hand to QEMU, inside the template directory */
    kernel: fileName,
    cmdline: z.string().max(4096),
    ramMB: z
      .number()
      .int()
      .min(16)
      .max(1 << 20),
    generation: z.number().int().min(1),
    memory: z.enum(['file', 'ram']),
    /** the template's disk overlay inside its directory, and the user's base disk under it */
    disk: fileName.optional(),
    baseDisk: z.string().refine(isAbsolute, 'must be an absolute path').optional(),
    net: NetModeSchema,
    /** group that clones of this template run as: the one allowed to open its memory file */
    gid: z.number().int().min(0).optional(),
    frozenAt: z.string(),
    freezeMs: z.number(),
    ports: z.array(port),
  })
  .strict();

/** A frozen template's metadata (meta.json): what a fork needs to restore it (device line-up, QEMU version, memory, kernel, disk) and where it came from. */
export type TemplateMeta = z.infer<typeof TemplateMetaSchema>;

export { describeIssues };

function parseVersioned<T>(file: string, text: string, schema: z.ZodType<T>, format: string, what: string): T {
  let raw: { format?: unknown; name?: unknown } & Record<string, unknown>;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new RecordError('E_RECORD_INVALID', `${file} is not valid JSON (${(e as Error).message})`, {
      hint: `the ${what} is damaged; remove it (scion rm / scion gc) and make it again`,
    });
  }
  if (raw?.format !== format) {
    const found = typeof raw?.format === 'string' ? `format "${raw.format}"` : 'no format field (written by an older scion)';
    throw new RecordError('E_RECORD_VERSION', `${file} has ${found}; this scion reads "${format}"`, { hint: `make the ${what} again with this scion` });
  }
  const r = schema.safeParse(raw);
  if (!r.success)
    throw new RecordError('E_RECORD_INVALID', `${file} is not a valid ${what}: ${describeIssues(r.error)}`, {
      hint: `it was altered or damaged; remove it and make the ${what} again`,
    });
  return r.data;
}

export function parseVmRecord(file: string, text: string, expectedName: string): VmRecord {
  const r = parseVersioned(file, text, VmRecordSchema, VM_FORMAT, 'VM record');
  if (r.name !== expectedName)
    throw new RecordError('E_RECORD_INVALID', `${file} names VM "${r.name}", but lives in the run directory of "${expectedName}"`, {
      hint: 'it was moved or altered; remove it',
    });
  if (r.role === 'clone' && !r.template) throw new RecordError('E_RECORD_INVALID', `${file}: a clone record without its template`);
  return r;
}

export function parseTemplateMeta(file: string, text: string, expectedName: string): TemplateMeta {
  const m = parseVersioned(file, text, TemplateMetaSchema, TEMPLATE_FORMAT, 'template metadata');
  if (m.name !== expectedName)
    throw new RecordError('E_RECORD_INVALID', `${file} names template "${m.name}", but lives in the directory of "${expectedName}"`, {
      hint: 'it was moved or altered; freeze the template again',
    });
  return m;
}

/** The VM's record; undefined when there is none (a run directory still being made, or none at all). */
export async function readRecord(name: ValidName): Promise<VmRecord | undefined> {
  const p = vmPaths(name, vmsDir());
  let text: string;
  try {
    text = await readNoFollow(p.record);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new RecordError('E_RECORD_INVALID', `${p.record} cannot be read: ${(e as Error).message}`, {
      hint: 'a symlink or something else stands where a VM record should be; remove it',
    });
  }
  return parseVmRecord(p.record, text, name);
}

export async function writeRecord(r: VmRecord): Promise<void> {
  VmRecordSchema.parse(r); // never write what could not be read back
  await atomicWrite(vmPaths(r.name as ValidName, vmsDir()).record, JSON.stringify(r, null, 2) + '\n', 0o600);
}

export async function readTemplateMeta(tdir: string, name: ValidName): Promise<TemplateMeta> {
  const f = templatePaths(tdir).meta;
  let text: string;
  try {
    text = await readNoFollow(f);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT')
      throw new RecordError('E_TEMPLATE_MISSING', `no frozen template named ${name} (${f} is missing)`, {
        hint: 'scion ls lists templates; scion freeze <template> makes one',
      });
    throw new RecordError('E_RECORD_INVALID', `${f} cannot be read: ${(e as Error).message}`, {
      hint: 'a symlink or something else stands where template metadata should be; freeze the template again',
    });
  }
  return parseTemplateMeta(f, text, name);
}

export async function writeTemplateMeta(tdir: string, m: TemplateMeta): Promise<void> {
  TemplateMetaSchema.parse(m);
  await atomicWrite(join(tdir, 'meta.json'), JSON.stringify(m, null, 2) + '\n', 0o600);
}
