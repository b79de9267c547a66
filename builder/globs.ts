/**
 * Path globs for `exclude:` in an image definition: absolute, `*` within one
 * path segment, `?` one character of a segment, `**` any number of segments
 * (a pattern ending in `/**` also names the directory itself). Pure.
 */

/** A glob as a regular expression over canonical absolute paths. */
export function globToRegExp(glob: string): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === '*' && glob[i + 1] === '*') {
      i++;
      if (glob[i + 1] === '/') {
        i++;
        re += '(?:.*/)?';
      } // "**/": zero or more whole segments
      else re += '.*';
    } else if (c === '*') re += '[^/]*';
    else if (c === '?') re += '[^/]';
    else re += c.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  // "/dir/**" names the directory itself as well
  if (glob.endsWith('/**')) re = `${re.slice(0, -'/.*'.length)}(?:/.*)?`;
  return new RegExp(`^${re}$`);
}

/** Paths of `paths` that any of the globs matches. */
export function matchingPaths(paths: Iterable<string>, globs: string[]): string[] {
  const res = globs.map(globToRegExp);
  return [...paths].filter((p) => res.some((r) => r.test(p)));
}

/**
 * What every image leaves out unless a `files:` entry puts it back: static
 * libraries and C headers (build-time only; crun's package ships libcrun.a),
 * pkg-config files. Docs, man pages and locales are left out as packages are
 * unpacked (builder/assemble.ts).
 */
export const DEFAULT_EXCLUDES = ['/**/*.a', '/usr/include/**', '/usr/lib/x86_64-linux-gnu/pkgconfig/**', '/usr/share/pkgconfig/**'];
