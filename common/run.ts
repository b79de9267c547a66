/**
 * The one way host/ and builder/ run a program to completion: execa, with a
 * typed error that names the command and carries the tail of its stderr.
 * (Long-lived QEMU processes are spawned in host/qemu/process.ts, which
 * needs detached children, inherited file descriptors and a uid; the guest
 * agent keeps its own pre-fork shell.)
 */
import { execa, ExecaError, type Options } from 'execa';
import { ScionError, type ErrorCode } from './errors.ts';

export class CommandError extends ScionError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly command: string,
    readonly exitCode: number | undefined,
    readonly stderrTail: string,
    opts: { hint?: string; cause?: unknown } = {},
  ) {
    super(code, message, opts);
  }
}

/** Debian package that provides each program scion runs: the hint when one is missing. */
export const PROVIDER: Record<string, string> = {
  'qemu-system-x86_64': 'qemu-system-x86',
  'qemu-img': 'qemu-utils',
  gpgv: 'gpgv',
  xz: 'xz-utils',
  zstd: 'zstd',
  ip: 'iproute2',
};

export const tailOf = (s: string | undefined, lines = 3) =>
  (s ?? '')
    .trim()
    .split('\n')
    .filter((l) => l.trim())
    .slice(-lines)
    .join(' | ');

export function missingCommand(cmd: string, cause?: unknown): CommandError {
  const pkg = PROVIDER[cmd.split('/').pop()!] ?? cmd;
  return new CommandError('E_COMMAND_MISSING', `${cmd} is not installed (or not on PATH)`, cmd, undefined, '', {
    hint: `apt-get install ${pkg} (bash scripts/setup.sh installs everything scion needs)`,
    cause,
  });
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

/** Run `cmd args…`, resolve with its output; a missing program, a signal or a non-zero exit is a CommandError. */
export async function run(
  cmd: string,
  args: string[],
  opts: { input?: string | Buffer; code?: ErrorCode; what?: string; timeoutMs?: number; encoding?: 'utf8' | 'buffer'; env?: Record<string, string> } = {},
): Promise<RunResult> {
  const o: Options = { input: opts.input, reject: true, stripFinalNewline: false, timeout: opts.timeoutMs, maxBuffer: 512 * 1024 * 1024, env: opts.env };
  try {
    const r = await execa(cmd, args, o);
    return { stdout: String(r.stdout), stderr: String(r.stderr) };
  } catch (e) {
    if (e instanceof ExecaError) {
      if ((e as ExecaError & { code?: string }).code === 'ENOENT') throw missingCommand(cmd, e);
      const why = e.timedOut ? `timed out after ${opts.timeoutMs} ms` : e.signal ? `killed by ${e.signal}` : `exited ${e.exitCode}`;
      const tail = tailOf(String(e.stderr ?? ''));
      throw new CommandError(
        opts.code ?? 'E_COMMAND_FAILED',
        `${opts.what ?? `${cmd} ${args.join(' ')}`}: ${why}${tail ? `: ${tail}` : ''}`,
        cmd,
        e.exitCode,
        tail,
        { cause: e },
      );
    }
    throw e;
  }
}

/** The same, for bytes in and out (decompressors). */
export async function runBuffer(cmd: string, args: string[], input: Buffer, opts: { code?: ErrorCode; what?: string } = {}): Promise<Buffer> {
  try {
    const r = await execa(cmd, args, { input, encoding: 'buffer', reject: true, maxBuffer: 2 * 1024 * 1024 * 1024, stripFinalNewline: false });
    return Buffer.from(r.stdout as Uint8Array);
  } catch (e) {
    if (e instanceof ExecaError) {
      if ((e as ExecaError & { code?: string }).code === 'ENOENT') throw missingCommand(cmd, e);
      const tail = tailOf(Buffer.from((e.stderr as Uint8Array | string | undefined) ?? '').toString());
      throw new CommandError(
        opts.code ?? 'E_COMMAND_FAILED',
        `${opts.what ?? cmd}: exited ${e.exitCode ?? e.signal}${tail ? `: ${tail}` : ''}`,
        cmd,
        e.exitCode,
        tail,
        { cause: e },
      );
    }
    throw e;
  }
}
