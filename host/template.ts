/**
 * Templates: boot one from a built image, freeze it (device state only; RAM
 * stays in its memory file on tmpfs), or freeze a running clone as a new
 * template (a fork of a fork). All of it through the Machine handle.
 */
import { validName } from '../common/names.ts';
import { Machine, type BootOptions, type TemplateMeta } from './machine/machine.ts';
import type { ImageArtifacts } from './image.ts';

export type { BootOptions, TemplateMeta };
export { checkTemplate } from './machine/templates.ts';

/** Boot the template VM of an image and wait for its agent's ready (and give it the template identity). */
export function bootTemplate(img: ImageArtifacts, opts: BootOptions = {}): Promise<Machine> {
  return Machine.boot(img, opts);
}

/** Freeze a running template: agent prepares, CPU stops, device state to a file (RAM stays in the memory file). */
export async function freeze(template: Machine | string, img: ImageArtifacts, log?: (m: string) => void): Promise<TemplateMeta> {
  const m = typeof template === 'string' ? await Machine.open(validName(template, 'template')) : template;
  try {
    return await m.freeze(img, log);
  } finally {
    m.close();
  }
}

/** Freeze a running clone as a new template; its clones carry the clone's generation + 1. */
export async function freezeClone(cloneName: string, newName: string, log?: (m: string) => void): Promise<TemplateMeta> {
  const m = await Machine.open(validName(cloneName, 'clone'));
  try {
    return await m.freezeAsTemplate(newName, log);
  } finally {
    m.close();
  }
}
