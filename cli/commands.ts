/**
 * The command table: every `scion` command once, with its arguments, its
 * options and what it does. Dispatch, option parsing and `scion --help` all
 * come from this table, so a command cannot exist without its help, nor an
 * option be accepted by a command that ignores it. Commands call the library
 * API only (host/index.ts and the Machine); names are validated at this edge,
 * before anything is touched.
 */
import { ScionError, EXIT } from '../common/errors.ts';
import { validName, TEMPLATE_SUFFIX } from '../common/names.ts';
import {
  build,
  verify,
  loadImage,
  resolveImage,
  bootTemplate,
  freeze,
  freezeClone,
  fork,
  list,
  stopVm,
  removeVm,
  gc,
  connectAgent,
  up,
  Machine,
  push,
  pull,
  serve,
  serveOptions,
  type Compression,
  type NetMode,
  type AgentClient,
} from '../host/index.ts';
import { buildProgress, fmtBytes, table } from './format.ts';

export type OptionValues = Record<string, string | boolean | undefined>;
export interface Context {
  json: boolean;
  err: (s: string) => void;
  out: (s: string) => void;
}
export interface OptionSpec {
  type: 'string' | 'boolean';
  short?: string;
  value?: string;
  help: string;
}
export interface CommandSpec {
  name: string;
  /** arguments as the help shows them */
  args: string;
  summary: string;
  /** more lines for the help */
  details?: string[];
  options: Record<string, OptionSpec>;
  /** remove temporary directories on SIGINT/SIGTERM and exit 130/143 */
  cleansUpOnInterrupt?: boolean;
  run(pos: string[], v: OptionValues, ctx: Context): Promise<number>;
}

const str = (v: OptionValues, k: string): string | undefined => (typeof v[k] === 'string' ? (v[k] as string) : undefined);
/** `fn` with a synced agent connection to `vm`, closed afterwards. */
async function withAgent<T>(vm: string, fn: (a: AgentClient) => Promise<T>): Promise<T> {
  const a = await connectAgent(validName(vm));
  try {
    return await fn(a);
  } finally {
    a.close();
  }
}
const need = (pos: string[], k: number, cmd: string, usage: string) => {
  if (pos.length < k) throw new ScionError('E_USAGE', `scion ${cmd}: missing argument`, { hint: usage });
};

/** --bridge/--netns/--network → a bridge network mode, --tap → a loose tap (user-mode networking otherwise). */
export function netFrom(v: OptionValues): NetMode | undefined {
  if (v.tap) {
    if (v.bridge || v.netns || v.network) throw new ScionError('E_USAGE', '--tap goes alone: not with --bridge, --netns or --network');
    return { mode: 'tap' };
  }
  if (!v.bridge) {
    if (v.netns || v.network) throw new ScionError('E_USAGE', '--netns and --network go with --bridge');
    return undefined;
  }
  const bridge = v.bridge as string;
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(bridge))
    throw new ScionError('E_USAGE', `--bridge ${JSON.stringify(bridge)}: not an interface name (1-15 of A-Z a-z 0-9 _ . -)`);
  const netns = v.netns as string | undefined;
  if (netns !== undefined && !/^[A-Za-z0-9_.-]{1,64}$/.test(netns))
    throw new ScionError('E_USAGE', `--netns ${JSON.stringify(netns)}: not a network namespace name (A-Z a-z 0-9 _ . -)`);
  const network = (v.network as string | undefined) ?? '10.44.0.0/24';
  if (
    !/^(\d{1,3}\.){3}0\/24$/.test(network) ||
    network
      .split(/[./]/)
      .slice(0, 4)
      .some((o) => Number(o) > 255)
  )
    throw new ScionError('E_USAGE', `--network ${network}: use a /24 such as 10.44.0.0/24`);
  return { mode: 'bridge', bridge, netns, network };
}

/** A whole-number option within bounds, or E_USAGE naming the flag. */
function wholeNumber(v: string | boolean, flag: string, min: number, max: number, unit = ''): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new ScionError('E_USAGE', `${flag} ${v}: use a whole number${unit} from ${min} to ${max}`);
  return n;
}

export function count(v: string | boolean | undefined, flag: string, dflt: number, min = 1): number {
  return v === undefined ? dflt : wholeNumber(v, flag, min, 200);
}

const tbSize = (v: string | boolean | undefined): number | undefined => (v === undefined ? undefined : wholeNumber(v, '--tb-size', 1, 2048, ' of MiB'));

function compressionOf(v: string | undefined): Compression {
  const c = v ?? 'none';
  if (c !== 'none' && c !== 'gzip' && c !== 'zstd') throw new ScionError('E_USAGE', `--compression ${c}: use none, gzip or zstd`);
  return c;
}

const NET_OPTIONS: Record<string, OptionSpec> = {
  bridge: { type: 'string', value: 'BR', help: 'a tap per VM on bridge BR instead of user-mode networking' },
  netns: { type: 'string', value: 'NS', help: 'the network namespace BR lives in' },
  network: { type: 'string', value: 'CIDR', help: 'addresses for bridged VMs (default 10.44.0.0/24; .15 the template, .16+ clones)' },
  tap: { type: 'boolean', help: 'a tap per VM attached to nothing: a template for containerd pods (each pod VM joins its own network)' },
};
const INSECURE: Record<string, OptionSpec> = { insecure: { type: 'boolean', help: 'plain HTTP to a registry that is not on loopback' } };
const BUILD_INPUT: Record<string, OptionSpec> = {
  compression: { type: 'string', value: 'none|gzip|zstd', help: 'initramfs compression (default none: fastest boot under TCG)' },
  mirror: { type: 'string', value: 'URL', help: "Debian mirror (default: the definition's, else the host's apt sources)" },
};

export const COMMANDS: CommandSpec[] = [
  {
    name: 'build',
    args: '<image.yaml>',
    summary: 'build DIR/<name>/: vmlinuz, initrd.img, manifest.json, sbom.cdx.json (CycloneDX 1.6), provenance.intoto.json (SLSA v1)',
    options: {
      out: { type: 'string', value: 'DIR', help: 'output directory (default ./out)' },
      'update-lock': { type: 'boolean', help: 're-resolve packages and rewrite <image>.scion.lock' },
      locked: { type: 'boolean', help: 'CI: fail (exit 3) if the lock is missing or would change' },
      ...BUILD_INPUT,
    },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      if (pos.length !== 1)
        throw new ScionError('E_USAGE', 'scion build needs exactly one image definition', { hint: 'scion build images/minimal.yaml --out out' });
      const r = await build({
        definitionPath: pos[0],
        outDir: str(v, 'out'),
        updateLock: !!v['update-lock'],
        locked: !!v.locked,
        mirror: str(v, 'mirror'),
        compression: compressionOf(str(v, 'compression')),
        onEvent: ctx.json ? undefined : buildProgress(ctx.err),
      });
      if (ctx.json) {
        ctx.out(JSON.stringify({ ok: true, ...r }, null, 2));
        return EXIT.ok;
      }
      ctx.out(`built ${r.name} -> ${r.dir}`);
      for (const o of r.outputs) ctx.out(`  ${o.name.padEnd(23)} ${fmtBytes(o.size).padStart(10)}  sha256 ${o.sha256}`);
      ctx.out(`  ${r.packages} packages; lock ${r.lockChanged ? 'written' : 'unchanged'}: ${r.lock}`);
      ctx.out(`  stripped ${r.stripped.files} ELF file(s): ${fmtBytes(r.stripped.bytes)} of debug sections and symbol tables`);
      ctx.out(`  largest files in the initramfs (${fmtBytes(r.sizes.initrdUncompressed)} in all):`);
      for (const f of r.largest) ctx.out(`    ${fmtBytes(f.size).padStart(10)}  ${f.path}`);
      ctx.out(`  what each package contributes (left out by exclude globs: ${r.excluded.files} file(s), ${fmtBytes(r.excluded.bytes)}):`);
      for (const p of r.packageSizes.slice(0, 10)) ctx.out(`    ${fmtBytes(p.bytes).padStart(10)}  ${p.name} (${p.files} files)`);
      return EXIT.ok;
    },
  },
  {
    name: 'verify',
    args: '<image.yaml>',
    summary: 'build twice, each from an empty cache in a temporary directory, and compare: "identical", or the first differing file (inside the initramfs)',
    options: { ...BUILD_INPUT },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      if (pos.length !== 1) throw new ScionError('E_USAGE', 'scion verify needs exactly one image definition', { hint: 'scion verify images/minimal.yaml' });
      if (!ctx.json) ctx.err('[verify] two builds, one after the other, each from an empty cache in a temporary directory');
      const r = await verify({
        definitionPath: pos[0],
        mirror: str(v, 'mirror'),
        compression: compressionOf(str(v, 'compression')),
        onEvent: ctx.json
          ? undefined
          : (n, ev) => {
              if (ev.type === 'step') ctx.err(`[verify] build ${n}: ${ev.step} done in ${(ev.ms / 1000).toFixed(1)} s`);
            },
      });
      if (ctx.json) ctx.out(JSON.stringify({ ok: r.identical, ...r }, null, 2));
      else if (r.identical) {
        ctx.out(`${r.name}: identical: two builds from empty caches gave the same bytes`);
        for (const o of r.outputs) ctx.out(`  ${o.name.padEnd(23)} ${fmtBytes(o.size[0]).padStart(10)}  sha256 ${o.sha256[0]}`);
      } else {
        const d = r.difference!;
        ctx.out(`${r.name}: NOT reproducible: ${d.output}${d.path ? `: ${d.path}` : ''}: ${d.how}`);
      }
      return r.identical ? EXIT.ok : EXIT.verification;
    },
  },
  {
    name: 'push',
    args: '<out/name> <registry>/<repo>:<tag>',
    summary: 'upload a built image as one OCI artifact (credentials: ~/.docker/config.json or $DOCKER_CONFIG)',
    options: { ...INSECURE },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      need(pos, 2, 'push', 'scion push out/web 127.0.0.1:5000/scion/web:1.0');
      const r = await push(pos[0], pos[1], { insecure: !!v.insecure, log: ctx.json ? undefined : (m) => ctx.err(`[push] ${m}`) });
      ctx.out(
        ctx.json
          ? JSON.stringify({ ok: true, ...r }, null, 2)
          : `pushed ${r.reference}\n  uploaded: ${r.uploaded.join(', ') || 'nothing (the registry had every blob)'}; already there: ${r.skipped.join(', ') || 'none'}`,
      );
      return EXIT.ok;
    },
  },
  {
    name: 'pull',
    args: '<registry>/<repo>:<tag>|@sha256:…',
    summary: 'download and verify an image into DIR/<name>/ (up and boot take the reference too)',
    options: { out: { type: 'string', value: 'DIR', help: 'where the image goes (default ./out)' }, ...INSECURE },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      need(pos, 1, 'pull', 'scion pull 127.0.0.1:5000/scion/web:1.0 --out images-dir');
      const r = await pull(pos[0], str(v, 'out') ?? 'out', { insecure: !!v.insecure, log: ctx.json ? undefined : (m) => ctx.err(`[pull] ${m}`) });
      ctx.out(ctx.json ? JSON.stringify({ ok: true, ...r }, null, 2) : `pulled ${r.reference} -> ${r.dir} (every digest checked)`);
      return EXIT.ok;
    },
  },
  {
    name: 'up',
    args: '<image.yaml|out/name|ref>',
    summary: 'build (cached), boot, freeze, fork N clones, print them',
    options: {
      clones: { type: 'string', value: 'N', help: 'how many clones (default 3; 0: only the template)' },
      disk: { type: 'string', value: 'D.qcow2', help: 'a disk: the template writes to an overlay on it, clones to overlays on that' },
      ...NET_OPTIONS,
      ...INSECURE,
    },
    async run(pos, v, ctx) {
      need(pos, 1, 'up', 'scion up images/web.yaml --clones 3');
      const r = await up(pos[0], {
        insecure: !!v.insecure,
        clones: count(v.clones, '--clones', 3, 0),
        disk: str(v, 'disk'),
        net: netFrom(v),
        log: (m) => ctx.err(`[up] ${m}`),
        onBuildEvent: ctx.json ? undefined : buildProgress(ctx.err),
      });
      if (ctx.json) {
        ctx.out(JSON.stringify(r, null, 2));
        return EXIT.ok;
      }
      ctx.out(
        table([
          ['NAME', 'HOSTNAME', 'MAC', 'IP', 'PORTS', 'FORK→READY'],
          ...r.clones.map((c) => [
            c.name,
            c.hostname,
            c.mac,
            c.ip,
            Object.entries(c.ports)
              .map(([g, h]) => `127.0.0.1:${h}->${g}`)
              .join(',') || '-',
            `${c.timings.ready.toFixed(0)} ms`,
          ]),
        ]),
      );
      ctx.out(`\nclones keep running; \`scion ls\` lists them, \`scion rm --all\` removes them.`);
      return EXIT.ok;
    },
  },
  {
    name: 'boot',
    args: 'out/<image>|<ref>',
    summary: 'boot a template VM and wait for its agent',
    options: {
      name: { type: 'string', value: 'T', help: 'the template name (default <image>-tpl)' },
      disk: { type: 'string', value: 'D.qcow2', help: 'a disk (the template writes to an overlay on it)' },
      ...NET_OPTIONS,
      ...INSECURE,
    },
    async run(pos, v, ctx) {
      need(pos, 1, 'boot', 'scion boot out/<image>');
      const img = await loadImage(
        (await resolveImage(pos[0], { insecure: !!v.insecure, log: ctx.err, onBuildEvent: ctx.json ? undefined : buildProgress(ctx.err) })).dir,
      );
      const m = await bootTemplate(img, {
        name: v.name === undefined ? undefined : validName(v.name, 'template'),
        disk: str(v, 'disk'),
        net: netFrom(v),
        log: ctx.err,
      });
      m.close();
      const i = m.info();
      ctx.out(
        ctx.json
          ? JSON.stringify({ name: i.name, runDir: i.runDir, accel: i.accel })
          : `template ${i.name} is running (${i.accel}); freeze it with: scion freeze ${i.name}`,
      );
      return EXIT.ok;
    },
  },
  {
    name: 'freeze',
    args: '<template> | <clone> --name T',
    summary: 'freeze a running template; or a running clone as a new template T (forks of a fork)',
    options: { name: { type: 'string', value: 'T', help: 'the new template, when freezing a clone' } },
    async run(pos, v, ctx) {
      need(pos, 1, 'freeze', 'scion freeze <template>');
      const name = validName(pos[0]);
      const newName = v.name === undefined ? undefined : validName(v.name, 'template');
      const m = await Machine.open(name);
      const i = m.info();
      if (i.role === 'clone') {
        if (!newName)
          throw new ScionError('E_USAGE', 'freezing a clone makes a new template: name it with --name', {
            hint: `scion freeze ${name} --name ${name}${TEMPLATE_SUFFIX}`,
          });
        const meta = await freezeClone(name, newName, ctx.err);
        ctx.out(ctx.json ? JSON.stringify(meta) : `frozen clone ${name} as template ${newName}; fork it with: scion fork ${newName} -n 3`);
        return EXIT.ok;
      }
      const meta = await freeze(m, await loadImage(i.image), ctx.err);
      ctx.out(ctx.json ? JSON.stringify(meta) : `frozen: ${name}`);
      return EXIT.ok;
    },
  },
  {
    name: 'fork',
    args: '<template>',
    summary: 'fork N running clones of a frozen template',
    options: {
      n: { type: 'string', short: 'n', value: 'N', help: 'how many clones (default 1)' },
      'tb-size': {
        type: 'string',
        value: 'MB',
        help: "each clone's TCG translation buffer (default SCION_TB_SIZE_MB, else 32): smaller saves memory, costs speed (README: Benchmarks)",
      },
    },
    async run(pos, v, ctx) {
      need(pos, 1, 'fork', 'scion fork <template> -n 3');
      const cs = await fork(validName(pos[0], 'template'), { n: count(v.n, '-n', 1), tbSizeMB: tbSize(v['tb-size']), log: ctx.json ? undefined : ctx.err });
      ctx.out(
        ctx.json
          ? JSON.stringify({ clones: cs }, null, 2)
          : table([['NAME', 'HOSTNAME', 'IP', 'READY'], ...cs.map((c) => [c.name, c.hostname, c.ip, `${c.timings.ready} ms`])]),
      );
      return EXIT.ok;
    },
  },
  {
    name: 'ls',
    args: '',
    summary: 'list VMs (templates and clones) from their run directories',
    options: {},
    async run(_pos, _v, ctx) {
      const l = await list();
      if (ctx.json) ctx.out(JSON.stringify(l, null, 2));
      else if (!l.length) ctx.out('no VMs');
      else
        ctx.out(
          table([
            ['NAME', 'ROLE', 'STATE', 'HOSTNAME', 'IP', 'PORTS', 'OWNER', 'RUN DIR'],
            ...l.map((x) => [
              x.name,
              x.role,
              x.state,
              x.hostname ?? '-',
              x.ip ?? '-',
              Object.entries(x.ports)
                .map(([g, h]) => `${h}->${g}`)
                .join(',') || '-',
              x.owner ? `${x.owner.kind}:${x.owner.pid}${x.owner.alive ? '' : ' (dead)'}` : '-',
              x.runDir,
            ]),
          ]),
        );
      return EXIT.ok;
    },
  },
  {
    name: 'info',
    args: '<vm>',
    summary: "the agent's info: identity, fork generation, containers",
    options: {},
    async run(pos, _v, ctx) {
      need(pos, 1, 'info', 'scion info <vm>');
      const info = await withAgent(pos[0], (a) => a.call('info'));
      ctx.out(
        ctx.json
          ? JSON.stringify(info, null, 2)
          : `${pos[0]}: ${info.identity.hostname} generation ${info.generation}, kernel ${info.kernel}, containers: ${info.containers.map((c) => `${c.name}=${c.state}`).join(' ') || 'none'}`,
      );
      return EXIT.ok;
    },
  },
  {
    name: 'exec',
    args: '<vm> -- CMD...',
    summary: 'run a command in the guest (if the image allows exec); exits with its status',
    options: {},
    async run(pos, _v, ctx) {
      need(pos, 2, 'exec', 'scion exec <vm> -- cmd args…');
      const r = await withAgent(pos[0], (a) => a.call('exec', { argv: pos.slice(1) }));
      if (ctx.json) ctx.out(JSON.stringify(r));
      else {
        process.stdout.write(r.stdout);
        process.stderr.write(r.stderr);
      }
      return r.exitCode;
    },
  },
  {
    name: 'logs',
    args: '<vm>',
    summary: "the console log, or a container's log",
    options: { container: { type: 'string', value: 'C', help: "container C's stdout and stderr instead" } },
    async run(pos, v) {
      need(pos, 1, 'logs', 'scion logs <vm> [--container NAME]');
      const name = validName(pos[0]);
      const container = str(v, 'container');
      if (container) process.stdout.write((await withAgent(name, (a) => a.call('containers.logs', { name: container }))).logs);
      else process.stdout.write(await (await Machine.open(name)).consoleLog());
      return EXIT.ok;
    },
  },
  {
    name: 'console',
    args: '<vm>',
    summary: 'interactive serial console (Ctrl-] to leave)',
    options: {},
    async run(pos) {
      need(pos, 1, 'console', 'scion console <vm>');
      const { consoleSession } = await import('./console.ts');
      return consoleSession(validName(pos[0]));
    },
  },
  stopOrRemove('stop', 'stop VMs (keeps run directories)'),
  stopOrRemove('rm', 'stop and remove VMs and their run directories'),
  {
    name: 'gc',
    args: '',
    summary: 'remove run directories of dead VMs; kill QEMUs whose run dir is gone',
    options: {},
    async run(_pos, _v, ctx) {
      const r = await gc();
      ctx.out(
        ctx.json
          ? JSON.stringify(r)
          : `removed ${r.removed.length} dead run dir(s), killed ${r.killed.length} orphan QEMU(s), released ${r.released.length} reservation(s)`,
      );
      return EXIT.ok;
    },
  },
  {
    name: 'serve',
    args: '<image.yaml|template> --port P',
    summary: 'the front door: forks clones on demand and routes HTTP to guest port P',
    details: ['Durations: 500ms, 30s, 2m.'],
    options: {
      port: { type: 'string', value: 'P', help: 'the guest port requests go to (required)' },
      listen: { type: 'string', value: 'H:P', help: 'where to listen (default 127.0.0.1:8080)' },
      mode: {
        type: 'string',
        value: 'shared|per-request',
        help: 'shared (default): a clone serves up to --concurrency requests; per-request: a fresh clone per request, removed after it',
      },
      concurrency: { type: 'string', value: 'K', help: 'requests a shared clone takes at once (default 10)' },
      min: { type: 'string', value: 'N', help: 'clones kept at least (default 0)' },
      max: { type: 'string', value: 'N', help: 'clones at most, pooled ones included (default 8)' },
      pool: { type: 'string', value: 'P', help: 'clones forked ahead and paused (QMP stop); a claim resumes one (default 0)' },
      idle: { type: 'string', value: 'D', help: 'a shared clone idle this long is removed (default 30s; scale to zero with --min 0)' },
      queue: { type: 'string', value: 'Q', help: 'requests held while clones fork (default 100); past it: 503 + Retry-After' },
      'queue-timeout': { type: 'string', value: 'D', help: 'how long a request may wait (default 10s)' },
      tcp: { type: 'boolean', help: 'plain TCP instead of HTTP: a fresh clone per connection' },
      admin: { type: 'string', value: 'H:P', help: '/metrics (Prometheus) and /healthz' },
      drain: { type: 'string', value: 'D', help: 'SIGTERM: time in-flight requests get before clones are removed (default 10s)' },
      'fork-parallel': { type: 'string', value: 'N', help: "clones forked at once for waiting requests (default: the host's cores)" },
    },
    async run(pos, v, ctx) {
      const o = serveOptions(pos[0], { ...v, json: ctx.json });
      const h = await serve(o, (line) => (o.json ? ctx.out(line) : ctx.err(line)));
      await new Promise<void>((resolve) => {
        const stop = (sig: string) => {
          ctx.err(o.json ? JSON.stringify({ event: 'signal', signal: sig }) : `[serve] ${sig}: draining, then removing every clone`);
          h.close().then(resolve, (e) => {
            ctx.err(`[serve] shutdown: ${(e as Error).message}`);
            resolve();
          });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
      return EXIT.ok;
    },
  },
];

function stopOrRemove(name: 'stop' | 'rm', summary: string): CommandSpec {
  return {
    name,
    args: '<vm>... | --all',
    summary,
    options: { all: { type: 'boolean', help: 'every VM (skips those another scion process is still making)' } },
    async run(pos, v, ctx) {
      if (v.all && pos.length) throw new ScionError('E_USAGE', `scion ${name}: name VMs or pass --all, not both`);
      const names = v.all ? (await list()).map((x) => x.name) : pos.map((n) => validName(n));
      if (!names.length && !v.all) throw new ScionError('E_USAGE', `scion ${name}: name VMs or pass --all`);
      const done: string[] = [];
      const busy: string[] = [];
      for (const n of names) {
        try {
          await (name === 'rm' ? removeVm(n) : stopVm(n));
          done.push(n);
        } catch (e) {
          // --all skips what another scion process is still making; named VMs report it
          if (v.all && (e as ScionError).code === 'E_VM_BUSY') {
            busy.push(n);
            continue;
          }
          throw e;
        }
      }
      const verb = name === 'rm' ? 'removed' : 'stopped';
      ctx.out(
        ctx.json
          ? JSON.stringify({ [verb]: done, busy })
          : `${verb}: ${done.join(' ') || '(none)'}${busy.length ? `; left (being made by another scion): ${busy.join(' ')}` : ''}`,
      );
      return EXIT.ok;
    },
  };
}
