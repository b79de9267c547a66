/**
 * A hibernated clone as one OCI artifact of its own artifactType: the
 * clone's portable record as the config, its saved state (the device state
 * and the RAM pages that differ from its template, gzip) as the one layer,
 * and its template named by reference: `subject` is the template snapshot's
 * manifest, pushed by digest to the same repository (image-spec 1.1: an
 * artifact about another manifest). The template's blobs are the template
 * snapshot's own, so a clone's push sends its template once per registry.
 * Pure: building the manifest, and checking what a registry sent.
 */
import { ScionError } from '../common/errors.ts';
import type { Descriptor } from './artifact.ts';
import { MANIFEST_MEDIA_TYPE, TITLE } from './artifact.ts';

export const HIBERNATED_ARTIFACT_TYPE = 'application/vnd.scion.hibernated.v1';
export const HIBERNATED_CONFIG_TYPE = 'application/vnd.scion.hibernated.record.v1+json';
export const HIBERNATED_STATE_TYPE = 'application/vnd.scion.hibernated.state.v1+gzip';
/** The record's bound; a saved state's (compressed; the cut stream is a few MiB, a stream kept whole is the guest's RAM at most). */
export const MAX_RECORD_BYTES = 64 * 1024;
export const MAX_STATE_BLOB = 64 * 1024 ** 3;

export class HibernatedError extends ScionError {}

/** The manifest of a hibernated clone: record, saved state, its template as subject. Pure. */
export function hibernatedManifest(o: {
  config: { digest: string; size: number };
  state: { digest: string; size: number };
  template: { digest: string; size: number };
  annotations: Record<string, string>;
}): object {
  return {
    schemaVersion: 2,
    mediaType: MANIFEST_MEDIA_TYPE,
    artifactType: HIBERNATED_ARTIFACT_TYPE,
    config: { mediaType: HIBERNATED_CONFIG_TYPE, ...o.config },
    layers: [{ mediaType: HIBERNATED_STATE_TYPE, ...o.state, annotations: { [TITLE]: 'state' } }],
    subject: { mediaType: MANIFEST_MEDIA_TYPE, ...o.template },
    annotations: o.annotations,
  };
}

const DIGEST = /^sha256:[a-f0-9]{64}$/;

/** A hibernated clone's manifest a registry sent, checked: ours, one state layer, a template subject, sizes bounded. Pure. */
export function checkHibernatedManifest(ref: string, raw: unknown): { config: Descriptor; state: Descriptor; template: Descriptor } {
  const bad = (why: string) => new HibernatedError('E_NOT_SCION_SNAPSHOT', `${ref}: ${why}`, { hint: 'push it with `scion push <hibernated clone> <ref>`' });
  const m = raw as { schemaVersion?: number; artifactType?: string; config?: Descriptor; layers?: Descriptor[]; subject?: Descriptor };
  if (!m || typeof m !== 'object' || m.schemaVersion !== 2 || !Array.isArray(m.layers)) throw bad('not an OCI image manifest');
  if (m.artifactType !== HIBERNATED_ARTIFACT_TYPE) throw bad(`artifactType is ${JSON.stringify(m.artifactType)}, not ${HIBERNATED_ARTIFACT_TYPE}`);
  const sized = (d: Descriptor | undefined, max: number, what: string) => {
    if (!d || typeof d.digest !== 'string' || !DIGEST.test(d.digest)) throw bad(`${what}: digest ${JSON.stringify(d?.digest)} is not sha256:<hex>`);
    if (!Number.isSafeInteger(d.size) || d.size < 0 || d.size > max) throw bad(`${what}: size ${JSON.stringify(d.size)} is over ${max} bytes`);
    return { mediaType: d.mediaType, digest: d.digest, size: d.size };
  };
  if (m.config?.mediaType !== HIBERNATED_CONFIG_TYPE) throw bad(`its config is ${JSON.stringify(m.config?.mediaType)}, not ${HIBERNATED_CONFIG_TYPE}`);
  if (m.layers.length !== 1 || m.layers[0]?.mediaType !== HIBERNATED_STATE_TYPE)
    throw bad(`it must have exactly one layer, the saved state (${HIBERNATED_STATE_TYPE})`);
  if (m.subject?.mediaType !== MANIFEST_MEDIA_TYPE) throw bad("it names no template (its subject must be the template snapshot's manifest)");
  return {
    config: sized(m.config, MAX_RECORD_BYTES, 'config'),
    state: sized(m.layers[0], MAX_STATE_BLOB, 'the saved state'),
    // a template manifest lists its chunks: a few hundred KiB for the largest guest
    template: sized(m.subject, 4 * 1024 * 1024, 'the template'),
  };
}
