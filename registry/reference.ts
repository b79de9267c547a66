/**
 * OCI references: `registry[:port]/repository[:tag][@sha256:hex]`. Pure. The
 * grammar is the distribution spec's (repository components, tags of at most
 * 128 characters); anything else is refused before a byte goes on the wire.
 */
import { ScionError } from '../common/errors.ts';

/** A parsed image reference: registry, repository, tag and/or digest. */
export interface Reference {
  registry: string; // host[:port]
  repository: string;
  tag?: string;
  digest?: string;
}

const COMPONENT = '[a-z0-9]+(?:(?:\\.|_|__|-+)[a-z0-9]+)*';
const REPOSITORY = new RegExp(`^${COMPONENT}(?:/${COMPONENT})*$`);
const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;
const HOST = /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$/;

export class ImageReferenceError extends ScionError {
  constructor(ref: string, problem: string) {
    super('E_IMAGE_REF', `image reference ${JSON.stringify(ref)}: ${problem}`, {
      hint: 'use registry/repository:tag, e.g. 127.0.0.1:5000/scion/web:1.0, or …@sha256:<digest>',
    });
  }
}

/** An image reference (`host[:port]/repo[:tag][@sha256:…]`) parsed and checked, or a clear error. */
export function parseReference(ref: string): Reference {
  if (ref.length > 512) throw new ImageReferenceError(ref.slice(0, 40) + '…', 'longer than 512 characters');
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw new ImageReferenceError(ref, `digest ${JSON.stringify(digest)} is not sha256:<64 hex digits>`);
  }
  const slash = rest.indexOf('/');
  if (slash <= 0) throw new ImageReferenceError(ref, 'no registry: it must start with a registry host (and port), then a "/"');
  const registry = rest.slice(0, slash);
  let path = rest.slice(slash + 1);
  if (!HOST.test(registry)) throw new ImageReferenceError(ref, `registry ${JSON.stringify(registry)} is not a host name or [IPv6] with an optional port`);
  let tag: string | undefined;
  const colon = path.lastIndexOf(':');
  if (colon >= 0) {
    tag = path.slice(colon + 1);
    path = path.slice(0, colon);
  }
  if (!REPOSITORY.test(path))
    throw new ImageReferenceError(ref, `repository ${JSON.stringify(path)}: use lower-case components of a-z, 0-9 and . _ - separated by "/"`);
  if (tag !== undefined && !TAG.test(tag))
    throw new ImageReferenceError(ref, `tag ${JSON.stringify(tag)}: 1-128 of A-Z a-z 0-9 _ . -, not starting with . or -`);
  if (tag === undefined && digest === undefined) throw new ImageReferenceError(ref, 'name a tag (:1.0) or a digest (@sha256:…)');
  return { registry, repository: path, tag, digest };
}

/** Whether a command-line argument is meant as a reference (and not a path): it parses, and no such file exists (checked by the caller). */
export function looksLikeReference(arg: string): boolean {
  try {
    parseReference(arg);
    return true;
  } catch {
    return false;
  }
}

export function formatReference(r: Reference): string {
  return `${r.registry}/${r.repository}${r.tag ? `:${r.tag}` : ''}${r.digest ? `@${r.digest}` : ''}`;
}

/** Plain HTTP only for loopback (as docker does) or when asked for. */
export function registryBaseUrl(registry: string, insecure = false): string {
  const host = registry.replace(/:\d+$/, '');
  const loopback = host === 'localhost' || /^127\./.test(host) || host === '[::1]';
  return `${loopback || insecure ? 'http' : 'https'}://${registry}`;
}
