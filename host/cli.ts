/** `scion`: a thin shell over the library API. Every command takes --json. */
import { parseArgs } from 'node:util';
import { describeError, ScionError } from '../common/errors.ts';
import { build, type BuildEvent } from '../builder/build.ts';

const HELP = `scion: fork running QEMU VMs copy-on-write

Usage: scion <command> [options]

Commands:
  build <image.yaml>          build out/<name>/{vmlinuz,initrd.img,manifest.json}
      --update-lock             re-resolve packages and rewrite <image>.scion.lock
      --compression none|gzip|zstd   initramfs compression (default none: fastest boot under TCG)
      --mirror URL              Debian mirror (default: the definition's, else the host's apt sources)
  up <image.yaml> [--clones N] [--disk D.qcow2] [--bridge BR [--netns NS] [--network CIDR]]
                              build (cached), boot, freeze, fork N clones, print them
  boot out/<image> [--name T] [--disk D.qcow2]
                              boot a template VM and wait for its agent; with a disk,
                              the template writes to an overlay and clones to overlays on it;
                              with --bridge, each VM gets a tap on bridge BR (in netns NS) and an
                              address from CIDR (default 10.44.0.0/24; .15 the template, .16+ clones)
  freeze <template>           freeze a running template into a template directory
  freeze <clone> --name T     freeze a running clone as a new template T (forks of a fork)
  fork <template> [-n N]      fork N running clones of a frozen template
  ls                          list VMs (templates and clones) from their run directories
  info <vm>                   the agent's info: identity, fork generation, containers
  exec <vm> -- CMD...         run a command in the guest (if the image allows exec)
  logs <vm> [--container C]   the console log, or a container's log
  console <vm>                interactive serial console (Ctrl-] to leave)
  stop <vm>... | --all        stop VMs (keeps run directories)
  rm <vm>... | --all          stop and remove VMs and their run directories
  gc                          remove run directories of dead VMs; kill QEMUs whose run dir is gone

Global options:
  --json                      machine-readable output on stdout
  -h, --help                  this help
Environment: SCION_RUN_DIR (default /run/scion for root, else $XDG_RUNTIME_DIR/scion),
             XDG_CACHE_HOME (package cache under scion/), SOURCE_DATE_EPOCH.`;

const fmtBytes = (n: number) => (n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`);

export async function main(argv: string[]): Promise<number> {
  const cmd = argv[0];
  const rest = argv.slice(1);
  if (!cmd || cmd === '-h' || cmd === '--help' || cmd === 'help') { console.log(HELP); return cmd ? 0 : 2; }
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    strict: true,
    options: {
      json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
      'update-lock': { type: 'boolean' }, compression: { type: 'string' }, mirror: { type: 'string' },
      clones: { type: 'string' }, n: { type: 'string', short: 'n' }, net: { type: 'string' }, name: { type: 'string' },
      all: { type: 'boolean' }, container: { type: 'string' }, disk: { type: 'string' }, bridge: { type: 'string' }, netns: { type: 'string' }, network: { type: 'string' }, timeout: { type: 'string' }, 'keep-template': { type: 'boolean' },
    },
  });
  if (values.help) { console.log(HELP); return 0; }
  const json = !!values.json;
  const err = (s: string) => process.stderr.write(s + '\n');
  switch (cmd) {
    case 'build': {
      if (positionals.length !== 1) throw new ScionError('E_USAGE', 'scion build needs exactly one image definition', { hint: 'scion build images/minimal.yaml' });
      const comp = values.compression ?? 'none';
      if (!['none', 'gzip', 'zstd'].includes(comp)) throw new ScionError('E_USAGE', `--compression ${comp}: use none, gzip or zstd`);
      const r = await build({ definitionPath: positionals[0], updateLock: values['update-lock'], mirror: values.mirror, compression: comp as any, onEvent: json ? undefined : buildProgress(err) });
      if (json) console.log(JSON.stringify(r, null, 2));
      else {
        console.log(`built ${r.name} -> ${r.dir}`);
        console.log(`  vmlinuz     ${fmtBytes(r.sizes.vmlinuz).padStart(10)}  sha256 ${r.sha256.vmlinuz}`);
        console.log(`  initrd.img  ${fmtBytes(r.sizes.initrd).padStart(10)}  sha256 ${r.sha256.initrd}`);
        console.log(`  ${r.packages} packages; lock ${r.lockChanged ? 'written' : 'unchanged'}: ${r.lock}`);
      }
      return 0;
    }
    default: {
      const host = await import('./commands.ts');
      return host.run(cmd, positionals, values as any, { json, err, argv: rest });
    }
  }
}

export function buildProgress(err: (s: string) => void) {
  const isTty = process.stderr.isTTY;
  return (ev: BuildEvent) => {
    if (ev.type === 'step') err(`[build] ${ev.step} done in ${(ev.ms / 1000).toFixed(1)} s`);
    else if (ev.type === 'log') err(`[build] ${ev.message}`);
    else if (ev.type === 'download' && (ev.done || isTty)) {
      const rate = ev.received / Math.max(ev.ms, 1) * 1000;
      const name = ev.url.split('/').pop();
      const line = `[fetch] ${name} ${fmtBytes(ev.received)}${ev.total ? `/${fmtBytes(ev.total)}` : ''} ${fmtBytes(rate)}/s${ev.done ? '' : '…'}`;
      if (ev.done) err(line);
      else process.stderr.write(`\r${line}\x1b[K`);
    }
  };
}

const isMain = process.argv[1] && /scion(\.js)?$|cli\.ts$/.test(process.argv[1]);
if (isMain) {
  main(process.argv.slice(2)).then((code) => process.exit(code), (e) => {
    const json = process.argv.includes('--json');
    if (json) console.log(JSON.stringify({ ok: false, error: e instanceof ScionError ? e.toJSON() : { code: 'E_INTERNAL', message: String(e?.message ?? e) } }));
    process.stderr.write(`scion: ${describeError(e)}\n`);
    if (!(e instanceof ScionError) && process.env.SCION_DEBUG) console.error(e);
    process.exit(1);
  });
}
