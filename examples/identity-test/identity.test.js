// Every clone of our image must be a machine of its own: checked inside the
// guests, through scion's agent, not taken from what the host says it assigned.
import { expect } from 'vitest';
import { scionTest } from 'scion/testing';

const test = scionTest({
  image: new URL('./image.yaml', import.meta.url).pathname,
  count: 3,
  // set only to show these tests catch a broken re-identification
  skipIdentityApply: process.env.SCION_EXAMPLE_BREAK_IDENTITY === '1',
});

const inEach = (clones, cmd) => Promise.all(clones.map(async (c) => {
  const r = await c.exec(cmd);
  expect(r.exitCode, `${c.name}: ${cmd}: ${r.stderr}`).toBe(0);
  return r.stdout.trim();
}));
const expectDistinct = (values) => expect(new Set(values).size, values.join(' | ')).toBe(values.length);

test('clones have distinct hostnames, and each is the one assigned', async ({ clones }) => {
  const names = await inEach(clones, 'cat /proc/sys/kernel/hostname');
  expectDistinct(names);
  expect(names).toEqual(clones.map((c) => c.assigned.hostname));
});

test('clones have distinct MAC addresses', async ({ clones }) => {
  expectDistinct(await inEach(clones, 'cat /sys/class/net/eth0/address'));
});

test('clones have distinct IP addresses', async ({ clones }) => {
  const ips = await inEach(clones, "ip -4 -o addr show dev eth0 | sed -e 's/.*inet \\([0-9.]*\\).*/\\1/'");
  expectDistinct(ips);
  expect(ips).toEqual(clones.map((c) => c.assigned.ip));
});

test('clones have distinct machine-ids', async ({ clones }) => {
  const ids = await inEach(clones, 'cat /etc/machine-id');
  expectDistinct(ids);
  for (const id of ids) expect(id).toMatch(/^[0-9a-f]{32}$/);
});

test('clones read different bytes from /dev/urandom', async ({ clones }) => {
  expectDistinct(await inEach(clones, 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n"'));
});

test("each clone's container sees its clone's new hostname", async ({ clones }) => {
  for (const c of clones) {
    const page = await c.http('/', { timeoutMs: 10_000 });
    expect(page.status).toBe(200);
    expect(page.body.trim()).toBe((await c.info()).identity.hostname);
    expect(page.body.trim()).toBe(c.assigned.hostname);
  }
});
