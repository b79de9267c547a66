/**
 * A containerd of the test's own: its root, state, sockets and config under a
 * temporary directory (nothing touches a system containerd), `native`
 * snapshots (works on any filesystem), started and stopped by the test.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, writeFileSync, existsSync, rmSync, mkdirSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { $ } from 'zx';

export interface TestContainerd {
  dir: string;
  address: string;
  ttrpcAddress: string;
  readonly proc: ChildProcess;
  log: () => string;
  restart: () => Promise<void>;
  ctr: (args: string[], opts?: { namespace?: string; nothrow?: boolean }) => Promise<{ stdout: string; stderr: string; exitCode: number | null }>;
  stop: () => Promise<void>;
}

/** Shim processes whose working directory (their bundle) is under `dir`. */
export function shimPids(dir: string): number[] {
  return readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .flatMap((p) => {
      try {
        if (!readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('containerd-shim-scion-v2')) return [];
        return readlinkSync(`/proc/${p}/cwd`).startsWith(dir) ? [Number(p)] : [];
      } catch {
        return [];
      } // ended meanwhile
    });
}

/** The CRI plugin's configuration: runtime `scion` (our shim), the sandbox image the test imported, native snapshots. */
export function criConfig(o: { sandboxImage: string; cniConfDir?: string }): string[] {
  return [
    // these machines give root no CAP_SYS_RESOURCE: runc could not set the sandbox's oom_score_adj
    // of -998 ("can't get final child's PID from pipe: EOF"); clamped to containerd's own, it runs
    '[plugins."io.containerd.grpc.v1.cri"]',
    `  sandbox_image = "${o.sandboxImage}"`,
    '  restrict_oom_score_adj = true',
    '[plugins."io.containerd.grpc.v1.cri".containerd]',
    '  snapshotter = "native"',
    '  default_runtime_name = "runc"',
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
    '  runtime_type = "io.containerd.runc.v2"',
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.scion]',
    '  runtime_type = "io.containerd.scion.v2"',
    '  pod_annotations = ["io.scion.*"]',
    '[plugins."io.containerd.grpc.v1.cri".cni]',
    '  bin_dir = "/usr/lib/cni"',
    `  conf_dir = "${o.cniConfDir ?? '/nonexistent'}"`,
  ];
}

/** `pool`: SCION_SHIM_POOL for its shims (default 0: each pod forked, so a test sees only its own VMs) */
export async function startContainerd(
  opts: { path?: string[]; cri?: { sandboxImage: string; cniConfDir?: string }; pool?: number } = {},
): Promise<TestContainerd> {
  const dir = mkdtempSync(join(tmpdir(), 'scion-containerd-'));
  const address = join(dir, 'containerd.sock');
  mkdirSync(join(dir, 'root'));
  mkdirSync(join(dir, 'state'));
  writeFileSync(
    join(dir, 'config.toml'),
    [
      'version = 2',
      `root = "${dir}/root"`,
      `state = "${dir}/state"`,
      opts.cri ? '' : 'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
      ...(opts.cri ? criConfig(opts.cri) : []),
      '[grpc]',
      `  address = "${address}"`,
      '[ttrpc]',
      `  address = "${address}.ttrpc"`,
      '[debug]',
      `  address = "${dir}/debug.sock"`,
      '  level = "debug"',
      '[plugins."io.containerd.monitor.v1.cgroups"]',
      '  no_prometheus = true',
    ].join('\n') + '\n',
  );
  let log = '';
  const env = { ...process.env, PATH: [...(opts.path ?? []), process.env.PATH].join(':'), SCION_SHIM_POOL: String(opts.pool ?? 0) };
  const launch = async (): Promise<ChildProcess> => {
    log = '';
    const p = spawn('containerd', ['--config', join(dir, 'config.toml')], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    p.stdout!.on('data', (c) => (log += c));
    p.stderr!.on('data', (c) => (log = (log + c).slice(-200_000)));
    const end = Date.now() + 30_000;
    while (!existsSync(address) || !/containerd successfully booted/.test(log)) {
      if (p.exitCode !== null || Date.now() > end) {
        p.kill('SIGKILL');
        throw new Error(`containerd did not start: ${log.slice(-3000)}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    return p;
  };
  let proc = await launch();
  const exited = (p: ChildProcess) =>
    new Promise((r) => {
      if (p.exitCode !== null || p.signalCode !== null) r(undefined);
      else p.once('exit', r);
    });
  const ctr = async (args: string[], o: { namespace?: string; nothrow?: boolean } = {}) => {
    const r = await $({ env, nothrow: o.nothrow ?? false, quiet: true })`ctr --address ${address} --namespace ${o.namespace ?? 'scion-test'} ${args}`;
    return { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode };
  };
  const stop = async () => {
    // what a test left: its tasks killed and deleted through containerd (their shims then exit), then any
    // shim still serving from this containerd's bundles killed (it would outlive containerd, by design)
    const ids = (await ctr(['tasks', 'ls', '-q'], { nothrow: true })).stdout.trim().split('\n').filter(Boolean);
    for (const id of ids) {
      await ctr(['tasks', 'kill', '--signal', 'SIGKILL', id], { nothrow: true });
      for (let i = 0; i < 50 && (await ctr(['tasks', 'delete', id], { nothrow: true })).exitCode !== 0; i++) await new Promise((r) => setTimeout(r, 100));
    }
    for (const id of (await ctr(['containers', 'ls', '-q'], { nothrow: true })).stdout.trim().split('\n').filter(Boolean))
      await ctr(['containers', 'delete', id], { nothrow: true });
    for (const pid of shimPids(dir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone meanwhile */
      }
    }
    proc.kill('SIGTERM');
    await Promise.race([exited(proc), new Promise((r) => setTimeout(r, 10_000))]);
    if (proc.exitCode === null) proc.kill('SIGKILL');
    // every mount containerd left under its directories (snapshots, a sandbox's /dev/shm), deepest first
    const mounts = readFileSync('/proc/mounts', 'utf8')
      .split('\n')
      .map((l) => l.split(' ')[1])
      .filter((m) => m?.startsWith(`${dir}/`))
      .sort()
      .reverse();
    for (const m of mounts) await $({ nothrow: true, quiet: true })`umount -l ${m}`;
    rmSync(dir, { recursive: true, force: true });
  };
  /** containerd killed (SIGKILL: no clean shutdown) and started again on the same root, state and sockets; shims go on. */
  const restart = async () => {
    proc.kill('SIGKILL');
    await exited(proc);
    proc = await launch();
  };
  return {
    dir,
    address,
    ttrpcAddress: `${address}.ttrpc`,
    get proc() {
      return proc;
    },
    log: () => log,
    ctr,
    stop,
    restart,
  };
}

/** A template for CNI pods: the image booted with a tap of its own (networking `tap`), as the pods' VMs will have one. */
export async function freezeTapTemplate(img: import('../../host/index.ts').ImageArtifacts, name: string): Promise<void> {
  const vm = await import('../../host/index.ts');
  await vm.freeze(await vm.bootTemplate(img, { name, net: { mode: 'tap' } }), img);
}

/** A CNI config dir with one bridge network (host-local addresses in `subnet`.0/24, state kept under `dir`); its conf dir. */
export function cniBridgeConfig(dir: string, o: { name: string; bridge: string; subnet: string }): string {
  mkdirSync(join(dir, 'conf'), { recursive: true });
  mkdirSync(join(dir, 'ipam'), { recursive: true });
  writeFileSync(
    join(dir, 'conf', '10-scion.conflist'),
    JSON.stringify({
      cniVersion: '0.4.0',
      name: o.name,
      plugins: [
        {
          type: 'bridge',
          bridge: o.bridge,
          isGateway: true,
          ipMasq: false,
          ipam: { type: 'host-local', dataDir: join(dir, 'ipam'), ranges: [[{ subnet: `${o.subnet}.0/24` }]], routes: [{ dst: '0.0.0.0/0' }] },
        },
      ],
    }),
  );
  return join(dir, 'conf');
}
