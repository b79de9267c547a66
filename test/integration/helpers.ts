import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '../..');
export const image = (name: string) => join(ROOT, 'images', `${name}.yaml`);
const made: string[] = [];
/** A fresh temporary directory, removed by cleanupTmp(). */
export const tmp = (prefix: string) => {
  const d = mkdtempSync(join(tmpdir(), `scion-${prefix}-`));
  made.push(d);
  return d;
};
export function cleanupTmp() {
  for (const d of made.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** Give this test file its own run and template directories, so it sees only its own VMs. */
export function isolateRunDirs(tag: string): { run: string; templates: string } {
  const run = tmp(`run-${tag}`);
  const templates = mkdtempSync(join('/dev/shm', `scion-tpl-${tag}-`));
  process.env.SCION_RUN_DIR = run;
  process.env.SCION_TEMPLATE_DIR = templates;
  return { run, templates };
}

/** A VM's run-directory paths, as scion lays them out. */
export async function paths(name: string) {
  const { vmPaths, vmsDir } = await import('../../host/store/dirs.ts');
  const { validName } = await import('../../common/names.ts');
  return vmPaths(validName(name), vmsDir());
}

/** QEMU processes scion started under this test's run root, found from /proc (not from scion's records). */
export async function scionQemuPids(): Promise<{ pid: number; runDir: string }[]> {
  const { qemuPidsUnder } = await import('../../host/qemu/process.ts');
  const { vmsDir } = await import('../../host/store/dirs.ts');
  return qemuPidsUnder(vmsDir()).map((q) => ({ pid: q.pid, runDir: q.jail.replace(/\/jail$/, '') }));
}

/** Build web.yaml (cached), boot it as `name` and freeze it: the template most test files fork. */
export async function frozenWebTemplate(name = 'web-tpl'): Promise<void> {
  const { build } = await import('../../builder/build.ts');
  const vm = await import('../../host/index.ts');
  const img = await vm.loadImage((await build({ definitionPath: image('web') })).dir);
  await vm.freeze(await vm.bootTemplate(img, { name }), img);
}

/** Remove every VM of this test file, then its run and template directories. */
export async function removeEverything(dirs: { run: string; templates: string }): Promise<void> {
  const vm = await import('../../host/index.ts');
  // clones first: a template its hibernated clones need is not removed before them
  for (const v of (await vm.list()).sort((a, b) => Number(a.role === 'template') - Number(b.role === 'template'))) await vm.removeVm(v.name);
  rmSync(dirs.templates, { recursive: true, force: true });
  rmSync(dirs.run, { recursive: true, force: true });
  cleanupTmp();
}
