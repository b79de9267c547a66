/**
 * `on_fork: keep` (images/web-keep.yaml): after a fork the container is not
 * restarted: the same process keeps running, the agent sets its UTS hostname
 * in place, and its page (read on every request) names the clone's hostname.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { build } from '../../builder/build.ts';
import * as vm from '../../host/index.ts';
import { image, isolateRunDirs, removeEverything } from './helpers.ts';

const dirs = isolateRunDirs('keep');
afterAll(() => removeEverything(dirs));

/** The container's init pid as crun records it in the guest. */
async function crunPid(a: vm.AgentClient): Promise<number> {
  const r = await a.call('exec', { argv: ['cat', '/run/crun/web/status'] });
  expect(r.exitCode, r.stderr).toBe(0);
  return JSON.parse(r.stdout).pid;
}

describe('a container kept across the fork', () => {
  let templatePid: number;
  let clones: vm.CloneResult[];
  beforeAll(async () => {
    const img = await vm.loadImage((await build({ definitionPath: image('web-keep') })).dir);
    const h = await vm.bootTemplate(img, { name: 'keep-tpl' });
    templatePid = await crunPid(await h.agent()); // the handle's own connection: a VM's agent port serves one client
    await vm.freeze(h, img);
    clones = await vm.fork('keep-tpl', { n: 2 });
  });

  it('keeps running (same process, never restarted) and its page names the new hostname', async () => {
    for (const c of clones) {
      const res = await fetch(`http://127.0.0.1:${c.ports['8080']}/cgi-bin/host`);
      expect(await res.text()).toBe(`hello from ${c.hostname}\n`);
      const a = await vm.connectAgent(c.name);
      try {
        expect(await crunPid(a)).toBe(templatePid);
        const info = await a.call('info');
        expect(info.containers).toEqual([expect.objectContaining({ name: 'web', state: 'running', restarts: 0, healthy: true })]);
        expect(info.identity.hostname).toBe(c.hostname);
      } finally {
        a.close();
      }
    }
    expect(clones[0].hostname).not.toBe(clones[1].hostname);
  });
});
