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

/** esbuild over guest-agent/main.ts, for QuickJS (`qjs -m`): a checkout's builds, and the pack step. */
export async function bundleAgentFromSource(): Promise<Buffer> {
  const esbuild = await import('esbuild');
  const r = await esbuild.build({
    entryPoints: [join(packageRoot(), 'guest-agent', 'main.ts')],
    bundle: true,
    // QuickJS: no Node built-ins; its own `std` and `os` modules stay imports
    platform: 'neutral',
    format: 'esm',
    target: 'es2023',
    external: ['std', 'os'],
    write: false,
    minify: false,
    legalComments: 'none',
    banner: { js: '// scion guest agent (bundled)' },
    absWorkingDir: packageRoot(),
  });
  return Buffer.from(r.outputFiles[0].contents);
}
