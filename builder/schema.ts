/**
 * The image definition: YAML in, a validated, defaulted ImageDefinition out.
 * Pure: takes the text and the file name, never touches the disk or network.
 * Every problem is a DefinitionError at file:line:column with the field path.
 */
import { parseDocument, LineCounter, isMap, isSeq, isScalar, type Node } from 'yaml';
import { DefinitionError } from '../common/errors.ts';

export const SCHEMA_VERSION = 1;

export interface HealthCheck {
  http?: { port: number; path: string };
  tcp?: { port: number };
  command?: string[];
  intervalMs: number;
  timeoutMs: number;
}
export type ContainerImage = { packages: string[] } | { oci: string };
export interface ContainerDef {
  name: string;
  image: ContainerImage;
  command: string[];
  env: Record<string, string>;
  restart: 'always' | 'on-failure' | 'no';
  /** after a fork: restart it with the new hostname, or keep it running and change what it sees in place */
  onFork: 'restart' | 'keep';
  healthcheck?: HealthCheck;
  ports: number[];
  network: 'host' | 'none';
}
export interface FileDef {
  path: string;
  mode: number;
  contents?: string;
  source?: string;
}
export interface ImageDefinition {
  schema: number;
  name: string;
  debian: { suite: string; components: string[]; architecture: string; mirror?: string };
  kernel: { package: string; modules: string[]; cmdline: string };
  packages: string[];
  /** runtime: the Debian package whose interpreter runs the agent (QuickJS's), locked like every package */
  agent: { runtime: AgentRuntime; exec: boolean };
  files: FileDef[];
  /** path globs left out of the guest (after the defaults: static libraries, headers) */
  exclude: string[];
  containers: ContainerDef[];
  network: { mode: 'static' | 'dhcp'; interface: string; guestRamMB: number };
}

/** The runtimes the agent's bundle is built for. */
export const AGENT_RUNTIMES = ['quickjs'] as const;
export type AgentRuntime = (typeof AGENT_RUNTIMES)[number];

type Loc = { line: number; col: number };
type Validator<T> = (node: Node | null | undefined, path: string, ctx: Ctx) => T;
interface Ctx {
  file: string;
  lc: LineCounter;
  at(node: Node | null | undefined): Loc;
}

function fail(ctx: Ctx, node: Node | null | undefined, path: string, problem: string, hint?: string): never {
  const { line, col } = ctx.at(node);
  throw new DefinitionError(ctx.file, line, col, path, problem, hint);
}
function kind(node: Node | null | undefined): string {
  if (node == null) return 'nothing';
  if (isMap(node)) return 'a mapping';
  if (isSeq(node)) return 'a list';
  if (isScalar(node)) return node.value === null ? 'null' : `${typeof node.value} ${JSON.stringify(node.value)}`;
  return 'something else';
}

const str =
  (pattern?: RegExp, what?: string): Validator<string> =>
  (n, p, c) => {
    if (!isScalar(n) || typeof n.value !== 'string') fail(c, n, p, `expected a string, found ${kind(n)}`);
    const v = n.value as string;
    if (pattern && !pattern.test(v)) fail(c, n, p, `${JSON.stringify(v)} is not ${what ?? `a match for ${pattern}`}`);
    return v;
  };
const int =
  (min: number, max: number): Validator<number> =>
  (n, p, c) => {
    if (!isScalar(n) || typeof n.value !== 'number' || !Number.isInteger(n.value)) fail(c, n, p, `expected an integer, found ${kind(n)}`);
    const v = n.value as number;
    if (v < min || v > max) fail(c, n, p, `${v} is out of range; allowed ${min}..${max}`);
    return v;
  };
const bool: Validator<boolean> = (n, p, c) => {
  if (!isScalar(n) || typeof n.value !== 'boolean') fail(c, n, p, `expected true or false, found ${kind(n)}`);
  return n.value as boolean;
};
const oneOf =
  <T extends string>(...allowed: T[]): Validator<T> =>
  (n, p, c) => {
    const v = str()(n, p, c);
    if (!allowed.includes(v as T)) fail(c, n, p, `${JSON.stringify(v)} is not allowed; use one of: ${allowed.join(', ')}`);
    return v as T;
  };
const list =
  <T>(item: Validator<T>): Validator<T[]> =>
  (n, p, c) => {
    if (!isSeq(n)) fail(c, n, p, `expected a list, found ${kind(n)}`);
    return n.items.map((it, i) => item(it as Node, `${p}[${i}]`, c));
  };
const dict =
  <T>(value: Validator<T>): Validator<Record<string, T>> =>
  (n, p, c) => {
    if (!isMap(n)) fail(c, n, p, `expected a mapping, found ${kind(n)}`);
    const out: Record<string, T> = {};
    for (const pair of n.items) {
      const k = str()(pair.key as Node, p, c);
      out[k] = value(pair.value as Node, `${p}.${k}`, c);
    }
    return out;
  };
type Fields = Record<string, { v: Validator<any>; required?: boolean; dflt?: () => unknown }>;
const obj =
  <T>(fields: Fields, check?: (v: any, n: Node, p: string, c: Ctx) => void): Validator<T> =>
  (n, p, c) => {
    if (!isMap(n)) fail(c, n, p, `expected a mapping, found ${kind(n)}`);
    const out: Record<string, unknown> = {};
    const seen = new Set<string>();
    for (const pair of n.items) {
      const keyNode = pair.key as Node;
      const k = isScalar(keyNode) ? String(keyNode.value) : '?';
      const fp = p ? `${p}.${k}` : k;
      const f = fields[k];
      if (!f) fail(c, keyNode, fp, `unknown key "${k}"`, `allowed keys here: ${Object.keys(fields).join(', ')}`);
      seen.add(k);
      out[k] = f.v(pair.value as Node, fp, c);
    }
    for (const [k, f] of Object.entries(fields)) {
      if (seen.has(k)) continue;
      if (f.required) fail(c, n, p || '(top level)', `missing required key "${k}"`);
      if (f.dflt) out[k] = f.dflt();
    }
    check?.(out, n, p, c);
    return out as T;
  };

const PKG = /^[a-z0-9][a-z0-9+.-]+$/;
const pkgName = str(PKG, 'a Debian package name');
const absPath = str(/^\/[^\0]*$/, 'an absolute path');
const port = int(1, 65535);
const cmd = list(str());

const healthcheck = obj<HealthCheck>(
  {
    http: { v: obj({ port: { v: port, required: true }, path: { v: str(/^\//, 'a path starting with /'), dflt: () => '/' } }) },
    tcp: { v: obj({ port: { v: port, required: true } }) },
    command: { v: cmd },
    interval_ms: { v: int(10, 600000), dflt: () => 200 },
    timeout_ms: { v: int(10, 600000), dflt: () => 1000 },
  },
  (v, n, p, c) => {
    const kinds = ['http', 'tcp', 'command'].filter((k) => v[k] !== undefined);
    if (kinds.length !== 1) fail(c, n, p, `a health check needs exactly one of http, tcp, command (found ${kinds.length ? kinds.join(', ') : 'none'})`);
    v.intervalMs = v.interval_ms;
    v.timeoutMs = v.timeout_ms;
    delete v.interval_ms;
    delete v.timeout_ms;
  },
);

const containerImage: Validator<ContainerImage> = (n, p, c) => {
  if (isScalar(n)) return { oci: str()(n, p, c) };
  return obj<ContainerImage>({ packages: { v: list(pkgName) }, oci: { v: str() } }, (v, node, pp, cc) => {
    if ((v.packages === undefined) === (v.oci === undefined))
      fail(cc, node, pp, 'an image is either {packages: [...]} or {oci: <path to an OCI layout or archive>}');
  })(n, p, c);
};

const container = obj<ContainerDef>(
  {
    name: { v: str(/^[a-z0-9][a-z0-9_-]{0,62}$/, 'a container name (lowercase letters, digits, - and _)'), required: true },
    image: { v: containerImage, required: true },
    command: { v: cmd, required: true },
    env: { v: dict(str()), dflt: () => ({}) },
    restart: { v: oneOf('always', 'on-failure', 'no'), dflt: () => 'always' },
    healthcheck: { v: healthcheck },
    ports: { v: list(port), dflt: () => [] },
    network: { v: oneOf('host', 'none'), dflt: () => 'host' },
    on_fork: { v: oneOf('restart', 'keep'), dflt: () => 'restart' },
  },
  (v) => {
    v.onFork = v.on_fork;
    delete v.on_fork;
  },
);

const fileDef = obj<FileDef>(
  {
    path: { v: absPath, required: true },
    mode: { v: (n, p, c) => parseInt(str(/^0?[0-7]{3,4}$/, 'an octal mode such as "0644"')(n, p, c), 8), dflt: () => 0o644 },
    contents: { v: str() },
    source: { v: str() },
  },
  (v, n, p, c) => {
    if ((v.contents === undefined) === (v.source === undefined)) fail(c, n, p, 'a file needs exactly one of contents or source');
  },
);

/** The agent's runtime: a Debian package name; the Node runtime of earlier definitions is refused with what to write instead. */
const agentRuntime: Validator<AgentRuntime> = (n, p, c) => {
  const instead = 'write `runtime: quickjs` (or leave agent.runtime out); the next build without --locked adds it to the lock';
  if (isMap(n)) {
    const pkg = n.get('package');
    fail(
      c,
      n,
      p,
      `the agent no longer runs on Node${typeof pkg === 'string' ? ` (${pkg})` : ''}: it runs on QuickJS, from Debian's quickjs package, locked like every other package`,
      instead,
    );
  }
  const v = str(PKG, 'a Debian package name')(n, p, c);
  if (!(AGENT_RUNTIMES as readonly string[]).includes(v))
    fail(c, n, p, `${JSON.stringify(v)} is not a runtime the agent is built for; it runs on: ${AGENT_RUNTIMES.join(', ')}`, instead);
  return v as AgentRuntime;
};

const definition = obj<ImageDefinition>({
  schema: { v: int(1, 1), required: true },
  name: { v: str(/^[a-z0-9][a-z0-9_-]{0,62}$/, 'an image name (lowercase letters, digits, - and _)'), required: true },
  debian: {
    v: obj({
      suite: { v: str(/^[a-z-]+$/, 'a suite name'), dflt: () => 'stable' },
      components: { v: list(oneOf('main', 'contrib', 'non-free', 'non-free-firmware')), dflt: () => ['main'] },
      architecture: { v: oneOf('amd64'), dflt: () => 'amd64' },
      mirror: { v: str(/^https?:\/\/\S+$/, 'an http(s) URL') },
    }),
    dflt: () => ({ suite: 'stable', components: ['main'], architecture: 'amd64' }),
  },
  kernel: {
    v: obj({
      package: { v: pkgName, dflt: () => 'linux-image-amd64' },
      modules: { v: list(str(/^[a-zA-Z0-9_-]+$/, 'a module name')), dflt: () => [] },
      cmdline: { v: str(), dflt: () => 'console=ttyS0' },
    }),
    required: true,
  },
  packages: { v: list(pkgName), dflt: () => [] },
  agent: {
    v: obj({
      runtime: { v: agentRuntime, dflt: () => 'quickjs' },
      exec: { v: bool, dflt: () => false },
    }),
    dflt: () => ({ runtime: 'quickjs', exec: false }),
  },
  files: { v: list(fileDef), dflt: () => [] },
  exclude: { v: list(str(/^\/[^\0\n]*$/, 'an absolute path glob such as /usr/share/zoneinfo/**')), dflt: () => [] },
  containers: {
    v: (n, p, c) => {
      const cs = list(container)(n, p, c);
      const seen = new Set<string>();
      cs.forEach((ct, i) => {
        if (seen.has(ct.name)) fail(c, (n as any).items[i], `${p}[${i}].name`, `duplicate container name "${ct.name}"`);
        seen.add(ct.name);
      });
      return cs;
    },
    dflt: () => [],
  },
  network: {
    v: obj(
      {
        mode: { v: oneOf('static', 'dhcp'), dflt: () => 'static' },
        interface: { v: str(/^[a-z0-9]{1,15}$/, 'an interface name'), dflt: () => 'eth0' },
        guest_ram_mb: { v: int(128, 65536), dflt: () => 512 },
      },
      (v) => {
        v.guestRamMB = v.guest_ram_mb;
        delete v.guest_ram_mb;
      },
    ),
    dflt: () => ({ mode: 'static', interface: 'eth0', guestRamMB: 512 }),
  },
});

export function parseDefinition(text: string, file: string): ImageDefinition {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const ctx: Ctx = {
    file,
    lc,
    at(node) {
      const off = node?.range?.[0] ?? 0;
      const pos = lc.linePos(off);
      return { line: pos.line, col: pos.col };
    },
  };
  if (doc.errors.length) {
    const e = doc.errors[0];
    const pos = lc.linePos(e.pos[0]);
    throw new DefinitionError(file, pos.line, pos.col, '', `YAML syntax: ${e.message.split('\n')[0]}`);
  }
  if (!doc.contents) throw new DefinitionError(file, 1, 1, '', 'the file is empty', 'start from images/minimal.yaml');
  return definition(doc.contents as Node, '', ctx);
}
