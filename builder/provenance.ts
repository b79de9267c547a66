/**
 * The build's provenance: an in-toto Statement v1 whose predicate is SLSA
 * Provenance v1. Pure and deterministic: no timestamps, no invocation id, no
 * host names; what the build read is named by digest. Sign it with any
 * in-toto tool, e.g. `cosign attest-blob --type slsaprovenance1 --predicate …`
 * (README: "In CI").
 */

export const BUILD_TYPE = 'https://scion.dev/buildtypes/image/v1';
export const BUILDER_ID = 'https://scion.dev/builder/scion-build';

export interface ProvenanceInput {
  image: string;
  scionVersion: string;
  outputs: { name: string; sha256: string }[];
  definition: { path: string; sha256: string };
  lock: { path: string; sha256: string };
  compression: string;
  sourceDateEpoch: number;
  mirror: string;
  suite: string;
  codename: string;
  architecture: string;
  packages: { name: string; version: string; filename: string; sha256: string }[];
  containerImages: { name: string; path: string; layers: { digest: string }[] }[];
  userFiles: { path: string; source?: string; sha256: string }[];
}

export function provenanceJson(i: ProvenanceInput): string {
  const mirror = i.mirror.replace(/\/+$/, '');
  const byUri = new Map<string, { uri: string; name?: string; digest: Record<string, string>; annotations?: Record<string, string> }>();
  for (const p of i.packages)
    byUri.set(`${mirror}/${p.filename}`, { uri: `${mirror}/${p.filename}`, name: `${p.name}_${p.version}`, digest: { sha256: p.sha256 } });
  const layers = i.containerImages.flatMap((c) =>
    c.layers.map((l) => ({ uri: `oci-layout:${c.path}@${l.digest}`, name: `${c.name} layer`, digest: { sha256: l.digest.replace(/^sha256:/, '') } })),
  );
  const files = i.userFiles.filter((f) => f.source).map((f) => ({ uri: `file:${f.source}`, name: f.path, digest: { sha256: f.sha256 } }));
  const statement = {
    _type: 'https://in-toto.io/Statement/v1',
    subject: [...i.outputs].sort((a, b) => (a.name < b.name ? -1 : 1)).map((o) => ({ name: `${i.image}/${o.name}`, digest: { sha256: o.sha256 } })),
    predicateType: 'https://slsa.dev/provenance/v1',
    predicate: {
      buildDefinition: {
        buildType: BUILD_TYPE,
        externalParameters: {
          definition: { path: i.definition.path, digest: { sha256: i.definition.sha256 } },
          lock: { path: i.lock.path, digest: { sha256: i.lock.sha256 } },
          compression: i.compression,
        },
        internalParameters: { sourceDateEpoch: i.sourceDateEpoch, debian: { suite: i.suite, codename: i.codename, architecture: i.architecture } },
        resolvedDependencies: [
          { uri: i.definition.path, digest: { sha256: i.definition.sha256 } },
          { uri: i.lock.path, digest: { sha256: i.lock.sha256 } },
          ...[...byUri.values()].sort((a, b) => (a.uri < b.uri ? -1 : 1)),
          ...layers,
          ...files,
        ],
      },
      runDetails: {
        builder: { id: BUILDER_ID, version: { scion: i.scionVersion } },
        metadata: {},
      },
    },
  };
  return JSON.stringify(statement, null, 2) + '\n';
}
