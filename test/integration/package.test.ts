/**
 * scion as a user gets it: `npm pack`, installed from the tarball into empty
 * projects; the CLI and the API from plain JavaScript; the identity-test
 * example run through the zx CI recipe (build --locked, verify, its vitest
 * identity tests, push to a real local registry); the same tests failing
 * when clones are not re-identified; and the fixtures' cleanup when the test
 * process is killed mid-run.
 */
import { execFileSync } from 'node:child_process';
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { cpSync, readFileSync, writeFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { $ } from 'zx';
import { ROOT, tmp, cleanupTmp, isolateRunDirs, removeEverything, scionQemuPids } from './helpers.ts';
import { startRegistry, type TestRegistry } from '../support/registry.ts';

const dirs = isolateRunDirs('package');
const version = (p: string) => JSON.parse(readFileSync(join(ROOT, 'node_modules', p, 'package.json'), 'utf8')).version;
let tarball: string;
let project: string;
let reg: TestRegistry;
// the example's scion runs in child processes: same isolated run dirs, no Docker credentials of the host
const env = () => ({ ...process.env, DOCKER_CONFIG: tmp('docker-config'), FORCE_COLOR: '0', NO_COLOR: '1' });

beforeAll(async () => {
  const packDir = tmp('pack');
  const out = await $({ cwd: ROOT, quiet: true })`npm pack --json --pack-destination ${packDir}`;
  tarball = join(packDir, JSON.parse(out.stdout)[0].filename);
  reg = await startRegistry();
});
afterAll(async () => {
  await reg?.stop();
  await removeEverything(dirs);
  cleanupTmp();
});

describe('the packed package', () => {
  it('holds compiled JS, declarations and the agent bundle; no TypeScript sources, tests or examples', async () => {
    const files = (await $`tar -tzf ${tarball}`.quiet()).stdout.trim().split('\n');
    expect(files).toContain('package/dist/host/index.js');
    expect(files).toContain('package/dist/host/index.d.ts');
    expect(files).toContain('package/dist/testing/index.js');
    expect(files).toContain('package/dist/guest-agent/agent.mjs');
    expect(files).toContain('package/bin/scion.js');
    // the containerd shim runs from the package too: its code and the protobuf descriptors it reads
    expect(files).toEqual(
      expect.arrayContaining(['package/bin/containerd-shim-scion-v2', 'package/dist/shim/main.js', 'package/dist/shim/proto/descriptors.json']),
    );
    expect(files.filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))).toEqual([]);
    expect(files.filter((f) => /^package\/(test|examples|bench|scripts)\//.test(f))).toEqual([]);
    const dts = (await $`tar -xzOf ${tarball} package/dist/host/index.d.ts`.quiet()).stdout;
    expect(dts).not.toMatch(/from '\.[^']*\.ts'/);
  });

  it('installs into an empty project: `npx scion --help` works and plain .mjs imports the API', async () => {
    const p = tmp('empty-project');
    writeFileSync(join(p, 'package.json'), JSON.stringify({ name: 'empty', private: true, type: 'module' }));
    await $({ cwd: p, quiet: true })`npm install --no-audit --no-fund --prefer-offline ${tarball}`;
    expect(existsSync(join(p, 'node_modules/tsx'))).toBe(false); // no TypeScript loader at run time
    expect(existsSync(join(p, 'node_modules/esbuild'))).toBe(false); // the agent was bundled at pack time
    const help = await $({ cwd: p, quiet: true })`npx scion --help`;
    expect(help.stdout).toContain('scion: fork running QEMU VMs copy-on-write');
    expect(help.stdout).toContain('verify <image.yaml>');
    // the installed shim starts (compiled code, its descriptors found) and refuses arguments containerd would never give
    const shim = await $({ cwd: p, quiet: true, nothrow: true })`npx containerd-shim-scion-v2 -namespace default -id x bogus`;
    expect(shim.exitCode).toBe(2);
    expect(shim.stderr).toContain('unknown action "bogus"');
    // `delete` after a shim that is gone answers containerd with a DeleteResponse, encoded from the packaged descriptors
    // (stdout is protobuf: read it as bytes)
    const del = execFileSync('npx', ['containerd-shim-scion-v2', '-namespace', 'default', '-id', 'gone', 'delete'], { cwd: p });
    const { decode } = await import('../../shim/proto.ts');
    expect(decode('containerd.task.v2.DeleteResponse', del)).toMatchObject({ exitStatus: 137 });
    // the API the README documents, and nothing else: every name imported by name from the installed package
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('\n### API'), readme.indexOf('\n## ', readme.indexOf('\n### API')));
    const documented = [...section.matchAll(/^\| `([A-Za-z_]\w*)`/gm)].map((m) => m[1]).sort();
    expect(documented).toEqual(
      expect.arrayContaining(['build', 'up', 'fork', 'serve', 'verify', 'push', 'pull', 'list', 'Machine', 'SCION_VERSION', 'validName', 'ScionError']),
    );
    writeFileSync(
      join(p, 'use.mjs'),
      [
        `import { ${documented.join(', ')} } from 'scion';`,
        "import * as all from 'scion';",
        `const named = { ${documented.join(', ')} };`,
        "console.log(JSON.stringify({ missing: Object.entries(named).filter(([, v]) => v === undefined).map(([k]) => k), exported: Object.keys(all).sort(), version: SCION_VERSION, name: validName('web-1'), machine: typeof Machine.open }));",
      ].join('\n'),
    );
    const r = JSON.parse((await $({ cwd: p, quiet: true })`node use.mjs`).stdout);
    expect(r).toEqual({
      missing: [],
      exported: documented,
      version: JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version,
      name: 'web-1',
      machine: 'function',
    });
  });
});

describe('examples/identity-test through examples/ci', () => {
  beforeAll(async () => {
    project = tmp('identity-test');
    cpSync(join(ROOT, 'examples/identity-test'), project, { recursive: true });
    cpSync(join(ROOT, 'examples/ci/ci.mjs'), join(project, 'ci.mjs'));
    await $({ cwd: project, quiet: true })`npm install --no-audit --no-fund --prefer-offline ${tarball} vitest@${version('vitest')} zx@${version('zx')}`;
  });

  it('the CI script builds with the lock, verifies reproducibility, runs the identity tests and pushes', async () => {
    const r = await $({ cwd: project, nothrow: true, quiet: true, env: { ...env(), PUSH_TO: `${reg.host}/example/idtest:ci` } })`node ci.mjs`;
    expect(r.exitCode, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain('idtest: identical');
    expect(r.stdout).toMatch(/Tests\s+6 passed \(6\)/);
    const result = JSON.parse(readFileSync(join(project, 'ci-result.json'), 'utf8'));
    expect(result.reproducible).toBe(true);
    expect(result.pushed).toMatch(new RegExp(`^${reg.host.replace(/\./g, '\\.')}/example/idtest:ci@sha256:[0-9a-f]{64}$`));
    const raw = JSON.parse((await $`skopeo inspect --raw --tls-verify=false docker://${reg.host}/example/idtest:ci`.quiet()).stdout);
    const initrd = raw.layers.find((l: any) => l.annotations['org.opencontainers.image.title'] === 'initrd.img');
    expect(initrd.digest).toBe(`sha256:${result.outputs.find((o: any) => o.name === 'initrd.img').sha256}`);
    expect(await scionQemuPids()).toEqual([]);
    expect(readdirSync(join(dirs.run, 'vms'))).toEqual([]);
  });

  it('a build whose lock would change fails the pipeline at the build step (exit 3)', async () => {
    const yaml = readFileSync(join(project, 'image.yaml'), 'utf8');
    writeFileSync(join(project, 'image.yaml'), yaml.replace('packages: [busybox-static]', 'packages: [busybox-static, dash]'));
    try {
      const r = await $({ cwd: project, nothrow: true, quiet: true, env: env() })`node ci.mjs`;
      expect(r.exitCode).toBe(3);
      expect(r.stdout).toContain('build (locked) failed (exit 3)');
      expect(r.stdout).toContain('--locked, but the definition no longer matches image.scion.lock (package sets container:hello)');
    } finally {
      writeFileSync(join(project, 'image.yaml'), yaml);
    }
  });

  it('with re-identification skipped, the same identity tests fail (and still leave nothing behind)', async () => {
    const r = await $({ cwd: project, nothrow: true, quiet: true, env: { ...env(), SCION_EXAMPLE_BREAK_IDENTITY: '1' } })`npx vitest run`;
    expect(r.exitCode).toBe(1);
    const failed = [...new Set([...(r.stdout + r.stderr).matchAll(/FAIL\s+identity\.test\.js > (.+)/g)].map((m) => m[1].trim()))];
    expect(failed).toEqual(
      expect.arrayContaining([
        'clones have distinct hostnames, and each is the one assigned',
        'clones have distinct MAC addresses',
        'clones have distinct IP addresses',
        'clones have distinct machine-ids',
        "each clone's container sees its clone's new hostname",
      ]),
    );
    expect(await scionQemuPids()).toEqual([]);
    expect(readdirSync(join(dirs.run, 'vms'))).toEqual([]);
  });

  it('when the test process is killed mid-run, the watchdog removes its template and clones', async () => {
    const run = $({ cwd: project, nothrow: true, quiet: true, env: env() })`npx vitest run`;
    const { list } = await import('../../host/lifecycle.ts');
    let owner: number | undefined;
    for (let i = 0; i < 600 && !owner; i++) {
      const vms = await list();
      // wait until the template QEMU runs: then there is something to clean up
      owner = vms.find((v) => v.owner?.kind === 'test' && v.state !== 'incomplete' && (v.state === 'running' || v.state === 'starting'))?.owner?.pid;
      if (!owner) await new Promise((r) => setTimeout(r, 200));
    }
    expect(owner, 'the fixture never started a template').toBeDefined();
    expect((await scionQemuPids()).length).toBeGreaterThan(0);
    process.kill(owner!, 'SIGKILL'); // the vitest worker holding the fixture: no teardown can run
    await run;
    for (let i = 0; i < 100 && ((await scionQemuPids()).length || readdirSync(join(dirs.run, 'vms')).length); i++) await new Promise((r) => setTimeout(r, 200));
    expect(await scionQemuPids()).toEqual([]);
    expect(readdirSync(join(dirs.run, 'vms'))).toEqual([]);
    expect(readdirSync(dirs.templates)).toEqual([]);
  });
});
