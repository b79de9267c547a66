/**
 * scion as a containerd runtime, against a real containerd the test starts
 * (its own root, state and sockets; nothing touches a system containerd):
 * `ctr` drives containerd-shim-scion-v2 from bin/, each task a pod VM forked
 * from a template the test freezes from images/pod.yaml, its image Debian's
 * busybox imported into containerd's own store.
 */
import { describe, it, expect, beforeAll, afterAll, afterEach } from 'vitest';
import { spawn, execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { readdirSync, existsSync, readFileSync, mkdtempSync, statSync, readlinkSync } from 'node:fs';
import { startContainerd, shimPids, type TestContainerd } from '../support/containerd.ts';
import { busyboxOciArchive } from '../support/oci-busybox.ts';
import { isolateRunDirs, removeEverything, image, scionQemuPids } from './helpers.ts';
import { EventPublisher } from '../../shim/events.ts';
import { TtrpcClient } from '../../shim/ttrpc.ts';
import { spareKey } from '../../shim/spare.ts';
import { startRegistry } from '../support/registry.ts';
import { createHash, randomBytes } from 'node:crypto';

/** ctr with `input` on its stdin (then closed), its stdout and stderr as bytes. */
function ctrWithInput(c: TestContainerd, args: string[], input: Buffer): Promise<{ stdout: Buffer; stderr: Buffer; exitCode: number | null }> {
  return new Promise((resolve) => {
    const p = spawn('ctr', ['--address', c.address, '--namespace', 'scion-test', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [],
      err: Buffer[] = [];
    p.stdout.on('data', (b: Buffer) => out.push(b));
    p.stderr.on('data', (b: Buffer) => err.push(b));
    p.stdin.on('error', () => {}); // ended before it read everything: the test's checks say what came
    p.stdin.end(input);
    p.on('close', (exitCode) => resolve({ stdout: Buffer.concat(out), stderr: Buffer.concat(err), exitCode }));
  });
}

const ROOT = join(import.meta.dirname, '../..');
const IMAGE = 'docker.io/scion/busybox:test';
const RUNTIME = ['--runtime', 'io.containerd.scion.v2', '--snapshotter', 'native'];
const dirs = isolateRunDirs('shim');
let cd: TestContainerd;
let podImageDir: string;

beforeAll(async () => {
  const { build } = await import('../../builder/build.ts');
  const vm = await import('../../host/index.ts');
  podImageDir = (await build({ definitionPath: image('pod') })).dir;
  const img = await vm.loadImage(podImageDir);
  await vm.freeze(await vm.bootTemplate(img, { name: 'pod-tpl' }), img);
  // the shim finds scion's run and template directories, and its template, through containerd's environment;
  // pods may name images on a loopback registry (the test's own)
  process.env.SCION_SHIM_IMAGES = '127.0.0.1:';
  cd = await startContainerd({ path: [join(ROOT, 'bin')] });
  await cd.ctr(['images', 'import', await busyboxOciArchive(cd.dir, IMAGE)]);
}, 180_000);
afterAll(async () => {
  try {
    await cd?.stop();
  } finally {
    await removeEverything(dirs);
  }
});

/** `ctr tasks ls` once the task is no longer running (or after 10 s). */
async function stopped(id: string): Promise<string> {
  let ls = '';
  for (let i = 0; i < 100; i++) {
    ls = (await cd.ctr(['tasks', 'ls'])).stdout;
    if (new RegExp(`${id}\\s+\\d+\\s+STOPPED`).test(ls)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return ls;
}

/**
 * The shim processes (serving, or containerd's background `delete`) still
 * there after a bounded wait, with their command lines: every test ends with
 * none, so a shim that stays is blamed on the test that left it.
 */
async function shimsLeft(): Promise<string[]> {
  for (let i = 0; i < 150 && shimPids(cd.dir).length; i++) await new Promise((r) => setTimeout(r, 100));
  return shimPids(cd.dir).flatMap((p) => {
    try {
      return [`${p}: ${readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').join(' ')}`];
    } catch {
      return [];
    }
  });
}

/** Kill a task (ctr tasks kill `killArgs`), wait for it to stop, delete it and its container: the `ctr tasks ls` it stopped in. */
async function killAndDelete(id: string, killArgs: string[]): Promise<string> {
  await cd.ctr(['tasks', 'kill', ...killArgs, id]);
  const ls = await stopped(id);
  await cd.ctr(['tasks', 'delete', id]);
  await cd.ctr(['containers', 'delete', id]);
  return ls;
}

/** VMs scion knows of, other than the template. */
async function pods(): Promise<string[]> {
  const vm = await import('../../host/index.ts');
  return (await vm.list()).filter((v) => v.role === 'clone').map((v) => v.name);
}

describe('ctr run --runtime io.containerd.scion.v2', () => {
  afterEach(async () => {
    expect(await shimsLeft()).toEqual([]);
  });

  it("prints the command's output (stdout and stderr) and exits with its status; the pod VM is gone after --rm", async () => {
    const r = await cd.ctr(['run', '--rm', ...RUNTIME, IMAGE, 'run1', 'sh', '-c', 'echo hello from $(hostname); echo to-stderr >&2; exit 7'], {
      nothrow: true,
    });
    expect(r.stdout).toMatch(/^hello from pod-\d+\n$/);
    expect(r.stderr).toBe('to-stderr\n');
    expect(r.exitCode).toBe(7);
    expect(await pods()).toEqual([]);
    expect((await cd.ctr(['tasks', 'ls', '-q'])).stdout.trim()).toBe('');
  });

  it('stdio as bytes: input piped into ctr reaches the container byte for byte, output and error streams arrive whole and in order before the exit', async () => {
    const input = randomBytes(3 * 1024 * 1024);
    const r = await ctrWithInput(
      cd,
      ['run', '--rm', ...RUNTIME, IMAGE, 'io1', 'sh', '-c', 'sha256sum; wc -c; seq 1 120000 >&2 & seq 1 300000; wait; exit 3'],
      input,
    );
    const lines = (n: number) => Array.from({ length: n }, (_, i) => `${i + 1}\n`).join('');
    // sha256sum and wc both read stdin: the first to its end, the second sees nothing left
    const [sum, count, ...rest] = r.stdout.toString().split('\n');
    expect(sum).toBe(`${createHash('sha256').update(input).digest('hex')}  -`);
    expect(count.trim()).toBe('0');
    expect(rest.join('\n')).toBe(lines(300000));
    expect(r.stderr.toString()).toBe(lines(120000));
    expect(r.exitCode).toBe(3);
  });

  it("a reader that stalls holds the writer in the guest back: the shim's memory stays bounded, and every byte arrives once it reads again", async () => {
    const SIZE = 100_000_000;
    const p = spawn(
      'ctr',
      ['--address', cd.address, '--namespace', 'scion-test', 'run', '--rm', ...RUNTIME, IMAGE, 'stall1', 'sh', '-c', `head -c ${SIZE} /dev/zero`],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let bytes = 0,
      err = '';
    p.stdout.on('data', (c: Buffer) => {
      bytes += c.length;
    });
    p.stderr.on('data', (c) => (err += c));
    p.stdout.pause();
    // stalled for 8 s: the task runs (its pod VM is up within that) and writes into a reader that does not read
    let peakKb = 0;
    for (let i = 0; i < 16; i++) {
      await new Promise((r) => setTimeout(r, 500));
      for (const pid of shimPids(cd.dir)) {
        try {
          peakKb = Math.max(peakKb, Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]));
        } catch {
          /* gone */
        }
      }
    }
    expect(shimPids(cd.dir).length).toBeGreaterThan(0);
    p.stdout.resume();
    const code = await new Promise((r) => p.on('close', r));
    expect(err).toBe('');
    expect(code).toBe(0);
    expect(bytes).toBe(SIZE);
    // a shim that buffered what the guest wrote would hold most of the 100 MB; it idles at ~60 MB
    expect(peakKb).toBeLessThan(110 * 1024);
    // output small enough to sit in the buffers between guest and reader (the port's queue, the socket, the
    // FIFO): the process exits while its reader stalls, and its exit must wait for that output, not cut it off
    const q = spawn(
      'ctr',
      ['--address', cd.address, '--namespace', 'scion-test', 'run', '--rm', ...RUNTIME, IMAGE, 'stall2', 'sh', '-c', 'head -c 1000000 /dev/zero; exit 9'],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let small = 0;
    q.stdout.on('data', (c: Buffer) => {
      small += c.length;
    });
    q.stdout.pause();
    await new Promise((r) => setTimeout(r, 8000));
    q.stdout.resume();
    expect(await new Promise((r) => q.on('close', r))).toBe(9);
    expect(small).toBe(1_000_000);
  }, 180_000);

  it("runs in a VM of its own: another kernel's view, the image's files, the pod's hostname", async () => {
    const r = await cd.ctr(['run', '--rm', ...RUNTIME, IMAGE, 'run2', 'sh', '-c', 'uname -r; ls /bin | wc -l; cat /proc/1/cmdline | tr "\\0" " "'], {
      nothrow: true,
    });
    const [kernel, count, init] = r.stdout.trim().split('\n');
    expect(kernel).toMatch(/deb13-amd64$/); // the guest's trixie kernel, not the host's
    expect(Number(count)).toBeGreaterThan(10);
    expect(init.trim()).toBe('sh -c uname -r; ls /bin | wc -l; cat /proc/1/cmdline | tr "\\0" " "'); // pid 1 of its own pid namespace
    expect(r.exitCode).toBe(0);
  });

  it('a detached task: exec in it (output, status), ps, kill with SIGTERM (143), delete; events in order', async () => {
    const watcher = spawn('ctr', ['--address', cd.address, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    watcher.stdout.on('data', (c) => (seen += c));
    try {
      // pid 1 of its namespace: SIGTERM reaches it only through a handler (as under runc)
      await cd.ctr(['run', '-d', ...RUNTIME, IMAGE, 'svc', 'sh', '-c', 'trap "exit 143" TERM; while true; do sleep 1; done']);
      expect(await pods()).toHaveLength(1);
      const ex = await cd.ctr(['tasks', 'exec', '--exec-id', 'e1', 'svc', 'sh', '-c', 'echo exec sees $(hostname); exit 4'], { nothrow: true });
      expect(ex.stdout).toMatch(/^exec sees pod-\d+\n$/);
      expect(ex.exitCode).toBe(4);
      // the task's processes, found by its pid namespace in the guest: the shell (its pid is the task's) and its sleep
      const ps = (await cd.ctr(['tasks', 'ps', 'svc'])).stdout
        .trim()
        .split('\n')
        .slice(1)
        .map((l) => Number(l.trim().split(/\s+/)[0]));
      const taskPid = Number(/svc\s+(\d+)\s+RUNNING/.exec((await cd.ctr(['tasks', 'ls'])).stdout)![1]);
      expect(ps).toContain(taskPid);
      expect(ps.length).toBeGreaterThanOrEqual(2);
      expect(await killAndDelete('svc', ['--signal', 'SIGTERM'])).toMatch(/svc\s+\d+\s+STOPPED/);
      expect(await pods()).toEqual([]);
      const end = Date.now() + 5000;
      while (!seen.includes('/tasks/delete') && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    } finally {
      watcher.kill();
    }
    const topics = seen
      .split('\n')
      .filter((l) => l.includes('"svc"'))
      .map((l) => /\s(\/tasks\/\S+)\s/.exec(l)?.[1])
      .filter(Boolean);
    expect(topics).toEqual(['/tasks/create', '/tasks/start', '/tasks/exec-added', '/tasks/exec-started', '/tasks/exit', '/tasks/exit', '/tasks/delete']);
    const exits = seen
      .split('\n')
      .filter((l) => l.includes('/tasks/exit') && l.includes('"svc"'))
      .map((l) => JSON.parse(l.slice(l.indexOf('{'))).exit_status);
    expect(exits).toEqual([4, 143]);
  });

  it("metrics tell the task's processes, CPU time and memory; kill --all signals every process of the task, not only its first", async () => {
    // the shell is pid 1 of its namespace without a handler: SIGTERM does not reach it; only its child gets
    // it, through --all, and then the shell's wait ends (a kill without --all leaves both running)
    await cd.ctr(['run', '-d', ...RUNTIME, IMAGE, 'all1', 'sh', '-c', 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; sleep 300 & wait $!; exit $?']);
    let ps: string[] = [];
    for (let i = 0; i < 100 && ps.length < 2; i++) {
      ps = (await cd.ctr(['tasks', 'ps', 'all1'])).stdout.trim().split('\n').slice(1);
      if (ps.length < 2) await new Promise((r) => setTimeout(r, 100));
    }
    expect(ps).toHaveLength(2); // the shell, past its loop, and its sleep
    // containerd reads them as cgroup v2 metrics (as CRI's ContainerStats does)
    const m = JSON.parse((await cd.ctr(['tasks', 'metrics', '--format', 'json', 'all1'])).stdout);
    expect(m.pids.current).toBe(2);
    expect(m.cpu.usage_usec).toBeGreaterThan(0); // the loop's CPU time
    expect(m.cpu.usage_usec).toBe(m.cpu.user_usec + m.cpu.system_usec);
    expect(m.memory.usage).toBeGreaterThan(100 * 1024); // two resident busybox processes
    expect(m.memory.usage_limit).toBeGreaterThan(m.memory.usage); // the VM's memory
    await cd.ctr(['tasks', 'kill', '--signal', 'SIGTERM', 'all1']);
    await new Promise((r) => setTimeout(r, 1000));
    expect((await cd.ctr(['tasks', 'ls'])).stdout).toMatch(/all1\s+\d+\s+RUNNING/);
    expect(await killAndDelete('all1', ['--all', '--signal', 'SIGTERM'])).toMatch(/all1\s+\d+\s+STOPPED/);
    expect(await pods()).toEqual([]);
  });

  it("a terminal: run -t and exec -t get a pty, sized as ctr's own terminal, and the exit status", async () => {
    const pty = await import('node-pty');
    /** ctr on a pty of 100x30 (node-pty), as a user at a terminal runs it */
    const onPty = (args: string[]) =>
      new Promise<{ out: string; code: number }>((resolve) => {
        const p = pty.spawn('ctr', ['--address', cd.address, '--namespace', 'scion-test', ...args], {
          cols: 100,
          rows: 30,
          env: process.env as Record<string, string>,
        });
        let out = '';
        p.onData((d) => (out += d));
        p.onExit(({ exitCode }) => resolve({ out, code: exitCode }));
      });
    // ctr sizes the pty just after the start: the script waits for it, as a program would for SIGWINCH
    // (busybox stty prints no size while it is 0x0)
    const sized = 'until [ -n "$(stty size 2>/dev/null)" ]; do sleep 0.1; done; [ -t 0 ] && [ -t 1 ] && echo on-a-tty; stty size';
    const r = await onPty(['run', '-t', '--rm', ...RUNTIME, IMAGE, 'tty1', 'sh', '-c', `${sized}; exit 5`]);
    // (\r\r\n: the guest's pty makes \n \r\n, ctr's terminal adds a \r; runc's pods print the same through ctr)
    expect(r.out).toMatch(/on-a-tty\r+\n30 100\r+\n/);
    expect(r.code).toBe(5);
    await cd.ctr(['run', '-d', ...RUNTIME, IMAGE, 'tty2', 'sleep', '300']);
    const ex = await onPty(['tasks', 'exec', '-t', '--exec-id', 'x1', 'tty2', 'sh', '-c', `${sized}; exit 6`]);
    expect(ex.out).toMatch(/on-a-tty\r+\n30 100\r+\n/);
    expect(ex.code).toBe(6);
    expect(await killAndDelete('tty2', ['-s', 'SIGKILL'])).toMatch(/tty2\s+\d+\s+STOPPED/);
    expect(await pods()).toEqual([]);
  });

  it('SIGKILL (ctr kill -s 9) ends the task with 137', async () => {
    const watcher = spawn('ctr', ['--address', cd.address, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    watcher.stdout.on('data', (c) => (seen += c));
    try {
      await cd.ctr(['run', '-d', ...RUNTIME, IMAGE, 'k9', 'sleep', '300']);
      expect(await killAndDelete('k9', ['--signal', 'SIGKILL'])).toMatch(/k9\s+\d+\s+STOPPED/);
    } finally {
      watcher.kill();
    }
    const exit = seen.split('\n').find((l) => l.includes('/tasks/exit') && l.includes('"k9"'))!;
    expect(JSON.parse(exit.slice(exit.indexOf('{')))).toMatchObject({ container_id: 'k9', exit_status: 137 });
    expect(await pods()).toEqual([]);
  });

  it('containerd restarted while a task runs: it finds the shim again through the address file, and the task goes on', async () => {
    await cd.ctr(['run', '-d', ...RUNTIME, IMAGE, 'survivor', 'sh', '-c', 'trap "exit 143" TERM; while true; do sleep 1; done']);
    const before = (await cd.ctr(['tasks', 'ls'])).stdout;
    await cd.restart();
    expect((await cd.ctr(['tasks', 'ls'])).stdout).toBe(before); // same task, same pid, RUNNING
    const ex = await cd.ctr(['tasks', 'exec', '--exec-id', 'after', 'survivor', 'sh', '-c', 'echo still $(hostname)'], { nothrow: true });
    expect(ex.stdout).toMatch(/^still pod-\d+\n$/);
    await cd.ctr(['tasks', 'kill', 'survivor']);
    expect(await stopped('survivor')).toMatch(/survivor\s+\d+\s+STOPPED/);
    await cd.ctr(['tasks', 'delete', 'survivor']);
    await cd.ctr(['containers', 'delete', 'survivor']);
    expect(await pods()).toEqual([]);
  });

  it('a template that does not exist: the run fails, saying which template and how to make it, and leaves nothing', async () => {
    const r = await cd.ctr(['run', '--rm', ...RUNTIME, '--annotation', 'io.scion.template=no-such-tpl', IMAGE, 'notpl', 'true'], { nothrow: true });
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toMatch(/cannot fork a pod VM from template no-such-tpl: no frozen template named no-such-tpl \(.*scion freeze <template> makes one/);
    expect(await pods()).toEqual([]);
    await cd.ctr(['containers', 'delete', 'notpl'], { nothrow: true });
    expect(readdirSync(join(dirs.run, 'shim')).filter((f) => f.endsWith('.erofs'))).toEqual([]); // the packed rootfs did not stay
  });

  it('a shim killed mid-task: containerd sees the task end, delete and gc leave nothing of scion', async () => {
    await cd.ctr(['run', '-d', ...RUNTIME, IMAGE, 'doomed', 'sleep', '300']);
    expect(await pods()).toHaveLength(1);
    // by its working directory, the task's bundle: a spare that took the task has `-id spare` on its command line
    const [shimPid] = shimPids(cd.dir).filter((p) => readlinkSync(`/proc/${p}/cwd`).endsWith('/doomed'));
    expect(shimPid).toBeGreaterThan(0);
    process.kill(shimPid, 'SIGKILL');
    let ls = '';
    for (let i = 0; i < 100; i++) {
      ls = (await cd.ctr(['tasks', 'ls'])).stdout;
      if (!/doomed\s+\d+\s+RUNNING/.test(ls)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(ls).not.toMatch(/doomed\s+\d+\s+RUNNING/);
    await cd.ctr(['tasks', 'delete', 'doomed'], { nothrow: true });
    await cd.ctr(['containers', 'delete', 'doomed']);
    const vm = await import('../../host/index.ts');
    await vm.gc();
    expect(await pods()).toEqual([]);
    expect(await scionQemuPids()).toEqual([]); // a frozen template runs no QEMU
    // containerd's clean-up runs the shim binary's `delete` in the background: give it its time
    expect(await shimsLeft()).toEqual([]);
    const shimDir = join(dirs.run, 'shim');
    // what stays is at most the containerd's spare, live, waiting for its next task (it is containerd's, not the
    // killed shim's pod's: made by the start of this or an earlier task, up 2 s after it, gone with its containerd)
    const files = existsSync(shimDir) ? readdirSync(shimDir).filter((f) => f.endsWith('.sock') || f.endsWith('.erofs')) : [];
    const liveSpare = (f: string) => {
      const m = /^spare-[0-9a-f]{12}-(\d+)\.sock$/.exec(f);
      return !!m && existsSync(`/proc/${m[1]}`) && readFileSync(`/proc/${m[1]}/cmdline`, 'utf8').split('\0').includes(cd.address);
    };
    expect(files.filter((f) => !liveSpare(f))).toEqual([]);
    expect(files.filter(liveSpare).length).toBeLessThanOrEqual(1);
  });
});

describe('a pod whose image is named by reference (io.scion.image)', () => {
  it('gets a template made from the pulled image on first use (a tap template), reused by the next pod; a bad reference is a clear error', async () => {
    const reg = await startRegistry();
    const vm = await import('../../host/index.ts');
    try {
      const ref = `${reg.host}/scion/pod:1.0`;
      await vm.push(podImageDir, ref);
      const run = (id: string, r: string) =>
        cd.ctr(['run', '--rm', ...RUNTIME, '--annotation', `io.scion.image=${r}`, IMAGE, id, 'sh', '-c', 'echo up in $(hostname)'], { nothrow: true });
      const first = await run('byref1', ref);
      expect(first.stderr).toBe('');
      expect(first.stdout).toMatch(/^up in pod-[0-9a-f]{12}-\d+\n$/); // named after its template
      const manifest = (await vm.loadImage(podImageDir)).manifestSha256;
      const tplName = `pod-${manifest.slice(0, 12)}-tpl`;
      const tpl = (await vm.list()).find((v) => v.name === tplName);
      expect(tpl).toMatchObject({ role: 'template', state: 'frozen' });
      const made = (await vm.Machine.find(tplName))!.info();
      expect(made.netMode).toEqual({ mode: 'tap' });
      // the second pod forks from the same template: not made again
      expect((await run('byref2', ref)).stdout).toMatch(/^up in pod-[0-9a-f]{12}-\d+\n$/);
      const again = (await vm.Machine.find(tplName))!.info();
      expect([statSync(again.runDir).ino, again.timings]).toEqual([statSync(made.runDir).ino, made.timings]);
      expect(reg.requests('GET', '/manifests/')).toBeGreaterThan(0);
      const bad = await run('byref3', `${reg.host}/scion/no-such:1.0`);
      expect(bad.exitCode).not.toBe(0);
      expect(bad.stderr).toMatch(/cannot make a template of 127\.0\.0\.1:\d+\/scion\/no-such:1\.0 \(annotation io\.scion\.image\): /);
      await cd.ctr(['containers', 'delete', 'byref3'], { nothrow: true });
      // a reference outside what the node allows (SCION_SHIM_IMAGES) is refused before anything is pulled
      const before = reg.requests('GET', '/manifests/');
      const denied = await run('byref4', 'registry.example.com/evil/pod:1.0');
      expect(denied.stderr).toMatch(
        /io\.scion\.image: registry\.example\.com\/evil\/pod:1\.0 is not under a reference this node allows \(SCION_SHIM_IMAGES: 127\.0\.0\.1:\)/,
      );
      expect(reg.requests('GET', '/manifests/')).toBe(before);
      await cd.ctr(['containers', 'delete', 'byref4'], { nothrow: true });
      expect(await pods()).toEqual([]);
      await vm.removeVm(tplName);
    } finally {
      await reg.stop();
    }
  });
});

describe('a pod whose template is a snapshot reference (io.scion.template=<registry>/<repo>:<tag>)', () => {
  it('pulls the template snapshot once per node for pods starting at once, forks them from it, and refuses a reference the node does not allow', async () => {
    const reg = await startRegistry();
    const vm = await import('../../host/index.ts');
    try {
      const ref = `${reg.host}/snap/pod-tpl:1`;
      const pushed = await vm.pushTemplate('pod-tpl', ref);
      const manifest = JSON.parse(
        await (await fetch(`http://${reg.host}/v2/snap/pod-tpl/manifests/1`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })).text(),
      );
      // GETs of the artifact's layers (RAM chunks, state, kernel stub, index); a pod waiting for another's pull reads the small record again
      const layerGets = () => manifest.layers.map((l: { digest: string }) => reg.requests('GET', `/blobs/${l.digest}`));
      const run = (id: string, r: string) =>
        cd.ctr(['run', '--rm', ...RUNTIME, '--annotation', `io.scion.template=${r}`, IMAGE, id, 'sh', '-c', 'echo up in $(hostname)'], { nothrow: true });
      const [a, b] = await Promise.all([run('snap1', ref), run('snap2', ref)]);
      for (const r of [a, b]) {
        expect(r.stderr).toBe('');
        expect(r.stdout).toMatch(/^up in \S+\n$/);
      }
      const name = `snap-${pushed.digest.slice(7, 19)}`;
      expect((await vm.list()).find((v) => v.name === name)).toMatchObject({ role: 'template', state: 'frozen' });
      // pulled once: every layer of the artifact fetched once, for both pods
      expect(manifest.layers).toHaveLength(pushed.chunks.sent + 3);
      expect(new Set(layerGets())).toEqual(new Set([1]));
      expect((await run('snap3', ref)).stdout).toMatch(/^up in \S+\n$/);
      expect(new Set(layerGets())).toEqual(new Set([1])); // a later pod forks from the local copy
      const denied = await run('snap4', 'registry.example.com/evil/pod-tpl:1');
      expect(denied.stderr).toMatch(/template snapshot registry\.example\.com\/evil\/pod-tpl:1 is not under a reference this node allows/);
      await cd.ctr(['containers', 'delete', 'snap4'], { nothrow: true });
      expect(await pods()).toEqual([]);
      await vm.removeVm(name);
    } finally {
      await reg.stop();
    }
  });
});

describe('a shim containerd leaves', () => {
  it('with no task, goes by itself when the connection closes (no Shutdown came), and takes its socket along', async () => {
    const bundle = mkdtempSync(join(cd.dir, 'bundle-'));
    // containerd's `start`, by hand: a lone task's shim, serving, with no task created yet
    const address = execFileSync(
      join(ROOT, 'bin', 'containerd-shim-scion-v2'),
      ['-namespace', 'scion-test', '-id', 'lonely', '-address', cd.address, 'start'],
      { cwd: bundle, encoding: 'utf8' },
    );
    const sock = address.replace(/^unix:\/\//, '');
    const [pid] = shimPids(bundle);
    expect(pid).toBeGreaterThan(0);
    const client = new TtrpcClient(sock);
    expect(await client.call('containerd.task.v2.Task', 'Connect', { id: 'lonely' })).toMatchObject({ shimPid: pid });
    client.close();
    for (let i = 0; i < 100 && shimPids(bundle).length; i++) await new Promise((r) => setTimeout(r, 100));
    expect(shimPids(bundle)).toEqual([]);
    expect(existsSync(sock)).toBe(false);
  });
});

describe('shims whose containerd goes away', () => {
  /** Every shim process of a containerd: serving (their bundle under its directory) and spare (its address on their command line). */
  const shimsOf = (c: TestContainerd): number[] => [
    ...new Set([
      ...shimPids(c.dir),
      ...readdirSync('/proc')
        .filter((p) => /^\d+$/.test(p))
        .flatMap((p) => {
          try {
            const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
            return argv.some((x) => x.endsWith('containerd-shim-scion-v2')) && argv.includes(c.address) ? [Number(p)] : [];
          } catch {
            return [];
          } // ended meanwhile
        }),
    ]),
  ];
  const until = async (what: () => boolean | Promise<boolean>, ms: number) => {
    for (const end = Date.now() + ms; !(await what()) && Date.now() < end; ) await new Promise((r) => setTimeout(r, 200));
  };
  const clones = async () => (await (await import('../../host/index.ts')).list()).filter((v) => v.role === 'clone');

  it('containerd stopped (SIGTERM) with a detached task, a spare and a pool refill under way: every shim exits, the pod VM goes, no half-made VM stays', async () => {
    const c = await startContainerd({ path: [join(ROOT, 'bin')], pool: 1 });
    const vm = await import('../../host/index.ts');
    try {
      await c.ctr(['images', 'import', await busyboxOciArchive(c.dir, IMAGE)]);
      await c.ctr(['run', '-d', ...RUNTIME, IMAGE, 'left1', 'sleep', '300']);
      // the refill starts 1 s after the task did: containerd goes while it forks (a second QEMU), with the spare up
      await until(async () => (await clones()).length >= 2 && shimsOf(c).length >= 2, 30_000);
      expect(shimsOf(c).length).toBeGreaterThanOrEqual(2); // the serving shim and the spare
      const refilling = (await clones()).some((v) => v.owner?.kind === 'pool' && v.state === 'starting');
      c.proc.kill('SIGTERM'); // containerd's own orderly stop: it unlinks its sockets, its tasks' shims stay behind
      await until(() => shimsOf(c).length === 0, 30_000);
      expect(
        shimsOf(c).map((p) => {
          try {
            return readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').join(' ');
          } catch {
            return String(p);
          }
        }),
      ).toEqual([]);
      // what stays is the node's pool only: paused, ready VMs of the template (at most its size), nothing of the pod
      const left = await clones();
      expect(left.every((v) => v.owner?.kind === 'pool' && v.state === 'running')).toBe(true);
      expect(left.length).toBeLessThanOrEqual(1);
      expect((await scionQemuPids()).length).toBe(left.length);
      console.log(`containerd stopped with a refill ${refilling ? 'under way' : 'already done'}: ${left.length} pooled VM left`);
      for (const v of left) await vm.removeVm(v.name, { force: true });
    } finally {
      await c.stop();
    }
  }, 120_000);

  it('a shim told to stop (SIGTERM) removes its pod VM and exits; containerd killed (SIGKILL, its sockets left dead): the rest go within seconds', async () => {
    const c = await startContainerd({ path: [join(ROOT, 'bin')] });
    try {
      await c.ctr(['images', 'import', await busyboxOciArchive(c.dir, IMAGE)]);
      await c.ctr(['run', '-d', ...RUNTIME, IMAGE, 'term1', 'sleep', '300']);
      await c.ctr(['run', '-d', ...RUNTIME, IMAGE, 'kill1', 'sleep', '300']);
      expect(await clones()).toHaveLength(2);
      const [termShim] = shimPids(c.dir).filter((p) => readlinkSync(`/proc/${p}/cwd`).endsWith('/term1'));
      expect(termShim).toBeGreaterThan(0);
      process.kill(termShim, 'SIGTERM');
      await until(async () => !existsSync(`/proc/${termShim}`) && (await clones()).length === 1, 30_000);
      expect(existsSync(`/proc/${termShim}`)).toBe(false);
      expect((await clones()).map((v) => v.state)).toEqual(['running']); // kill1's, untouched
      c.proc.kill('SIGKILL');
      await until(async () => shimsOf(c).length === 0 && (await clones()).length === 0, 30_000);
      expect(shimsOf(c)).toEqual([]);
      expect(await clones()).toEqual([]);
      expect(await scionQemuPids()).toEqual([]);
    } finally {
      await c.stop();
    }
  }, 120_000);
});

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
    } finally {
      pub.close();
      watcher.kill();
    }
    // `ctr events`: <date> <time> <zone> UTC <namespace> <topic> <event as JSON>
    const events = seen
      .split('\n')
      .filter((l) => l.includes('"ev1"'))
      .map((l) => /^\S+ \S+ \S+ \S+ (\S+) (\S+) (\{.*\})$/.exec(l)!);
    expect(events.map((m) => m[2])).toEqual(['/tasks/create', '/tasks/start', '/tasks/exit', '/tasks/delete']);
    expect(events.every((m) => m[1] === 'scion-test')).toBe(true);
    expect(JSON.parse(events[2][3])).toMatchObject({ container_id: 'ev1', pid: 7, exit_status: 3 });
  });
});

describe('spare shims (a serving process up before its task)', () => {
  /** Spare processes of a containerd (their command line names its address), with their pids. */
  const sparesOf = (address: string): number[] =>
    readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .flatMap((p) => {
        try {
          const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
          return argv.some((x) => x.endsWith('containerd-shim-scion-v2')) && argv.includes('spare') && argv.includes(address) ? [Number(p)] : [];
        } catch {
          return [];
        } // ended meanwhile
      });
  const spareUp = async (dir: string, key: string): Promise<string[]> => {
    for (let i = 0; i < 150; i++) {
      const socks = readdirSync(dir).filter((f) => f.startsWith(`spare-${key}-`));
      if (socks.length) return socks;
      await new Promise((r) => setTimeout(r, 100));
    }
    return [];
  };

  it('the next task is served by the spare the last start left (its output and status as ever); a dead spare is passed over; spares go with their containerd', async () => {
    const cd2 = await startContainerd({ path: [join(ROOT, 'bin')] });
    const shimDir = join(dirs.run, 'shim');
    // the spares of this containerd and namespace (the file's other containerd keeps its own)
    const key = spareKey({ namespace: 'scion-test', address: cd2.address }, cd2.ttrpcAddress);
    try {
      await cd2.ctr(['images', 'import', await busyboxOciArchive(cd2.dir, IMAGE)]);
      const first = await cd2.ctr(['run', '--rm', ...RUNTIME, IMAGE, 'spare-a', 'sh', '-c', 'echo a from $(hostname); exit 3'], { nothrow: true });
      expect([first.stdout, first.exitCode]).toEqual([expect.stringMatching(/^a from pod-\d+\n$/), 3]);
      expect(await spareUp(shimDir, key)).toHaveLength(1); // left by the first start
      const second = await cd2.ctr(['run', '--rm', ...RUNTIME, IMAGE, 'spare-b', 'sh', '-c', 'echo b from $(hostname); exit 4'], { nothrow: true });
      expect([second.stdout, second.exitCode]).toEqual([expect.stringMatching(/^b from pod-\d+\n$/), 4]);
      expect(cd2.log()).toContain('serving spare-b (a spare, taken)');
      // a spare killed before it was taken: the next start serves the task with a process of its own
      const [sock] = await spareUp(shimDir, key);
      process.kill(Number(/-(\d+)\.sock$/.exec(sock)![1]), 'SIGKILL');
      const third = await cd2.ctr(['run', '--rm', ...RUNTIME, IMAGE, 'spare-c', 'sh', '-c', 'echo c; exit 5'], { nothrow: true });
      expect([third.stdout, third.exitCode]).toEqual(['c\n', 5]);
      expect(cd2.log()).toMatch(/serving spare-c \d+ ms after the process started/);
      expect(await spareUp(shimDir, key)).toHaveLength(1);
      expect(sparesOf(cd2.address)).toHaveLength(1);
    } finally {
      await cd2.stop();
    }
    // its containerd gone, the spare goes too (it looks every 2 s)
    for (let i = 0; i < 60 && sparesOf(cd2.address).length; i++) await new Promise((r) => setTimeout(r, 100));
    expect(sparesOf(cd2.address)).toEqual([]);
    expect(readdirSync(shimDir).filter((f) => f.startsWith(`spare-${key}-`))).toEqual([]);
  }, 120_000);
});
