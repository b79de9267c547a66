/**
 * What the kubelet does for a pod, through containerd's CRI plugin with the
 * runtime `scion` (runtime_type io.containerd.scion.v2), from a gRPC client
 * whose messages come from the containerd binary itself (cri.ts). The pods
 * use the node's network (no CNI yet: issue 16); each pod is one VM forked
 * from the test's template, its containers run in it.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { processAlive } from '../../common/proc.ts';
import { join } from 'node:path';
import { startContainerd, freezeTapTemplate, cniBridgeConfig, shimPids, type TestContainerd } from '../support/containerd.ts';
import { busyboxOciArchive } from '../support/oci-busybox.ts';
import { criClient } from '../support/cri.ts';
import { isolateRunDirs, removeEverything, image, tmp } from './helpers.ts';
import { randomBytes } from 'node:crypto';
import { $ } from 'zx';

const ROOT = join(import.meta.dirname, '../..');
const IMAGE = 'docker.io/scion/busybox:test';
const dirs = isolateRunDirs('cri');
const logs = tmp('podlogs'); // removed with the rest at the end
let cd: TestContainerd;
let cri: ReturnType<typeof criClient>;
// CNI: a bridge (host-local addresses) the test's containerd gives each pod a veth on
const tag = randomBytes(2).toString('hex');
const cniBridge = `scnb${tag}`,
  subnet = `10.88.${parseInt(tag.slice(0, 2), 16)}`;
const cniDir = tmp('cni');
let cniConfDir = '';

beforeAll(async () => {
  const { build } = await import('../../builder/build.ts');
  const vm = await import('../../host/index.ts');
  const img = await vm.loadImage((await build({ definitionPath: image('pod') })).dir);
  await vm.freeze(await vm.bootTemplate(img, { name: 'pod-tpl' }), img);
  await freezeTapTemplate(img, 'podnet-tpl');
  cd = await startContainerd({
    path: [join(ROOT, 'bin')],
    cri: { sandboxImage: IMAGE, cniConfDir: (cniConfDir = cniBridgeConfig(cniDir, { name: `scion-test-${tag}`, bridge: cniBridge, subnet })) },
  });
  await cd.ctr(['images', 'import', await busyboxOciArchive(cd.dir, IMAGE)], { namespace: 'k8s.io' });
  cri = criClient(cd.address);
}, 180_000);
afterAll(async () => {
  cri?.close();
  try {
    await cd?.stop();
  } finally {
    await removeEverything(dirs);
    await $({ nothrow: true, quiet: true })`ip link del ${cniBridge}`; // never made if no pod ran: nothing to remove
  }
});

const podConfig = (name: string) => ({
  metadata: { name, uid: `uid-${name}`, namespace: 'default', attempt: 0 },
  hostname: name,
  log_directory: join(logs, name),
  linux: { security_context: { namespace_options: { network: 'NODE' } } },
});

async function clones() {
  const vm = await import('../../host/index.ts');
  return (await vm.list()).filter((v) => v.role === 'clone');
}

describe("the kubelet's calls for a pod, runtime_handler scion", () => {
  it('run the pod as one forked VM: sandbox, container, status, logs, exec, stop and remove, nothing left', async () => {
    expect((await cri.runtime.Version({})).runtime_name).toBe('containerd');
    const cfg = podConfig('web-pod');
    const { pod_sandbox_id: sb } = await cri.runtime.RunPodSandbox({ config: cfg, runtime_handler: 'scion' });
    expect((await cri.runtime.PodSandboxStatus({ pod_sandbox_id: sb })).status.state).toBe('SANDBOX_READY');
    const vms = await clones();
    expect(vms).toHaveLength(1); // the pod is a clone of the template
    expect(vms[0].hostname).toBe('web-pod'); // with the pod's hostname as its identity
    const { container_id: ct } = await cri.runtime.CreateContainer({
      pod_sandbox_id: sb,
      config: {
        metadata: { name: 'app' },
        image: { image: IMAGE },
        command: ['sh', '-c', 'echo started in $(hostname); trap "exit 0" TERM; while true; do sleep 1; done'],
        log_path: 'app.log',
      },
      sandbox_config: cfg,
    });
    await cri.runtime.StartContainer({ container_id: ct });
    expect(await clones()).toHaveLength(1); // the container runs inside the pod's VM, no VM of its own
    expect((await cri.runtime.ContainerStatus({ container_id: ct })).status.state).toBe('CONTAINER_RUNNING');
    let log = '';
    for (let i = 0; i < 50 && !log.includes('started'); i++) {
      await new Promise((r) => setTimeout(r, 100));
      try {
        log = readFileSync(join(logs, 'web-pod', 'app.log'), 'utf8');
      } catch {
        /* not yet */
      }
    }
    expect(log).toMatch(/ stdout F started in web-pod\n/); // CRI's log format, from the container's stdout
    const ex = await cri.runtime.ExecSync({ container_id: ct, cmd: ['sh', '-c', 'echo exec in $(hostname); echo err >&2; exit 3'], timeout: 30 });
    expect({ out: ex.stdout.toString(), err: ex.stderr.toString(), code: ex.exit_code }).toEqual({ out: 'exec in web-pod\n', err: 'err\n', code: 3 });
    // what the kubelet's stats (kubectl top) read: the container's processes in the guest, as containerd sees them
    const stats = (await cri.runtime.ContainerStats({ container_id: ct })).stats;
    expect(Number(stats.memory.working_set_bytes.value)).toBeGreaterThan(100 * 1024);
    // a second container of the pod: the same VM, and the pod's IPC namespace and /dev/shm, as Kubernetes shares them,
    // and (this pod's pid mode is POD: shareProcessNamespace) its pid namespace, whose first process is the pod's reaper
    const { container_id: side } = await cri.runtime.CreateContainer({
      pod_sandbox_id: sb,
      config: {
        metadata: { name: 'side' },
        image: { image: IMAGE },
        command: ['sh', '-c', 'trap "exit 0" TERM; while true; do sleep 1; done'],
        log_path: 'side.log',
      },
      sandbox_config: cfg,
    });
    await cri.runtime.StartContainer({ container_id: side });
    expect(await clones()).toHaveLength(1);
    const inBoth = async (cmd: string) =>
      Promise.all([ct, side].map(async (id) => (await cri.runtime.ExecSync({ container_id: id, cmd: ['sh', '-c', cmd], timeout: 30 })).stdout.toString()));
    const [ipcApp, ipcSide] = await inBoth('readlink /proc/self/ns/ipc');
    expect(ipcApp).toMatch(/^ipc:\[\d+\]\n$/);
    expect(ipcSide).toBe(ipcApp);
    await cri.runtime.ExecSync({ container_id: ct, cmd: ['sh', '-c', 'echo from app > /dev/shm/note'], timeout: 30 });
    expect((await inBoth('cat /dev/shm/note'))[1]).toBe('from app\n');
    const [pidApp, pidSide] = await inBoth('readlink /proc/self/ns/pid');
    expect(pidSide).toBe(pidApp);
    expect((await inBoth('ps -o args'))[1]).toMatch(/echo started in/); // the other container's process
    expect((await inBoth('tr "\\0" " " < /proc/1/cmdline'))[1]).toMatch(/while :; do busybox sleep 3600/);
    await cri.runtime.StopContainer({ container_id: side, timeout: 10 });
    await cri.runtime.RemoveContainer({ container_id: side });
    await cri.runtime.StopContainer({ container_id: ct, timeout: 10 });
    const st = (await cri.runtime.ContainerStatus({ container_id: ct })).status;
    expect({ state: st.state, exit: st.exit_code }).toEqual({ state: 'CONTAINER_EXITED', exit: 0 }); // its TERM trap ran
    await cri.runtime.RemoveContainer({ container_id: ct });
    await cri.runtime.StopPodSandbox({ pod_sandbox_id: sb });
    await cri.runtime.RemovePodSandbox({ pod_sandbox_id: sb });
    expect(await clones()).toEqual([]);
    expect((await cri.runtime.ListPodSandbox({})).items).toEqual([]);
  });

  it('two pods at once are two VMs with their own hostnames and machine-ids', async () => {
    const pods = await Promise.all(
      ['pod-a', 'pod-b'].map(async (name) => (await cri.runtime.RunPodSandbox({ config: podConfig(name), runtime_handler: 'scion' })).pod_sandbox_id as string),
    );
    try {
      const vms = await clones();
      expect(vms.map((v) => v.hostname).sort()).toEqual(['pod-a', 'pod-b']);
      // (the agent's port is the shim's while the pod runs: the identity each VM was given is read from its record)
      const vm = await import('../../host/index.ts');
      const ids = await Promise.all(
        vms.map(async (v) => {
          const m = await vm.Machine.open(v.name);
          try {
            return m.info().identity!;
          } finally {
            m.close();
          }
        }),
      );
      expect(new Set(ids.map((i) => i.machineId)).size).toBe(2);
      expect(new Set(ids.map((i) => i.mac)).size).toBe(2);
      // and from inside: a container in each pod sees its pod's hostname
      for (const [i, sb] of pods.entries()) {
        const name = ['pod-a', 'pod-b'][i];
        const { container_id: ct } = await cri.runtime.CreateContainer({
          pod_sandbox_id: sb,
          config: { metadata: { name: 'c' }, image: { image: IMAGE }, command: ['sleep', '300'], log_path: 'c.log' },
          sandbox_config: podConfig(name),
        });
        await cri.runtime.StartContainer({ container_id: ct });
        expect((await cri.runtime.ExecSync({ container_id: ct, cmd: ['hostname'], timeout: 30 })).stdout.toString()).toBe(`${name}\n`);
        await cri.runtime.StopContainer({ container_id: ct, timeout: 1 });
        await cri.runtime.RemoveContainer({ container_id: ct });
      }
    } finally {
      for (const sb of pods) {
        await cri.runtime.StopPodSandbox({ pod_sandbox_id: sb });
        await cri.runtime.RemovePodSandbox({ pod_sandbox_id: sb });
      }
    }
    expect(await clones()).toEqual([]);
  });

  it('with CNI: the pod VM takes the IP and MAC CNI gave the pod, and its DNS config; the host reaches the container inside at that IP', async () => {
    const cfg = {
      metadata: { name: 'web-cni', uid: 'uid-cni', namespace: 'default', attempt: 0 },
      hostname: 'web-cni',
      log_directory: join(logs, 'web-cni'),
      annotations: [{ key: 'io.scion.template', value: 'podnet-tpl' }],
      dns_config: { servers: ['10.96.0.10'], searches: ['default.svc.cluster.local', 'svc.cluster.local'], options: ['ndots:5'] }, // as the kubelet gives ClusterFirst pods
    };
    const { pod_sandbox_id: sb } = await cri.runtime.RunPodSandbox({ config: cfg, runtime_handler: 'scion' });
    try {
      const podIp = (await cri.runtime.PodSandboxStatus({ pod_sandbox_id: sb })).status.network.ip as string;
      expect(podIp.startsWith(`${subnet}.`)).toBe(true);
      const [v] = await clones();
      expect(v.ip).toBe(podIp);
      const { container_id: ct } = await cri.runtime.CreateContainer({
        pod_sandbox_id: sb,
        sandbox_config: cfg,
        config: {
          metadata: { name: 'web' },
          image: { image: IMAGE },
          command: ['sh', '-c', 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 8080 -h /www'],
          log_path: 'web.log',
          linux: { security_context: { namespace_options: { pid: 'CONTAINER' } } }, // a pid namespace of its own (what the kubelet asks without shareProcessNamespace)
        },
      });
      await cri.runtime.StartContainer({ container_id: ct });
      let body = '';
      for (let i = 0; i < 100 && !body; i++) {
        try {
          body = await (await fetch(`http://${podIp}:8080/`, { signal: AbortSignal.timeout(2000) })).text();
        } catch {
          await new Promise((r) => setTimeout(r, 200));
        }
      }
      expect(body).toBe('hello from web-cni\n');
      // the pod's interface in its namespace has no process behind it: frames go to the VM, whose MAC it is
      const mac = (await cri.runtime.ExecSync({ container_id: ct, cmd: ['cat', '/sys/class/net/eth0/address'], timeout: 30 })).stdout.toString().trim();
      const m = await (await import('../../host/index.ts')).Machine.open(v.name);
      try {
        expect(mac).toBe(m.info().identity!.mac);
      } finally {
        m.close();
      }
      // and it is the MAC CNI gave the pod's veth (read in the pod's namespace, from the sandbox's netns)
      const netns = JSON.parse((await $`ip -j netns list`.quiet()).stdout)
        .map((n: { name: string }) => n.name)
        .filter((n: string) => n.startsWith('cni-'));
      const macs = await Promise.all(
        netns.map(async (n: string) => JSON.parse((await $({ nothrow: true, quiet: true })`ip -n ${n} -j link show dev eth0`).stdout || '[]')[0]?.address),
      );
      expect(macs).toContain(mac);
      // pid mode CONTAINER: the container's own command is pid 1 of its namespace
      expect((await cri.runtime.ExecSync({ container_id: ct, cmd: ['sh', '-c', 'tr "\\0" " " < /proc/1/cmdline'], timeout: 30 })).stdout.toString()).toMatch(
        /^httpd -f -p 8080/,
      );
      // the container resolves names as the pod's DNS config says (the VM's resolv.conf, which the container's is)
      expect((await cri.runtime.ExecSync({ container_id: ct, cmd: ['cat', '/etc/resolv.conf'], timeout: 30 })).stdout.toString()).toBe(
        'nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n',
      );
      await cri.runtime.StopContainer({ container_id: ct, timeout: 1 });
      await cri.runtime.RemoveContainer({ container_id: ct });
    } finally {
      await cri.runtime.StopPodSandbox({ pod_sandbox_id: sb });
      await cri.runtime.RemovePodSandbox({ pod_sandbox_id: sb });
    }
    expect(await clones()).toEqual([]);
  });

  it('an unknown template named by a pod annotation fails RunPodSandbox with a clear error, and nothing stays', async () => {
    // (a map in the binary's descriptor is its entries: key, value)
    const cfg = { ...podConfig('bad-tpl'), annotations: [{ key: 'io.scion.template', value: 'no-such-tpl' }] };
    await expect(cri.runtime.RunPodSandbox({ config: cfg, runtime_handler: 'scion' })).rejects.toThrow(
      /cannot fork a pod VM from template no-such-tpl: no frozen template named no-such-tpl/,
    );
    expect(await clones()).toEqual([]);
  });
});

describe('a node with a pool of paused forks (SCION_SHIM_POOL=1)', () => {
  it("a pod takes the pooled VM (its tap moved into the pod's namespace, its identity the pod's), the pool is refilled, gc keeps pooled VMs, nothing else stays", async () => {
    const vm = await import('../../host/index.ts');
    const { readyEntries } = await import('../../host/store/pool.ts');
    const pooled = async () => (await vm.list()).filter((v) => v.owner?.kind === 'pool');
    const waitPool = async (not?: string) => {
      for (let i = 0; i < 300; i++) {
        const ready = await readyEntries('podnet-tpl');
        if (ready.length === 1 && ready[0] !== not) return ready[0];
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error(`the pool of podnet-tpl was not refilled: ${JSON.stringify(await vm.list())}`);
    };
    const cd2 = await startContainerd({ path: [join(ROOT, 'bin')], pool: 1, cri: { sandboxImage: IMAGE, cniConfDir } });
    const cri2 = criClient(cd2.address);
    try {
      await cd2.ctr(['images', 'import', await busyboxOciArchive(cd2.dir, IMAGE)], { namespace: 'k8s.io' });
      // the CRI plugin loads the CNI config a moment after it starts (as a kubelet waits for NetworkReady)
      for (let i = 0; i < 100; i++) {
        const conds = (await cri2.runtime.Status({})).status.conditions as { type: string; status: boolean }[];
        if (conds.find((c) => c.type === 'NetworkReady')?.status) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const pod = async (name: string) => {
        const cfg = {
          metadata: { name, uid: `uid-${name}`, namespace: 'default', attempt: 0 },
          hostname: name,
          log_directory: join(logs, name),
          annotations: [{ key: 'io.scion.template', value: 'podnet-tpl' }],
        };
        const { pod_sandbox_id: sb } = await cri2.runtime.RunPodSandbox({ config: cfg, runtime_handler: 'scion' });
        const ip = (await cri2.runtime.PodSandboxStatus({ pod_sandbox_id: sb })).status.network.ip as string;
        const { container_id: ct } = await cri2.runtime.CreateContainer({
          pod_sandbox_id: sb,
          sandbox_config: cfg,
          config: {
            metadata: { name: 'web' },
            image: { image: IMAGE },
            command: ['sh', '-c', 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 8080 -h /www'],
            log_path: 'web.log',
          },
        });
        await cri2.runtime.StartContainer({ container_id: ct });
        let body = '';
        for (let i = 0; i < 100 && !body; i++) {
          try {
            body = await (await fetch(`http://${ip}:8080/`, { signal: AbortSignal.timeout(2000) })).text();
          } catch {
            await new Promise((r) => setTimeout(r, 200));
          }
        }
        const mac = (await cri2.runtime.ExecSync({ container_id: ct, cmd: ['cat', '/sys/class/net/eth0/address'], timeout: 30 })).stdout.toString().trim();
        const remove = async () => {
          await cri2.runtime.StopPodSandbox({ pod_sandbox_id: sb });
          await cri2.runtime.RemovePodSandbox({ pod_sandbox_id: sb });
        };
        return { sb, ip, body, mac, remove, vm: (await clones()).find((v) => v.hostname === name)! };
      };
      // an empty pool: the first pod is forked; once its container runs, the node's pool gets a VM
      expect(await pooled()).toEqual([]);
      const p1 = await pod('pool-a');
      expect(p1.body).toBe('hello from pool-a\n');
      expect(p1.vm.owner?.kind).toBe('shim');
      const first = await waitPool();
      const [pv] = await pooled();
      expect(pv.name).toBe(first);
      expect(pv.pid).toBeGreaterThan(0); // its QEMU runs (paused)
      await p1.remove();
      // its filler (p1's shim) is gone now; the pool still holds the VM, and gc leaves it
      for (let i = 0; i < 150 && shimPids(cd2.dir).length; i++) await new Promise((r) => setTimeout(r, 100));
      expect(shimPids(cd2.dir)).toEqual([]);
      await vm.gc();
      expect((await pooled()).map((v) => v.name)).toEqual([first]);
      // the next pod is that VM: the pod's hostname, the IP CNI gave it, answering at that IP, the pod's MAC
      const p2 = await pod('pool-b');
      expect(p2.vm.name).toBe(first);
      expect(p2.vm.ip).toBe(p2.ip);
      expect(p2.ip.startsWith(`${subnet}.`)).toBe(true);
      expect(p2.body).toBe('hello from pool-b\n');
      expect(p2.mac).toBe(p2.vm.mac);
      expect(p2.vm.owner?.kind).toBe('shim');
      // the pool is refilled with another VM; the pod's VM is not in it
      const second = await waitPool(first);
      expect(second).not.toBe(first);
      await p2.remove();
      // only the pool stays: one paused VM of the template, nothing of the pods
      for (let i = 0; i < 150 && shimPids(cd2.dir).length; i++) await new Promise((r) => setTimeout(r, 100));
      expect((await clones()).map((v) => `${v.name} ${v.owner?.kind}`)).toEqual([`${second} pool`]);
      // a pooled VM forked from an earlier template of that name (its entry names another freeze) is
      // not given to a pod: it is removed, and the pod forked
      // (names are reused once a VM is gone: a VM is told by its QEMU's pid here)
      const stalePid = (await pooled())[0].pid!;
      writeFileSync(
        join(dirs.run, 'pool', 'podnet-tpl', second),
        JSON.stringify({ pid: 1, at: '2000-01-01T00:00:00.000Z', frozenAt: '2000-01-01T00:00:00.000Z' }) + '\n',
      );
      const p3 = await pod('pool-c');
      expect(p3.body).toBe('hello from pool-c\n');
      expect(p3.vm.pid).not.toBe(stalePid);
      expect(p3.vm.owner?.kind).toBe('shim');
      expect(processAlive(stalePid)).toBe(false); // the stale VM's QEMU is gone (a zombie until its parent reaps it counts as gone)
      let third = '';
      for (let i = 0; i < 300 && !third; i++) {
        const [v] = await pooled();
        if (v && !v.makerPid && v.pid !== stalePid && (await readyEntries('podnet-tpl')).includes(v.name as never)) third = v.name;
        else await new Promise((r) => setTimeout(r, 100));
      }
      expect(third).not.toBe('');
      await p3.remove();
      for (let i = 0; i < 150 && shimPids(cd2.dir).length; i++) await new Promise((r) => setTimeout(r, 100));
      // a pooled VM whose template is removed is nobody's: gc removes it and its entry
      const thirdPid = (await pooled())[0].pid!;
      await vm.removeVm('podnet-tpl');
      await vm.gc();
      expect(await pooled()).toEqual([]);
      expect(processAlive(thirdPid)).toBe(false);
      expect(await readyEntries('podnet-tpl')).toEqual([]);
    } finally {
      cri2.close();
      await cd2.stop();
    }
    expect(await clones()).toEqual([]);
  }, 240_000);
});
