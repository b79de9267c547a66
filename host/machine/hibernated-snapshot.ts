/**
 * A hibernated clone to and from an OCI registry (`scion push <clone> <ref>`,
 * `scion pull <ref>`): registry/hibernated-artifact.ts's artifact. Push
 * uploads the clone's template as a snapshot (by digest, to the same
 * repository: blobs the registry has are not sent again), then the clone's
 * saved state and portable record. Pull makes sure of the template first
 * (ensureSnapshotTemplate: pulled once per node, checked against this node's
 * VMM), then lays the clone out hibernated under its own name, with this
 * node's host ports and QEMU uid: `scion resume` brings it up here, the same
 * machine (identity, generation, processes, files). A pushed clone is a copy:
 * resumed on two nodes it is two machines with one identity (see SECURITY.md).
 */
import { mkdir, readFile, rm } from 'node:fs/promises';
import { atomicWrite } from '../../common/safe-fs.ts';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gunzip, gzip } from 'node:zlib';
import { z } from 'zod';
import { ociDigest } from '../../common/digest.ts';
import { VmError } from '../../common/errors.ts';
import { removeOnInterrupt } from '../../common/interrupt.ts';
import { validName, type ValidName } from '../../common/names.ts';
import { describeIssues } from '../../common/validation.ts';
import { HOSTNAME_PATTERN } from '../../common/contracts.ts';
import { SCION_VERSION } from '../../common/version.ts';
import { TITLE } from '../../registry/artifact.ts';
import { RegistryClient, type ClientOptions } from '../../registry/client.ts';
import { HibernatedError, checkHibernatedManifest, hibernatedManifest, MAX_RECORD_BYTES } from '../../registry/hibernated-artifact.ts';
import { formatReference, parseReference } from '../../registry/reference.ts';
import { fetchBlobBytes, fetchCheckedManifest, putManifestChecked, sendBlobOnce } from '../../registry/transfer.ts';
import { hibernationDir } from '../store/dirs.ts';
import { IdentitySchema, readRecord, writeRecord, type TemplateMeta, type VmRecord } from '../store/records.ts';
import { claimNamed, releasePorts, reserveForwards } from './claim.ts';
import { cloneRecord } from './fork-plan.ts';
import { removeVm } from './inventory.ts';
import { ensureSnapshotTemplate, uploadTemplate } from './snapshot.ts';
import { checkTemplate } from './templates.ts';

const RECORD_FORMAT = 'scion.hibernated/1';
/** What of a hibernated clone travels: who it is and where it was; everything else is its template's or this node's. */
const PortableCloneSchema = z
  .object({
    format: z.literal(RECORD_FORMAT),
    name: z.string(),
    template: z.string(),
    generation: z.number().int().min(0),
    // the record's identity checks, and a hostname the agent would take (it names the machine in ls and logs)
    identity: IdentitySchema.extend({ hostname: z.string().regex(HOSTNAME_PATTERN, 'not a hostname') }),
    hibernated: z.object({ at: z.string().max(64), stateBytes: z.number().int().min(0), pages: z.number().int().min(0) }).strict(),
  })
  .strict();
type PortableClone = z.infer<typeof PortableCloneSchema>;

/** What a hibernated clone's push did: its reference and digest, its template's snapshot digest, bytes sent in all and of the template. */
export interface HibernatedPushResult {
  reference: string;
  digest: string;
  template: { name: string; digest: string; bytesSent: number };
  stateBytes: number;
  bytesSent: number;
}

/** Push the hibernated clone `name` to `refText` (a tag), its template with it by digest. */
export async function pushHibernated(name: string, refText: string, o: ClientOptions & { log?: (m: string) => void } = {}): Promise<HibernatedPushResult> {
  const ref = parseReference(refText);
  if (!ref.tag || ref.digest) throw new VmError('E_USAGE', `scion push ${refText}: push to a tag (registry/repository:tag), not a digest`);
  const n = validName(name);
  const r = await readRecord(n);
  if (!r) throw new VmError('E_NO_VM', `no VM named ${n}`, { hint: 'scion ls' });
  if (!r.hibernated || !r.template || !r.identity)
    throw new VmError('E_NOT_HIBERNATED', `${n} is not hibernated: a clone is pushed hibernated (its state saved)`, { hint: `scion hibernate ${n} first` });
  if (r.netMode.mode !== 'user' && r.netMode.mode !== 'none')
    throw new VmError(
      'E_UNSUPPORTED',
      `${n} has ${r.netMode.mode} networking: only clones with user or no networking move to another node (a tap is this node's)`,
    );
  const state = await readFile(join(hibernationDir(n), 'state')).catch((e) => {
    throw new VmError('E_NOT_HIBERNATED', `${n}: its saved state cannot be read (${(e as Error).message}); was it resumed meanwhile?`, { cause: e });
  });
  const client = new RegistryClient(ref, o);
  o.log?.(`${n}: its template ${r.template} first`);
  const tpl = await uploadTemplate(r.template, client, undefined, o);
  const gz = await promisify(gzip)(state, { level: 1 });
  const record: PortableClone = {
    format: RECORD_FORMAT,
    name: n,
    template: r.template,
    generation: r.generation,
    identity: r.identity,
    hibernated: r.hibernated,
  };
  const config = Buffer.from(JSON.stringify(record));
  let bytesSent = tpl.bytesSent;
  for (const b of [gz, config]) if (await sendBlobOnce(client, b, ociDigest(b))) bytesSent += b.length;
  const manifest = JSON.stringify(
    hibernatedManifest({
      config: { digest: ociDigest(config), size: config.length },
      state: { digest: ociDigest(gz), size: gz.length },
      template: { digest: tpl.digest, size: tpl.manifestSize },
      annotations: { [TITLE]: n, 'dev.scion.version': SCION_VERSION, 'dev.scion.template': r.template },
    }),
  );
  const digest = await putManifestChecked(client, ref.tag, manifest);
  bytesSent += manifest.length;
  o.log?.(`pushed ${n}: saved state ${gz.length} bytes (gzip), ${bytesSent} bytes sent in all`);
  return {
    reference: formatReference({ ...ref, digest }),
    digest,
    template: { name: r.template, digest: tpl.digest, bytesSent: tpl.bytesSent },
    stateBytes: gz.length,
    bytesSent,
  };
}

/** What a hibernated clone's pull laid out: the clone's name here, its template's local name, bytes received for the clone itself. */
export interface HibernatedPullResult {
  reference: string;
  digest: string;
  name: ValidName;
  template: { name: ValidName; digest: string; pulled: boolean };
  bytesReceived: number;
}

/** Pull a hibernated clone and lay it out here hibernated, as `name` (default: its pushed name); `scion resume` brings it up. */
export async function pullHibernated(refText: string, o: ClientOptions & { name?: string; log?: (m: string) => void } = {}): Promise<HibernatedPullResult> {
  const ref = parseReference(refText);
  const client = new RegistryClient(ref, o);
  const { digest, manifest: m } = await fetchCheckedManifest(
    client,
    refText,
    checkHibernatedManifest,
    (msg) => new HibernatedError('E_NOT_SCION_SNAPSHOT', msg),
  );
  const pushed = parseRecord(refText, (await fetchBlobBytes(client, m.config.digest, m.config.size, 'the clone record')).toString('utf8'));
  const name = validName(o.name ?? pushed.name, 'clone');
  // its template by the digest the clone names: this node's copy, or pulled now (its VMM checked there)
  const tplRef = formatReference({ ...ref, tag: undefined, digest: m.template.digest });
  const tpl = await ensureSnapshotTemplate(tplRef, { ...o, name: undefined });
  const { meta } = await checkTemplate(tpl.name);
  const record = await claimPulledClone(name, meta, pushed);
  const dir = hibernationDir(name);
  const forget = removeOnInterrupt(dir);
  try {
    // a saved state is at most its template's RAM and the device state, compressed or not
    const bound = meta.ramMB * 1024 * 1024 + 256 * 1024 * 1024;
    if (m.state.size > bound)
      throw new HibernatedError('E_NOT_SCION_SNAPSHOT', `${refText}: its saved state is ${m.state.size} bytes, more than a ${meta.ramMB} MiB guest can have`);
    const gz = await fetchBlobBytes(client, m.state.digest, m.state.size, `${refText} saved state`);
    const state = await promisify(gunzip)(gz, { maxOutputLength: bound, chunkSize: 1024 * 1024 }).catch((e) => {
      throw new HibernatedError('E_NOT_SCION_SNAPSHOT', `${refText}: its saved state does not decompress: ${(e as Error).message}`);
    });
    await rm(dir, { recursive: true, force: true }); // a leftover of a crash under the name now ours
    await mkdir(dir, { mode: 0o700 });
    await atomicWrite(join(dir, 'state'), state, 0o600);
    record.making = undefined;
    await writeRecord(record);
    o.log?.(`pulled ${name}: hibernated, its template ${tpl.name}; scion resume ${name}`);
    return {
      reference: formatReference({ ...ref, digest }),
      digest,
      name,
      template: { name: tpl.name, digest: tpl.digest, pulled: tpl.pulled },
      bytesReceived: gz.length,
    };
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    await removeVm(name, { force: true }).catch(() => undefined);
    throw e;
  } finally {
    forget();
  }
}

/** The pulled clone's name claimed, with this node's host ports and QEMU uid (its template's group), marked as being pulled. */
async function claimPulledClone(name: ValidName, meta: TemplateMeta, pushed: PortableClone): Promise<VmRecord> {
  const { ports, forwards } = meta.net.mode === 'user' ? await reserveForwards(meta.ports, name) : { ports: [], forwards: [] };
  try {
    return await claimNamed(
      name,
      () => ({
        ...cloneRecord(meta, name, pushed.identity, { netMode: meta.net, forwards, ports }),
        generation: pushed.generation,
        hibernated: pushed.hibernated,
        making: { ownerPid: process.pid, phase: 'pull' },
      }),
      meta.gid,
    );
  } catch (e) {
    await releasePorts(ports);
    throw e;
  }
}

/** The pushed record, checked: ours, its identity valid. */
function parseRecord(refText: string, text: string): PortableClone {
  if (text.length > MAX_RECORD_BYTES) throw new HibernatedError('E_NOT_SCION_SNAPSHOT', `${refText}: the clone record is over ${MAX_RECORD_BYTES} bytes`);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new HibernatedError('E_NOT_SCION_SNAPSHOT', `${refText}: the clone record is not JSON`);
  }
  const r = PortableCloneSchema.safeParse(raw);
  if (!r.success) throw new HibernatedError('E_NOT_SCION_SNAPSHOT', `${refText}: the clone record is not valid: ${describeIssues(r.error)}`);
  return r.data;
}
