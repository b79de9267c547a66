/**
 * Frozen templates to and from an OCI registry (`scion push <template> <ref>`,
 * `scion pull <ref>`): the artifact is registry/snapshot-artifact.ts's. Push
 * reads the template's memory file chunk by chunk, leaves zero chunks out,
 * and asks the registry before each blob: what it has is not sent again.
 * Pull checks the record against this node's VMM before a byte of RAM moves,
 * lays the template out in a temporary directory under the template root
 * (sparse memory file, every blob's digest and size checked, each chunk
 * decompressed to exactly its size), and renames it in; the template's name
 * is claimed first like any VM's, and a failed pull removes both.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { chmod, chown, mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gunzip, gzip } from 'node:zlib';
import { ociDigest } from '../../common/digest.ts';
import { VmError } from '../../common/errors.ts';
import { removeOnInterrupt } from '../../common/interrupt.ts';
import { validName, type ValidName } from '../../common/names.ts';
import { SCION_VERSION } from '../../common/version.ts';
import { TITLE } from '../../registry/artifact.ts';
import { RegistryClient, type ClientOptions } from '../../registry/client.ts';
import { formatReference, parseReference } from '../../registry/reference.ts';
import { fetchBlobBytes, fetchCheckedManifest, fetchManifestBytes, putManifestChecked, sendBlobOnce } from '../../registry/transfer.ts';
import {
  CHUNK_BYTES,
  MAX_SNAPSHOT_RAM_BYTES,
  SNAPSHOT_ARTIFACT_TYPE,
  SnapshotError,
  checkSnapshotManifest,
  isZero,
  parseRamIndex,
  snapshotManifest,
  type RamIndex,
  type SnapshotFile,
} from '../../registry/snapshot-artifact.ts';
import { HIBERNATED_ARTIFACT_TYPE } from '../../registry/hibernated-artifact.ts';
import { claimNamed } from './claim.ts';
import { compatibilityProblems } from './compat.ts';
import { makingElsewhere, removeVm } from './inventory.ts';
import { newVmRecord } from './plan.ts';
import { checkTemplate, memMode, templateDir } from './templates.ts';
import { currentVmm } from '../qemu/vmm.ts';
import { USER_NET } from '../qemu/argv.ts';
import { trustedTemplateRoot, templatePaths } from '../store/dirs.ts';
import { TemplateMetaSchema, TEMPLATE_FORMAT, describeIssues, readRecord, writeRecord, writeTemplateMeta, type TemplateMeta } from '../store/records.ts';

const gzipAsync = promisify(gzip);
const gunzipAsync = promisify(gunzip);
/** zlib level 1: RAM pages compress well at once; higher levels cost push time for little. Fixed: the level decides the chunk digests. */
const GZIP = { level: 1 } as const;
/** RAM chunks fetched at once by a pull. */
const PULL_CONCURRENCY = 8;

/** What a template push takes: the registry client's options and a progress log. */
export interface SnapshotPushOptions extends ClientOptions {
  log?: (m: string) => void;
}
/** What a template push did: the reference, the manifest digest, its RAM chunks (all, zero ones left out, sent, the registry had) and the bytes sent and in all. */
export interface SnapshotPushResult {
  reference: string;
  digest: string;
  chunks: { total: number; zero: number; sent: number; reused: number };
  bytesSent: number;
  artifactBytes: number;
  requests: RegistryClient['counts'];
}

/** The record as the artifact carries it: what is this node's alone (the clones' group, the base disk's path) left out. Pure. */
export function portableRecord(meta: TemplateMeta): Omit<TemplateMeta, 'gid' | 'baseDisk' | 'disk'> {
  const { gid: _g, baseDisk: _b, disk: _d, ...rest } = meta;
  return rest;
}

/** Push the frozen template `name` to `refText` as one snapshot artifact. */
export async function pushTemplate(name: string, refText: string, o: SnapshotPushOptions = {}): Promise<SnapshotPushResult> {
  const ref = parseReference(refText);
  if (!ref.tag || ref.digest) throw new VmError('E_USAGE', `scion push ${refText}: push to a tag (registry/repository:tag), not a digest`);
  const client = new RegistryClient(ref, o);
  const r = await uploadTemplate(name, client, ref.tag, o);
  return { reference: formatReference({ ...ref, digest: r.digest }), ...r, requests: client.counts };
}

/**
 * The frozen template's blobs uploaded (what the registry has skipped) and
 * its manifest put under `tag`, or under its own digest when none (a
 * hibernated clone's template, which the clone's artifact names).
 */
export async function uploadTemplate(
  name: string,
  client: RegistryClient,
  tag: string | undefined,
  o: SnapshotPushOptions,
): Promise<Omit<SnapshotPushResult, 'reference' | 'requests'> & { manifestSize: number }> {
  const { meta, files: t } = await checkTemplate(name);
  if (meta.memory !== 'file' || meta.disk)
    throw new VmError(
      'E_UNSUPPORTED',
      `template ${meta.name} ${meta.disk ? 'has a disk' : 'keeps its RAM in its state file'}: only disk-less templates with a memory file are pushed as snapshots`,
    );
  const chunks = { total: 0, zero: 0, sent: 0, reused: 0 };
  let bytesSent = 0;
  let artifactBytes = 0;
  const memBytes = meta.ramMB * 1024 * 1024;
  const index: RamIndex = { chunkSize: CHUNK_BYTES, memBytes, chunks: [] };
  const done = new Set<string>();
  const fh = await open(t.mem, 'r');
  try {
    const buf = Buffer.alloc(CHUNK_BYTES);
    for (let n = 0; n * CHUNK_BYTES < memBytes; n++) {
      const len = Math.min(CHUNK_BYTES, memBytes - n * CHUNK_BYTES);
      const { bytesRead } = await fh.read(buf, 0, len, n * CHUNK_BYTES);
      const chunk = buf.subarray(0, bytesRead);
      chunks.total++;
      if (bytesRead !== len) throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: its memory file ends at ${n * CHUNK_BYTES + bytesRead} bytes`);
      if (isZero(chunk)) {
        chunks.zero++;
        continue;
      }
      const gz = await gzipAsync(chunk, GZIP);
      const digest = ociDigest(gz);
      index.chunks.push({ n, digest, size: gz.length });
      if (done.has(digest)) continue;
      done.add(digest);
      artifactBytes += gz.length;
      if (await sendBlobOnce(client, gz, digest)) {
        chunks.sent++;
        bytesSent += gz.length;
      } else chunks.reused++;
      if (n % 64 === 63) o.log?.(`RAM: ${n + 1} of ${Math.ceil(memBytes / CHUNK_BYTES)} chunks read, ${chunks.sent} sent, ${chunks.reused} the registry had`);
    }
  } finally {
    await fh.close();
  }
  const layerFiles: { name: SnapshotFile; data: Buffer }[] = [
    { name: 'state', data: await gzipAsync(await readFile(t.state), GZIP) },
    { name: 'kernel-stub', data: await readFile(t.kernel) },
    { name: 'ram-index', data: Buffer.from(JSON.stringify(index)) },
  ];
  const config = Buffer.from(JSON.stringify(portableRecord(meta)));
  const files: { name: SnapshotFile; digest: string; size: number }[] = [];
  for (const b of [...layerFiles, { name: 'config' as const, data: config }]) {
    const digest = ociDigest(b.data);
    artifactBytes += b.data.length;
    if (await sendBlobOnce(client, b.data, digest)) bytesSent += b.data.length;
    if (b.name !== 'config') files.push({ name: b.name, digest, size: b.data.length });
  }
  const manifest = JSON.stringify(
    snapshotManifest({
      config: { digest: ociDigest(config), size: config.length },
      files,
      index,
      annotations: { [TITLE]: meta.name, 'dev.scion.version': SCION_VERSION, 'dev.scion.vmm': meta.vmm.digest },
    }),
  );
  const digest = await putManifestChecked(client, tag ?? ociDigest(manifest), manifest);
  bytesSent += manifest.length;
  o.log?.(`pushed ${meta.name}: ${chunks.total} chunks, ${chunks.zero} zero, ${chunks.sent} sent, ${chunks.reused} the registry had; ${bytesSent} bytes sent`);
  return { digest, chunks, bytesSent, artifactBytes, manifestSize: Buffer.byteLength(manifest) };
}

/** What a template pull takes: the registry client's options, the local name (default: the pushed template's) and a progress log. */
export interface SnapshotPullOptions extends ClientOptions {
  name?: string;
  log?: (m: string) => void;
}
/** What a template pull laid out: the reference, the manifest digest, the template's name, its RAM chunks fetched and the bytes received. */
export interface SnapshotPullResult {
  reference: string;
  digest: string;
  name: ValidName;
  chunks: number;
  bytesReceived: number;
}

/** The snapshot manifest `refText` names, its digest checked, and its record. */
async function fetchSnapshot(client: RegistryClient, refText: string) {
  const { digest, manifest: m } = await fetchCheckedManifest(client, refText, checkSnapshotManifest, (msg) => new SnapshotError('E_NOT_SCION_SNAPSHOT', msg));
  const recordText = (await fetchBlobBytes(client, m.config.digest, m.config.size, 'the template record')).toString('utf8');
  return { digest, m, recordText };
}

/**
 * The pushed record checked as any template record, under a placeholder
 * name (the caller names it: --name, else the pushed name, checked then),
 * without what is another node's (its clones' group, its disk).
 */
function checkedRecord(refText: string, text: string): { meta: TemplateMeta; pushedName: string } {
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new SnapshotError('E_NOT_SCION_SNAPSHOT', `${refText}: the template record is not JSON`);
  }
  if (raw?.format !== TEMPLATE_FORMAT)
    throw new SnapshotError(
      'E_NOT_SCION_SNAPSHOT',
      `${refText}: the template record has format ${JSON.stringify(raw?.format)}; this scion reads ${TEMPLATE_FORMAT}`,
    );
  const r = TemplateMetaSchema.safeParse({ ...raw, name: 'snapshot', gid: undefined, disk: undefined, baseDisk: undefined });
  if (!r.success) throw new SnapshotError('E_NOT_SCION_SNAPSHOT', `${refText}: the template record is not valid: ${describeIssues(r.error)}`);
  if (r.data.memory !== 'file' || r.data.ramMB * 1024 * 1024 > MAX_SNAPSHOT_RAM_BYTES)
    throw new SnapshotError(
      'E_NOT_SCION_SNAPSHOT',
      `${refText}: the template record names ${r.data.ramMB} MiB of ${r.data.memory} memory; a snapshot holds at most 64 GiB in a memory file`,
    );
  return { meta: r.data, pushedName: typeof raw.name === 'string' ? raw.name : '' };
}

/** Pull a template snapshot and lay it out as the frozen template `name` (default: its pushed name). */
export async function pullTemplate(refText: string, o: SnapshotPullOptions = {}): Promise<SnapshotPullResult> {
  const ref = parseReference(refText);
  const client = new RegistryClient(ref, o);
  const { digest, m, recordText } = await fetchSnapshot(client, refText);
  const { meta: pushed, pushedName } = checkedRecord(refText, recordText);
  const name = validName(o.name ?? pushedName, 'template');
  // refuse before a byte of RAM moves: the record must restore under this node's VMM
  const probe = { ...pushed, name };
  const problems = compatibilityProblems(probe, await currentVmm(), true);
  if (problems.length)
    throw new VmError('E_TEMPLATE_INCOMPATIBLE', `${refText}: template ${pushedName} cannot be restored here: ${problems.join('; ')}`, {
      hint: 'run the VMM it names on this node (scion vmm), or freeze the template again under this one',
    });
  const record = await claimNamed(name, () =>
    newVmRecord({
      name,
      role: 'template',
      image: probe.image,
      accel: probe.accel,
      generation: probe.generation,
      ports: {},
      netMode: probe.net,
      desc: {
        name,
        mode: 'template',
        accel: probe.accel,
        machine: probe.machine,
        cpu: probe.cpu,
        ramMB: probe.ramMB,
        cpus: 1,
        memory: 'file',
        cmdline: probe.cmdline,
        initrd: true,
        vmgenid: randomUUID(),
        mac: '02:53:43:00:00:00',
        net: probe.net.mode === 'user' ? { mode: 'user', guestIp: USER_NET.templateIp, forwards: [] } : { mode: 'none' },
        sandbox: true,
      },
      slots: [],
      making: { ownerPid: process.pid, phase: 'pull' },
    }),
  );
  const tmp = join(trustedTemplateRoot(), `.pull-${process.pid}-${randomBytes(4).toString('hex')}`);
  const forget = removeOnInterrupt(tmp);
  try {
    const meta: TemplateMeta = { ...probe, gid: record.gid };
    const received = await layOut(client, refText, m, meta, tmp);
    await rm(templateDir(name), { recursive: true, force: true }); // a leftover of a crash under the name now ours
    await rename(tmp, templateDir(name));
    record.frozen = true;
    record.making = undefined;
    await writeRecord(record);
    o.log?.(`pulled template ${name}: ${received.chunks} RAM chunks, ${received.bytes} bytes`);
    return { reference: formatReference({ ...ref, digest }), digest, name, chunks: received.chunks, bytesReceived: received.bytes };
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    await removeVm(name, { force: true }).catch(() => undefined);
    throw e;
  } finally {
    forget();
  }
}

/** The template's files in `dir`: state, kernel stub, a sparse memory file with every chunk in place, meta.json. */
async function layOut(
  client: RegistryClient,
  refText: string,
  m: ReturnType<typeof checkSnapshotManifest>,
  meta: TemplateMeta,
  dir: string,
): Promise<{ chunks: number; bytes: number }> {
  await mkdir(dir, { mode: 0o700 });
  const t = templatePaths(dir);
  let bytes = 0;
  const file = async (f: SnapshotFile) => {
    bytes += m.files[f].size;
    return fetchBlobBytes(client, m.files[f].digest, m.files[f].size, `${refText} ${f}`);
  };
  const state = await gunzipAsync(await file('state'), { maxOutputLength: 256 * 1024 * 1024 }).catch((e) => {
    throw new SnapshotError('E_NOT_SCION_SNAPSHOT', `${refText}: its device state does not decompress: ${(e as Error).message}`);
  });
  await writeFile(t.state, state, { mode: 0o600, flag: 'wx' });
  await writeFile(t.kernel, await file('kernel-stub'), { mode: 0o644, flag: 'wx' });
  const memBytes = meta.ramMB * 1024 * 1024;
  const index = parseRamIndex(refText, (await file('ram-index')).toString('utf8'), memBytes, m.chunks);
  const fh = await open(t.mem, 'wx', 0o600);
  try {
    await fh.truncate(memBytes); // sparse: chunks left out are zero
    // a few chunks in flight: fetching one overlaps decompressing (zlib's thread pool) and writing others
    let next = 0;
    const worker = async () => {
      while (next < index.chunks.length) {
        const c = index.chunks[next++];
        const want = Math.min(CHUNK_BYTES, memBytes - c.n * CHUNK_BYTES);
        const gz = await fetchBlobBytes(client, c.digest, c.size, `${refText} RAM chunk ${c.n}`);
        bytes += gz.length;
        // the output in one buffer: zlib's default 16 KiB pieces cost a trip to the main thread each (measured: 66 chunks
        // of the web template in ~430 ms against ~170-290 ms)
        const raw = await gunzipAsync(gz, { maxOutputLength: want, chunkSize: want }).catch((e) => {
          throw new SnapshotError('E_NOT_SCION_SNAPSHOT', `${refText}: RAM chunk ${c.n} does not decompress to ${want} bytes: ${(e as Error).message}`);
        });
        if (raw.length !== want) throw new SnapshotError('E_NOT_SCION_SNAPSHOT', `${refText}: RAM chunk ${c.n} is ${raw.length} bytes, not ${want}`);
        await fh.write(raw, 0, raw.length, c.n * CHUNK_BYTES);
      }
    };
    await Promise.all(Array.from({ length: PULL_CONCURRENCY }, worker));
  } finally {
    await fh.close();
  }
  if (meta.gid !== undefined) await chown(t.mem, 0, meta.gid);
  await chmod(t.mem, memMode(meta.vmm.version));
  await writeTemplateMeta(dir, meta);
  return { chunks: index.chunks.length, bytes };
}

/** What a reference names, by its manifest's artifactType: a template snapshot, a hibernated clone, or else (for `scion pull`) an image. */
export async function snapshotKindOf(refText: string, o: ClientOptions = {}): Promise<'template' | 'hibernated' | undefined> {
  const { bytes } = await fetchManifestBytes(new RegistryClient(parseReference(refText), o), refText);
  let type: unknown;
  try {
    type = JSON.parse(bytes.toString('utf8'))?.artifactType;
  } catch {
    return undefined;
  }
  return type === SNAPSHOT_ARTIFACT_TYPE ? 'template' : type === HIBERNATED_ARTIFACT_TYPE ? 'hibernated' : undefined;
}

/** What `ensureSnapshotTemplate` gives: the local template's name and whether this call pulled it. */
export interface SnapshotTemplate {
  name: ValidName;
  digest: string;
  pulled: boolean;
}

/**
 * The frozen template a snapshot reference stands for on this node, pulled
 * the first time: named after the manifest digest (snap-<12 hex>), so a tag
 * moved to another snapshot is another template, and every caller (shims of
 * pods starting at once) agrees on the name. While another process pulls it,
 * this waits for that pull (and pulls itself if that one failed).
 */
export async function ensureSnapshotTemplate(refText: string, o: SnapshotPullOptions & { waitMs?: number } = {}): Promise<SnapshotTemplate> {
  const ref = parseReference(refText);
  const client = new RegistryClient(ref, o);
  const { digest } = await fetchManifestBytes(client, refText);
  const name = validName(`snap-${digest.slice(7, 19)}`, 'template');
  const pinned = formatReference({ ...ref, tag: undefined, digest });
  const deadline = Date.now() + (o.waitMs ?? 300_000);
  let said = false;
  for (;;) {
    if (
      await checkTemplate(name).then(
        () => true,
        () => false,
      )
    )
      return { name, digest, pulled: false };
    // another live process pulling it: wait without asking the registry again
    const pulling = makingElsewhere(await readRecord(name).catch(() => undefined));
    try {
      if (pulling) throw new VmError('E_VM_EXISTS', `${name} is being pulled`);
      await pullTemplate(pinned, { ...o, name });
      return { name, digest, pulled: true };
    } catch (e) {
      if ((e as VmError).code !== 'E_VM_EXISTS' || Date.now() > deadline) throw e;
      if (!said) o.log?.(`${name}: another process is pulling it; waiting`);
      said = true;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}
