/**
 * A container image for containerd's own store, made by the test: Debian's
 * busybox-static (the .deb the build cache holds, checked by the lock's
 * SHA-256) as one layer with its applets linked, written as an OCI image
 * layout archive (tar-stream) that `ctr image import` takes.
 */
import { sha256 as sha } from '../../common/digest.ts';
import { tarOf } from './tar.ts';
import { readFileSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { join } from 'node:path';
import { BlobCache } from '../../builder/cache.ts';
import { extractDeb } from '../../builder/debian/deb.ts';

const APPLETS = ['sh', 'echo', 'cat', 'sleep', 'hostname', 'ls', 'ps', 'wc', 'true', 'false', 'id', 'env', 'pwd', 'uname', 'tr', 'mkdir', 'httpd', 'ip'];

/** Write `<dir>/busybox-oci.tar` (image name `name`); returns its path. */
export async function busyboxOciArchive(dir: string, name: string, cmd: string[] = ['sh']): Promise<string> {
  const lock = JSON.parse(readFileSync(join(import.meta.dirname, '../../images/pod.scion.lock'), 'utf8'));
  const p = Object.values<any>(lock.sets)
    .flatMap((s) => s.packages)
    .find((x: any) => x.name === 'busybox-static');
  const deb = await new BlobCache().get(p.sha256);
  if (!deb) throw new Error('busybox-static is not in the build cache: build images/pod.yaml first');
  const busybox = (await extractDeb(deb)).find((e) => e.path === '/usr/bin/busybox')!.data!;
  const layerTar = await tarOf([
    { name: 'bin/', type: 'directory', mode: 0o755 },
    { name: 'tmp/', type: 'directory', mode: 0o1777 },
    { name: 'etc/', type: 'directory', mode: 0o755 },
    { name: 'proc/', type: 'directory', mode: 0o755 },
    { name: 'sys/', type: 'directory', mode: 0o755 },
    { name: 'dev/', type: 'directory', mode: 0o755 },
    { name: 'bin/busybox', data: busybox, mode: 0o755 },
    ...APPLETS.map((a) => ({ name: `bin/${a}`, type: 'symlink' as const, linkname: 'busybox', mode: 0o777 })),
  ]);
  const layer = gzipSync(layerTar);
  const config = Buffer.from(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      config: { Cmd: cmd, Env: ['PATH=/bin'] },
      rootfs: { type: 'layers', diff_ids: [`sha256:${sha(layerTar)}`] },
    }),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${sha(config)}`, size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: `sha256:${sha(layer)}`, size: layer.length }],
    }),
  );
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          digest: `sha256:${sha(manifest)}`,
          size: manifest.length,
          annotations: { 'io.containerd.image.name': name, 'org.opencontainers.image.ref.name': name.split(':').pop() },
        },
      ],
    }),
  );
  const archive = await tarOf([
    { name: 'oci-layout', data: Buffer.from('{"imageLayoutVersion":"1.0.0"}') },
    { name: 'index.json', data: index },
    ...[config, manifest, layer].map((b) => ({ name: `blobs/sha256/${sha(b)}`, data: b })),
  ]);
  const path = join(dir, `${name.replace(/[^a-z0-9]+/g, '-')}.tar`);
  writeFileSync(path, archive);
  return path;
}
