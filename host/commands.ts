/** CLI commands that drive VMs (everything but build). */
import { VmError, ScionError } from '../common/errors.ts';
import { build } from '../builder/build.ts';
import { buildProgress } from './cli.ts';
import * as vm from './vm.ts';
import { paths, readRecord } from './rundir.ts';
import type { NetMode } from './net.ts';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

interface Ctx { json: boolean; err: (s: string) => void; argv: string[] }
type Vals = Record<string, string | boolean | undefined>;

function table(rows: string[][]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (c ?? '').padEnd(w[i])).join('  ').trimEnd()).join('\n');
}

/** --bridge/--netns/--network → a bridge network mode (user-mode networking otherwise). */
function netFrom(v: Vals): NetMode | undefined {
  if (!v.bridge) {
    if (v.netns || v.network) throw new ScionError('E_USAGE', '--netns and --network go with --bridge');
    return undefined;
  }
  const network = (v.network as string | undefined) ?? '10.44.0.0/24';
  if (!/^\d+\.\d+\.\d+\.0\/24$/.test(network)) throw new ScionError('E_USAGE', `--network ${network}: use a /24 such as 10.44.0.0/24`);
  return { mode: 'bridge', bridge: v.bridge as string, netns: v.netns as string | undefined, network };
}

function count(v: string | boolean | undefined, flag: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 200) throw new ScionError('E_USAGE', `${flag} ${v}: use a whole number from 1 to 200`);
  return n;
}

export async function up(definition: string, clones: number, ctx: Ctx, disk?: string, net?: NetMode) {
  const log = ctx.err;
  const t0 = performance.now();
  const b = await build({ definitionPath: definition, onEvent: ctx.json ? undefined : buildProgress(log) });
  const img = await vm.loadImage(b.dir);
  const tplName = `${img.name}-tpl`;
  const existing = await readRecord(tplName);
  let meta: vm.TemplateMeta | undefined;
  if (existing?.frozen) {
    try {
      meta = await vm.checkTemplate(existing.templateDir!);
      if (meta.manifestSha256 !== img.manifestSha256) { log(`[up] template ${tplName} is from an older build; re-making it`); meta = undefined; }
      else if (JSON.stringify(meta.net ?? { mode: 'user' }) !== JSON.stringify(net ?? { mode: 'user' }) || !!meta.disk !== !!disk) { log(`[up] template ${tplName} has other networking or disk; re-making it`); meta = undefined; }
    } catch { meta = undefined; }
    if (!meta) await vm.removeVm(tplName);
  } else if (existing) await vm.removeVm(tplName);
  const tBoot = performance.now();
  if (!meta) {
    log(`[up] booting template ${tplName} (${img.name})…`);
    const h = await vm.bootTemplate(img, { name: tplName, disk, net, log: (m) => log(`[up] ${m}`) });
    log(`[up] template ready in ${((performance.now() - tBoot) / 1000).toFixed(1)} s; freezing`);
    meta = await vm.freeze(h, img, (m) => log(`[up] ${m}`));
  } else log(`[up] reusing frozen template ${tplName}`);
  log(`[up] forking ${clones} clone(s)…`);
  const cs = await vm.fork(tplName, { n: clones, parallel: 2, log });
  const out = {
    template: { name: tplName, image: img.dir, accel: meta.accel, generation: meta.generation, freezeMs: meta.freezeMs, templateDir: join(paths(tplName).dir) },
    clones: cs.map((c) => ({ name: c.name, hostname: c.hostname, mac: c.mac, ip: c.ip, machineId: c.machineId, vmgenid: c.vmgenid, ports: c.ports, runDir: c.runDir, agentSocket: c.agentSocket, timings: c.timings })),
    totalMs: Math.round(performance.now() - t0),
  };
  if (ctx.json) console.log(JSON.stringify(out, null, 2));
  else {
    console.log(table([['NAME', 'HOSTNAME', 'MAC', 'IP', 'PORTS', 'FORK→READY'], ...cs.map((c) => [c.name, c.hostname, c.mac, c.ip, Object.entries(c.ports).map(([g, h]) => `127.0.0.1:${h}->${g}`).join(',') || '-', `${c.timings.ready.toFixed(0)} ms`])]));
    console.log(`\nclones keep running; \`scion ls\` lists them, \`scion rm --all\` removes them.`);
  }
  return 0;
}

export async function run(cmd: string, pos: string[], v: Vals, ctx: Ctx): Promise<number> {
  const need = (k: number, usage: string) => { if (pos.length < k) throw new ScionError('E_USAGE', `scion ${cmd}: missing argument`, { hint: usage }); };
  switch (cmd) {
    case 'up': need(1, 'scion up images/web.yaml --clones 3'); return up(pos[0], count(v.clones, '--clones', 3), ctx, v.disk as string | undefined, netFrom(v));
    case 'boot': {
      need(1, 'scion boot out/<image>');
      const img = await vm.loadImage(pos[0]);
      const h = await vm.bootTemplate(img, { name: v.name as string | undefined, disk: v.disk as string | undefined, net: netFrom(v), log: ctx.err });
      h.qmp.close(); h.agent.close();
      if (ctx.json) console.log(JSON.stringify({ name: h.record.name, runDir: paths(h.record.name).dir, accel: h.record.accel }));
      else console.log(`template ${h.record.name} is running (${h.record.accel}); freeze it with: scion freeze ${h.record.name}`);
      return 0;
    }
    case 'freeze': {
      need(1, 'scion freeze <template>');
      const r = await readRecord(pos[0]);
      if (r?.role === 'clone') {
        if (!v.name) throw new ScionError('E_USAGE', 'freezing a clone makes a new template: name it with --name', { hint: `scion freeze ${pos[0]} --name ${pos[0]}-tpl` });
        const meta = await vm.freezeClone(pos[0], v.name as string, ctx.err);
        console.log(ctx.json ? JSON.stringify(meta) : `frozen clone ${pos[0]} as template ${v.name}; fork it with: scion fork ${v.name} -n 3`);
        return 0;
      }
      if (!r || r.role !== 'template') throw new VmError('E_NO_VM', `no template VM named ${pos[0]}`, { hint: 'scion ls' });
      const { QmpClient } = await import('./qmp.ts');
      const { AgentClient } = await import('./agent-client.ts');
      const qmp = new QmpClient(); await qmp.connect(paths(r.name).qmp);
      const agent = new AgentClient(); await agent.connect(paths(r.name).agent); await agent.sync();
      const meta = await vm.freeze({ record: r, qmp, agent }, await vm.loadImage(r.image), ctx.err);
      console.log(ctx.json ? JSON.stringify(meta) : `frozen: ${r.templateDir}`);
      return 0;
    }
    case 'fork': {
      need(1, 'scion fork <template> -n 3');
      const cs = await vm.fork(pos[0], { n: count(v.n, '-n', 1), log: ctx.err });
      if (ctx.json) console.log(JSON.stringify({ clones: cs }, null, 2));
      else console.log(table([['NAME', 'HOSTNAME', 'IP', 'READY'], ...cs.map((c) => [c.name, c.hostname, c.ip, `${c.timings.ready} ms`])]));
      return 0;
    }
    case 'ls': {
      const l = await vm.list();
      if (ctx.json) console.log(JSON.stringify(l, null, 2));
      else if (!l.length) console.log('no VMs');
      else console.log(table([['NAME', 'ROLE', 'STATE', 'HOSTNAME', 'IP', 'PORTS', 'RUN DIR'], ...l.map((x) => [x.name, x.role, x.state, x.hostname ?? '-', x.ip ?? '-', Object.entries(x.ports).map(([g, h]) => `${h}->${g}`).join(',') || '-', x.runDir])]));
      return 0;
    }
    case 'info': {
      need(1, 'scion info <vm>');
      const a = await vm.connectAgent(pos[0]);
      const info = await a.call('info');
      a.close();
      console.log(ctx.json ? JSON.stringify(info, null, 2) : `${pos[0]}: ${info.identity.hostname} generation ${info.generation}, kernel ${info.kernel}, containers: ${info.containers.map((c: any) => `${c.name}=${c.state}`).join(' ') || 'none'}`);
      return 0;
    }
    case 'exec': {
      need(2, 'scion exec <vm> -- cmd args…');
      const a = await vm.connectAgent(pos[0]);
      const r = await a.call('exec', { argv: pos.slice(1) });
      a.close();
      if (ctx.json) console.log(JSON.stringify(r));
      else { process.stdout.write(r.stdout); process.stderr.write(r.stderr); }
      return r.exitCode;
    }
    case 'logs': {
      need(1, 'scion logs <vm> [--container NAME]');
      if (v.container) {
        const a = await vm.connectAgent(pos[0]);
        const r = await a.call('containers.logs', { name: v.container });
        a.close();
        process.stdout.write(r.logs);
      } else process.stdout.write(await readFile(paths(pos[0]).console, 'utf8').catch(() => { throw new VmError('E_NO_VM', `no console log for ${pos[0]}`); }));
      return 0;
    }
    case 'console': {
      need(1, 'scion console <vm>');
      const { consoleSession } = await import('./console.ts');
      return consoleSession(pos[0]);
    }
    case 'stop': case 'rm': {
      const names = v.all ? (await vm.list()).map((x) => x.name) : pos;
      if (!names.length) throw new ScionError('E_USAGE', `scion ${cmd}: name VMs or pass --all`);
      for (const n of names) await (cmd === 'rm' ? vm.removeVm(n) : vm.stopVm(n));
      if (ctx.json) console.log(JSON.stringify({ [cmd === 'rm' ? 'removed' : 'stopped']: names }));
      else console.log(`${cmd === 'rm' ? 'removed' : 'stopped'}: ${names.join(' ')}`);
      return 0;
    }
    case 'gc': {
      const r = await vm.gc();
      console.log(ctx.json ? JSON.stringify(r) : `removed ${r.removed.length} dead run dir(s), killed ${r.killed.length} orphan QEMU(s)`);
      return 0;
    }
  }
  throw new ScionError('E_USAGE', `unknown command "${cmd}"`, { hint: 'scion --help' });
}
