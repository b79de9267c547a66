/**
 * Hibernate and resume: a running clone's state goes to disk (only the RAM
 * that differs from its template), its QEMU ends; resume brings the same
 * machine back, its processes and files as they were, its clock corrected.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import * as vm from '../../host/index.ts';
import { measureOffset } from '../../host/machine/clock.ts';
import { guestSh, startCounter } from '../support/guest.ts';
import { isolateRunDirs, tmp, frozenWebTemplate, removeEverything, scionQemuPids } from './helpers.ts';

const dirs = isolateRunDirs('hib');
process.env.SCION_STATE_DIR = tmp('state-hib');

beforeAll(async () => {
  await frozenWebTemplate('web-tpl');
}, 300_000);

afterAll(async () => {
  await removeEverything(dirs);
  delete process.env.SCION_STATE_DIR;
});

describe('a hibernated clone', () => {
  it('is saved to disk with only the RAM that differs from its template, and comes back the same machine: its processes, files and identity, its clock corrected', async () => {
    const [c] = await vm.fork('web-tpl', { n: 1 });
    // a counting process and a file in the guest's tmpfs
    const { pid, mark, count: before } = await startCounter(c.name);
    const a0 = await vm.connectAgent(c.name);
    const info = await a0.call('info');
    a0.close(); // the agent's port takes one host connection at a time

    const m = await vm.Machine.open(c.name);
    const h = await m.hibernate();
    expect(h.stateBytes).toBeLessThanOrEqual(16 * 1024 * 1024); // an idle web clone: its own pages, not the template's
    expect(statSync(join(process.env.SCION_STATE_DIR!, 'hibernated', c.name, 'state')).size).toBe(h.stateBytes);
    expect((await vm.list()).find((v) => v.name === c.name)?.state).toBe('hibernated');
    expect((await scionQemuPids()).filter((q) => q.runDir.endsWith(`/${c.name}`))).toEqual([]); // its QEMU is gone
    expect((await vm.gc()).removed).not.toContain(c.name); // gc keeps it

    await new Promise((r) => setTimeout(r, 2000)); // it sleeps; the host's clock goes on
    const back = await vm.Machine.resumeHibernated(c.name);
    const agent = await back.agent();
    const after = await agent.call('info');
    expect(after.identity).toEqual(info.identity);
    expect(after.generation).toBe(info.generation);
    // the clock within 100 ms of the host's (the round trip's half as the error bar)
    const off = await measureOffset(agent, 5);
    expect(Math.abs(off.offsetMs)).toBeLessThanOrEqual(100 + off.errorMs);
    back.close();
    // the same process goes on counting from where it was; the file is there
    expect(await guestSh(c.name, `kill -0 ${pid} && echo alive`)).toContain('alive');
    await new Promise((r) => setTimeout(r, 500));
    expect(Number(await guestSh(c.name, 'cat /tmp/h/count'))).toBeGreaterThan(before);
    expect(await guestSh(c.name, 'cat /tmp/h/mark')).toBe(mark);
    expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    expect(existsSync(join(process.env.SCION_STATE_DIR!, 'hibernated', c.name))).toBe(false); // its saved state is gone once it runs
    await vm.removeVm(c.name);
  });

  it('refuses what it cannot do, with the VM named: a template, a clone that is not hibernated', async () => {
    await expect((await vm.Machine.open('web-tpl')).hibernate()).rejects.toMatchObject({
      code: 'E_NO_VM',
      message: expect.stringContaining('web-tpl is not a clone'),
    });
    const [c] = await vm.fork('web-tpl', { n: 1 });
    await expect(vm.Machine.resumeHibernated(c.name)).rejects.toMatchObject({ code: 'E_NOT_HIBERNATED', message: `${c.name} is not hibernated` });
    // a hibernation cut short (its directory left, its maker gone): refused, never taken over; gc clears it
    const left = join(process.env.SCION_STATE_DIR!, 'hibernated', c.name);
    mkdirSync(left, { recursive: true });
    await expect((await vm.Machine.open(c.name)).hibernate()).rejects.toMatchObject({ code: 'E_VM_BUSY', message: expect.stringContaining(left) });
    expect((await vm.list()).find((v) => v.name === c.name)?.state).toBe('running'); // it runs on
    expect((await vm.gc()).removed).toContain(`${c.name} (saved state)`);
    expect(existsSync(left)).toBe(false);
    expect((await (await vm.Machine.open(c.name)).hibernate()).stateBytes).toBeGreaterThan(0);
    // its template is not removed from under it
    await expect(vm.removeVm('web-tpl')).rejects.toMatchObject({ code: 'E_TEMPLATE_IN_USE', message: expect.stringContaining(c.name) });
    // two resumes at once: one brings it back, the other is refused (never two QEMUs for one machine)
    const both = await Promise.allSettled([vm.Machine.resumeHibernated(c.name), vm.Machine.resumeHibernated(c.name)]);
    expect(both.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect(both.find((r) => r.status === 'rejected')).toMatchObject({ reason: { code: 'E_VM_BUSY' } });
    for (const r of both) if (r.status === 'fulfilled') r.value.close();
    expect((await scionQemuPids()).filter((q) => q.runDir.endsWith(`/${c.name}`))).toHaveLength(1);
    expect((await vm.list()).find((v) => v.name === c.name)?.state).toBe('running');
    await vm.removeVm(c.name);
    expect(existsSync(left)).toBe(false); // rm takes the saved state with it
  });
});
