/**
 * deploy/kubernetes/ against what the shim relies on. There is no kubelet on
 * these machines, so what is checked is the agreement between the files and
 * the code: the runtime's name from RuntimeClass to containerd's config to the
 * shim binary, the template annotation and its default, the node label.
 */
import { describe, it, expect } from 'vitest';
import { readFileSync, mkdtempSync, mkdirSync, copyFileSync, rmSync, existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { tmpdir } from 'node:os';
import { spawnSync } from 'node:child_process';
import { parseAllDocuments } from 'yaml';
import { parse as parseToml } from 'smol-toml';
import { TEMPLATE_ANNOTATION } from '../../shim/service.ts';
import { config } from '../../common/config.ts';

const ROOT = join(import.meta.dirname, '../..');
const dir = join(ROOT, 'deploy/kubernetes');
const yamlDocs = (f: string) =>
  parseAllDocuments(readFileSync(join(dir, f), 'utf8')).map((d) => {
    expect(d.errors, f).toEqual([]);
    return d.toJS();
  });
const toml = (f: string) => parseToml(readFileSync(join(dir, f), 'utf8')) as any;
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));

/** containerd's rule: runtime_type io.containerd.<name>.<version> runs containerd-shim-<name>-<version>. */
const shimBinary = (runtimeType: string) => {
  const m = /^io\.containerd\.([a-z0-9]+)\.(v\d+)$/.exec(runtimeType)!;
  return `containerd-shim-${m[1]}-${m[2]}`;
};
const globMatch = (patterns: string[], key: string) => patterns.some((p) => new RegExp(`^${p.replace(/\./g, '\\.').replace(/\*/g, '.*')}$`).test(key));

describe('deploy/kubernetes', () => {
  const [rc] = yamlDocs('runtimeclass.yaml');
  const v2 = toml('containerd-scion.toml').plugins['io.containerd.grpc.v1.cri'].containerd.runtimes;
  const v3 = toml('containerd-scion-v3.toml').plugins['io.containerd.cri.v1.runtime'].containerd.runtimes;
  const [, cm, ds] = yamlDocs('daemonset.yaml');

  it('RuntimeClass handler -> containerd runtime (1.6/1.7 and 2.x) -> the shim binary the package installs', () => {
    expect(rc).toMatchObject({ apiVersion: 'node.k8s.io/v1', kind: 'RuntimeClass', metadata: { name: 'scion' } });
    for (const runtimes of [v2, v3]) {
      const r = runtimes[rc.handler];
      expect(r, 'the handler is a runtime of that name').toBeDefined();
      expect(shimBinary(r.runtime_type)).toBe('containerd-shim-scion-v2');
      expect(Object.keys(pkg.bin)).toContain(shimBinary(r.runtime_type));
      // the pod annotation naming a template reaches the shim
      expect(globMatch(r.pod_annotations, TEMPLATE_ANNOTATION)).toBe(true);
    }
    expect(pkg.files).toContain('deploy/');
  });

  it('the DaemonSet installs that binary, on the nodes the RuntimeClass schedules to, with the templates pods name', () => {
    expect(ds).toMatchObject({ kind: 'DaemonSet' });
    const spec = ds.spec.template.spec;
    expect(spec.nodeSelector).toEqual(rc.scheduling.nodeSelector);
    const install = readFileSync(join(dir, 'install-node.sh'), 'utf8');
    expect(install).toContain('/usr/local/bin/containerd-shim-scion-v2');
    expect(install).toContain('bin/containerd-shim-scion-v2 "\\$@"'); // "$@" in the launcher it writes
    for (const f of ['containerd-scion.toml', 'containerd-scion-v3.toml']) expect(install).toContain(f);
    expect(spec.initContainers[0].command.join(' ')).toContain('deploy/kubernetes/install-node.sh');
    const templates = cm.data.templates
      .trim()
      .split('\n')
      .map((l: string) => l.trim().split(/\s+/)[0]);
    expect(cm.data.SCION_SHIM_TEMPLATE).toBe(config({}).shimTemplate); // the shim's default
    expect(templates).toContain(cm.data.SCION_SHIM_TEMPLATE);
    const env = spec.containers[0].env.find((e: { name: string }) => e.name === 'SCION_SHIM_TEMPLATE');
    expect(env.valueFrom.configMapKeyRef).toEqual({ name: cm.metadata.name, key: 'SCION_SHIM_TEMPLATE' });
    // the shim's own environment on the node comes from the ConfigMap through the installer
    for (const key of ['SCION_SHIM_TEMPLATE', 'SCION_SHIM_IMAGES', 'SCION_SHIM_POOL']) {
      expect(spec.initContainers[0].env.find((e: { name: string }) => e.name === key)?.valueFrom.configMapKeyRef).toEqual({ name: cm.metadata.name, key });
      expect(cm.data[key]).toBeDefined();
    }
  });

  it('the example Deployment and Knative Service run on it and name a template the nodes have', () => {
    const templates = cm.data.templates
      .trim()
      .split('\n')
      .map((l: string) => l.trim().split(/\s+/)[0]);
    const [dep] = yamlDocs('example-deployment.yaml');
    const [kn] = yamlDocs('knative-service.yaml');
    for (const t of [dep.spec.template, kn.spec.template]) {
      expect(t.spec.runtimeClassName).toBe(rc.metadata.name);
      expect(templates).toContain(t.metadata.annotations[TEMPLATE_ANNOTATION]);
    }
    expect(kn).toMatchObject({ apiVersion: 'serving.knative.dev/v1', kind: 'Service' });
    expect(kn.spec.template.metadata.annotations['autoscaling.knative.dev/min-scale']).toBe('0');
  });
});

describe('install-node.sh on a node root', () => {
  it("installs the shim's launcher with the ConfigMap's environment and the config for the node's containerd (a real chroot with this machine's 1.6); refuses a hostile value", () => {
    const host = mkdtempSync(join(tmpdir(), 'scion-node-root-'));
    const src = mkdtempSync(join(tmpdir(), 'scion-node-src-'));
    try {
      // the node: its containerd and what that links against, so `chroot $HOST containerd --version` runs for real
      for (const f of ['/usr/bin/containerd', '/lib/x86_64-linux-gnu/libc.so.6', '/lib64/ld-linux-x86-64.so.2']) {
        mkdirSync(join(host, dirname(f)), { recursive: true });
        copyFileSync(f, join(host, f));
      }
      spawnSync('chmod', ['0755', join(host, 'usr/bin/containerd'), join(host, 'lib64/ld-linux-x86-64.so.2')]);
      // the image's install: the package's deploy files under /opt/scion
      mkdirSync(join(src, 'lib/node_modules/scion/deploy/kubernetes'), { recursive: true });
      for (const f of ['containerd-scion.toml', 'containerd-scion-v3.toml'])
        copyFileSync(join(dir, f), join(src, 'lib/node_modules/scion/deploy/kubernetes', f));
      const install = (env: Record<string, string>) =>
        spawnSync('sh', [join(dir, 'install-node.sh')], { env: { PATH: process.env.PATH!, HOST: host, SRC: src, ...env }, encoding: 'utf8' });
      const r = install({ SCION_SHIM_TEMPLATE: 'web-tpl', SCION_SHIM_IMAGES: 'registry.example.com/scion/,127.0.0.1:5000/', SCION_SHIM_POOL: '2' });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const launcherPath = join(host, 'usr/local/bin/containerd-shim-scion-v2');
      const launcher = readFileSync(launcherPath, 'utf8');
      // the environment the shim gets, as a shell reads the launcher
      const envLine = launcher.split('\n').find((l) => l.startsWith('export '))!;
      const seen = spawnSync('sh', ['-c', `${envLine}; echo "$SCION_SHIM_TEMPLATE|$SCION_SHIM_IMAGES|$SCION_SHIM_POOL"`], { encoding: 'utf8' }).stdout;
      expect(seen).toBe('web-tpl|registry.example.com/scion/,127.0.0.1:5000/|2\n');
      // the values the shim reads are the ones it accepts
      expect(config({ SCION_SHIM_POOL: '2' }).shimPool).toBe(2);
      expect(launcher).toMatch(/exec \/opt\/scion\/node\/bin\/node \/opt\/scion\/lib\/node_modules\/scion\/bin\/containerd-shim-scion-v2 "\$@"\n$/);
      // containerd 1.6 here: the config for 1.6/1.7
      expect(readFileSync(join(host, 'etc/containerd/conf.d/scion.toml'), 'utf8')).toBe(readFileSync(join(dir, 'containerd-scion.toml'), 'utf8'));
      expect(existsSync(join(host, 'opt/scion/lib/node_modules/scion/deploy/kubernetes/containerd-scion.toml'))).toBe(true);
      // a value that would be shell code in the launcher: refused, and the installed launcher stays as it was
      const bad = install({ SCION_SHIM_TEMPLATE: "x'; reboot; '" });
      expect(bad.status).toBe(2);
      expect(bad.stderr).toMatch(/install-node\.sh: refusing "x'; reboot; '"/);
      expect(readFileSync(launcherPath, 'utf8')).toBe(launcher);
      for (const pool of ['2; reboot', '17', '-1']) {
        const r2 = install({ SCION_SHIM_POOL: pool });
        expect([r2.status, r2.stderr]).toEqual([2, expect.stringContaining('install-node.sh: refusing SCION_SHIM_POOL')]);
      }
      expect(readFileSync(launcherPath, 'utf8')).toBe(launcher);
    } finally {
      rmSync(host, { recursive: true, force: true });
      rmSync(src, { recursive: true, force: true });
    }
  });
});
