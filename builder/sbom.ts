/**
 * The image's CycloneDX 1.6 SBOM, through @cyclonedx/cyclonedx-library. Pure:
 * the same inputs give the same bytes (lists sorted by the library's
 * normaliser, the timestamp is SOURCE_DATE_EPOCH, the serial number is
 * derived from the content).
 *
 * What it lists: every package of the lock (one component per name+version,
 * whichever sets it is in), the agent's Node runtime, the agent bundle, each
 * container and, for containers from OCI images, each layer by digest. The
 * relations: image -> the roots of each set, the bundle and the containers;
 * package -> the packages of its own set its Depends/Pre-Depends name;
 * container -> its root packages or its layers; bundle -> runtime.
 */
import { createHash } from 'node:crypto';
import * as CDX from '@cyclonedx/cyclonedx-library';
import { PackageURL } from 'packageurl-js';
import { parseDepends } from './debian/control.ts';

export interface SbomPackage {
  name: string;
  version: string;
  architecture: string;
  sha256: string;
  /** names in the same set that its Depends and Pre-Depends resolved to */
  depends: string[];
}

export interface SbomInput {
  image: string;
  scionVersion: string;
  codename: string;
  sourceDateEpoch: number;
  /** set name (guest, kernel, container:web) -> roots and packages */
  sets: Record<string, { roots: string[]; packages: SbomPackage[] }>;
  /** the agent's runtime: a package of the guest set */
  runtime: { package: string; version: string };
  agentBundleSha256: string;
  containers: { name: string; set?: string; layers?: { digest: string; size: number; mediaType: string }[] }[];
}

/** Architecture from a pool file name: pool/main/b/busybox/busybox-static_1.37.0-6+b9_amd64.deb -> amd64. */
export function debArchitecture(filename: string): string {
  const m = /_([a-z0-9-]+)\.u?deb$/.exec(filename);
  if (!m) throw new Error(`cannot read the architecture from ${filename}`);
  return m[1];
}

/** Depends + Pre-Depends of a control stanza, each group resolved to the first alternative present in `available` (or that a present package Provides). */
export function resolvedDepends(control: Record<string, string>, available: Map<string, string[]>): string[] {
  const out = new Set<string>();
  const groups = [...parseDepends(control['Pre-Depends']), ...parseDepends(control['Depends'])];
  for (const g of groups) {
    for (const alt of g) {
      if (available.has(alt.name)) {
        out.add(alt.name);
        break;
      }
      const provider = [...available].find(([, provides]) => provides.includes(alt.name));
      if (provider) {
        out.add(provider[0]);
        break;
      }
    }
  }
  return [...out].sort();
}

export function debPurl(p: { name: string; version: string; architecture: string }, codename: string): string {
  return new PackageURL('deb', 'debian', p.name, p.version, { arch: p.architecture, distro: codename }, undefined).toString();
}

export function sbomJson(input: SbomInput): string {
  const { Models, Enums, Spec, Serialize } = CDX;
  const bom = new Models.Bom();
  const ref = new Map<string, CDX.Models.Component>();
  const sha256 = (c: CDX.Models.Component, hex: string) => c.hashes.set(Enums.HashAlgorithm['SHA-256'], hex);

  const image = new Models.Component(Enums.ComponentType.OperatingSystem, input.image, { bomRef: `image:${input.image}` });
  bom.metadata.component = image;
  bom.metadata.timestamp = new Date(input.sourceDateEpoch * 1000);
  bom.metadata.tools.components.add(new Models.Component(Enums.ComponentType.Application, 'scion', { version: input.scionVersion, bomRef: 'tool:scion' }));

  const pkgRef = (name: string, version: string) => `deb:${name}@${version}`;
  for (const set of Object.values(input.sets)) {
    for (const p of set.packages) {
      const r = pkgRef(p.name, p.version);
      if (ref.has(r)) continue;
      const c = new Models.Component(Enums.ComponentType.Library, p.name, { bomRef: r, version: p.version, purl: debPurl(p, input.codename) });
      sha256(c, p.sha256);
      c.properties.add(new Models.Property('scion:debian:architecture', p.architecture));
      ref.set(r, c);
      bom.components.add(c);
    }
  }
  for (const [setName, set] of Object.entries(input.sets)) {
    const byName = new Map(set.packages.map((p) => [p.name, p]));
    for (const p of set.packages) {
      const c = ref.get(pkgRef(p.name, p.version))!;
      for (const d of p.depends) {
        const dp = byName.get(d);
        if (dp && dp !== p) c.dependencies.add(ref.get(pkgRef(dp.name, dp.version))!.bomRef);
      }
    }
    if (setName === 'guest' || setName === 'kernel') {
      for (const root of set.roots) {
        const p = byName.get(root);
        if (p) image.dependencies.add(ref.get(pkgRef(p.name, p.version))!.bomRef);
      }
    }
  }

  const runtime = ref.get(pkgRef(input.runtime.package, input.runtime.version));
  if (!runtime) throw new Error(`the agent's runtime ${input.runtime.package} ${input.runtime.version} is not among the image's packages`);

  const agent = new Models.Component(Enums.ComponentType.Application, 'scion-guest-agent', {
    bomRef: 'scion:guest-agent',
    version: input.scionVersion,
    description: 'the guest agent bundle (/opt/scion/agent.mjs)',
  });
  sha256(agent, input.agentBundleSha256);
  agent.dependencies.add(runtime.bomRef);
  bom.components.add(agent);
  image.dependencies.add(agent.bomRef);

  for (const ct of input.containers) {
    const c = new Models.Component(Enums.ComponentType.Container, ct.name, { bomRef: `container:${ct.name}` });
    if (ct.set) {
      const set = input.sets[ct.set];
      for (const root of set?.roots ?? []) {
        const p = set.packages.find((x) => x.name === root);
        if (p) c.dependencies.add(ref.get(pkgRef(p.name, p.version))!.bomRef);
      }
    }
    for (const l of ct.layers ?? []) {
      const r = `oci-layer:${l.digest}`;
      let layer = ref.get(r);
      if (!layer) {
        layer = new Models.Component(Enums.ComponentType.File, l.digest, { bomRef: r, description: `OCI layer (${l.mediaType}, ${l.size} bytes)` });
        sha256(layer, l.digest.replace(/^sha256:/, ''));
        ref.set(r, layer);
        bom.components.add(layer);
      }
      c.dependencies.add(layer.bomRef);
    }
    bom.components.add(c);
    image.dependencies.add(c.bomRef);
  }

  const serialise = (b: CDX.Models.Bom) =>
    new Serialize.JsonSerializer(new Serialize.JSON.Normalize.Factory(Spec.Spec1dot6)).serialize(b, { sortLists: true, space: 2 });
  // a serial number from the content: same build, same SBOM, same number
  const digest = createHash('sha256').update(serialise(bom)).digest('hex');
  bom.serialNumber = `urn:uuid:${digest.slice(0, 8)}-${digest.slice(8, 12)}-5${digest.slice(13, 16)}-${((parseInt(digest[16], 16) & 3) | 8).toString(16)}${digest.slice(17, 20)}-${digest.slice(20, 32)}`;
  return serialise(bom) + '\n';
}
