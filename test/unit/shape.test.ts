/**
 * The shape of the code, checked from the code itself: the import graph
 * (esbuild's metafile: every static and dynamic import, resolved), function
 * sizes in the builder's stages, the declarations the host's agent client
 * publishes (emitted by tsc), the CLI's help against its command table, the
 * package API against the README, and the constants that mirror files.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, readdirSync, mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { execFileSync } from 'node:child_process';
import * as esbuild from 'esbuild';
import { COMMANDS } from '../../cli/commands.ts';
import { helpText } from '../../cli/main.ts';
import { SCION_VERSION } from '../../common/version.ts';
import { ERROR_CODES } from '../../common/error-codes.ts';
import { config, ConfigError } from '../../common/config.ts';

const ROOT = join(import.meta.dirname, '../..');
const scratch = mkdtempSync(join(tmpdir(), 'scion-shape-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const tsFiles = (dir: string): string[] =>
  readdirSync(join(ROOT, dir), { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && e.name.endsWith('.ts') && !e.name.endsWith('.d.ts'))
    .map((e) => relative(ROOT, join(e.parentPath, e.name)));

/** file -> the project files it imports (statically or dynamically), as esbuild resolves them. */
async function importGraph(entries: string[]): Promise<Map<string, string[]>> {
  const r = await esbuild.build({
    entryPoints: entries.map((e) => join(ROOT, e)),
    bundle: true,
    metafile: true,
    write: false,
    platform: 'node',
    format: 'esm',
    packages: 'external',
    absWorkingDir: ROOT,
    outdir: scratch,
    logLevel: 'silent',
  });
  return new Map(
    Object.entries(r.metafile!.inputs).map(([f, i]) => [f, i.imports.map((x) => x.path).filter((p) => !p.startsWith('node:') && !p.includes('node_modules'))]),
  );
}

describe('the Machine is the only way down to QEMU and the run directories', () => {
  it('no module above host/machine imports host/qemu or host/store', async () => {
    const below = /^host\/(machine|qemu|store)\//;
    const above = [...tsFiles('host'), ...tsFiles('cli'), ...tsFiles('testing'), ...tsFiles('shim')].filter((f) => !below.test(f));
    expect(above.length).toBeGreaterThan(15);
    const graph = await importGraph(above);
    const offending = above.flatMap((f) => (graph.get(f) ?? []).filter((i) => /^host\/(qemu|store)\//.test(i)).map((i) => `${f} -> ${i}`));
    expect(offending).toEqual([]);
    // and the graph is real: the machine layer itself does reach them
    expect(graph.get('host/machine/machine.ts')).toEqual(expect.arrayContaining(['host/qemu/process.ts', 'host/store/records.ts']));
  });
});

describe('one face', () => {
  /** What programs on top of the library may import of host/, builder/ and registry/: the package's faces. */
  const FACES = ['host/index.ts', 'host/runtime.ts', 'host/machine/inspect.ts'];
  it('cli/, shim/, testing/ and bench/ reach host/, builder/ and registry/ only through host/index.ts or a named public subpath (scion/runtime, scion/inspect)', async () => {
    const clients = ['cli', 'shim', 'testing', 'bench'].flatMap(tsFiles);
    const graph = await importGraph(clients);
    const offending = clients.flatMap((f) =>
      (graph.get(f) ?? []).filter((i) => /^(host|builder|registry)\//.test(i) && !FACES.includes(i)).map((i) => `${f} -> ${i}`),
    );
    expect(offending).toEqual([]);
    // the graph is real: they do go through the faces
    expect(graph.get('cli/commands.ts')).toContain('host/index.ts');
    expect(graph.get('shim/service.ts')).toContain('host/runtime.ts');
  });
  it('bench/ shares test helpers only through test/support/', async () => {
    const files = tsFiles('bench');
    const graph = await importGraph(files);
    expect(
      files.flatMap((f) => (graph.get(f) ?? []).filter((i) => i.startsWith('test/') && !i.startsWith('test/support/')).map((i) => `${f} -> ${i}`)),
    ).toEqual([]);
  });
  it('the package exports each face', () => {
    const exp = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).exports;
    expect(Object.values(exp).flatMap((e) => (typeof e === 'object' && e ? [(e as { default: string }).default] : []))).toEqual(
      expect.arrayContaining(FACES.map((f) => `./dist/${f.replace(/\.ts$/, '.js')}`)),
    );
  });
});

describe('the agent behind its platform layer', () => {
  it('only the platform layer (platform-qjs.ts, qjs-io.ts, qjs-spawn.ts) and main.ts touch QuickJS; no agent module imports a Node built-in', async () => {
    const files = tsFiles('guest-agent');
    const r = await esbuild.build({
      entryPoints: files.map((f) => join(ROOT, f)),
      bundle: true,
      metafile: true,
      write: false,
      platform: 'neutral',
      format: 'esm',
      external: ['std', 'os', 'node:*'],
      absWorkingDir: ROOT,
      outdir: scratch,
      logLevel: 'silent',
    });
    const inputs = r.metafile!.inputs;
    const runtimeImports = Object.entries(inputs).flatMap(([f, i]) => i.imports.filter((x) => x.external).map((x) => `${f} -> ${x.path}`));
    // the platform layer: platform-qjs.ts and the two modules it is made of (qjs-io.ts, qjs-spawn.ts), and the entry
    expect(runtimeImports.sort()).toEqual([
      'guest-agent/main.ts -> os',
      'guest-agent/platform-qjs.ts -> os',
      'guest-agent/platform-qjs.ts -> std',
      'guest-agent/qjs-io.ts -> os',
      'guest-agent/qjs-io.ts -> std',
      'guest-agent/qjs-spawn.ts -> os',
      'guest-agent/qjs-spawn.ts -> std',
    ]);
    // what the agent reaches, the common/ modules included: nothing uses Node's globals either
    for (const f of Object.keys(inputs))
      expect(readFileSync(join(ROOT, f), 'utf8').replace(/\/\*[\s\S]*?\*\/|\/\/.*$/gm, ''), f).not.toMatch(/\b(Buffer|process)\.|\bNodeJS\./);
  });
});

describe('the builder in stages', () => {
  /** Top-level functions (declarations and arrow constants) and their length in lines. */
  function functionLengths(file: string): { name: string; lines: number }[] {
    const lines = readFileSync(join(ROOT, file), 'utf8').split('\n');
    const out: { name: string; lines: number }[] = [];
    lines.forEach((l, i) => {
      const m = /^(?:export )?(?:async )?function\*? (\w+)|^(?:export )?const (\w+) = (?:async )?\(/.exec(l);
      if (!m) return;
      const end = lines.findIndex((x, k) => k > i && /^(\}|\};|\}\);)$/.test(x));
      out.push({ name: m[1] ?? m[2], lines: (end < 0 ? lines.length : end) - i + 1 });
    });
    return out;
  }
  it.each(['builder/build.ts', 'builder/packages.ts', 'builder/guest.ts', 'builder/outputs.ts'])('%s has no function over 80 lines', (file) => {
    const fns = functionLengths(file);
    expect(fns.length).toBeGreaterThan(1);
    expect(fns.filter((f) => f.lines > 80)).toEqual([]);
  });
});

describe('one of each generic helper', () => {
  it('atomicWrite, sha256 and the cache directory are defined once, in common/, and host/qemu reaches nothing of the builder', async () => {
    const files = ['host', 'cli', 'builder', 'registry', 'testing', 'common', 'shim', 'bench'].flatMap(tsFiles);
    const defined = (re: RegExp) => files.filter((f) => re.test(readFileSync(join(ROOT, f), 'utf8')));
    expect(defined(/^export (async )?function atomicWrite\b/m)).toEqual(['common/safe-fs.ts']);
    expect(defined(/^export (const|function) sha256\b/m)).toEqual(['common/digest.ts']);
    expect(defined(/\bfunction defaultCacheDir\b/)).toEqual([]);
    const graph = await importGraph(tsFiles('host/qemu'));
    expect(
      [...graph.entries()]
        .filter(([f]) => f.startsWith('host/qemu/'))
        .flatMap(([f, is]) => is.filter((i) => i.startsWith('builder/')).map((i) => `${f} -> ${i}`)),
    ).toEqual([]);
  });
});

describe('typed contracts', () => {
  it("the agent client's published types have no `any`", () => {
    const cfg = join(scratch, 'tsconfig.json');
    writeFileSync(
      cfg,
      JSON.stringify({
        extends: join(ROOT, 'tsconfig.json'),
        compilerOptions: {
          noEmit: false,
          declaration: true,
          emitDeclarationOnly: true,
          rewriteRelativeImportExtensions: true,
          rootDir: ROOT,
          outDir: join(scratch, 'd'),
          typeRoots: [join(ROOT, 'node_modules/@types')],
        },
        files: [join(ROOT, 'host/agent-client.ts')],
        include: [],
      }),
    );
    execFileSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', cfg], { cwd: ROOT });
    const code = (f: string) =>
      readFileSync(join(scratch, 'd', f), 'utf8')
        .replace(/\/\*[\s\S]*?\*\//g, '')
        .replace(/\/\/.*$/gm, ''); // comments may say "any"
    const dts = code('host/agent-client.d.ts');
    expect(dts).toContain('call<C extends AgentCommand>');
    expect(dts).not.toMatch(/\bany\b/);
    // and the protocol map its signatures come from
    expect(code('common/agent-protocol.d.ts')).not.toMatch(/\bany\b/);
  });
  it('error codes are listed once each', () => {
    expect(new Set(ERROR_CODES).size).toBe(ERROR_CODES.length);
  });
  it("the version literal is package.json's", () => {
    expect(SCION_VERSION).toBe(JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version);
  });
});

describe('configuration', () => {
  it('is read when asked, from the environment given', () => {
    expect(config({ SCION_RUN_DIR: '/x/run', SCION_TB_SIZE_MB: '16' })).toMatchObject({
      runDir: '/x/run',
      tbSizeMB: 16,
      uidBase: 1_500_000_000,
      registryStallMs: 30_000,
    });
    expect(config({ SCION_REGISTRY_STALL_S: '2', SCION_UID_BASE: '2000000' })).toMatchObject({ registryStallMs: 2000, uidBase: 2_000_000 });
  });
  it.each([
    ['SCION_TB_SIZE_MB', 'lots'],
    ['SCION_UID_BASE', '-5'],
    ['SCION_ACCEL', 'xen'],
    ['SCION_REGISTRY_STALL_S', '0'],
  ])('refuses %s=%s by name', (k, v) => {
    expect(() => config({ [k]: v })).toThrow(ConfigError);
    expect(() => config({ [k]: v })).toThrow(k);
  });
  it('nothing reads SCION_* variables outside common/config.ts (the guest agent reads its own)', () => {
    const files = ['host', 'cli', 'builder', 'registry', 'testing', 'common'].flatMap(tsFiles).filter((f) => f !== 'common/config.ts');
    const reads = [...files, ...tsFiles('shim')].filter((f) => /process\.env\.(SCION_|XDG_CACHE|SOURCE_DATE)/.test(readFileSync(join(ROOT, f), 'utf8')));
    expect(reads).toEqual([]);
  });
});

describe('the face', () => {
  it("the CLI's help lists every command of the table, with its options", () => {
    const help = helpText();
    for (const c of COMMANDS) {
      expect(help).toMatch(new RegExp(`^  ${c.name}\\b`, 'm'));
      for (const o of Object.keys(c.options)) expect(help, `${c.name} --${o}`).toContain(`--${o}`);
    }
    const printed = execFileSync(process.execPath, [join(ROOT, 'bin/scion.js'), '--help'], { encoding: 'utf8' });
    expect(printed.trim()).toBe(help.trim());
    expect(COMMANDS.map((c) => c.name)).toEqual(
      expect.arrayContaining([
        'build',
        'verify',
        'push',
        'pull',
        'up',
        'boot',
        'freeze',
        'fork',
        'ls',
        'info',
        'exec',
        'logs',
        'console',
        'stop',
        'rm',
        'gc',
        'serve',
      ]),
    );
  });

  it("the package's runtime exports are exactly the names the README's API section documents", async () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('\n### API'), readme.indexOf('\n## ', readme.indexOf('\n### API')));
    const documented = new Set([...section.matchAll(/^\| `([A-Za-z_]\w*)`/gm)].map((m) => m[1]));
    const api = await import('../../host/index.ts');
    expect([...documented].sort()).toEqual(Object.keys(api).sort());
  });
});

describe('names', () => {
  it('a template is named <image>-tpl in one place, and its base read back in one', () => {
    const files = ['host', 'cli', 'testing', 'shim', 'common'].flatMap(tsFiles).filter((f) => f !== 'common/names.ts');
    const code = (f: string) => readFileSync(join(ROOT, f), 'utf8').replace(/\/\*[\s\S]*?\*\/|\/\/.*$/gm, '');
    expect(files.filter((f) => /-tpl(\$\/|`|')/.test(code(f)) && !/'pod-tpl'/.test(code(f)))).toEqual([]);
  });
});

describe('the API documented where it is declared', () => {
  /** Where `name` is declared, following `export { … } from` and `export type { … }` of an import. */
  function declaration(file: string, name: string): { file: string; line: number; src: string[] } | undefined {
    const text = readFileSync(file, 'utf8');
    const src = text.split('\n');
    const at = src.findIndex((l) =>
      new RegExp(`^export (declare )?(abstract )?(async )?(function\\*?|const|let|class|interface|type|enum) ${name}\\b`).test(l),
    );
    if (at >= 0) return { file, line: at, src };
    for (const m of text.matchAll(/export (type )?\{([^}]*)\} from '([^']+)'/g)) {
      for (const part of m[2].split(',').map((x) => x.trim().replace(/^type /, ''))) {
        const [orig, alias] = part.split(' as ').map((x) => x.trim());
        if ((alias ?? orig) === name) return declaration(join(file, '..', m[3]), orig);
      }
    }
    for (const m of text.matchAll(/^export (type )?\{([^}]*)\};/gm)) {
      if (
        !m[2]
          .split(',')
          .map((x) => x.trim().replace(/^type /, ''))
          .includes(name)
      )
        continue;
      const imp = new RegExp(`import (type )?\\{[^}]*\\b${name}\\b[^}]*\\} from '([^']+)'`).exec(text);
      if (imp) return declaration(join(file, '..', imp[2]), name);
    }
    return undefined;
  }
  it('every name host/index.ts exports has a doc comment on its declaration', () => {
    const index = join(ROOT, 'host/index.ts');
    const names = [...readFileSync(index, 'utf8').matchAll(/export (type )?\{([^}]*)\} from '([^']+)'/g)].flatMap((m) =>
      m[2]
        .split(',')
        .map((x) =>
          x
            .trim()
            .replace(/^type /, '')
            .split(' as ')[0]
            .trim(),
        )
        .filter(Boolean)
        .map((n) => ({ n, from: join(index, '..', m[3]) })),
    );
    expect(names.length).toBeGreaterThan(50);
    const undocumented = names.flatMap(({ n, from }) => {
      const d = declaration(from, n);
      if (!d) return [`${n}: no declaration found`];
      let k = d.line - 1;
      while (k >= 0 && d.src[k].trim().startsWith('//')) k--;
      return d.src[k]?.trim().endsWith('*/') ? [] : [`${relative(ROOT, d.file)}:${d.line + 1} ${n}`];
    });
    expect(undocumented).toEqual([]);
  });
});

describe("docs/DESIGN.md's picture", () => {
  it('names every module of the product, and every module it names exists', () => {
    const design = readFileSync(join(ROOT, 'docs/DESIGN.md'), 'utf8');
    const named = new Set(design.match(/[\w./-]+\.ts/g) ?? []);
    // brace groups: host/machine/{claim,templates}.ts
    for (const m of design.matchAll(/([\w./-]*)\{([\w,.-]+)\}(\.ts)?/g)) for (const p of m[2].split(',')) named.add(`${m[1]}${p}${m[3] ?? ''}`);
    const product = ['host', 'shim', 'cli', 'common', 'builder', 'registry', 'testing', 'guest-agent'].flatMap(tsFiles);
    expect(product.filter((f) => !named.has(f))).toEqual([]);
    const roots = /^(host|shim|cli|common|builder|registry|testing|guest-agent|bench|test)\//;
    expect([...named].filter((f) => roots.test(f) && !existsSync(join(ROOT, f)))).toEqual([]);
  });
});
