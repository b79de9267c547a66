/** An optional qcow2 disk: the template writes to an overlay; each clone gets its own overlay on the frozen one. */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { build } from '../../builder/build.ts';
import * as vm from '../../host/index.ts';
import { image, isolateRunDirs, tmp, removeEverything } from './helpers.ts';

const dirs = isolateRunDirs('disk');
import { sha256File as sha, guestSh } from '../support/guest.ts';

describe('qcow2 disk', () => {
  let clones: vm.CloneResult[];
  let base: string;
  let tplDisk: string;
  let tplDiskSha: string;
  beforeAll(async () => {
    base = join(tmp('disk'), 'base.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '64M']);
    const img = await vm.loadImage((await build({ definitionPath: image('minimal') })).dir);
    const h = await vm.bootTemplate(img, { name: 'disk-tpl', disk: base });
    const w = await (await h.agent()).call('exec', {
      argv: ['sh', '-c', 'echo written-by-template | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null'],
    });
    expect(w.exitCode).toBe(0);
    await vm.freeze(h, img);
    tplDisk = join(dirs.templates, 'disk-tpl', 'disk.qcow2');
    tplDiskSha = sha(tplDisk);
    clones = await vm.fork('disk-tpl', { n: 2, parallel: 2 });
  });
  afterAll(() => removeEverything(dirs));

  const sh = (name: string, script: string): Promise<string> => guestSh(name, script);

  it('clones see what the template wrote, write their own blocks, and leave the template disk unchanged', async () => {
    for (const c of clones) {
      expect(await sh(c.name, 'head -c 20 /dev/vda')).toBe('written-by-template\n');
      await sh(c.name, `echo mine-${c.hostname} | dd of=/dev/vda bs=512 seek=2048 count=1 conv=sync,fsync 2>/dev/null`);
    }
    for (const c of clones) expect(await sh(c.name, 'dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n 1')).toBe(`mine-${c.hostname}\n`);
    expect(sha(tplDisk)).toBe(tplDiskSha);
    const info = JSON.parse(
      execFileSync('qemu-img', ['info', '--output=json', '-U', join(dirs.run, 'vms', clones[0].name, 'disk.qcow2')], { encoding: 'utf8' }),
    );
    expect(info['backing-filename']).toBe(tplDisk);
  });
});
