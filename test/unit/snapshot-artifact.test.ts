/**
 * The template snapshot artifact (registry/snapshot-artifact.ts): the
 * manifest it makes, and what it refuses of a manifest or RAM index a
 * registry sends (untrusted). Pure.
 */
import { describe, expect, it } from 'vitest';
import {
  CHUNK_BYTES,
  CHUNK_MEDIA_TYPE,
  MAX_CHUNK_BLOB,
  SNAPSHOT_ARTIFACT_TYPE,
  checkSnapshotManifest,
  isZero,
  parseRamIndex,
  snapshotManifest,
} from '../../registry/snapshot-artifact.ts';
import { HIBERNATED_ARTIFACT_TYPE, MAX_RECORD_BYTES, checkHibernatedManifest, hibernatedManifest } from '../../registry/hibernated-artifact.ts';

const d = (c: string) => `sha256:${c.repeat(64)}`;
const files = [
  { name: 'state' as const, digest: d('1'), size: 100 },
  { name: 'kernel-stub' as const, digest: d('2'), size: 200 },
  { name: 'ram-index' as const, digest: d('3'), size: 300 },
];
const index = {
  chunkSize: CHUNK_BYTES,
  memBytes: 8 * CHUNK_BYTES,
  chunks: [
    { n: 0, digest: d('a'), size: 1000 },
    { n: 3, digest: d('b'), size: 2000 },
    { n: 5, digest: d('a'), size: 1000 }, // the same bytes twice: one blob
  ],
};
const manifest = () => snapshotManifest({ config: { digest: d('c'), size: 50 }, files, index, annotations: {} }) as any;

describe('a template snapshot artifact', () => {
  it('lists the record as config, the three files by title, and each distinct chunk once', () => {
    const m = manifest();
    expect(m.artifactType).toBe(SNAPSHOT_ARTIFACT_TYPE);
    expect(m.layers.filter((l: any) => l.mediaType === CHUNK_MEDIA_TYPE).map((l: any) => l.digest)).toEqual([d('a'), d('b')]);
    const checked = checkSnapshotManifest('r', m);
    expect(checked.files.state.digest).toBe(d('1'));
    expect([...checked.chunks]).toEqual([
      [d('a'), 1000],
      [d('b'), 2000],
    ]);
    expect(parseRamIndex('r', JSON.stringify(index), 8 * CHUNK_BYTES, checked.chunks).chunks).toHaveLength(3);
  });
  it('refuses a manifest of another type, a missing file, an unknown title, a bad digest, an oversized chunk', () => {
    expect(() => checkSnapshotManifest('r', { ...manifest(), artifactType: 'application/vnd.scion.image.v1' })).toThrow(/artifactType/);
    const m = manifest();
    expect(() => checkSnapshotManifest('r', { ...m, layers: m.layers.slice(1) })).toThrow(/has no state/);
    expect(() =>
      checkSnapshotManifest('r', {
        ...m,
        layers: [...m.layers, { mediaType: 'x', digest: d('e'), size: 1, annotations: { 'org.opencontainers.image.title': '../mem' } }],
      }),
    ).toThrow(/titled "..\/mem"/);
    expect(() => checkSnapshotManifest('r', { ...m, layers: [...m.layers, { mediaType: CHUNK_MEDIA_TYPE, digest: 'sha256:zz', size: 1 }] })).toThrow(
      /not sha256/,
    );
    expect(() =>
      checkSnapshotManifest('r', { ...m, layers: [...m.layers, { mediaType: CHUNK_MEDIA_TYPE, digest: d('f'), size: MAX_CHUNK_BLOB + 1 }] }),
    ).toThrow(/over/);
  });
  it('refuses an index that places a chunk outside the memory or twice, names a blob the manifest lacks, or has another chunk size', () => {
    const chunks = checkSnapshotManifest('r', manifest()).chunks;
    const with_ = (c: object) => JSON.stringify({ ...index, ...c });
    expect(() => parseRamIndex('r', with_({ chunks: [{ n: 8, digest: d('a'), size: 1000 }] }), 8 * CHUNK_BYTES, chunks)).toThrow(/outside the 8 chunks/);
    expect(() => parseRamIndex('r', with_({ chunks: [{ n: -1, digest: d('a'), size: 1000 }] }), 8 * CHUNK_BYTES, chunks)).toThrow(/outside/);
    expect(() => parseRamIndex('r', with_({ chunks: [index.chunks[0], index.chunks[0]] }), 8 * CHUNK_BYTES, chunks)).toThrow(/two chunks at 0/);
    expect(() => parseRamIndex('r', with_({ chunks: [{ n: 1, digest: d('9'), size: 1000 }] }), 8 * CHUNK_BYTES, chunks)).toThrow(/does not list/);
    expect(() => parseRamIndex('r', with_({ chunks: [{ n: 1, digest: d('a'), size: 999 }] }), 8 * CHUNK_BYTES, chunks)).toThrow(/does not list/);
    expect(() => parseRamIndex('r', with_({ chunkSize: 4096 }), 8 * CHUNK_BYTES, chunks)).toThrow(/chunk size/);
    expect(() => parseRamIndex('r', with_({}), 9 * CHUNK_BYTES, chunks)).toThrow(/the record says/);
  });
  it('tells a zero chunk from one with a single byte set anywhere', () => {
    const b = Buffer.alloc(CHUNK_BYTES);
    expect(isZero(b)).toBe(true);
    b[CHUNK_BYTES - 1] = 1;
    expect(isZero(b)).toBe(false);
    expect(isZero(Buffer.alloc(10))).toBe(true);
  });
});

describe('the hibernated clone artifact', () => {
  const good = () =>
    JSON.parse(
      JSON.stringify(
        hibernatedManifest({
          config: { digest: d('c'), size: 500 },
          state: { digest: d('5'), size: 6_000_000 },
          template: { digest: d('7'), size: 40_000 },
          annotations: {},
        }),
      ),
    );

  it('names its template as its subject and is read back as made', () => {
    const m = good();
    expect(m.artifactType).toBe(HIBERNATED_ARTIFACT_TYPE);
    expect(m.subject).toEqual({ mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: d('7'), size: 40_000 });
    const c = checkHibernatedManifest('r', m);
    expect(c.state.size).toBe(6_000_000);
    expect(c.template.digest).toBe(d('7'));
  });

  it.each([
    ['another artifact type', (m: any) => (m.artifactType = SNAPSHOT_ARTIFACT_TYPE), /artifactType/],
    ['no template', (m: any) => delete m.subject, /names no template/],
    ['a second layer', (m: any) => m.layers.push(m.layers[0]), /exactly one layer/],
    ['a state of another media type', (m: any) => (m.layers[0].mediaType = 'application/octet-stream'), /exactly one layer/],
    ['a record over its bound', (m: any) => (m.config.size = MAX_RECORD_BYTES + 1), /config: size/],
    ['a template digest that is not sha256', (m: any) => (m.subject.digest = 'md5:00'), /the template: digest/],
  ])('refuses a manifest with %s', (_what, spoil, why) => {
    const m = good();
    spoil(m);
    expect(() => checkHibernatedManifest('reg/app:c1', m)).toThrow(why);
  });
});
