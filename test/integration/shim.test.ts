/**
 * scion as a containerd runtime, against a real containerd the test starts
 * (its own root, state and sockets).
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { startContainerd, type TestContainerd } from './containerd.ts';
import { EventPublisher } from '../../shim/events.ts';

let cd: TestContainerd;
beforeAll(async () => { cd = await startContainerd(); }, 60_000);
afterAll(async () => { await cd?.stop(); });

describe('task events', () => {
  it('reach containerd over its ttrpc socket, in order, as `ctr events` shows them', async () => {
    const watcher = spawn('ctr', ['--address', cd.address, 'events'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let seen = '';
    watcher.stdout.on('data', (c) => (seen += c));
    await new Promise((r) => setTimeout(r, 500)); // subscribed
    const pub = new EventPublisher(cd.ttrpcAddress, 'scion-test');
    try {
      await pub.publish('/tasks/create', { containerId: 'ev1', bundle: '/b', pid: 7 });
      await pub.publish('/tasks/start', { containerId: 'ev1', pid: 7 });
      await pub.publish('/tasks/exit', { containerId: 'ev1', id: 'ev1', pid: 7, exitStatus: 3, exitedAt: { seconds: 1, nanos: 0 } });
      await pub.publish('/tasks/delete', { containerId: 'ev1', pid: 7, exitStatus: 3, exitedAt: { seconds: 1, nanos: 0 } });
      const end = Date.now() + 10_000;
      while (seen.split('\n').filter((l) => l.includes('"ev1"')).length < 4 && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    } finally { pub.close(); watcher.kill(); }
    // `ctr events`: <date> <time> <zone> UTC <namespace> <topic> <event as JSON>
    const events = seen.split('\n').filter((l) => l.includes('"ev1"')).map((l) => /^\S+ \S+ \S+ \S+ (\S+) (\S+) (\{.*\})$/.exec(l)!);
    expect(events.map((m) => m[2])).toEqual(['/tasks/create', '/tasks/start', '/tasks/exit', '/tasks/delete']);
    expect(events.every((m) => m[1] === 'scion-test')).toBe(true);
    expect(JSON.parse(events[2][3])).toMatchObject({ container_id: 'ev1', pid: 7, exit_status: 3 });
  });
});
