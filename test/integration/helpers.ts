import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '../..');
export const image = (name: string) => join(ROOT, 'images', `${name}.yaml`);
export const tmp = (prefix: string) => mkdtempSync(join(tmpdir(), `scion-${prefix}-`));

/** Give this test file its own run and template directories, so it sees only its own VMs. */
export function isolateRunDirs(tag: string): { run: string; templates: string } {
  const run = tmp(`run-${tag}`);
  const templates = mkdtempSync(join('/dev/shm', `scion-tpl-${tag}-`));
  process.env.SCION_RUN_DIR = run;
  process.env.SCION_TEMPLATE_DIR = templates;
  return { run, templates };
}
