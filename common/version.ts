/** scion's own version and install root, from the package.json it ships with (the same file in a checkout and in an installed package). */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findPackage(): { root: string; version: string } {
  let dir = dirname(fileURLToPath(import.meta.url));
  // common/ in a checkout, dist/common/ in the package: at most two levels up
  for (let i = 0; i < 3; i++) {
    try {
      const p = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
      if (p.name === 'scion') return { root: dir, version: String(p.version) };
    } catch { /* not here: one level up */ }
    dir = dirname(dir);
  }
  throw new Error(`scion's package.json was not found above ${fileURLToPath(import.meta.url)}`);
}

const pkg = findPackage();
export const SCION_VERSION = pkg.version;
/** The directory holding scion's package.json: the checkout, or node_modules/scion. */
export const PACKAGE_ROOT = pkg.root;
