/**
 * .deb extraction: the ar container, then data.tar.{xz,zst,gz,none} through
 * tar-stream. xz and zstd are decompressed by the host's xz/zstd tools
 * (Node has neither built in); gzip by zlib.
 */
import { runBuffer, CommandError } from '../../common/run.ts';
import { gunzipSync } from 'node:zlib';
import tar from 'tar-stream';
import { ArchiveError } from '../../common/errors.ts';

export interface ArMember {
  name: string;
  data: Buffer;
}

export function parseAr(buf: Buffer): ArMember[] {
  if (buf.subarray(0, 8).toString('latin1') !== '!<arch>\n') throw new ArchiveError('E_DEB_FORMAT', 'not an ar archive (bad magic)');
  const out: ArMember[] = [];
  let off = 8;
  while (off + 60 <= buf.length) {
    const hdr = buf.subarray(off, off + 60).toString('latin1');
    const name = hdr.slice(0, 16).trim().replace(/\/$/, '');
    const size = parseInt(hdr.slice(48, 58).trim(), 10);
    if (hdr.slice(58, 60) !== '`\n' || !Number.isFinite(size)) throw new ArchiveError('E_DEB_FORMAT', `corrupt ar header at offset ${off}`);
    const start = off + 60;
    if (start + size > buf.length) throw new ArchiveError('E_DEB_FORMAT', `ar member ${name} is truncated`);
    out.push({ name, data: buf.subarray(start, start + size) });
    off = start + size + (size % 2);
  }
  return out;
}

/** Decompress through a Debian tool; a missing tool or a failure is a typed error naming it. */
async function pipeThrough(cmd: string, args: string[], input: Buffer): Promise<Buffer> {
  try {
    return await runBuffer(cmd, args, input, { code: 'E_DECOMPRESS', what: `${cmd} ${args.join(' ')}` });
  } catch (e) {
    if (e instanceof CommandError && e.code === 'E_COMMAND_MISSING') throw new ArchiveError('E_TOOL_MISSING', e.message, { hint: e.hint, cause: e });
    throw e;
  }
}

export async function decompress(name: string, data: Buffer): Promise<Buffer> {
  if (name.endsWith('.xz')) return pipeThrough('xz', ['-dc'], data);
  if (name.endsWith('.zst')) return pipeThrough('zstd', ['-dc'], data);
  if (name.endsWith('.gz')) return gunzipSync(data);
  return data;
}

export interface TarEntry {
  path: string; // absolute, normalised, no trailing slash
  type: 'file' | 'directory' | 'symlink' | 'link';
  mode: number;
  data?: Buffer;
  linkname?: string;
}

export function normalisePath(p: string): string {
  const parts: string[] = [];
  for (const seg of p.split('/')) {
    if (!seg || seg === '.') continue;
    if (seg === '..') parts.pop();
    else parts.push(seg);
  }
  return '/' + parts.join('/');
}

export function readTar(buf: Buffer): Promise<TarEntry[]> {
  return new Promise((resolve, reject) => {
    const ex = tar.extract();
    const out: TarEntry[] = [];
    ex.on('entry', (h, stream, next) => {
      const chunks: Buffer[] = [];
      stream.on('data', (c: unknown) => chunks.push(c as Buffer));
      stream.on('end', () => {
        const type =
          h.type === 'file' || h.type === 'contiguous-file'
            ? 'file'
            : h.type === 'directory'
              ? 'directory'
              : h.type === 'symlink'
                ? 'symlink'
                : h.type === 'link'
                  ? 'link'
                  : undefined;
        if (type)
          out.push({
            path: normalisePath(h.name),
            type,
            mode: (h.mode ?? 0o644) & 0o7777,
            data: type === 'file' ? Buffer.concat(chunks) : undefined,
            linkname: h.linkname ?? undefined,
          });
        next();
      });
      stream.resume();
    });
    ex.on('finish', () => resolve(out));
    ex.on('error', (e) => reject(new ArchiveError('E_DEB_FORMAT', `corrupt tar stream: ${e.message}`)));
    ex.end(buf);
  });
}

/** The .deb's data.tar, decompressed. */
export async function debDataTar(deb: Buffer, label = 'package'): Promise<Buffer> {
  const data = parseAr(deb).find((m) => m.name.startsWith('data.tar'));
  if (!data) throw new ArchiveError('E_DEB_FORMAT', `${label}: no data.tar member in the .deb`);
  return decompress(data.name, data.data);
}

/** The files of a decompressed data.tar, in archive order; hard links get their target's bytes. */
export async function dataTarEntries(tarBytes: Buffer): Promise<TarEntry[]> {
  const entries = await readTar(tarBytes);
  // hard links in a data.tar point at an earlier path; give them its bytes
  const byPath = new Map(entries.map((e) => [e.path, e]));
  for (const e of entries) {
    if (e.type === 'link') {
      const target = byPath.get(normalisePath(e.linkname!));
      if (target?.data) {
        e.type = 'file';
        e.data = target.data;
        e.mode = target.mode;
      }
    }
  }
  return entries;
}

/** The files of a .deb's data.tar, in archive order. */
export async function extractDeb(deb: Buffer, label = 'package'): Promise<TarEntry[]> {
  return dataTarEntries(await debDataTar(deb, label));
}

/** The package's own control stanza (control.tar's ./control): Package, Version, Architecture, Depends… */
export async function readControl(deb: Buffer, label = 'package'): Promise<Record<string, string>> {
  const { parseStanzas } = await import('./control.ts');
  const control = parseAr(deb).find((m) => m.name.startsWith('control.tar'));
  if (!control) throw new ArchiveError('E_DEB_FORMAT', `${label}: no control.tar member in the .deb`);
  const entries = await readTar(await decompress(control.name, control.data));
  const file = entries.find((e) => e.path === '/control');
  if (!file?.data) throw new ArchiveError('E_DEB_FORMAT', `${label}: control.tar has no control file`);
  return parseStanzas(file.data.toString('utf8'))[0] ?? {};
}
