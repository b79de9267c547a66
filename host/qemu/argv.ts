/**
 * QEMU command line from a pure description of the VM. Template and clone
 * are the same description with a different `mode`; the device line-up is
 * built by one function for both, so they cannot drift apart.
 */
import { VmError } from '../../common/errors.ts';
import { AGENT_PORT_NAME } from '../../common/contracts.ts';
import { JAIL_FILES as JAIL } from '../store/dirs.ts';

export type Accel = 'kvm' | 'tcg';

export interface PortForward {
  hostPort: number;
  guestPort: number;
}
export type NetConfig = { mode: 'user'; guestIp: string; forwards: PortForward[] } | { mode: 'bridge'; tap: string } | { mode: 'none' };

export interface VmDescription {
  /** the VM's name, shown in ps (-name) */
  name: string;
  mode: 'template' | 'clone';
  accel: Accel;
  /** the versioned machine type (pc-q35-10.0): what the VMM called q35 when the template booted */
  machine?: string;
  /** the CPU model (vmm-plan.ts cpuModel): a template's clones get the one it booted with */
  cpu?: string;
  ramMB: number;
  cpus: number;
  /** guest RAM: a file (template shared, clones private) or, for an ordinary full snapshot, anonymous memory */
  memory: 'file' | 'ram';
  cmdline: string;
  /** the template boots from an initrd; a clone restores RAM and needs none */
  initrd: boolean;
  vmgenid: string;
  mac: string;
  net: NetConfig;
  /** a clone maps its template's memory file private-writable from a read-only open (QEMU >= 8.2: readonly=on,rom=off), so it needs no write access to it */
  memReadonly?: boolean;
  /** wait for an incoming migration (clones, and the loader of a clone being frozen) */
  incoming?: boolean;
  /** a qcow2 disk chain: base (read-only) <- template overlay [<- clone overlay] */
  disk?: DiskChain;
  /** TCG translation cache size (MiB): smaller keeps a clone's private memory down */
  tbSizeMB?: number;
  /** QEMU's seccomp sandbox (-sandbox on with obsolete, elevateprivileges, spawn and resourcecontrol denied) */
  sandbox: boolean;
}

/** Layers of a VM's disk; `top` is the one the VM writes. */
export interface DiskChain {
  layers: ('base' | 'template' | 'clone')[];
}

/**
 * QEMU opens nothing by a path outside its jail: scion opens the files and
 * hands them over as these descriptors (QEMU re-opens /proc/self/fd/N, which
 * checks the file's own mode, never the directories above it). The socket
 * files and the console log are made by QEMU in its working directory.
 */
export const FD = { mem: 3, kernel: 4, initrd: 5, state: 6, diskBase: 7, diskTemplate: 8, diskClone: 9 } as const;
const fdPath = (n: number) => `/proc/self/fd/${n}`;

/**
 * TCG's translation buffer (MiB). A clone's is most of its own memory, and
 * with the agent on QuickJS little guest code runs after a fork: measured
 * (npm run bench:tb-size, 2026-12-03), 32 costs a restarted fork ~11% (1283 ->
 * 1427 ms to HTTP) and nothing on a kept one, for 27 MB less per clone
 * (88 -> 62). 16 doubles the fork time. A template boots the whole system
 * once and keeps QEMU's usual 64.
 */
export const CLONE_TB_SIZE_MB = 32;
export const TEMPLATE_TB_SIZE_MB = 64;

export const SANDBOX = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny';

export const USER_NET = { network: '10.0.2.0/24', gateway: '10.0.2.2', dns: '10.0.2.3', templateIp: '10.0.2.15' };

/**
 * The devices, in order, with no per-VM values: this is what a template's
 * device state depends on and what a clone must reproduce exactly.
 */
export function deviceLineup(d: Pick<VmDescription, 'ramMB' | 'cpus' | 'net' | 'disk'>): string[] {
  const l = [
    `machine=q35,memory-backend=mem`,
    `memory=${d.ramMB}M`,
    `smp=${d.cpus}`,
    'serial=isa-serial(console)',
    'virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x3',
    `virtserialport,bus=vser0.0,nr=1,name=${AGENT_PORT_NAME}`,
    // the backend kind matters: user-mode networking has migration state of its own
    `virtio-net-pci,id=nic0,bus=pcie.0,addr=0x4(${d.net.mode === 'bridge' ? 'tap' : d.net.mode})`,
    'vmgenid,id=vmgenid0',
    'virtio-rng-pci,id=rng0,bus=pcie.0,addr=0x5',
  ];
  if (d.disk) l.push('virtio-blk-pci,id=disk0,bus=pcie.0,addr=0x6');
  l.push(...HOTPLUG_PORTS.map((p) => `pcie-root-port,id=${p.id},bus=pcie.0,addr=${p.addr}`));
  return l;
}

/**
 * Empty PCIe root ports a running VM can take devices on (q35's root bus has
 * no hotplug): a pod's container rootfs arrives as a virtio-blk disk plugged
 * into one after the fork (shim/). Every VM has them, so templates and their
 * clones agree.
 */
export const HOTPLUG_PORTS = [
  { id: 'hp0', addr: '0x8', chassis: 1 },
  { id: 'hp1', addr: '0x9', chassis: 2 },
  { id: 'hp2', addr: '0xa', chassis: 3 },
  { id: 'hp3', addr: '0xb', chassis: 4 },
];

export function qemuArgv(d: VmDescription): string[] {
  const a: string[] = [
    '-name',
    `scion:${d.name}`,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-machine',
    `${d.machine ?? 'q35'},memory-backend=mem`,
    '-accel',
    d.accel === 'tcg' ? `tcg,tb-size=${d.tbSizeMB ?? (d.mode === 'template' ? TEMPLATE_TB_SIZE_MB : CLONE_TB_SIZE_MB)}` : 'kvm',
    '-cpu',
    d.cpu ?? (d.accel === 'kvm' ? 'host' : 'max'),
    '-m',
    `${d.ramMB}M`,
    '-smp',
    String(d.cpus),
    // guest RAM in a file: the template maps it shared (its writes land in the
    // file); clones map it private, so their writes are copy-on-write
    '-object',
    d.memory === 'ram'
      ? `memory-backend-ram,id=mem,size=${d.ramMB}M`
      : `memory-backend-file,id=mem,size=${d.ramMB}M,mem-path=${fdPath(FD.mem)},share=${d.mode === 'template' ? 'on' : 'off'}${d.memReadonly ? ',readonly=on,rom=off' : ''},prealloc=off`,
    '-kernel',
    fdPath(FD.kernel),
    '-append',
    d.cmdline,
    '-chardev',
    `socket,id=console,path=${JAIL.consoleSocket},server=on,wait=off,logfile=${JAIL.console},logappend=on`,
    '-serial',
    'chardev:console',
    '-qmp',
    `unix:${JAIL.qmp},server=on,wait=off`,
    '-device',
    'virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x3',
    '-chardev',
    `socket,id=agent,path=${JAIL.agent},server=on,wait=off`,
    '-device',
    `virtserialport,bus=vser0.0,nr=1,chardev=agent,name=${AGENT_PORT_NAME}`,
  ];
  if (d.sandbox) a.push('-sandbox', SANDBOX);
  if (d.initrd) a.push('-initrd', fdPath(FD.initrd));
  if (d.net.mode === 'user') {
    const guestIp = d.net.guestIp;
    const fwd = d.net.forwards.map((f) => `,hostfwd=tcp:127.0.0.1:${f.hostPort}-${guestIp}:${f.guestPort}`).join('');
    a.push('-netdev', `user,id=net0,net=${USER_NET.network}${fwd}`);
  } else if (d.net.mode === 'bridge') {
    a.push('-netdev', `tap,id=net0,ifname=${d.net.tap},script=no,downscript=no`);
  }
  a.push('-device', `virtio-net-pci,id=nic0,bus=pcie.0,addr=0x4,mac=${d.mac}${d.net.mode === 'none' ? '' : ',netdev=net0'}`);
  a.push('-device', `vmgenid,id=vmgenid0,guid=${d.vmgenid}`);
  a.push('-object', 'rng-random,id=rng0src,filename=/dev/urandom', '-device', 'virtio-rng-pci,id=rng0,bus=pcie.0,addr=0x5,rng=rng0src');
  if (d.disk) a.push(...diskArgs(d.disk), '-device', 'virtio-blk-pci,id=disk0,bus=pcie.0,addr=0x6,drive=disk-top');
  for (const p of HOTPLUG_PORTS) a.push('-device', `pcie-root-port,id=${p.id},bus=pcie.0,addr=${p.addr},chassis=${p.chassis}`);
  if (d.incoming) a.push('-incoming', 'defer');
  return a;
}

/**
 * The disk chain as explicit block nodes, each layer's file given by
 * descriptor (an fd set: QEMU takes the descriptor itself, with the access
 * mode scion opened it with, and checks no file mode) and its backing named
 * here, so QEMU never opens a backing file by the path in a qcow2 header.
 */
export function diskArgs(chain: DiskChain): string[] {
  const fds = { base: FD.diskBase, template: FD.diskTemplate, clone: FD.diskClone };
  const a: string[] = [];
  chain.layers.forEach((layer, i) => {
    const top = i === chain.layers.length - 1;
    const node = top ? 'disk-top' : `disk-${layer}`;
    const ro = top ? '' : ',read-only=on';
    a.push('-add-fd', `fd=${fds[layer]},set=${fds[layer]}`);
    a.push('-blockdev', `driver=file,node-name=${node}-file,filename=/dev/fdset/${fds[layer]}${ro}`);
    // the base is the user's own image: QEMU opens no backing it does not name
    const backing = i === 0 ? '' : `,backing=disk-${chain.layers[i - 1]}`;
    a.push('-blockdev', `driver=qcow2,node-name=${node},file=${node}-file${backing}${ro}`);
  });
  return a;
}

/**
 * What a clone needs of the kernel: a clone restores RAM and never runs the
 * kernel loader, but QEMU still wants a bzImage for -kernel (it decides the
 * option ROM, whose RAM block the device state names). The setup header is
 * enough; QEMU then keeps a few KiB per clone instead of a 12 MB copy.
 */
export function kernelStub(bzImage: Buffer): Buffer {
  if (bzImage.length < 0x210 || bzImage.toString('latin1', 0x202, 0x206) !== 'HdrS')
    throw new VmError('E_IMAGE_KERNEL', 'the image kernel is not a bzImage (no HdrS header)', { hint: 'rebuild the image' });
  const setupSects = bzImage[0x1f1] || 4;
  return Buffer.from(bzImage.subarray(0, Math.min(bzImage.length, (setupSects + 1) * 512 + 4096)));
}
