/**
 * scion's own version and install root. The version is a literal (a unit
 * test holds it equal to package.json's), so importing scion reads no file;
 * the install root is found on first use, from the package.json scion ships
 * with (the same file in a checkout and in an installed package).
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** scion's version (package.json's). */
export const SCION_VERSION = '0.1.0';

let root: string | undefined;
/** The directory holding scion's package.json: the checkout, or node_modules/scion. */
export function packageRoot(): string {
  if (root) return root;
  let dir = dirname(fileURLToPath(import.meta.url));
  // common/ in a checkout, dist/common/ in the package: at most two levels up
  for (let i = 0; i < 3; i++) {
    try {
      const p = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
      if (p.name === 'scion') return (root = dir);
    } catch {
      /* not here: one level up */
    }
    dir = dirname(dir);
  }
  throw new Error(`scion's package.json was not found above ${fileURLToPath(import.meta.url)}`);
}
