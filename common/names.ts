/**
 * One rule for every name scion puts into a path, a QEMU argument or a tap:
 * VMs, templates, images and clone prefixes. Checked once at the edge (CLI
 * argument, library call, record read back from disk); inside, the branded
 * type says it was checked, as Firecracker's validated VM ids do.
 */
import { ScionError } from './errors.ts';

/** A name that passed `validName`: the type says it was checked. */
export type ValidName = string & { readonly __validName: unique symbol };

export const NAME_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;
export const NAME_RULE = '1 to 63 characters of a-z, 0-9 and "-", starting with a letter or digit';

/** A name that breaks the rule: which kind of name, the value, the problem. */
export class NameError extends ScionError {
  constructor(
    readonly what: string,
    readonly value: unknown,
    problem: string,
  ) {
    super('E_BAD_NAME', `${what} name ${JSON.stringify(value)}: ${problem}`, { hint: `use ${NAME_RULE}, e.g. web-tpl` });
  }
}

/** Why `value` is not a valid name, or undefined if it is. Pure. */
export function nameProblem(value: unknown): string | undefined {
  if (typeof value !== 'string') return 'not a string';
  if (value === '') return 'empty';
  if (value.length > 63) return `${value.length} characters long (at most 63)`;
  if (value === '.' || value === '..' || value.includes('/')) return 'looks like a path (names may not contain "/" or be "." or "..")';
  const bad = [...value].find((c) => !/[a-z0-9-]/.test(c));
  if (bad !== undefined) return `contains ${JSON.stringify(bad)}`;
  if (value.startsWith('-')) return 'starts with "-"';
  return NAME_PATTERN.test(value) ? undefined : 'not allowed';
}

/** `value` as a checked name (VM, template, image, clone prefix), or a NameError saying what is wrong. */
export function validName(value: unknown, what = 'VM'): ValidName {
  const p = nameProblem(value);
  if (p) throw new NameError(what, value, p);
  return value as ValidName;
}

/** What marks a template's name: `<image>-tpl`. */
export const TEMPLATE_SUFFIX = '-tpl';

/** The default name of a template made from `base` (an image's name): `<base>-tpl`, checked. */
export function templateName(base: string): ValidName {
  return validName(`${base}${TEMPLATE_SUFFIX}`, 'template');
}

/** A template's name without its `-tpl` (what its clones and their hostnames are named after). Pure. */
export function templateBase(template: string): string {
  return template.endsWith(TEMPLATE_SUFFIX) ? template.slice(0, -TEMPLATE_SUFFIX.length) : template;
}
