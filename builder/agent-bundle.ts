/**
 * The guest agent as one file for the image: bundled by esbuild from the
 * sources in a checkout, or read from dist/ in an installed package (where
 * `npm pack` put it: scripts/prepack.mjs).
 */
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { packageRoot } from '../common/version.ts';

/** Where `npm pack` puts the prebuilt agent. */
export const prebuiltAgentPath = (): string => join(packageRoot(), 'dist', 'guest-agent', 'agent.mjs');

export async function bundleAgent(): Promise<Buffer> {
  if (!existsSync(join(packageRoot(), 'guest-agent', 'main.ts'))) return readFile(prebuiltAgentPath());
  return bundleAgentFromSource();
}

/** esbuild over guest-agent/main.ts: a checkout's builds, and the pack step. */
export async function bundleAgentFromSource(): Promise<Buffer> {
  const esbuild = await import('esbuild');
  const r = await esbuild.build({
    entryPoints: [join(packageRoot(), 'guest-agent', 'main.ts')],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node22',
    write: false,
    minify: false,
    legalComments: 'none',
    banner: { js: '// scion guest agent (bundled)' },
    absWorkingDir: packageRoot(),
  });
  return Buffer.from(r.outputFiles[0].contents);
}
