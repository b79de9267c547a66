import { describe, it, expect } from 'vitest';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { gzipSync } from 'node:zlib';
import { readOciImage, runtimeConfig } from '../../builder/oci.ts';
import { parseDefinition } from '../../builder/schema.ts';
import { readFileSync } from 'node:fs';

import { tarOf as tarOfEntries } from '../support/tar.ts';
import { sha256 as sha } from '../../common/digest.ts';
/** A layer's tar from `{name, body}` entries. */
const tarOf = (entries: { name: string; body?: string; type?: 'directory' }[]) =>
  tarOfEntries(entries.map((e) => ({ name: e.name, type: e.type, data: e.body })));

const layer1 = [
  { name: 'etc/', type: 'directory' as const },
  { name: 'etc/a', body: 'A' },
  { name: 'etc/b', body: 'B' },
  { name: 'data/x/y', body: 'old' },
  { name: 'bin/tool', body: 'v1' },
];
const layer2 = [{ name: 'etc/.wh.a' }, { name: 'data/.wh..wh..opq' }, { name: 'data/new', body: 'N' }, { name: 'bin/tool', body: 'v2' }];

describe('OCI images', () => {
  it('applies layers of an OCI layout in order, honouring whiteouts and opaque directories', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'scion-oci-'));
    mkdirSync(join(dir, 'blobs/sha256'), { recursive: true });
    const blob = (b: Buffer) => {
      const h = sha(b);
      writeFileSync(join(dir, 'blobs/sha256', h), b);
      return { digest: `sha256:${h}`, size: b.length };
    };
    const l1 = blob(gzipSync(await tarOf(layer1)));
    const l2 = blob(gzipSync(await tarOf(layer2)));
    const cfg = blob(Buffer.from(JSON.stringify({ config: { Cmd: ['/bin/tool'] } })));
    const man = blob(
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg },
          layers: [l1, l2].map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...l })),
        }),
      ),
    );
    writeFileSync(
      join(dir, 'index.json'),
      JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...man }] }),
    );
    writeFileSync(join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
    const img = await readOciImage(dir);
    const files = Object.fromEntries([...img.files].filter(([, e]) => e.type === 'file').map(([p, e]) => [p, e.data!.toString()]));
    expect(files).toEqual({ '/etc/b': 'B', '/data/new': 'N', '/bin/tool': 'v2' });
    expect(img.config.config.Cmd).toEqual(['/bin/tool']);
    // the layers by digest, for the SBOM and the provenance
    expect(img.layers).toEqual([l1, l2].map((l) => ({ ...l, mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip' })));
    // a layer whose bytes do not match its digest is refused
    const victim = join(dir, 'blobs/sha256', l2.digest.slice(7));
    writeFileSync(victim, Buffer.concat([readFileSync(victim), Buffer.from('x')]));
    await expect(readOciImage(dir)).rejects.toMatchObject({ code: 'E_OCI_DIGEST', message: `${dir}: layer ${l2.digest} does not match its digest` });
    rmSync(dir, { recursive: true, force: true });
  });

  it('reads a docker-save archive the same way', async () => {
    const l1 = await tarOf(layer1),
      l2 = await tarOf(layer2);
    const archive = await tarOf([
      { name: 'manifest.json', body: JSON.stringify([{ Config: 'cfg.json', Layers: ['l1/layer.tar', 'l2/layer.tar'] }]) },
      { name: 'cfg.json', body: '{"config":{}}' },
      { name: 'l1/layer.tar', body: l1.toString('latin1') },
      { name: 'l2/layer.tar', body: l2.toString('latin1') },
    ]);
    const f = join(mkdtempSync(join(tmpdir(), 'scion-oci-')), 'img.tar');
    writeFileSync(f, archive);
    const img = await readOciImage(f);
    rmSync(dirname(f), { recursive: true, force: true });
    expect([...img.files.keys()].filter((p) => img.files.get(p)!.type === 'file').sort()).toEqual(['/bin/tool', '/data/new', '/etc/b']);
  });

  it('gives a container its own UTS hostname, the VM network for network: host, and its own netns for none', () => {
    const def = parseDefinition(readFileSync(new URL('../../images/web.yaml', import.meta.url), 'utf8'), 'web.yaml');
    const cfg: any = runtimeConfig(def.containers[0], 'web-7');
    expect(cfg.hostname).toBe('web-7');
    expect(cfg.linux.namespaces.map((n: any) => n.type)).toEqual(['pid', 'mount', 'ipc', 'uts']);
    expect(cfg.process.args.slice(0, 2)).toEqual(['/bin/busybox', 'sh']);
    const none: any = runtimeConfig({ ...def.containers[0], network: 'none' }, 'x');
    expect(none.linux.namespaces.map((n: any) => n.type)).toContain('network');
  });
});
