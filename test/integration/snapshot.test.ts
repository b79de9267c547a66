/**
 * Freeze once, fork anywhere: two nodes on one machine (each its own run,
 * template and cache roots) and Debian's registry. Node A (this process)
 * builds, boots, freezes and pushes web-tpl; node B (the CLI, in its own
 * environment, with an empty cache: it never built or booted anything)
 * pulls it and forks clones that answer HTTP with their own hostnames.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFile, spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { parseAllDocuments } from 'yaml';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as vm from '../../host/index.ts';
import { isolateRunDirs, ROOT, tmp, frozenWebTemplate, removeEverything } from './helpers.ts';
import { guestSh, startCounter } from '../support/guest.ts';
import { startRegistry, type TestRegistry } from '../support/registry.ts';

const dirs = isolateRunDirs('snapa');
const nodeB = {
  SCION_RUN_DIR: tmp('run-snapb'),
  SCION_TEMPLATE_DIR: mkdtempSync(join('/dev/shm', 'scion-tpl-snapb-')),
  XDG_CACHE_HOME: tmp('cache-snapb'),
  SCION_UID_BASE: '1600000000',
  SCION_STATE_DIR: tmp('state-snapb'),
};
process.env.SCION_STATE_DIR = tmp('state-snapa');
let registry: TestRegistry;

/** The scion CLI as node B: its own roots, exit code and output. */
const onB = (args: string[], extra: Record<string, string> = {}) => scion(args, { ...nodeB, ...extra });
/** The scion CLI as node A (this process's roots). */
const onA = (args: string[]) => scion(args, {});

async function scion(args: string[], env: Record<string, string>): Promise<{ code: number; out: any; stderr: string }> {
  try {
    // --json right after the command: what follows `--` (exec's command) is not scion's
    const r = await promisify(execFile)(process.execPath, [join(ROOT, 'bin/scion.js'), args[0], '--json', ...args.slice(1)], {
      env: { ...process.env, ...env },
      maxBuffer: 16 * 1024 * 1024,
    });
    return { code: 0, out: JSON.parse(r.stdout), stderr: r.stderr };
  } catch (e) {
    const x = e as { code: number; stdout: string; stderr: string };
    return { code: x.code, out: x.stdout ? JSON.parse(x.stdout) : undefined, stderr: x.stderr };
  }
}

const putsOfBlobs = () => registry.requests('PUT', '/blobs/uploads/');

beforeAll(async () => {
  registry = await startRegistry();
  await frozenWebTemplate('web-tpl');
}, 300_000);

afterAll(async () => {
  await onB(['rm', '--all']);
  rmSync(nodeB.SCION_TEMPLATE_DIR, { recursive: true, force: true });
  await registry?.stop();
  await removeEverything(dirs);
  delete process.env.SCION_STATE_DIR;
});

describe('template snapshots in an OCI registry', () => {
  let first: vm.SnapshotPushResult;
  const ref = () => `${registry.host}/snap/web-tpl:1`;

  it('node A pushes its frozen template: zero chunks left out, compressed to under a quarter of the guest RAM; a second push sends almost nothing', async () => {
    first = await vm.pushTemplate('web-tpl', ref());
    const ramBytes = 512 * 1024 * 1024;
    expect(first.chunks.total).toBe(ramBytes / (2 * 1024 * 1024));
    expect(first.chunks.zero).toBeGreaterThan(0);
    expect(first.chunks.sent + first.chunks.reused).toBeLessThanOrEqual(first.chunks.total - first.chunks.zero);
    expect(first.artifactBytes).toBeLessThanOrEqual(ramBytes / 4);
    const putsAfterFirst = putsOfBlobs();
    expect(putsAfterFirst).toBe(first.chunks.sent + 4); // each chunk sent, plus state, kernel stub, index and record
    const second = await vm.pushTemplate('web-tpl', ref());
    expect(second.digest).toBe(first.digest); // the same template is the same artifact
    expect(second.chunks.sent).toBe(0);
    expect(second.bytesSent).toBeLessThanOrEqual(first.bytesSent * 0.05);
    expect(putsOfBlobs()).toBe(putsAfterFirst); // counted at the registry: no blob uploaded again
  });

  it('node B, which never built or booted anything, pulls it and forks 3 clones that answer with their own hostnames, identities distinct from A', async () => {
    expect(existsSync(join(nodeB.XDG_CACHE_HOME, 'scion'))).toBe(false);
    const pulled = await onB(['pull', ref()]);
    expect(pulled.code, pulled.stderr).toBe(0);
    expect(pulled.out).toMatchObject({ ok: true, kind: 'template', name: 'web-tpl', digest: first.digest });
    // the memory file is sparse where the template's RAM was zero, and group-read-only
    const mem = statSync(join(nodeB.SCION_TEMPLATE_DIR, 'web-tpl', 'mem'));
    expect(mem.size).toBe(512 * 1024 * 1024);
    expect(mem.blocks * 512).toBeLessThan(mem.size);
    expect(mem.mode & 0o777).toBe(0o640);
    const [onA] = await vm.fork('web-tpl', { n: 1 });
    const forked = await onB(['fork', 'web-tpl', '-n', '3']);
    expect(forked.code, forked.stderr).toBe(0);
    const clones: vm.CloneResult[] = forked.out.clones;
    expect(clones).toHaveLength(3);
    for (const c of clones) expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    expect(new Set(clones.map((c) => c.hostname)).size).toBe(3);
    const vmgenids = [onA.vmgenid, ...clones.map((c) => c.vmgenid)];
    expect(new Set(vmgenids).size).toBe(4);
    const machineIds = [onA.machineId, ...clones.map((c) => c.machineId)];
    expect(new Set(machineIds).size).toBe(4);
    // node A's own clone still answers as itself
    expect(await (await fetch(`http://127.0.0.1:${onA.ports['8080']}/`)).text()).toBe(`hello from ${onA.hostname}\n`);
    expect((await onB(['rm', ...clones.map((c) => c.name)])).code).toBe(0);
    await vm.removeVm(onA.name);
  });

  it('a snapshot reference stands for one template per node: pods starting at once pull it once, named by its digest (what the shim does for SCION_SHIM_TEMPLATE)', async () => {
    const [x, y, z] = await Promise.all([vm.ensureSnapshotTemplate(ref()), vm.ensureSnapshotTemplate(ref()), vm.ensureSnapshotTemplate(ref())]);
    expect(x.name).toBe(`snap-${first.digest.slice(7, 19)}`);
    expect([y.name, z.name]).toEqual([x.name, x.name]);
    expect([x, y, z].filter((t) => t.pulled)).toHaveLength(1);
    expect((await vm.ensureSnapshotTemplate(ref())).pulled).toBe(false);
    const [c] = await vm.fork(x.name, { n: 1 });
    expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    await vm.removeVm(c.name);
    await vm.removeVm(x.name);
  });

  it('scion up takes a template snapshot reference: pulled once per node, then forked, nothing booted', async () => {
    const r = await onB(['up', ref(), '--clones', '2']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.out.template).toMatchObject({ name: `snap-${first.digest.slice(7, 19)}` });
    expect(r.out.clones).toHaveLength(2);
    for (const c of r.out.clones as vm.CloneResult[])
      expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    expect(existsSync(join(nodeB.XDG_CACHE_HOME, 'scion', 'images'))).toBe(false); // no image was pulled
    const refused = await onB(['up', ref(), '--tap']);
    expect(refused.code).toBe(2);
    expect(refused.out.error.message).toContain('is a template snapshot: it brings its own networking');
    expect((await onB(['rm', ...r.out.clones.map((c: vm.CloneResult) => c.name), r.out.template.name])).code).toBe(0);
  });

  it('scion serve takes a template snapshot reference: the front door pulls it and forks clones that answer', async () => {
    const port = await new Promise<number>((res) => {
      const srv = createServer().listen(0, '127.0.0.1', () => {
        const p = (srv.address() as { port: number }).port;
        srv.close(() => res(p));
      });
    });
    const door = spawn(process.execPath, [join(ROOT, 'bin/scion.js'), 'serve', ref(), '--port', '8080', '--listen', `127.0.0.1:${port}`], {
      env: { ...process.env, ...nodeB },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    door.stderr.on('data', (b: Buffer) => (err += b));
    try {
      let body = '';
      for (let i = 0; i < 300 && !body; i++) {
        body = await fetch(`http://127.0.0.1:${port}/`).then(
          (r) => (r.ok ? r.text() : ''),
          () => '',
        );
        if (!body) await new Promise((r) => setTimeout(r, 100));
      }
      expect(body, err).toMatch(/^hello from \S+\n$/);
    } finally {
      door.kill('SIGTERM');
      await new Promise((r) => door.once('exit', r));
    }
    expect((await onB(['ls'])).out.filter((v: { role: string }) => v.role === 'clone')).toEqual([]); // its clones went with it
  });

  it("the DaemonSet's keeper, run for real as node B: a `name ref snapshot` line is pulled (never booted) and kept", async () => {
    // its script as the manifest has it, with the ConfigMap's file and `scion` (this checkout's CLI) where a node has them
    const ds = parseAllDocuments(readFileSync(join(ROOT, 'deploy/kubernetes/daemonset.yaml'), 'utf8'))
      .map((d) => d.toJSON())
      .find((d) => d?.kind === 'DaemonSet');
    const keeper = ds.spec.template.spec.containers.find((c: { args?: string[] }) => c.args?.[0]?.includes('/etc/scion/templates'));
    const etc = tmp('etc-scion');
    const bin = tmp('node-bin');
    writeFileSync(join(etc, 'templates'), `keep-tpl ${ref()} snapshot\n`);
    writeFileSync(join(bin, 'scion'), `#!/bin/sh\nexec ${process.execPath} ${join(ROOT, 'bin/scion.js')} "$@"\n`, { mode: 0o755 });
    const script = (keeper.args[0] as string).replaceAll('/etc/scion/templates', join(etc, 'templates'));
    const node = spawn('sh', ['-c', script], {
      env: { ...process.env, ...nodeB, PATH: `${bin}:${process.env.PATH}` },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    let out = '';
    node.stdout.on('data', (b: Buffer) => (out += b));
    node.stderr.on('data', (b: Buffer) => (out += b));
    try {
      let kept: { state?: string } | undefined;
      for (let i = 0; i < 600 && !kept; i++) {
        kept = ((await onB(['ls'])).out ?? []).find((v: { name: string; state: string }) => v.name === 'keep-tpl' && v.state === 'frozen');
        if (!kept) await new Promise((r) => setTimeout(r, 100));
      }
      expect(kept, out).toBeDefined();
    } finally {
      process.kill(-node.pid!, 'SIGTERM'); // the keeper loops forever, as a DaemonSet's container does
    }
    expect(out).not.toMatch(/booting|scion boot/); // pulled, not booted
    const forked = await onB(['fork', 'keep-tpl', '-n', '1']);
    expect(forked.code, forked.stderr).toBe(0);
    const [c] = forked.out.clones as vm.CloneResult[];
    expect(await (await fetch(`http://127.0.0.1:${c.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    expect((await onB(['rm', c.name, 'keep-tpl'])).code).toBe(0);
  });

  it('a node running another VMM refuses the record with the typed error, before anything is laid out', async () => {
    const r = await onB(['pull', ref(), '--name', 'other-vmm'], { SCION_VMM: 'system' });
    expect(r.code).toBe(1);
    expect(r.out.error.code).toBe('E_TEMPLATE_INCOMPATIBLE');
    expect(r.out.error.message).toMatch(/it was frozen under the pinned QEMU 10\.0\.\d+ \(sha256:[0-9a-f]{12}…\), this node runs the system QEMU 7\.2\./);
    expect(existsSync(join(nodeB.SCION_TEMPLATE_DIR, 'other-vmm'))).toBe(false);
    expect(existsSync(join(nodeB.SCION_RUN_DIR, 'vms', 'other-vmm'))).toBe(false);
  });

  it('a tampered chunk at the registry is refused and nothing is laid out', async () => {
    const m = JSON.parse(
      await (await fetch(`http://${registry.host}/v2/snap/web-tpl/manifests/1`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })).text(),
    );
    const chunk = m.layers.find((l: { mediaType: string }) => l.mediaType.endsWith('ram-chunk.v1+gzip'));
    const hex = chunk.digest.slice(7);
    const data = join(registry.storage, 'docker/registry/v2/blobs/sha256', hex.slice(0, 2), hex, 'data');
    const good = readFileSync(data);
    const bad = Buffer.from(good);
    bad[bad.length >> 1] ^= 0xff; // same size, one byte changed
    writeFileSync(data, bad);
    try {
      const r = await onB(['pull', ref(), '--name', 'tampered']);
      expect(r.code).toBe(5);
      expect(r.out.error.code).toBe('E_DIGEST_MISMATCH');
      expect(r.out.error.message).toContain(`RAM chunk`);
      expect(existsSync(join(nodeB.SCION_TEMPLATE_DIR, 'tampered'))).toBe(false);
      expect(readdirSync(nodeB.SCION_TEMPLATE_DIR).filter((n) => n.startsWith('.pull-'))).toEqual([]);
      expect(existsSync(join(nodeB.SCION_RUN_DIR, 'vms', 'tampered'))).toBe(false);
    } finally {
      writeFileSync(data, good);
    }
  });

  it('a hibernated clone is pushed with its template by digest, pulled on node B and resumed there: the same machine, its processes and files as they were', async () => {
    const [c] = await vm.fork('web-tpl', { n: 1 });
    const { pid, mark, count: before } = await startCounter(c.name);
    const machineId = await guestSh(c.name, 'cat /etc/machine-id');
    await (await vm.Machine.open(c.name)).hibernate();
    const cloneRef = `${registry.host}/snap/web-tpl:clone-1`; // the template's repository: a registry reuses blobs within one
    const push = await onA(['push', c.name, cloneRef]);
    expect(push.code, push.stderr).toBe(0);
    const pushed: vm.HibernatedPushResult = push.out;
    expect(push.out.kind).toBe('hibernated');
    // its template by digest: the same snapshot as the tagged push, which the registry had whole
    expect(pushed.template.digest).toBe(first.digest);
    expect(pushed.template.bytesSent).toBeLessThanOrEqual(first.bytesSent * 0.05);
    expect(pushed.stateBytes).toBeLessThanOrEqual(16 * 1024 * 1024);

    const pulled = await onB(['pull', cloneRef]);
    expect(pulled.code, pulled.stderr).toBe(0);
    expect(pulled.out).toMatchObject({ ok: true, kind: 'hibernated', name: c.name, template: { name: `snap-${first.digest.slice(7, 19)}` } });
    const listed = (await onB(['ls'])).out.find((v: { name: string }) => v.name === c.name);
    expect(listed).toMatchObject({ state: 'hibernated', template: `snap-${first.digest.slice(7, 19)}` });
    const resumed = await onB(['resume', c.name]);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.out.hostname).toBe(c.hostname);
    const inB = async (script: string) => {
      const r = await onB(['exec', c.name, '--', 'sh', '-c', script]);
      expect(r.code, r.stderr).toBe(0);
      return r.out.stdout as string;
    };
    expect(await inB(`kill -0 ${pid} && echo alive`)).toContain('alive'); // the same process
    expect(Number(await inB('sleep 0.5; cat /tmp/h/count'))).toBeGreaterThan(before); // counting on from where it was
    expect(await inB('cat /tmp/h/mark')).toBe(mark);
    expect(await inB('cat /etc/machine-id')).toBe(machineId);
    // its clock stepped to the host's (A's clone slept for seconds): the guest's time falls inside the window the command
    // ran in, to the second busybox's date gives (the 100 ms bound is hibernate.test.ts's, on the same resume path)
    const t0 = Date.now();
    const guestS = Number(await inB('date +%s'));
    expect(guestS).toBeGreaterThanOrEqual(Math.floor((t0 - 100) / 1000));
    expect(guestS).toBeLessThanOrEqual(Math.ceil((Date.now() + 100) / 1000));
    // it answers HTTP on node B's own host port, as itself
    expect(await (await fetch(`http://127.0.0.1:${resumed.out.ports['8080']}/`)).text()).toBe(`hello from ${c.hostname}\n`);
    expect((await onB(['rm', c.name])).code).toBe(0);
    await vm.removeVm(c.name);
  });
});
