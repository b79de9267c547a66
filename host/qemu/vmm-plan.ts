/**
 * The VMM scion runs, as data: the pinned QEMU closure's lock, its digest
 * and where it lives, and the command line that starts it. Pure; fetching
 * and extracting are vmm.ts's.
 *
 * A snapshot (a frozen template's device state and RAM) only loads into the
 * same QEMU build, machine type and CPU model. scion therefore runs the
 * QEMU its own lock names (vmm/qemu.scion.lock: qemu-system-x86 from Debian
 * trixie with its library closure, firmware and loader, each .deb by
 * SHA-256), started through the closure's own loader so the host's
 * libraries never mix in. The host's QEMU only on request (SCION_VMM=system).
 */
import { join } from 'node:path';
import { sha256 } from '../../common/digest.ts';
type LockedPackage = VmmLock['sets'][string]['packages'][number];

/** The set of the VMM lock that holds the closure. */
export const VMM_SET = 'vmm';
/** The packages the closure is resolved from. */
export const VMM_ROOTS = ['qemu-system-x86'];

/**
 * Dependencies not followed: maintainer-script tools (users, groups,
 * debconf) the QEMU binary never loads; ld.so needs none of them.
 */
const NOT_RUNTIME = new Set([
  'adduser',
  'passwd',
  'debconf',
  'base-passwd',
  'login.defs',
  'libpam-modules',
  'libpam-modules-bin',
  'libpam0g',
  'libsemanage2',
  'libsemanage-common',
]);
export const followRuntime = (name: string): boolean => !NOT_RUNTIME.has(name);

/** Paths inside an extracted closure (trixie is merged-/usr). */
export const CLOSURE = {
  loader: '/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2',
  libs: '/usr/lib/x86_64-linux-gnu',
  qemu: '/usr/bin/qemu-system-x86_64',
  modules: '/usr/lib/x86_64-linux-gnu/qemu',
  /** -L directories: Debian's QEMU looks for firmware in these three (its --firmwarepath) */
  firmware: ['/usr/share/qemu', '/usr/share/seabios', '/usr/lib/ipxe/qemu'],
} as const;

/** How QEMU is started: argv before QEMU's own arguments, and what it needs in its environment. */
export interface Vmm {
  kind: 'pinned' | 'system';
  /** the program and the arguments that run qemu-system-x86_64 (the loader's, for the pinned closure) */
  command: string[];
  /** QEMU's own arguments every run gets (-L: firmware from the closure) */
  args: string[];
  /** environment QEMU needs (QEMU_MODULE_DIR: the closure's modules) */
  env: Record<string, string>;
  /** `qemu-system-x86_64 --version`'s first line */
  version: string;
  /** what pins it: sha256 over the closure's .deb hashes (pinned), of the binary (system) */
  digest: string;
  /** the extracted closure (pinned) */
  dir?: string;
  /** the versioned machine type `q35` stands for here (pc-q35-10.0) */
  machine: string;
}

/** The closure's packages from the lock, sorted by name; an error message when the lock has none. Pure. */
export function closurePackages(lock: VmmLock): LockedPackage[] {
  const set = lock.sets[VMM_SET];
  if (!set?.packages.length) throw new Error(`the lock has no "${VMM_SET}" set`);
  return [...set.packages].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** The closure's digest: sha256 over "name version sha256" lines of its packages. Pure. */
export function closureDigest(packages: LockedPackage[]): string {
  return `sha256:${sha256(packages.map((p) => `${p.name} ${p.version} ${p.sha256}\n`).join(''))}`;
}

/** Where the closure of `digest` is extracted under the VMM root. Pure. */
export const closureDir = (root: string, digest: string): string => join(root, digest.replace(/^sha256:/, '').slice(0, 24));

/** The command, arguments and environment that run the closure extracted at `dir`. Pure. */
export function pinnedCommand(dir: string): Pick<Vmm, 'command' | 'args' | 'env'> {
  return {
    command: [dir + CLOSURE.loader, '--library-path', dir + CLOSURE.libs, dir + CLOSURE.qemu],
    // -L comes before the firmware path compiled in, so the host's /usr/share/seabios is never read
    args: CLOSURE.firmware.flatMap((f) => ['-L', dir + f]),
    env: { QEMU_MODULE_DIR: dir + CLOSURE.modules },
  };
}

/**
 * A symlink inside the closure made to stay inside it: an absolute target
 * (Debian's /usr/share/qemu/bios-256k.bin -> /usr/share/seabios/...) is
 * rewritten relative to the link, so the closure's firmware, not the
 * host's, is what QEMU opens. Pure.
 */
export function containedLink(linkPath: string, target: string): string {
  if (!target.startsWith('/')) return target;
  const from = linkPath.split('/').filter(Boolean).slice(0, -1);
  const to = target.split('/').filter(Boolean);
  let i = 0;
  while (i < from.length && i < to.length && from[i] === to[i]) i++;
  return [...from.slice(i).map(() => '..'), ...to.slice(i)].join('/') || '.';
}

/** A CycloneDX 1.6 SBOM of the closure: one component per package, by purl and SHA-256 of its .deb. Pure. */
export function closureSbom(lock: VmmLock, digest: string): string {
  const packages = closurePackages(lock);
  const purl = (p: LockedPackage) =>
    `pkg:deb/debian/${p.name}@${encodeURIComponent(p.version)}?arch=${lock.architecture}&distro=${lock.codename ?? lock.suite}`;
  return `${JSON.stringify(
    {
      bomFormat: 'CycloneDX',
      specVersion: '1.6',
      version: 1,
      serialNumber: `urn:uuid:${uuidFrom(digest)}`,
      metadata: { component: { type: 'application', name: 'scion-vmm', version: digest, 'bom-ref': 'scion-vmm' } },
      components: packages.map((p) => ({
        type: 'library',
        'bom-ref': purl(p),
        name: p.name,
        version: p.version,
        purl: purl(p),
        hashes: [{ alg: 'SHA-256', content: p.sha256 }],
      })),
      dependencies: [{ ref: 'scion-vmm', dependsOn: packages.filter((p) => VMM_ROOTS.includes(p.name)).map(purl) }],
    },
    null,
    2,
  )}\n`;
}

/** A UUID (v4 layout) derived from a digest: the same closure, the same serial number. Pure. */
function uuidFrom(digest: string): string {
  const h = sha256(digest);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

/**
 * The CPU model a VM gets: a snapshot restores only into the model it was
 * taken with, so it is named, never `host`. Under TCG `max` is the
 * emulator's own (fixed by the pinned build, not by the host's CPU); under
 * KVM a conservative named model every x86-64 host of the last decade has
 * (x86-64-v2 and AES). SCION_CPU overrides (`host` there is the user's
 * choice of speed over portable snapshots). Pure.
 */
export const KVM_CPU = 'Westmere-v2';
export const cpuModel = (accel: 'kvm' | 'tcg', override?: string): string => override ?? (accel === 'kvm' ? KVM_CPU : 'max');

/** "QEMU emulator version 10.0.13 (Debian …)" -> [10, 0, 13]; undefined when it says no version. Pure. */
export function versionOf(line: string): [number, number, number] | undefined {
  const m = /version (\d+)\.(\d+)(?:\.(\d+))?/.exec(line);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)] : undefined;
}

/** Whether this QEMU opens a memory-backend file read-only behind a private writable mapping (readonly=on,rom=off: QEMU 8.2). Pure. */
export function readonlyPrivateMemory(version: string): boolean {
  const v = versionOf(version);
  return !!v && (v[0] > 8 || (v[0] === 8 && v[1] >= 2));
}

/** What of vmm/qemu.scion.lock (builder/lock.ts's format) the host reads. */
export interface VmmLock {
  lockVersion: 1;
  suite: string;
  codename?: string;
  architecture: string;
  sets: Record<string, { roots: string[]; packages: { name: string; version: string; filename: string; sha256: string; size: number }[] }>;
}

/** The VMM lock's text, checked: its vmm set's packages each with a name, version and SHA-256. Pure; throws a plain message. */
export function parseVmmLock(text: string): VmmLock {
  const l = JSON.parse(text) as VmmLock;
  if (l?.lockVersion !== 1 || typeof l.sets !== 'object') throw new Error('not a scion.lock (lockVersion 1)');
  const packages = l.sets[VMM_SET]?.packages;
  if (!Array.isArray(packages) || !packages.length) throw new Error(`no "${VMM_SET}" package set`);
  for (const p of packages)
    if (typeof p?.name !== 'string' || typeof p.version !== 'string' || !/^[0-9a-f]{64}$/.test(p.sha256 ?? ''))
      throw new Error(`a package entry is malformed: ${JSON.stringify(p).slice(0, 120)}`);
  return l;
}
