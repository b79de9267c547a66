/**
 * Template directories: one per frozen template under the checked template
 * root (on tmpfs), holding meta.json, mem, state, kernel-stub and an optional
 * disk overlay. Found by name, never by a path read from a file; every file
 * checked (regular, ours, the right size) before a clone maps it.
 */
import { chmod, chown, lstat, mkdir, rm, stat, truncate } from 'node:fs/promises';
import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';
import { VmError } from '../../common/errors.ts';
import { validName, type ValidName } from '../../common/names.ts';
import { dirProblem, writeExclusive } from '../../common/safe-fs.ts';
import { run } from '../../common/run.ts';
import { currentVmm } from '../qemu/vmm.ts';
import { readonlyPrivateMemory } from '../qemu/vmm-plan.ts';
import { compatibilityProblems } from './compat.ts';
import { runningAsRoot } from '../qemu/process.ts';
import { trustedTemplateRoot, templatePaths } from '../store/dirs.ts';
import { readTemplateMeta, type TemplateMeta } from '../store/records.ts';

export type { TemplateMeta };
/** The VMM this node runs, which a template's record must name (re-exported for the package's face). */
export { currentVmm, type Vmm } from '../qemu/vmm.ts';

/** A frozen template, checked: what a fork maps. */
export interface FrozenTemplate {
  meta: TemplateMeta;
  dir: string;
  files: ReturnType<typeof templatePaths>;
}

/** The directory of template `name` under the checked root. */
export const templateDir = (name: ValidName): string => join(trustedTemplateRoot(), name);

/**
 * Memory file mode. Clones run as the template's group. From QEMU 8.2 a
 * clone opens the file read-only and maps it private-writable (readonly=on,
 * rom=off), so the group only reads it; before 8.2 QEMU opened a private
 * mapping's file read-write, and the group needed write (docs/SECURITY.md).
 */
export const memMode = (vmmVersion: string): number => (runningAsRoot() ? (readonlyPrivateMemory(vmmVersion) ? 0o640 : 0o660) : 0o600);

/** Whether this process may use /dev/kvm (a template frozen under KVM restores only with it). */
function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** A new template directory for `name` (the name is ours: its run directory exists). A leftover of a crash is replaced. */
export async function makeTemplateDir(name: ValidName): Promise<ReturnType<typeof templatePaths>> {
  const tdir = templateDir(name);
  await rm(tdir, { recursive: true, force: true });
  await mkdir(tdir, { mode: 0o700 });
  return templatePaths(tdir);
}

export async function makeMemFile(path: string, ramMB: number, gid?: number): Promise<void> {
  await writeExclusive(path, '', 0o600);
  if (gid !== undefined) await chown(path, 0, gid);
  // the template's QEMU writes it through its shared mapping (as the group): writable until the freeze, then memMode
  await chmod(path, runningAsRoot() ? 0o660 : 0o600); // explicitly: the umask would take the group's write away
  await truncate(path, ramMB * 1024 * 1024);
}

/** Check that `name` is a frozen template this QEMU can fork; fail clearly if not. */
export async function checkTemplate(name: string): Promise<FrozenTemplate> {
  const n = validName(name, 'template');
  const tdir = templateDir(n);
  const st = await lstat(tdir).catch(() => undefined);
  if (!st) throw new VmError('E_TEMPLATE_MISSING', `no frozen template named ${n}`, { hint: 'scion ls lists templates; scion freeze <template> makes one' });
  const problem = dirProblem(st, process.getuid?.() ?? 0);
  if (problem) throw new VmError('E_UNTRUSTED_DIR', `template directory ${tdir} ${problem}`, { hint: 'remove it and freeze the template again' });
  const meta = await readTemplateMeta(tdir, n);
  const problems = compatibilityProblems(meta, await currentVmm(), kvmUsable());
  if (problems.length)
    throw new VmError('E_TEMPLATE_INCOMPATIBLE', `template ${meta.name} cannot be restored here: ${problems.join('; ')}`, {
      hint: 'freeze the template again on this node, or run the VMM it names (SCION_VMM; scion vmm shows this one)',
    });
  const t = templatePaths(tdir);
  const files = [t.state, join(tdir, meta.kernel), ...(meta.memory === 'file' ? [t.mem] : []), ...(meta.disk ? [join(tdir, meta.disk)] : [])];
  for (const f of files) {
    const s = await lstat(f).catch(() => undefined);
    if (!s) throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: ${f} is missing`, { hint: 'freeze the template again' });
    if (!s.isFile())
      throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: ${f} is not a regular file`, {
        hint: 'something replaced it; freeze the template again',
      });
    if (s.uid !== (process.getuid?.() ?? 0))
      throw new VmError('E_UNTRUSTED_DIR', `template ${meta.name}: ${f} is owned by uid ${s.uid}`, {
        hint: 'something replaced it; freeze the template again',
      });
  }
  if (meta.memory === 'file') {
    const size = (await stat(t.mem)).size;
    if (size !== meta.ramMB * 1024 * 1024)
      throw new VmError('E_TEMPLATE_INCOMPLETE', `template ${meta.name}: memory file is ${size} bytes, expected ${meta.ramMB} MiB`);
  }
  return { meta, dir: tdir, files: t };
}

/** The user's base disk under a template's overlay (qemu-img reads it from the overlay's header). */
export async function baseDiskOf(overlay: string): Promise<string | undefined> {
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', overlay])).stdout);
  return info['full-backing-filename'] ?? info['backing-filename'];
}
