/**
 * Dependency closure over a Packages index: Depends and Pre-Depends,
 * alternatives, virtual packages through Provides, version constraints.
 * Pure and deterministic: same index + roots + pins -> same selection.
 * Conflicts/Breaks are not evaluated: the guest is assembled from files, not
 * installed by dpkg, so nothing is ever removed.
 */
import { ArchiveError } from '../../common/errors.ts';
import { parseDepends, type Dep, type DepGroup, type Stanza } from './control.ts';
import { compareVersions, satisfies } from './version.ts';

export interface PackageEntry {
  name: string;
  version: string;
  architecture: string;
  filename: string;
  sha256: string;
  size: number;
  depends: DepGroup[];
  provides: Dep[];
}

export interface PackageIndex {
  byName: Map<string, PackageEntry[]>; // highest version first
  providers: Map<string, PackageEntry[]>;
}

export function entryFromStanza(s: Stanza): PackageEntry {
  return {
    name: s['Package'],
    version: s['Version'],
    architecture: s['Architecture'],
    filename: s['Filename'],
    sha256: s['SHA256'],
    size: Number(s['Size']),
    depends: [...parseDepends(s['Pre-Depends']), ...parseDepends(s['Depends'])],
    provides: parseDepends(s['Provides']).map((g) => g[0]),
  };
}

export function buildIndex(entries: Iterable<PackageEntry>, arch: string): PackageIndex {
  const byName = new Map<string, PackageEntry[]>();
  const providers = new Map<string, PackageEntry[]>();
  for (const e of entries) {
    if (e.architecture !== arch && e.architecture !== 'all') continue;
    (byName.get(e.name) ?? byName.set(e.name, []).get(e.name)!).push(e);
    for (const p of e.provides) (providers.get(p.name) ?? providers.set(p.name, []).get(p.name)!).push(e);
  }
  for (const list of byName.values()) list.sort((a, b) => compareVersions(b.version, a.version));
  for (const list of providers.values()) list.sort((a, b) => a.name.localeCompare(b.name) || compareVersions(b.version, a.version));
  return { byName, providers };
}

export interface ResolveOptions {
  /** exact versions from scion.lock; a pinned package must be found at that version */
  pins?: Map<string, string>;
  /** names that are never pulled in as dependencies (e.g. dpkg-only plumbing) */
  skip?: Set<string>;
  /** only dependencies whose name passes are followed (e.g. the kernel metapackage -> image) */
  follow?: (name: string) => boolean;
}

function candidates(index: PackageIndex, dep: Dep, pins?: Map<string, string>): PackageEntry[] {
  const real = (index.byName.get(dep.name) ?? []).filter((e) => !dep.rel || satisfies(e.version, dep.rel, dep.version!));
  // a versioned dependency can only be met by a real package or a versioned Provides
  const virt = (index.providers.get(dep.name) ?? []).filter((e) => {
    if (!dep.rel) return true;
    const p = e.provides.find((x) => x.name === dep.name);
    return p?.version !== undefined && satisfies(p.version, dep.rel, dep.version!);
  });
  const all = [...real, ...virt];
  if (!pins) return all;
  return all.filter((e) => !pins.has(e.name) || pins.get(e.name) === e.version);
}

export function resolve(index: PackageIndex, roots: string[], opts: ResolveOptions = {}): PackageEntry[] {
  const chosen = new Map<string, PackageEntry>();
  const why = new Map<string, string>();
  const queue: PackageEntry[] = [];
  const choose = (e: PackageEntry, reason: string) => {
    if (chosen.has(e.name)) return;
    chosen.set(e.name, e);
    why.set(e.name, reason);
    queue.push(e);
  };
  for (const root of roots) {
    const all = index.byName.get(root);
    if (!all?.length) {
      const prov = index.providers.get(root);
      if (prov?.length) {
        choose(prov[0], 'requested');
        continue;
      }
      throw new ArchiveError('E_PKG_UNKNOWN', `package "${root}" is not in the archive index`, {
        hint: 'check the spelling with `apt-cache search`, and that the suite and components in the definition carry it',
      });
    }
    const pin = opts.pins?.get(root);
    const e = pin ? all.find((x) => x.version === pin) : all[0];
    if (!e)
      throw new ArchiveError('E_LOCK_STALE', `scion.lock pins ${root} ${pin}, which the archive no longer has`, { hint: 'run the build with --update-lock' });
    choose(e, 'requested');
  }
  while (queue.length) {
    const pkg = queue.shift()!;
    for (const group of pkg.depends) {
      if (group.some((d) => opts.skip?.has(d.name))) continue;
      if (opts.follow && !group.some((d) => opts.follow!(d.name))) continue;
      // already satisfied by something chosen?
      const met = group.some((d) => {
        const c = chosen.get(d.name);
        if (c && (!d.rel || satisfies(c.version, d.rel, d.version!))) return true;
        return [...chosen.values()].some((e) =>
          e.provides.some((p) => p.name === d.name && (!d.rel || (p.version && satisfies(p.version, d.rel, d.version!)))),
        );
      });
      if (met) continue;
      let picked: PackageEntry | undefined;
      for (const d of group) {
        const c = candidates(index, d, opts.pins);
        if (c.length) {
          picked = c[0];
          break;
        }
      }
      if (!picked) {
        const text = group.map((d) => d.name + (d.rel ? ` (${d.rel} ${d.version})` : '')).join(' | ');
        throw new ArchiveError('E_DEP_UNSATISFIABLE', `${pkg.name} ${pkg.version} depends on ${text}, which no package in the index satisfies`, {
          hint: opts.pins?.size
            ? 'the lock may pin an old version; try --update-lock'
            : 'the suite may be inconsistent, or the package needs another component',
        });
      }
      choose(picked, `${pkg.name}`);
    }
  }
  return [...chosen.values()].sort((a, b) => a.name.localeCompare(b.name));
}
