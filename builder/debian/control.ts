/** deb822 control stanzas and the relationship fields inside them. Pure. */
import type { Relation } from './version.ts';

export type Stanza = Record<string, string>;

export function parseStanzas(text: string): Stanza[] {
  const out: Stanza[] = [];
  let cur: Stanza = {};
  let last = '';
  for (const line of text.split('\n')) {
    if (line === '') {
      if (Object.keys(cur).length) out.push(cur);
      cur = {};
      last = '';
      continue;
    }
    if (line[0] === ' ' || line[0] === '\t') {
      if (last) cur[last] += '\n' + line.slice(1);
      continue;
    }
    const c = line.indexOf(':');
    if (c < 0) continue;
    last = line.slice(0, c);
    cur[last] = line.slice(c + 1).trim();
  }
  if (Object.keys(cur).length) out.push(cur);
  return out;
}

export interface Dep {
  name: string;
  rel?: Relation;
  version?: string;
  arch?: string;
}
/** One Depends entry: alternatives separated by `|`. */
export type DepGroup = Dep[];

export function parseDepends(field: string | undefined): DepGroup[] {
  if (!field) return [];
  return field
    .split(',')
    .map((g) => g.trim())
    .filter(Boolean)
    .map((group) =>
      group.split('|').map((alt) => {
        const m = /^([a-z0-9][a-z0-9+.-]*)(?::([a-z0-9-]+))?\s*(?:\(\s*(<<|<=|=|>=|>>|<|>)\s*([^)\s]+)\s*\))?/.exec(alt.trim());
        if (!m) throw new Error(`cannot parse dependency "${alt.trim()}"`);
        let rel = m[3] as string | undefined;
        if (rel === '<') rel = '<=';
        if (rel === '>') rel = '>=';
        return { name: m[1], arch: m[2], rel: rel as Relation | undefined, version: m[4] };
      }),
    );
}

/** The SHA256 section of a Release/InRelease file: path -> {sha256, size}. */
export function parseReleaseHashes(release: string): Map<string, { sha256: string; size: number }> {
  const st = parseStanzas(release)[0] ?? {};
  const out = new Map<string, { sha256: string; size: number }>();
  for (const line of (st['SHA256'] ?? '').split('\n')) {
    const parts = line.trim().split(/\s+/);
    if (parts.length === 3) out.set(parts[2], { sha256: parts[0], size: Number(parts[1]) });
  }
  return out;
}

/** The signed text inside a clearsigned InRelease (after gpgv has verified it). */
export function clearsignedBody(inrelease: string): string {
  const start = inrelease.indexOf('\n\n', inrelease.indexOf('-----BEGIN PGP SIGNED MESSAGE-----'));
  const end = inrelease.indexOf('\n-----BEGIN PGP SIGNATURE-----');
  if (start < 0 || end < 0) throw new Error('not a clearsigned message');
  return inrelease.slice(start + 2, end).replace(/^- /gm, '');
}
