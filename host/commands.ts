/** CLI commands that drive VMs (everything but build). Names are validated here, at the edge, before anything is touched. */
import { readFile } from 'node:fs/promises';
import { VmError, ScionError } from '../common/errors.ts';
import { validName } from '../common/names.ts';
import { buildProgress } from './progress.ts';
import { loadImage } from './image.ts';
import { bootTemplate, freeze, freezeClone } from './template.ts';
import { fork } from './clone.ts';
import { list, stopVm, removeVm, gc, connectAgent } from './lifecycle.ts';
import { up } from './up.ts';
import { QmpClient } from './qemu/qmp.ts';
import { AgentClient } from './agent-client.ts';
import { vmPaths, vmsDir } from './store/dirs.ts';
import { readRecord } from './store/records.ts';
import type { NetMode } from './net.ts';

interface Ctx { json: boolean; err: (s: string) => void; argv: string[] }
type Vals = Record<string, string | boolean | undefined>;

function table(rows: string[][]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (c ?? '').padEnd(w[i])).join('  ').trimEnd()).join('\n');
}

/** --bridge/--netns/--network → a bridge network mode (user-mode networking otherwise). */
export function netFrom(v: Vals): NetMode | undefined {
  if (!v.bridge) {
    if (v.netns || v.network) throw new ScionError('E_USAGE', '--netns and --network go with --bridge');
    return undefined;
  }
  const bridge = v.bridge as string;
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(bridge)) throw new ScionError('E_USAGE', `--bridge ${JSON.stringify(bridge)}: not an interface name (1-15 of A-Z a-z 0-9 _ . -)`);
  const netns = v.netns as string | undefined;
  if (netns !== undefined && !/^[A-Za-z0-9_.-]{1,64}$/.test(netns)) throw new ScionError('E_USAGE', `--netns ${JSON.stringify(netns)}: not a network namespace name (A-Z a-z 0-9 _ . -)`);
  const network = (v.network as string | undefined) ?? '10.44.0.0/24';
  if (!/^(\d{1,3}\.){3}0\/24$/.test(network) || network.split(/[./]/).slice(0, 4).some((o) => Number(o) > 255)) throw new ScionError('E_USAGE', `--network ${network}: use a /24 such as 10.44.0.0/24`);
  return { mode: 'bridge', bridge, netns, network };
}

export function count(v: string | boolean | undefined, flag: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 200) throw new ScionError('E_USAGE', `${flag} ${v}: use a whole number from 1 to 200`);
  return n;
}

export async function run(cmd: string, pos: string[], v: Vals, ctx: Ctx): Promise<number> {
  const need = (k: number, usage: string) => { if (pos.length < k) throw new ScionError('E_USAGE', `scion ${cmd}: missing argument`, { hint: usage }); };
  switch (cmd) {
    case 'up': {
      need(1, 'scion up images/web.yaml --clones 3');
      const r = await up(pos[0], { insecure: !!v.insecure, clones: count(v.clones, '--clones', 3), disk: v.disk as string | undefined, net: netFrom(v), log: (m) => ctx.err(`[up] ${m}`), onBuildEvent: ctx.json ? undefined : buildProgress(ctx.err) });
      if (ctx.json) console.log(JSON.stringify(r, null, 2));
      else {
        console.log(table([['NAME', 'HOSTNAME', 'MAC', 'IP', 'PORTS', 'FORK→READY'], ...r.clones.map((c) => [c.name, c.hostname, c.mac, c.ip, Object.entries(c.ports).map(([g, h]) => `127.0.0.1:${h}->${g}`).join(',') || '-', `${c.timings.ready.toFixed(0)} ms`])]));
        console.log(`\nclones keep running; \`scion ls\` lists them, \`scion rm --all\` removes them.`);
      }
      return 0;
    }
    case 'boot': {
      need(1, 'scion boot out/<image>');
      const { resolveImage } = await import('./image-source.ts');
      const img = await loadImage((await resolveImage(pos[0], { insecure: !!v.insecure, log: ctx.err, onBuildEvent: ctx.json ? undefined : buildProgress(ctx.err) })).dir);
      const h = await bootTemplate(img, { name: v.name === undefined ? undefined : validName(v.name, 'template'), disk: v.disk as string | undefined, net: netFrom(v), log: ctx.err });
      h.qmp.close(); h.agent.close();
      if (ctx.json) console.log(JSON.stringify({ name: h.record.name, runDir: vmPaths(validName(h.record.name), vmsDir()).dir, accel: h.record.accel }));
      else console.log(`template ${h.record.name} is running (${h.record.accel}); freeze it with: scion freeze ${h.record.name}`);
      return 0;
    }
    case 'freeze': {
      need(1, 'scion freeze <template>');
      const name = validName(pos[0]);
      const newName = v.name === undefined ? undefined : validName(v.name, 'template');
      const r = await readRecord(name);
      if (r?.role === 'clone') {
        if (!newName) throw new ScionError('E_USAGE', 'freezing a clone makes a new template: name it with --name', { hint: `scion freeze ${name} --name ${name}-tpl` });
        const meta = await freezeClone(name, newName, ctx.err);
        console.log(ctx.json ? JSON.stringify(meta) : `frozen clone ${name} as template ${newName}; fork it with: scion fork ${newName} -n 3`);
        return 0;
      }
      if (!r || r.role !== 'template') throw new VmError('E_NO_VM', `no template VM named ${name}`, { hint: 'scion ls' });
      if (r.frozen) throw new VmError('E_FROZEN', `template ${name} is already frozen`, { hint: `scion fork ${name} -n 3` });
      const p = vmPaths(name, vmsDir());
      const qmp = new QmpClient(`${name}/qmp`); await qmp.connect(p.qmp);
      const agent = new AgentClient(`${name}/agent`); await agent.connect(p.agent); await agent.sync();
      const meta = await freeze({ record: r, qmp, agent }, await loadImage(r.image), ctx.err);
      console.log(ctx.json ? JSON.stringify(meta) : `frozen: ${name}`);
      return 0;
    }
    case 'fork': {
      need(1, 'scion fork <template> -n 3');
      const cs = await fork(validName(pos[0], 'template'), { n: count(v.n, '-n', 1), log: ctx.json ? undefined : ctx.err });
      if (ctx.json) console.log(JSON.stringify({ clones: cs }, null, 2));
      else console.log(table([['NAME', 'HOSTNAME', 'IP', 'READY'], ...cs.map((c) => [c.name, c.hostname, c.ip, `${c.timings.ready} ms`])]));
      return 0;
    }
    case 'ls': {
      const l = await list();
      if (ctx.json) console.log(JSON.stringify(l, null, 2));
      else if (!l.length) console.log('no VMs');
      else console.log(table([['NAME', 'ROLE', 'STATE', 'HOSTNAME', 'IP', 'PORTS', 'OWNER', 'RUN DIR'], ...l.map((x) => [x.name, x.role, x.state, x.hostname ?? '-', x.ip ?? '-', Object.entries(x.ports).map(([g, h]) => `${h}->${g}`).join(',') || '-', x.owner ? `${x.owner.kind}:${x.owner.pid}${x.owner.alive ? '' : ' (dead)'}` : '-', x.runDir])]));
      return 0;
    }
    case 'info': {
      need(1, 'scion info <vm>');
      const a = await connectAgent(validName(pos[0]));
      const info = await a.call('info');
      a.close();
      console.log(ctx.json ? JSON.stringify(info, null, 2) : `${pos[0]}: ${info.identity.hostname} generation ${info.generation}, kernel ${info.kernel}, containers: ${info.containers.map((c: any) => `${c.name}=${c.state}`).join(' ') || 'none'}`);
      return 0;
    }
    case 'exec': {
      need(2, 'scion exec <vm> -- cmd args…');
      const a = await connectAgent(validName(pos[0]));
      const r = await a.call('exec', { argv: pos.slice(1) });
      a.close();
      if (ctx.json) console.log(JSON.stringify(r));
      else { process.stdout.write(r.stdout); process.stderr.write(r.stderr); }
      return r.exitCode;
    }
    case 'logs': {
      need(1, 'scion logs <vm> [--container NAME]');
      const name = validName(pos[0]);
      if (v.container) {
        const a = await connectAgent(name);
        const r = await a.call('containers.logs', { name: v.container });
        a.close();
        process.stdout.write(r.logs);
      } else {
        const p = vmPaths(name, vmsDir());
        process.stdout.write(await readFile(p.console, 'utf8').catch((e) => { throw new VmError('E_NO_VM', `no console log for ${name} (${p.console})`, { hint: 'scion ls', cause: e }); }));
      }
      return 0;
    }
    case 'console': {
      need(1, 'scion console <vm>');
      const { consoleSession } = await import('./console.ts');
      return consoleSession(validName(pos[0]));
    }
    case 'stop': case 'rm': {
      if (v.all && pos.length) throw new ScionError('E_USAGE', `scion ${cmd}: name VMs or pass --all, not both`);
      const names = v.all ? (await list()).map((x) => x.name) : pos.map((n) => validName(n));
      if (!names.length && !v.all) throw new ScionError('E_USAGE', `scion ${cmd}: name VMs or pass --all`);
      const done: string[] = [];
      const busy: string[] = [];
      for (const n of names) {
        try { await (cmd === 'rm' ? removeVm(n) : stopVm(n)); done.push(n); } catch (e) {
          // --all skips what another scion process is still making; named VMs report it
          if (v.all && (e as ScionError).code === 'E_VM_BUSY') { busy.push(n); continue; }
          throw e;
        }
      }
      const verb = cmd === 'rm' ? 'removed' : 'stopped';
      if (ctx.json) console.log(JSON.stringify({ [verb]: done, busy }));
      else console.log(`${verb}: ${done.join(' ') || '(none)'}${busy.length ? `; left (being made by another scion): ${busy.join(' ')}` : ''}`);
      return 0;
    }
    case 'serve': {
      const { serveOptions } = await import('./serve/options.ts');
      const { serve } = await import('./serve/server.ts');
      const o = serveOptions(pos[0], v);
      const h = await serve(o, (line) => (o.json ? console.log(line) : ctx.err(line)));
      await new Promise<void>((resolve) => {
        const stop = (sig: string) => {
          ctx.err(o.json ? JSON.stringify({ event: 'signal', signal: sig }) : `[serve] ${sig}: draining, then removing every clone`);
          h.close().then(resolve, (e) => { ctx.err(`[serve] shutdown: ${(e as Error).message}`); resolve(); });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
      return 0;
    }
    case 'push': {
      need(2, 'scion push out/web 127.0.0.1:5000/scion/web:1.0');
      const { push } = await import('../registry/transfer.ts');
      const r = await push(pos[0], pos[1], { insecure: !!v.insecure, log: ctx.json ? undefined : (m) => ctx.err(`[push] ${m}`) });
      console.log(ctx.json ? JSON.stringify({ ok: true, ...r }, null, 2) : `pushed ${r.reference}\n  uploaded: ${r.uploaded.join(', ') || 'nothing (the registry had every blob)'}; already there: ${r.skipped.join(', ') || 'none'}`);
      return 0;
    }
    case 'pull': {
      need(1, 'scion pull 127.0.0.1:5000/scion/web:1.0 --out images-dir');
      const { pull } = await import('../registry/transfer.ts');
      const r = await pull(pos[0], (v.out as string | undefined) ?? 'out', { insecure: !!v.insecure, log: ctx.json ? undefined : (m) => ctx.err(`[pull] ${m}`) });
      console.log(ctx.json ? JSON.stringify({ ok: true, ...r }, null, 2) : `pulled ${r.reference} -> ${r.dir} (every digest checked)`);
      return 0;
    }
    case 'gc': {
      const r = await gc();
      console.log(ctx.json ? JSON.stringify(r) : `removed ${r.removed.length} dead run dir(s), killed ${r.killed.length} orphan QEMU(s), released ${r.released.length} reservation(s)`);
      return 0;
    }
  }
  throw new ScionError('E_USAGE', `unknown command "${cmd}"`, { hint: 'scion --help' });
}
