/**
 * Every error a user can cause is a ScionError: a stable machine code, a
 * one-line human message that names the file, field or VM, and a hint that
 * says what to do. The CLI prints `message` (and `hint`); scripts match `code`.
 */
import { DEFINITION_CODES, NETWORK_CODES, VERIFICATION_CODES, type ErrorCode } from './error-codes.ts';

export type { ErrorCode };

/** Every error a user can cause: a stable code, a one-line message that names the file, field or VM, and a hint. */
export class ScionError extends Error {
  readonly code: ErrorCode;
  readonly hint?: string;
  constructor(code: ErrorCode, message: string, opts: { hint?: string; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = code;
    this.hint = opts.hint;
  }
  toJSON() {
    return { code: this.code, message: this.message, ...(this.hint ? { hint: this.hint } : {}) };
  }
}

/** Image definition problems, located at file:line:column and a field path. */
export class DefinitionError extends ScionError {
  constructor(
    readonly file: string,
    readonly line: number,
    readonly column: number,
    readonly field: string,
    problem: string,
    hint?: string,
  ) {
    super('E_DEFINITION', `${file}:${line}:${column}: ${field ? field + ': ' : ''}${problem}`, { hint });
  }
}

/** Debian archive problems: signature, index, resolution, download. */
export class ArchiveError extends ScionError {}

/** Build steps other than the archive: assembly, outputs. */
export class BuildError extends ScionError {}

/** QEMU/VM lifecycle problems on the host. */
export class VmError extends ScionError {}

export function describeError(err: unknown): string {
  if (err instanceof ScionError) return err.hint ? `${err.message}\n  hint: ${err.hint}` : err.message;
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * The CLI's exit codes (README: "Exit codes"). Scripts branch on these; the
 * JSON error object carries the exact code.
 */
export const EXIT = { ok: 0, error: 1, usage: 2, definition: 3, network: 4, verification: 5 } as const;

const inGroup = (group: readonly ErrorCode[], code: ErrorCode) => group.includes(code);

/** The CLI's exit status for an error (see EXIT). */
export function exitCodeFor(err: unknown): number {
  if (!(err instanceof ScionError)) return EXIT.error;
  if (err.code === 'E_USAGE') return EXIT.usage;
  if (err instanceof DefinitionError || inGroup(DEFINITION_CODES, err.code)) return EXIT.definition;
  if (inGroup(NETWORK_CODES, err.code)) return EXIT.network;
  if (inGroup(VERIFICATION_CODES, err.code)) return EXIT.verification;
  return EXIT.error;
}

/** What a failed connection's error says at its cause (fetch wraps the socket's error: ECONNREFUSED, ENOTFOUND, or its message), else its own message. */
export function causeText(e: unknown): string {
  const cause = (e as { cause?: { code?: unknown; message?: unknown } } | undefined)?.cause;
  if (typeof cause?.code === 'string') return cause.code;
  if (typeof cause?.message === 'string') return cause.message;
  return e instanceof Error ? e.message : String(e);
}
