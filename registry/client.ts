/**
 * A small OCI distribution client (distribution-spec 1.1): blob HEAD/GET,
 * monolithic and chunked uploads, manifests. Credentials come from the
 * Docker config file ($DOCKER_CONFIG/config.json, else ~/.docker/config.json):
 * Basic auth, or a Bearer token fetched from the realm the registry names.
 * Every failure is a RegistryError naming the registry and what to do.
 *
 * Bounded against a hostile or broken registry: every body is read with a
 * cap (error and token bodies a few KiB, manifests 4 MiB; a blob is checked
 * against the size its manifest states by the caller), and instead of a
 * whole-request time limit, which a large blob over a slow but healthy link
 * would hit, a stall limit: no byte for SCION_REGISTRY_STALL_S seconds
 * (default 30) fails the request (E_REGISTRY_STALLED).
 */
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ScionError, causeText } from '../common/errors.ts';
import { config } from '../common/config.ts';
import { registryBaseUrl, type Reference } from './reference.ts';

/** A registry that is unreachable, stalls, refuses, sends too much, or lacks the tag. */
export class RegistryError extends ScionError {}

export interface Credentials {
  username: string;
  password: string;
}

export function dockerConfigPath(env = process.env): string {
  return join(env.DOCKER_CONFIG || join(homedir(), '.docker'), 'config.json');
}

/** The credentials the Docker config holds for `registry` (keys may carry a scheme or a path). Pure over the file's text. */
export function credentialsFromConfig(text: string, registry: string): Credentials | undefined {
  let cfg: { auths?: unknown };
  try {
    cfg = JSON.parse(text);
  } catch {
    throw new RegistryError('E_DOCKER_CONFIG', 'the Docker config file is not valid JSON', { hint: 'fix or remove it; `docker login` writes it' });
  }
  const auths = cfg?.auths && typeof cfg.auths === 'object' ? cfg.auths : {};
  for (const [key, v] of Object.entries(auths as Record<string, { auth?: unknown; username?: unknown; password?: unknown } | undefined>)) {
    const host = key.replace(/^[a-z]+:\/\//, '').replace(/\/.*$/, '');
    if (host !== registry) continue;
    if (typeof v?.auth === 'string' && v.auth) {
      const plain = Buffer.from(v.auth, 'base64').toString('utf8');
      const i = plain.indexOf(':');
      if (i < 0) throw new RegistryError('E_DOCKER_CONFIG', `the Docker config's auth for ${registry} is not base64 of user:password`);
      return { username: plain.slice(0, i), password: plain.slice(i + 1) };
    }
    if (typeof v?.username === 'string' && typeof v?.password === 'string') return { username: v.username, password: v.password };
  }
  return undefined;
}

/** `Bearer realm="…",service="…",scope="…"` -> its parameters. Pure. */
export function parseChallenge(header: string): { scheme: string; params: Record<string, string> } {
  const m = /^(\w+)\s*(.*)$/s.exec(header.trim());
  const params: Record<string, string> = {};
  if (!m) return { scheme: '', params };
  for (const p of m[2].matchAll(/(\w+)="([^"]*)"/g)) params[p[1].toLowerCase()] = p[2];
  return { scheme: m[1].toLowerCase(), params };
}

export interface ClientOptions {
  insecure?: boolean;
  dockerConfig?: string;
  /** a response that sends no byte for this long fails (default: SCION_REGISTRY_STALL_S, 30 s) */
  stallMs?: number;
}

/** Caps on what scion reads of a response body it keeps in memory. */
export const BODY_CAPS = { error: 4 * 1024, token: 64 * 1024, manifest: 4 * 1024 * 1024 } as const;

/** An upload's answer may come only once its body is sent: allow this rate (bytes/s) on top of the stall limit. */
const SLOWEST_UPLOAD_BYTES_PER_S = 64 * 1024;

export class RegistryClient {
  readonly base: string;
  #auth?: string;
  #creds?: Credentials | null;
  /** requests sent, by kind: the tests count uploads */
  readonly counts = { blobUploads: 0, blobHeads: 0, blobGets: 0, chunks: 0 };

  constructor(
    readonly ref: Reference,
    private opts: ClientOptions = {},
  ) {
    this.base = registryBaseUrl(ref.registry, opts.insecure);
  }

  url(path: string): string {
    return `${this.base}/v2/${this.ref.repository}${path}`;
  }

  private async credentials(): Promise<Credentials | undefined> {
    if (this.#creds !== undefined) return this.#creds ?? undefined;
    const path = this.opts.dockerConfig ?? dockerConfigPath();
    let text: string | undefined;
    try {
      text = await readFile(path, 'utf8');
    } catch {
      /* no config: anonymous */
    }
    this.#creds = text === undefined ? null : (credentialsFromConfig(text, this.ref.registry) ?? null);
    return this.#creds ?? undefined;
  }

  private async authenticate(res: Response, scope: string): Promise<void> {
    const { scheme, params } = parseChallenge(res.headers.get('www-authenticate') ?? '');
    const creds = await this.credentials();
    const basic = creds && `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}`;
    if (scheme === 'basic') {
      if (!basic) throw this.denied(401, 'asks for credentials and the Docker config has none for it');
      this.#auth = basic;
      return;
    }
    if (scheme === 'bearer' && params.realm) {
      const u = new URL(params.realm);
      if (params.service) u.searchParams.set('service', params.service);
      u.searchParams.set('scope', params.scope ?? `repository:${this.ref.repository}:${scope}`);
      const t = await this.fetch(u.toString(), { headers: basic ? { authorization: basic } : {} });
      if (t.status === 401 || t.status === 403) {
        await t.body?.cancel();
        throw this.denied(t.status, basic ? 'refused the credentials in the Docker config' : 'gives no anonymous token');
      }
      if (!t.ok) {
        await t.body?.cancel();
        throw new RegistryError('E_REGISTRY_HTTP', `${this.ref.registry}: token service answered HTTP ${t.status}`);
      }
      let body: { token?: unknown; access_token?: unknown };
      try {
        body = JSON.parse((await this.readCapped(t, BODY_CAPS.token, "the token service's answer")).toString('utf8'));
      } catch (e) {
        if (e instanceof RegistryError) throw e;
        throw new RegistryError('E_REGISTRY_HTTP', `${this.ref.registry}: the token service's answer is not JSON`);
      }
      const token = typeof body?.token === 'string' ? body.token : typeof body?.access_token === 'string' ? body.access_token : undefined;
      if (!token) throw new RegistryError('E_REGISTRY_HTTP', `${this.ref.registry}: the token service sent no token`);
      this.#auth = `Bearer ${token}`;
      return;
    }
    throw this.denied(401, `asks for an authentication scheme scion does not speak (${scheme || 'none named'})`);
  }

  private denied(status: number, why: string): RegistryError {
    const code = status === 403 ? 'E_REGISTRY_DENIED' : 'E_REGISTRY_AUTH';
    return new RegistryError(code, `${this.ref.registry}/${this.ref.repository}: HTTP ${status}: the registry ${why}`, {
      hint:
        status === 403
          ? 'the account has no access to this repository (push needs write access)'
          : this.#auth
            ? `check the user name and password for ${this.ref.registry} in ${this.opts.dockerConfig ?? dockerConfigPath()}`
            : `put credentials for ${this.ref.registry} in ${this.opts.dockerConfig ?? dockerConfigPath()} (\`docker login ${this.ref.registry}\` or an "auths" entry)`,
    });
  }

  private get stallMs(): number {
    return this.opts.stallMs ?? config().registryStallMs;
  }

  private stalled(what: string): RegistryError {
    return new RegistryError('E_REGISTRY_STALLED', `${this.ref.registry}: ${what}: no data for ${this.stallMs / 1000} s`, {
      hint: 'the registry or the link to it stalled; try again (SCION_REGISTRY_STALL_S sets the limit)',
    });
  }

  /** One HTTP exchange: the answer's headers must come within the stall limit (plus the upload's time at the slowest rate allowed). */
  private async fetch(url: string, init: Omit<RequestInit, 'body'> & { body?: Uint8Array | string }): Promise<Response> {
    const ctrl = new AbortController();
    const bodyBytes = init.body === undefined ? 0 : typeof init.body === 'string' ? Buffer.byteLength(init.body) : init.body.length;
    const limit = this.stallMs + Math.ceil(bodyBytes / SLOWEST_UPLOAD_BYTES_PER_S) * 1000;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ctrl.abort();
    }, limit);
    try {
      const res = await fetch(url, { ...init, body: init.body as BodyInit | undefined, signal: ctrl.signal });
      this.#controllers.set(res, ctrl);
      return res;
    } catch (e) {
      if (timedOut) throw this.stalled(`${init.method ?? 'GET'} ${url.split('?')[0]}: no answer`);
      const cause = causeText(e);
      throw new RegistryError('E_REGISTRY_UNREACHABLE', `cannot reach the registry ${this.ref.registry} (${url.split('?')[0]}): ${cause}`, {
        hint: `check the address and that the registry runs${this.base.startsWith('https') ? '; for a plain-HTTP registry not on loopback pass --insecure' : ''}`,
        cause: e,
      });
    } finally {
      clearTimeout(timer);
    }
  }

  /** Each response's abort handle: a stalled body read aborts its connection. */
  #controllers = new WeakMap<Response, AbortController>();

  /**
   * A response body as it arrives, each chunk within the stall limit of the
   * one before. A failed or stalled read is a RegistryError; the connection
   * is aborted then, and when the caller stops early.
   */
  async *stream(res: Response, what: string): AsyncGenerator<Uint8Array> {
    if (!res.body) return;
    const reader = res.body.getReader();
    const abort = () => {
      this.#controllers.get(res)?.abort();
      reader.cancel().catch(() => undefined);
    };
    let done = false;
    try {
      for (;;) {
        let timer: NodeJS.Timeout | undefined;
        const stall = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(this.stalled(what)), this.stallMs);
        });
        let r: ReadableStreamReadResult<Uint8Array>;
        try {
          r = await Promise.race([reader.read(), stall]);
        } catch (e) {
          if (e instanceof RegistryError) throw e;
          throw new RegistryError('E_REGISTRY_UNREACHABLE', `${this.ref.registry}: ${what}: the connection failed (${causeText(e)})`, {
            hint: 'try again',
            cause: e,
          });
        } finally {
          clearTimeout(timer);
        }
        if (r.done) {
          done = true;
          return;
        }
        yield r.value;
      }
    } finally {
      if (!done) abort();
    }
  }

  /**
   * A whole body, at most `cap` bytes: past it E_REGISTRY_RESPONSE_TOO_LARGE,
   * or with `truncate` its first `cap` bytes (the rest is not read).
   */
  async readCapped(res: Response, cap: number, what: string, o: { truncate?: boolean } = {}): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let n = 0;
    for await (const c of this.stream(res, what)) {
      chunks.push(Buffer.from(c));
      n += c.length;
      if (n <= cap) continue;
      if (o.truncate) return Buffer.concat(chunks).subarray(0, cap);
      throw new RegistryError('E_REGISTRY_RESPONSE_TOO_LARGE', `${this.ref.registry}: ${what} is larger than ${cap} bytes`, {
        hint: 'the registry answers with more than a registry sends; check its address',
      });
    }
    return Buffer.concat(chunks);
  }

  /** A request with auth: a 401 is answered once (credentials or a token), then retried. */
  async request(
    method: string,
    url: string,
    init: { headers?: Record<string, string>; body?: Uint8Array | string; scope?: 'pull' | 'pull,push' } = {},
  ): Promise<Response> {
    const scope = init.scope ?? 'pull';
    for (let attempt = 0; ; attempt++) {
      const headers: Record<string, string> = { ...init.headers, ...(this.#auth ? { authorization: this.#auth } : {}) };
      const res = await this.fetch(url, { method, headers, body: init.body, redirect: 'follow' });
      if (res.status === 401 && attempt === 0) {
        await res.body?.cancel();
        await this.authenticate(res, scope);
        continue;
      }
      if (res.status === 403) {
        await res.body?.cancel();
        throw this.denied(403, this.#auth ? 'denies these credentials access to the repository' : 'denies anonymous access to the repository');
      }
      if (res.status === 401) {
        await res.body?.cancel();
        throw this.denied(401, this.#auth ? 'refused the credentials in the Docker config' : 'needs credentials');
      }
      return res;
    }
  }

  async hasBlob(digest: string): Promise<boolean> {
    this.counts.blobHeads++;
    const res = await this.request('HEAD', this.url(`/blobs/${digest}`), { scope: 'pull,push' });
    if (res.status === 200) return true;
    if (res.status === 404) return false;
    throw await this.httpError(res, `HEAD blob ${digest}`);
  }

  /** Upload one blob: in one request when small, else POST, a PATCH per chunk, PUT with the digest. */
  async uploadBlob(data: Buffer, digest: string, chunkBytes: number): Promise<void> {
    this.counts.blobUploads++;
    const start = await this.request('POST', this.url('/blobs/uploads/'), { scope: 'pull,push' });
    if (start.status !== 202) throw await this.httpError(start, 'start a blob upload');
    let location = this.location(start);
    await start.body?.cancel();
    if (data.length > chunkBytes) {
      for (let off = 0; off < data.length; off += chunkBytes) {
        const chunk = data.subarray(off, Math.min(off + chunkBytes, data.length));
        this.counts.chunks++;
        const res = await this.request('PATCH', location, {
          scope: 'pull,push',
          body: chunk,
          headers: { 'content-type': 'application/octet-stream', 'content-range': `${off}-${off + chunk.length - 1}`, 'content-length': String(chunk.length) },
        });
        if (res.status !== 202) throw await this.httpError(res, `upload bytes ${off}-${off + chunk.length - 1} of ${digest}`);
        location = this.location(res);
        await res.body?.cancel();
      }
      const done = await this.request('PUT', withDigest(location, digest), { scope: 'pull,push', headers: { 'content-length': '0' } });
      if (done.status !== 201) throw await this.httpError(done, `finish the upload of ${digest}`);
      await done.body?.cancel();
      return;
    }
    const res = await this.request('PUT', withDigest(location, digest), {
      scope: 'pull,push',
      body: data,
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(data.length) },
    });
    if (res.status !== 201) throw await this.httpError(res, `upload ${digest}`);
    await res.body?.cancel();
  }

  /** A blob's body (the caller checks size and digest as it reads). */
  async getBlob(digest: string): Promise<Response> {
    this.counts.blobGets++;
    const res = await this.request('GET', this.url(`/blobs/${digest}`));
    if (res.status === 404) {
      await res.body?.cancel();
      throw new RegistryError('E_BLOB_UNKNOWN', `${this.ref.registry}/${this.ref.repository}: blob ${digest} is not in the registry`, {
        hint: 'the artifact is incomplete; push it again',
      });
    }
    if (!res.ok) throw await this.httpError(res, `GET blob ${digest}`);
    return res;
  }

  async putManifest(reference: string, body: string, mediaType: string): Promise<string | undefined> {
    const res = await this.request('PUT', this.url(`/manifests/${reference}`), { scope: 'pull,push', body, headers: { 'content-type': mediaType } });
    if (res.status !== 201) throw await this.httpError(res, `PUT manifest ${reference}`);
    await res.body?.cancel();
    return res.headers.get('docker-content-digest') ?? undefined;
  }

  /** The manifest's bytes (at most 4 MiB) and the digest the registry states for it. */
  async getManifest(reference: string, accept: string): Promise<{ bytes: Buffer; statedDigest?: string }> {
    const res = await this.request('GET', this.url(`/manifests/${reference}`), { headers: { accept } });
    if (res.status === 404) {
      await res.body?.cancel();
      throw new RegistryError('E_UNKNOWN_TAG', `${this.ref.registry}/${this.ref.repository}: no manifest ${reference} (unknown tag or digest)`, {
        hint: `list what exists with: skopeo list-tags docker://${this.ref.registry}/${this.ref.repository}`,
      });
    }
    if (!res.ok) throw await this.httpError(res, `GET manifest ${reference}`);
    const bytes = await this.readCapped(res, BODY_CAPS.manifest, `manifest ${reference}`);
    return { bytes, statedDigest: res.headers.get('docker-content-digest') ?? undefined };
  }

  private location(res: Response): string {
    const loc = res.headers.get('location');
    if (!loc) throw new RegistryError('E_REGISTRY_HTTP', `${this.ref.registry}: an upload answer has no Location header`);
    return new URL(loc, this.base).toString();
  }

  private async httpError(res: Response, what: string): Promise<RegistryError> {
    // the body only helps explain the status: read its first few KiB, never more
    let text = '';
    try {
      text = (await this.readCapped(res, BODY_CAPS.error, `${what} (error body)`, { truncate: true })).toString('utf8').slice(0, 300);
    } catch {
      // an unreadable error body: the status says enough
    }
    let detail = text;
    try {
      const j = JSON.parse(text);
      if (Array.isArray(j.errors)) detail = j.errors.map((e: { code?: unknown; message?: unknown }) => `${e?.code}: ${e?.message}`).join('; ');
    } catch {
      /* not JSON: shown as text */
    }
    return new RegistryError('E_REGISTRY_HTTP', `${this.ref.registry}/${this.ref.repository}: ${what}: HTTP ${res.status}${detail ? ` (${detail})` : ''}`);
  }
}

function withDigest(location: string, digest: string): string {
  const u = new URL(location);
  u.searchParams.set('digest', digest);
  return u.toString();
}
