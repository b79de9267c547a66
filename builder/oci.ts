/**
 * Container bundles: an OCI runtime config.json (pure) and rootfs trees from
 * Debian packages or from OCI image layouts/archives (layers applied in order,
 * whiteouts honoured).
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ociDigest } from '../common/digest.ts';
import { gunzipSync } from 'node:zlib';
import { BuildError } from '../common/errors.ts';
import type { ContainerDef } from './schema.ts';
import { readTar, normalisePath, type TarEntry } from './debian/deb.ts';

export function runtimeConfig(c: ContainerDef, hostname: string): object {
  const env = { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', ...c.env };
  const namespaces = [{ type: 'pid' }, { type: 'mount' }, { type: 'ipc' }, { type: 'uts' }];
  if (c.network === 'none') namespaces.push({ type: 'network' });
  return {
    ociVersion: '1.0.2',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: c.command,
      env: Object.entries(env)
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([k, v]) => `${k}=${v}`),
      cwd: '/',
      capabilities: Object.fromEntries(
        ['bounding', 'effective', 'permitted'].map((k) => [
          k,
          ['CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FOWNER', 'CAP_KILL', 'CAP_NET_BIND_SERVICE', 'CAP_NET_RAW', 'CAP_SETGID', 'CAP_SETUID'],
        ]),
      ),
      noNewPrivileges: true,
    },
    root: { path: 'rootfs', readonly: false },
    hostname,
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620'] },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      { destination: '/tmp', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=1777'] },
      { destination: '/etc/resolv.conf', type: 'bind', source: '/etc/resolv.conf', options: ['rbind', 'ro'] },
      { destination: '/etc/hosts', type: 'bind', source: '/etc/hosts', options: ['rbind', 'ro'] },
    ],
    linux: {
      namespaces,
      maskedPaths: ['/proc/kcore', '/proc/keys', '/proc/timer_list', '/sys/firmware'],
      readonlyPaths: ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
    },
  };
}

/** Apply OCI layers (uncompressed tar entries) in order, honouring .wh. files and opaque dirs. */
export function applyLayers(layers: TarEntry[][]): Map<string, TarEntry> {
  const fs = new Map<string, TarEntry>();
  for (const layer of layers) {
    for (const e of layer) {
      const base = e.path.slice(e.path.lastIndexOf('/') + 1);
      const dir = e.path.slice(0, e.path.lastIndexOf('/')) || '/';
      if (base === '.wh..wh..opq') {
        for (const p of [...fs.keys()]) if (p.startsWith(dir === '/' ? '/' : dir + '/')) fs.delete(p);
        continue;
      }
      if (base.startsWith('.wh.')) {
        const victim = normalisePath(`${dir}/${base.slice(4)}`);
        fs.delete(victim);
        for (const p of [...fs.keys()]) if (p.startsWith(victim + '/')) fs.delete(p);
        continue;
      }
      if (e.type !== 'directory') for (const p of [...fs.keys()]) if (p.startsWith(e.path + '/')) fs.delete(p);
      fs.set(e.path, e);
    }
  }
  return fs;
}

async function readBlob(layoutDir: string, digest: string): Promise<Buffer> {
  const [alg, hex] = digest.split(':');
  return readFile(join(layoutDir, 'blobs', alg, hex));
}

/** Read an OCI image layout directory (skopeo copy oci:, umoci) or a `docker save`/OCI tar archive. */
export interface LayerDescriptor {
  digest: string;
  size: number;
  mediaType: string;
}

export async function readOciImage(path: string): Promise<{ files: Map<string, TarEntry>; config: any; layers: LayerDescriptor[] }> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch {
    throw new BuildError('E_OCI_MISSING', `container image ${path} does not exist`);
  }
  if (st.isDirectory()) {
    const index = JSON.parse(await readFile(join(path, 'index.json'), 'utf8'));
    const manDesc = index.manifests?.[0];
    if (!manDesc) throw new BuildError('E_OCI_FORMAT', `${path}/index.json lists no manifest`);
    const manifest = JSON.parse((await readBlob(path, manDesc.digest)).toString('utf8'));
    const config = JSON.parse((await readBlob(path, manifest.config.digest)).toString('utf8'));
    const layers: TarEntry[][] = [];
    const descriptors: LayerDescriptor[] = [];
    for (const l of manifest.layers) {
      let data = await readBlob(path, l.digest);
      if (ociDigest(data) !== l.digest)
        throw new BuildError('E_OCI_DIGEST', `${path}: layer ${l.digest} does not match its digest`, {
          hint: 'the image layout is damaged; copy the image again',
        });
      descriptors.push({ digest: l.digest, size: data.length, mediaType: String(l.mediaType) });
      if (String(l.mediaType).includes('gzip') || (data[0] === 0x1f && data[1] === 0x8b)) data = gunzipSync(data);
      layers.push(await readTar(data));
    }
    return { files: applyLayers(layers), config, layers: descriptors };
  }
  // an archive: docker save (manifest.json) or an OCI layout in a tar
  const entries = await readTar(await readFile(path));
  const byPath = new Map(entries.map((e) => [e.path, e]));
  const dockerManifest = byPath.get('/manifest.json');
  if (dockerManifest?.data) {
    const m = JSON.parse(dockerManifest.data.toString('utf8'))[0];
    const config = JSON.parse(byPath.get(normalisePath(m.Config))!.data!.toString('utf8'));
    const layers: TarEntry[][] = [];
    const descriptors: LayerDescriptor[] = [];
    for (const l of m.Layers as string[]) {
      let data = byPath.get(normalisePath(l))?.data;
      if (!data) throw new BuildError('E_OCI_FORMAT', `${path}: layer ${l} is missing`);
      descriptors.push({
        digest: ociDigest(data),
        size: data.length,
        mediaType: data[0] === 0x1f && data[1] === 0x8b ? 'application/vnd.docker.image.rootfs.diff.tar.gzip' : 'application/vnd.docker.image.rootfs.diff.tar',
      });
      if (data[0] === 0x1f && data[1] === 0x8b) data = gunzipSync(data);
      layers.push(await readTar(data));
    }
    return { files: applyLayers(layers), config, layers: descriptors };
  }
  throw new BuildError('E_OCI_FORMAT', `${path} is neither an OCI layout directory nor a docker-save archive`);
}
