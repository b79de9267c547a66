/**
 * QEMU command line from a pure description of the VM. Template and clone
 * are the same description with a different `mode`; the device line-up is
 * built by one function for both, so they cannot drift apart.
 */
export type Accel = 'kvm' | 'tcg';

export interface PortForward { hostPort: number; guestPort: number }
export type NetConfig =
  | { mode: 'user'; guestIp: string; forwards: PortForward[] }
  | { mode: 'bridge'; tap: string }
  | { mode: 'none' };

export interface VmDescription {
  mode: 'template' | 'clone';
  accel: Accel;
  ramMB: number;
  cpus: number;
  /** guest RAM: a file (template shared, clones private) or, for an ordinary full snapshot, anonymous memory */
  memory: 'file' | 'ram';
  memPath: string;
  kernel: string;
  /** the template boots from it; a clone restores RAM and needs none */
  initrd?: string;
  cmdline: string;
  vmgenid: string;
  mac: string;
  net: NetConfig;
  qmpSocket: string;
  agentSocket: string;
  consoleLog: string;
  /** the serial console, also as a socket for `scion console` */
  consoleSocket?: string;
  /** state file to restore from (clones) */
  incoming?: boolean;
  disk?: string;
  /** TCG translation cache size (MiB): smaller keeps a clone's private memory down */
  tbSizeMB?: number;
}

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
    'virtserialport,bus=vser0.0,nr=1,name=org.scion.agent.0',
    // the backend kind matters: user-mode networking has migration state of its own
    `virtio-net-pci,id=nic0,bus=pcie.0,addr=0x4(${d.net.mode === 'bridge' ? 'tap' : d.net.mode})`,
    'vmgenid,id=vmgenid0',
    'virtio-rng-pci,id=rng0,bus=pcie.0,addr=0x5',
  ];
  if (d.disk) l.push('virtio-blk-pci,id=disk0,bus=pcie.0,addr=0x6');
  return l;
}

export function qemuArgv(d: VmDescription): string[] {
  const a: string[] = [
    '-name', 'scion',
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-machine', 'q35,memory-backend=mem',
    '-accel', d.accel === 'tcg' ? `tcg,tb-size=${d.tbSizeMB ?? 64}` : 'kvm',
    '-cpu', d.accel === 'kvm' ? 'host' : 'max',
    '-m', `${d.ramMB}M`,
    '-smp', String(d.cpus),
    // guest RAM in a file: the template maps it shared (its writes land in the
    // file); clones map it private, so their writes are copy-on-write
    '-object', d.memory === 'ram' ? `memory-backend-ram,id=mem,size=${d.ramMB}M` : `memory-backend-file,id=mem,size=${d.ramMB}M,mem-path=${d.memPath},share=${d.mode === 'template' ? 'on' : 'off'},prealloc=off`,
    '-kernel', d.kernel,
    '-append', d.cmdline,
    '-chardev', d.consoleSocket ? `socket,id=console,path=${d.consoleSocket},server=on,wait=off,logfile=${d.consoleLog},logappend=on` : `file,id=console,path=${d.consoleLog}`,
    '-serial', 'chardev:console',
    '-qmp', `unix:${d.qmpSocket},server=on,wait=off`,
    '-device', 'virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x3',
    '-chardev', `socket,id=agent,path=${d.agentSocket},server=on,wait=off`,
    '-device', 'virtserialport,bus=vser0.0,nr=1,chardev=agent,name=org.scion.agent.0',
  ];
  if (d.initrd) a.push('-initrd', d.initrd);
  if (d.net.mode === 'user') {
    const fwd = d.net.forwards.map((f) => `,hostfwd=tcp:127.0.0.1:${f.hostPort}-${d.net.mode === 'user' ? d.net.guestIp : ''}:${f.guestPort}`).join('');
    a.push('-netdev', `user,id=net0,net=${USER_NET.network}${fwd}`);
  } else if (d.net.mode === 'bridge') {
    a.push('-netdev', `tap,id=net0,ifname=${d.net.tap},script=no,downscript=no`);
  }
  a.push('-device', `virtio-net-pci,id=nic0,bus=pcie.0,addr=0x4,mac=${d.mac}${d.net.mode === 'none' ? '' : ',netdev=net0'}`);
  a.push('-device', `vmgenid,id=vmgenid0,guid=${d.vmgenid}`);
  a.push('-object', 'rng-random,id=rng0src,filename=/dev/urandom', '-device', 'virtio-rng-pci,id=rng0,bus=pcie.0,addr=0x5,rng=rng0src');
  if (d.disk) a.push('-drive', `file=${d.disk},if=none,id=drive0,format=qcow2`, '-device', 'virtio-blk-pci,id=disk0,bus=pcie.0,addr=0x6,drive=drive0');
  if (d.incoming) a.push('-incoming', 'defer');
  return a;
}

/**
 * What a clone needs of the kernel: a clone restores RAM and never runs the
 * kernel loader, but QEMU still wants a bzImage for -kernel (it decides the
 * option ROM, whose RAM block the device state names). The setup header is
 * enough; QEMU then keeps a few KiB per clone instead of a 12 MB copy.
 */
export function kernelStub(bzImage: Buffer): Buffer {
  if (bzImage.length < 0x210 || bzImage.toString('latin1', 0x202, 0x206) !== 'HdrS') throw new Error('not a bzImage (no HdrS header)');
  const setupSects = bzImage[0x1f1] || 4;
  return Buffer.from(bzImage.subarray(0, Math.min(bzImage.length, (setupSects + 1) * 512 + 4096)));
}
