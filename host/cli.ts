/**
 * `scion`: a thin shell over the library API. Every command takes --json.
 * No side effects at import: bin/scion.js calls main() and prints errors.
 */
import { parseArgs } from 'node:util';
import { describeError, exitCodeFor, EXIT, ScionError } from '../common/errors.ts';
import { SCION_VERSION } from '../common/version.ts';
import { installInterruptCleanup } from '../common/interrupt.ts';
import { config } from '../common/config.ts';
import { build } from '../builder/build.ts';
import { buildProgress, fmtBytes } from './progress.ts';

const HELP = `scion: fork running QEMU VMs copy-on-write

Usage: scion <command> [options]

Commands:
  build <image.yaml>          build DIR/<name>/: vmlinuz, initrd.img, manifest.json,
                              sbom.cdx.json (CycloneDX 1.6), provenance.intoto.json (SLSA v1)
      --out DIR                 output directory (default ./out)
      --update-lock             re-resolve packages and rewrite <image>.scion.lock
      --locked                  CI: fail (exit 3) if the lock is missing or would change
      --compression none|gzip|zstd   initramfs compression (default none: fastest boot under TCG)
      --mirror URL              Debian mirror (default: the definition's, else the host's apt sources)
  verify <image.yaml>         build twice, each from an empty cache in a temporary directory, and
                              compare: "identical", or the first differing file (inside the initramfs)
  push <out/name> <registry>/<repo>:<tag>
                              upload a built image as one OCI artifact (credentials: ~/.docker/config.json
                              or $DOCKER_CONFIG; --insecure for plain HTTP on other hosts than loopback)
  pull <registry>/<repo>:<tag>|@sha256:… --out DIR
                              download and verify an image into DIR/<name>/ (up and boot take the reference too)
  up <image.yaml|out/name|ref> [--clones N] [--disk D.qcow2] [--bridge BR [--netns NS] [--network CIDR]]
                              build (cached), boot, freeze, fork N clones, print them
  boot out/<image>|<ref> [--name T] [--disk D.qcow2]
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
  serve <image.yaml|template> --port P [--listen 127.0.0.1:8080]
                              the front door: forks clones on demand and routes HTTP to guest port P
      --mode shared|per-request   shared (default): a clone serves up to --concurrency K requests
                                  (default 10); per-request: a fresh clone per request, removed after it
      --min N (0) --max N (8)     clones kept at least / at most (pooled ones count)
      --pool P (0)                clones forked ahead and paused (QMP stop); a claim resumes one
      --idle 30s                  a shared clone idle this long is removed (scale to zero with --min 0)
      --queue Q (100) --queue-timeout 10s   requests held while clones fork; past either: 503 + Retry-After
      --tcp                       plain TCP instead of HTTP: a fresh clone per connection
      --admin 127.0.0.1:9090      /metrics (Prometheus) and /healthz
      --drain 10s                 SIGTERM: time in-flight requests get before clones are removed
      --fork-parallel N           clones forked at once for waiting requests (default: the host's cores)
      Durations: 500ms, 30s, 2m.

Global options:
  --json                      machine-readable output on stdout
  -h, --help                  this help
Names of VMs, templates and images: 1-63 characters of a-z, 0-9 and "-", starting with a
letter or digit.
Environment: SCION_RUN_DIR (default /run/scion for root, else $XDG_RUNTIME_DIR/scion; made 0700),
             SCION_TEMPLATE_DIR (default /dev/shm/scion-<uid>/templates; must be tmpfs, made 0700),
             SCION_UID_BASE (QEMU runs as uid/gid SCION_UID_BASE+n when scion is root; default 1500000000),
             XDG_CACHE_HOME (package cache under scion/), SOURCE_DATE_EPOCH, SCION_ACCEL=kvm|tcg.
Exit codes: 0 ok; 1 error (the message names what and why; --json prints {ok:false,error:{code,…}});
            2 usage; 3 image definition or lock invalid; 4 network (mirror, npm or registry
            unreachable or answering an error); 5 verification failed (not reproducible, a digest,
            hash or signature that does not match); 130/143 interrupted (build, verify
            and pull remove their temporary directories first).`;


export async function main(argv: string[]): Promise<number> {
  const cmd = argv[0];
  const rest = argv.slice(1);
  if (!cmd || cmd === '-h' || cmd === '--help' || cmd === 'help') { console.log(HELP); return cmd ? 0 : 2; }
  if (cmd === '--version' || cmd === '-v' || cmd === 'version') { console.log(SCION_VERSION); return 0; }
  let parsed;
  try {
  parsed = parseArgs({
    args: rest,
    allowPositionals: true,
    strict: true,
    options: {
      json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
      'update-lock': { type: 'boolean' }, locked: { type: 'boolean' }, out: { type: 'string' }, insecure: { type: 'boolean' }, compression: { type: 'string' }, mirror: { type: 'string' },
      clones: { type: 'string' }, n: { type: 'string', short: 'n' }, name: { type: 'string' },
      all: { type: 'boolean' }, container: { type: 'string' }, disk: { type: 'string' }, bridge: { type: 'string' }, netns: { type: 'string' }, network: { type: 'string' },
      listen: { type: 'string' }, port: { type: 'string' }, mode: { type: 'string' }, concurrency: { type: 'string' }, min: { type: 'string' }, max: { type: 'string' },
      pool: { type: 'string' }, idle: { type: 'string' }, queue: { type: 'string' }, 'queue-timeout': { type: 'string' }, admin: { type: 'string' }, drain: { type: 'string' }, tcp: { type: 'boolean' }, 'fork-parallel': { type: 'string' },
    },
  });
  } catch (e) {
    throw new ScionError('E_USAGE', `scion ${cmd}: ${(e as Error).message}`, { hint: 'scion --help' });
  }
  const { values, positionals } = parsed;
  if (values.help) { console.log(HELP); return 0; }
  const json = !!values.json;
  const err = (s: string) => process.stderr.write(s + '\n');
  // long file-making steps: an interrupt removes their temporary directories (serve, up and the VM commands keep their own handling)
  if (['build', 'verify', 'pull', 'push'].includes(cmd)) installInterruptCleanup((m) => err(`scion: ${m}`));
  switch (cmd) {
    case 'build': {
      if (positionals.length !== 1) throw new ScionError('E_USAGE', 'scion build needs exactly one image definition', { hint: 'scion build images/minimal.yaml --out out' });
      const r = await build({ definitionPath: positionals[0], outDir: values.out, updateLock: values['update-lock'], locked: values.locked, mirror: values.mirror, compression: compressionOf(values.compression), onEvent: json ? undefined : buildProgress(err) });
      if (json) console.log(JSON.stringify({ ok: true, ...r }, null, 2));
      else {
        console.log(`built ${r.name} -> ${r.dir}`);
        for (const o of r.outputs) console.log(`  ${o.name.padEnd(23)} ${fmtBytes(o.size).padStart(10)}  sha256 ${o.sha256}`);
        console.log(`  ${r.packages} packages; lock ${r.lockChanged ? 'written' : 'unchanged'}: ${r.lock}`);
        console.log(`  stripped ${r.stripped.files} ELF file(s): ${fmtBytes(r.stripped.bytes)} of debug sections and symbol tables`);
        console.log(`  largest files in the initramfs (${fmtBytes(r.sizes.initrdUncompressed)} in all):`);
        for (const f of r.largest) console.log(`    ${fmtBytes(f.size).padStart(10)}  ${f.path}`);
      }
      return EXIT.ok;
    }
    case 'verify': {
      if (positionals.length !== 1) throw new ScionError('E_USAGE', 'scion verify needs exactly one image definition', { hint: 'scion verify images/minimal.yaml' });
      const { verify } = await import('../builder/verify.ts');
      if (!json) err('[verify] two builds, one after the other, each from an empty cache in a temporary directory');
      const r = await verify({ definitionPath: positionals[0], mirror: values.mirror, compression: compressionOf(values.compression), onEvent: json ? undefined : (n, ev) => { if (ev.type === 'step') err(`[verify] build ${n}: ${ev.step} done in ${(ev.ms / 1000).toFixed(1)} s`); } });
      if (json) console.log(JSON.stringify({ ok: r.identical, ...r }, null, 2));
      else if (r.identical) {
        console.log(`${r.name}: identical: two builds from empty caches gave the same bytes`);
        for (const o of r.outputs) console.log(`  ${o.name.padEnd(23)} ${fmtBytes(o.size[0]).padStart(10)}  sha256 ${o.sha256[0]}`);
      } else {
        const d = r.difference!;
        console.log(`${r.name}: NOT reproducible: ${d.output}${d.path ? `: ${d.path}` : ''}: ${d.how}`);
      }
      return r.identical ? EXIT.ok : EXIT.verification;
    }
    default: {
      const host = await import('./commands.ts');
      return host.run(cmd, positionals, values as any, { json, err, argv: rest });
    }
  }
}


function compressionOf(v: string | undefined): 'none' | 'gzip' | 'zstd' {
  const c = v ?? 'none';
  if (c !== 'none' && c !== 'gzip' && c !== 'zstd') throw new ScionError('E_USAGE', `--compression ${c}: use none, gzip or zstd`);
  return c;
}

/** Run the CLI: exit code out, errors printed (JSON on stdout with --json). */
export async function runCli(argv: string[]): Promise<number> {
  try { return await main(argv); } catch (e) {
    const json = argv.includes('--json');
    if (json) console.log(JSON.stringify({ ok: false, error: e instanceof ScionError ? e.toJSON() : { code: 'E_INTERNAL', message: String((e as Error)?.message ?? e) } }));
    process.stderr.write(`scion: ${describeError(e)}\n`);
    if (!(e instanceof ScionError) && config().debug) console.error(e);
    return exitCodeFor(e);
  }
}
