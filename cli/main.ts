/**
 * `scion`: a thin shell over the library API. One command table
 * (commands.ts) gives dispatch, each command's options and the help. Every
 * command takes --json. No side effects at import: bin/scion.js calls runCli.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { describeError, exitCodeFor, ScionError } from '../common/errors.ts';
import { SCION_VERSION } from '../common/version.ts';
import { chooseVmm, config } from '../common/config.ts';
import { installInterruptCleanup } from '../common/interrupt.ts';
import { COMMANDS, type CommandSpec } from './commands.ts';

const GLOBAL_OPTIONS = {
  json: { type: 'boolean', help: 'machine-readable output on stdout' },
  help: { type: 'boolean', short: 'h', help: "this help (or a command's: scion <command> --help)" },
} as const;

function optionLines(spec: CommandSpec): string[] {
  return Object.entries(spec.options).map(([k, o]) => {
    const flag = `${o.short ? `-${o.short}, ` : ''}--${k}${o.value ? ` ${o.value}` : ''}`;
    return `      ${flag.padEnd(30)} ${o.help}`;
  });
}

function commandHelp(spec: CommandSpec): string[] {
  const head = `  ${`${spec.name} ${spec.args}`.trim()}`;
  return [head, `      ${spec.summary}`, ...optionLines(spec), ...(spec.details ?? []).map((d) => `      ${d}`)];
}

/** The whole help, made from the command table. */
export function helpText(): string {
  return `scion: fork running QEMU VMs copy-on-write

Usage: scion <command> [arguments] [options]

Commands:
${COMMANDS.flatMap(commandHelp).join('\n')}

Global options:
      --json                         ${GLOBAL_OPTIONS.json.help}
      --vmm pinned|system            the QEMU to run: scion's pinned closure (default) or the host's (sets SCION_VMM)
  -h, --help                         ${GLOBAL_OPTIONS.help.help}
      --version                      scion's version
Names of VMs, templates and images: 1-63 characters of a-z, 0-9 and "-", starting with a
letter or digit.
Environment (read when a command runs; a malformed value is refused by name):
  SCION_RUN_DIR       run directories (default /run/scion for root, else $XDG_RUNTIME_DIR/scion; made 0700)
  SCION_TEMPLATE_DIR  frozen templates (default /dev/shm/scion-<uid>/templates; must be tmpfs, made 0700)
  SCION_UID_BASE      QEMU runs as uid/gid SCION_UID_BASE+n when scion is root (default 1500000000)
  SCION_VMM           pinned (default: the QEMU closure vmm/qemu.scion.lock names; scion vmm fetch) or system
  SCION_VMM_DIR       where the pinned closure lives (default /var/lib/scion/vmm for root, made 0755)
  SCION_QEMU          the host's QEMU binary (implies SCION_VMM=system; default qemu-system-x86_64)
  SCION_STATE_DIR     hibernated clones' saved state (default /var/lib/scion/state for root)
  SCION_CPU           the CPU model VMs boot with (default max under TCG, Westmere-v2 under KVM; never host unless asked)
  SCION_ACCEL         kvm or tcg (default: KVM if it really boots the guest, probed once)
  SCION_TB_SIZE_MB    TCG translation buffer per clone, MiB (default 32)
  SCION_REGISTRY_STALL_S  a registry response silent this long fails (default 30)
  SCION_SHIM_TEMPLATE the template the containerd shim forks pods from (default pod-tpl)
  XDG_CACHE_HOME (package cache under scion/), SOURCE_DATE_EPOCH, SCION_DEBUG
Exit codes: 0 ok; 1 error (the message names what and why; --json prints {ok:false,error:{code,…}});
            2 usage; 3 image definition or lock invalid; 4 network (mirror or registry
            unreachable or answering an error); 5 verification failed (not reproducible, a digest,
            hash or signature that does not match); 130/143 interrupted (build, verify, push
            and pull remove their temporary directories first).`;
}

export async function main(argv: string[]): Promise<number> {
  const name = argv[0];
  const out = (s: string) => console.log(s);
  if (!name || name === '-h' || name === '--help' || name === 'help') {
    out(helpText());
    return name ? 0 : 2;
  }
  if (name === '--version' || name === '-v' || name === 'version') {
    out(SCION_VERSION);
    return 0;
  }
  const spec = COMMANDS.find((c) => c.name === name);
  if (!spec) throw new ScionError('E_USAGE', `unknown command "${name}"`, { hint: `scion --help lists them: ${COMMANDS.map((c) => c.name).join(', ')}` });
  const options: ParseArgsConfig['options'] = { json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' }, vmm: { type: 'string' } };
  for (const [k, o] of Object.entries(spec.options)) options[k] = o.short ? { type: o.type, short: o.short } : { type: o.type };
  let parsed: { values: Record<string, string | boolean | (string | boolean)[] | undefined>; positionals: string[] };
  try {
    parsed = parseArgs({ args: argv.slice(1), allowPositionals: true, strict: true, options });
  } catch (e) {
    throw new ScionError('E_USAGE', `scion ${name}: ${(e as Error).message}`, { hint: `scion ${name} --help` });
  }
  const { values, positionals } = parsed;
  if (values.vmm !== undefined) {
    if (values.vmm !== 'pinned' && values.vmm !== 'system')
      throw new ScionError('E_USAGE', `scion ${name}: --vmm ${JSON.stringify(values.vmm)}: use pinned or system`, { hint: `scion ${name} --help` });
    chooseVmm(values.vmm); // read by the library at each call, and by the processes it starts
  }
  if (values.help) {
    out(commandHelp(spec).join('\n'));
    return 0;
  }
  const err = (s: string) => process.stderr.write(s + '\n');
  // long file-making steps: an interrupt removes their temporary directories (serve, up and the VM commands keep their own handling)
  if (spec.cleansUpOnInterrupt) installInterruptCleanup((m) => err(`scion: ${m}`));
  return spec.run(positionals, values as Record<string, string | boolean | undefined>, { json: !!values.json, err, out });
}

/** Run the CLI: exit code out, errors printed (JSON on stdout with --json). */
export async function runCli(argv: string[]): Promise<number> {
  try {
    return await main(argv);
  } catch (e) {
    const json = argv.includes('--json');
    if (json)
      console.log(
        JSON.stringify({ ok: false, error: e instanceof ScionError ? e.toJSON() : { code: 'E_INTERNAL', message: String((e as Error)?.message ?? e) } }),
      );
    process.stderr.write(`scion: ${describeError(e)}\n`);
    let debug = false;
    try {
      debug = config().debug;
    } catch {
      /* a malformed variable is reported above when it matters */
    }
    if (!(e instanceof ScionError) && debug) console.error(e);
    return exitCodeFor(e);
  }
}
