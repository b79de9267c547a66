/** Debian version comparison (deb-version(7)): epoch, upstream, revision. Pure. */

function order(c: string): number {
  if (c === '~') return -1;
  if (c === '') return 0;
  if (/[A-Za-z]/.test(c)) return c.charCodeAt(0);
  return c.charCodeAt(0) + 256;
}

function comparePart(a: string, b: string): number {
  let i = 0,
    j = 0;
  while (i < a.length || j < b.length) {
    // non-digit run, compared with the modified ASCII order where ~ sorts first
    while ((i < a.length && !/\d/.test(a[i])) || (j < b.length && !/\d/.test(b[j]))) {
      const ac = i < a.length && !/\d/.test(a[i]) ? a[i] : '';
      const bc = j < b.length && !/\d/.test(b[j]) ? b[j] : '';
      const d = order(ac) - order(bc);
      if (d) return d;
      if (ac) i++;
      if (bc) j++;
      if (!ac && !bc) break;
    }
    let an = '',
      bn = '';
    while (i < a.length && /\d/.test(a[i])) an += a[i++];
    while (j < b.length && /\d/.test(b[j])) bn += b[j++];
    const d = Number(an || '0') - Number(bn || '0');
    if (d) return d;
  }
  return 0;
}

export function parseVersion(v: string): { epoch: number; upstream: string; revision: string } {
  let epoch = 0;
  let rest = v;
  const colon = v.indexOf(':');
  if (colon >= 0) {
    epoch = Number(v.slice(0, colon));
    rest = v.slice(colon + 1);
  }
  const dash = rest.lastIndexOf('-');
  return dash >= 0 ? { epoch, upstream: rest.slice(0, dash), revision: rest.slice(dash + 1) } : { epoch, upstream: rest, revision: '0' };
}

export function compareVersions(a: string, b: string): number {
  const pa = parseVersion(a),
    pb = parseVersion(b);
  if (pa.epoch !== pb.epoch) return pa.epoch - pb.epoch;
  return comparePart(pa.upstream, pb.upstream) || comparePart(pa.revision, pb.revision);
}

export type Relation = '<<' | '<=' | '=' | '>=' | '>>';
export function satisfies(version: string, rel: Relation, want: string): boolean {
  const c = compareVersions(version, want);
  switch (rel) {
    case '<<':
      return c < 0;
    case '<=':
      return c <= 0;
    case '=':
      return c === 0;
    case '>=':
      return c >= 0;
    case '>>':
      return c > 0;
  }
}
