/**
 * The Debian archive client: signed InRelease -> Packages index (hash checked
 * against InRelease) -> PackageIndex; .deb download checked by SHA-256.
 *
 * Signatures are checked with Debian's own gpgv against the archive keyring
 * (debian-archive-keyring): it is exactly what apt uses, it is in every Debian
 * install, and it keeps OpenPGP parsing out of our code.
 */
import { run, CommandError } from '../../common/run.ts';
import { mkdtemp, writeFile, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { ArchiveError, BuildError } from '../../common/errors.ts';
import type { BlobCache } from '../cache.ts';
import { atomicWrite } from '../../common/safe-fs.ts';
import { sha256 } from '../../common/digest.ts';
import { download, type Progress } from '../fetch.ts';
import { clearsignedBody, parseReleaseHashes, parseStanzas } from './control.ts';
import { buildIndex, entryFromStanza, type PackageEntry, type PackageIndex } from './resolver.ts';

export const DEFAULT_KEYRING = '/usr/share/keyrings/debian-archive-keyring.gpg';

export interface ArchiveOptions {
  mirror: string;
  suite: string;
  components: string[];
  architecture: string;
  keyring?: string;
  cache: BlobCache;
  onProgress?: Progress;
  log?: (msg: string) => void;
}

/** The mirror to use: the caller's, else the definition's, else the host's apt sources; none is an error naming the definition. */
export async function chooseMirror(definitionPath: string, ...preferred: (string | undefined)[]): Promise<string> {
  const mirror = preferred.find(Boolean) ?? (await mirrorFromAptSources());
  if (!mirror)
    throw new BuildError('E_NO_MIRROR', `${definitionPath}: debian.mirror is not set and the host's apt sources name no Debian mirror`, {
      hint: 'add `debian: {mirror: http://deb.debian.org/debian}` to the definition',
    });
  return mirror;
}

/** The mirror named in the host's apt sources (deb822 or one-line), if any. */
export async function mirrorFromAptSources(): Promise<string | undefined> {
  const { readdir } = await import('node:fs/promises');
  const texts: string[] = [];
  try {
    texts.push(await readFile('/etc/apt/sources.list', 'utf8'));
  } catch {
    /* deb822-only hosts have none */
  }
  try {
    for (const f of (await readdir('/etc/apt/sources.list.d')).sort()) {
      if (f.endsWith('.list') || f.endsWith('.sources')) texts.push(await readFile(join('/etc/apt/sources.list.d', f), 'utf8'));
    }
  } catch {
    /* no sources.list.d: the definition must name a mirror (reported by the caller) */
  }
  for (const t of texts) {
    const m = /^URIs:\s*(http\S*\/debian)\/?\s*$/m.exec(t) ?? /^deb\s+(?:\[[^\]]*\]\s+)?(http\S*\/debian)\/?\s/m.exec(t);
    if (m) return m[1];
  }
  return undefined;
}

export async function gpgvVerify(signed: Buffer, keyring: string): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'scion-gpgv-'));
  try {
    const f = join(dir, 'InRelease');
    await writeFile(f, signed);
    // gpgv exits non-zero on a bad signature; its status lines say why either way
    const r = await run('gpgv', ['--keyring', keyring, '--status-fd', '1', f]).catch((e) => {
      if (e instanceof CommandError && e.code === 'E_COMMAND_MISSING')
        throw new ArchiveError('E_TOOL_MISSING', 'gpgv is not installed', { hint: 'apt-get install gpgv debian-archive-keyring', cause: e });
      if (e instanceof CommandError) {
        const out = e.cause as { stdout?: unknown; stderr?: unknown } | undefined;
        return { stdout: String(out?.stdout ?? ''), stderr: String(out?.stderr ?? '') };
      }
      throw e;
    });
    if (!/\[GNUPG:\] VALIDSIG/.test(r.stdout)) {
      const why = /BAD signature|NO_PUBKEY|no valid OpenPGP data/.exec(r.stderr + r.stdout)?.[0] ?? r.stderr.trim().split('\n').pop();
      throw new ArchiveError('E_SIGNATURE', `InRelease signature is not valid: ${why}`, {
        hint: `the mirror served a file not signed by a key in ${keyring}; check the mirror, or the keyring`,
      });
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export class DebianArchive {
  codename?: string;
  constructor(readonly opts: ArchiveOptions) {}

  private url(path: string) {
    return `${this.opts.mirror.replace(/\/$/, '')}/${path}`;
  }

  /** Fetch and verify InRelease; with no network, fall back to the last verified copy (verified again). */
  async release(): Promise<string> {
    const o = this.opts;
    const ref = o.cache.refPath(`inrelease-${o.mirror}-${o.suite}`);
    let signed: Buffer;
    try {
      signed = await download(this.url(`dists/${o.suite}/InRelease`), o.onProgress);
    } catch (e) {
      if ((e as ArchiveError).code !== 'E_NETWORK') throw e;
      try {
        signed = await readFile(ref);
      } catch {
        throw e;
      }
      o.log?.(`network unreachable: using the cached InRelease of ${o.suite}`);
    }
    await gpgvVerify(signed, o.keyring ?? DEFAULT_KEYRING);
    await atomicWrite(ref, signed, 0o644, { makeDirs: true });
    const body = clearsignedBody(signed.toString('utf8'));
    this.codename = parseStanzas(body)[0]?.['Codename'];
    return body;
  }

  async index(): Promise<PackageIndex> {
    const o = this.opts;
    const hashes = parseReleaseHashes(await this.release());
    const entries: PackageEntry[] = [];
    for (const comp of o.components) {
      const rel = `${comp}/binary-${o.architecture}/Packages.gz`;
      const want = hashes.get(rel);
      if (!want) throw new ArchiveError('E_INDEX_MISSING', `InRelease of ${o.suite} lists no ${rel}`, { hint: 'check the suite, component and architecture' });
      let gz = await o.cache.get(want.sha256);
      if (!gz) {
        gz = await download(this.url(`dists/${o.suite}/${rel}`), o.onProgress);
        if (sha256(gz) !== want.sha256)
          throw new ArchiveError('E_HASH_MISMATCH', `${rel} does not match the SHA-256 in InRelease`, { hint: 'the mirror may be mid-sync; try again later' });
        await o.cache.put(gz);
      }
      for (const st of parseStanzas(gunzipSync(gz).toString('utf8'))) entries.push(entryFromStanza(st));
    }
    return buildIndex(entries, o.architecture);
  }

  /** A .deb's bytes, from the cache or the mirror, always checked against its SHA-256. */
  async deb(p: { name: string; version: string; filename: string; sha256: string }): Promise<Buffer> {
    const o = this.opts;
    const cached = await o.cache.get(p.sha256);
    if (cached) return cached;
    const data = await download(this.url(p.filename), o.onProgress);
    if (sha256(data) !== p.sha256) {
      throw new ArchiveError('E_HASH_MISMATCH', `${p.name} ${p.version}: downloaded .deb does not match its SHA-256 (${p.sha256.slice(0, 12)}…)`, {
        hint: 'the mirror or a proxy served other bytes; the file was not used',
      });
    }
    await o.cache.put(data);
    return data;
  }
}
