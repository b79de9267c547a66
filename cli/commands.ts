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
  up,
  Machine,
  serve,
  serveOptions,
} from '../host/index.ts';
import { buildProgress, table } from './format.ts';

import { IMAGE_COMMANDS } from './image-commands.ts';
import { VMM_COMMANDS } from './vmm-commands.ts';
import { HIBERNATE_COMMANDS } from './hibernate-commands.ts';
import { NET_OPTIONS, INSECURE, count, need, netFrom, str, tbSize, withAgent, type CommandSpec } from './options.ts';
export { netFrom, count, type CommandSpec, type Context, type OptionSpec, type OptionValues } from './options.ts';

export const COMMANDS: CommandSpec[] = [
  ...IMAGE_COMMANDS,
  ...VMM_COMMANDS,
  {
    name: 'up',
    args: '<image.yaml|out/name|ref>',
    summary: 'build (cached), boot, freeze, fork N clones, print them; given a template snapshot reference, pull it (once per node) and fork',
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
  ...HIBERNATE_COMMANDS,
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
    args: '<image.yaml|ref|snapshot ref|template> --port P',
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
      // --all: clones before templates (a template its hibernated clones need is not removed before them)
      const names = v.all
        ? (await list()).sort((a, b) => Number(a.role === 'template') - Number(b.role === 'template')).map((x) => x.name)
        : pos.map((n) => validName(n));
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
