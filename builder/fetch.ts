/** HTTP downloads with progress and typed failures. */
import { ArchiveError, causeText } from '../common/errors.ts';

export type Progress = (ev: { url: string; received: number; total?: number; done: boolean; ms: number }) => void;

export async function download(url: string, onProgress?: Progress, timeoutMs = 120_000): Promise<Buffer> {
  const t0 = performance.now();
  let res: Response;
  try {
    res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  } catch (e) {
    const cause = rootCode(e) ?? causeText(e);
    throw new ArchiveError('E_NETWORK', `cannot fetch ${url}: ${cause}`, {
      hint: 'the network or the mirror is unreachable; a build whose inputs are all cached (with scion.lock) needs no network',
      cause: e,
    });
  }
  if (!res.ok) throw new ArchiveError('E_HTTP', `fetching ${url} failed: HTTP ${res.status} ${res.statusText}`);
  const total = Number(res.headers.get('content-length')) || undefined;
  const chunks: Buffer[] = [];
  let received = 0;
  let last = 0;
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    chunks.push(Buffer.from(chunk));
    received += chunk.length;
    const now = performance.now();
    if (onProgress && now - last > 250) {
      last = now;
      onProgress({ url, received, total, done: false, ms: now - t0 });
    }
  }
  onProgress?.({ url, received, total, done: true, ms: performance.now() - t0 });
  return Buffer.concat(chunks);
}

/** The errno-style code at the bottom of fetch's error chain (ECONNREFUSED, ENOTFOUND, ...). */
function rootCode(x: unknown, depth = 0): string | undefined {
  const e = x as { code?: unknown; cause?: unknown; errors?: unknown[] } | undefined;
  if (!e || depth > 5) return undefined;
  if (typeof e.code === 'string' && /^E[A-Z]+$/.test(e.code)) return e.code;
  return rootCode(e.cause, depth + 1) ?? (Array.isArray(e.errors) ? rootCode(e.errors[0], depth + 1) : undefined);
}
