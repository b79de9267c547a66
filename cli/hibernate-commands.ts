/**
 * `scion hibernate <clone>` and `scion resume <clone>`: a clone's state to
 * disk and its QEMU gone, and back (host/machine/hibernate.ts).
 */
import { EXIT } from '../common/errors.ts';
import { Machine, validName } from '../host/index.ts';
import { fmtBytes } from './format.ts';
import { need, type CommandSpec } from './options.ts';

export const HIBERNATE_COMMANDS: CommandSpec[] = [
  {
    name: 'hibernate',
    args: '<clone>',
    summary:
      'save a running clone to disk (its device state and only the RAM that differs from its template) and end its QEMU: its memory is freed, `ls` shows it hibernated; `scion resume` brings it back',
    options: {},
    async run(pos, _v, ctx) {
      need(pos, 1, 'hibernate', 'scion hibernate web-c1');
      const m = await Machine.open(validName(pos[0]));
      const r = await m.hibernate(ctx.json ? undefined : ctx.err);
      ctx.out(
        ctx.json
          ? JSON.stringify({ ok: true, ...r }, null, 2)
          : `hibernated ${r.name}: ${fmtBytes(r.stateBytes)} on disk (${r.pages} pages differ from its template), in ${r.ms} ms`,
      );
      return EXIT.ok;
    },
  },
  {
    name: 'resume',
    args: '<clone>',
    summary: 'bring a hibernated clone back: the same machine (name, identity, generation, host ports, its processes and files), its clock corrected',
    options: {},
    async run(pos, _v, ctx) {
      need(pos, 1, 'resume', 'scion resume web-c1');
      const t0 = performance.now();
      const m = await Machine.resumeHibernated(validName(pos[0]), ctx.json ? undefined : ctx.err);
      const i = m.info();
      m.close();
      const ms = Math.round(performance.now() - t0);
      ctx.out(
        ctx.json
          ? JSON.stringify({ ok: true, name: i.name, hostname: i.identity?.hostname, ports: i.ports, ms }, null, 2)
          : `resumed ${i.name} (${i.identity?.hostname}) in ${ms} ms`,
      );
      return EXIT.ok;
    },
  },
];
