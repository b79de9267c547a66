#!/usr/bin/env node
// `npm pack` / `npm publish` run this (the "prepack" script): compile the
// library to dist/ (JS + .d.ts), bundle the guest agent into
// dist/guest-agent/agent.mjs, so the package needs no TypeScript loader and
// no bundler at run time. A shell-like sequence, hence zx.
import { $, fs, path } from 'zx';

$.verbose = false;
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
$.cwd = root;
await fs.rm(path.join(root, 'dist'), { recursive: true, force: true });
await $`npx tsc -p tsconfig.build.json`;
// declarations keep the sources' .ts specifiers; consumers resolve .js
for (const f of await fs.readdir(path.join(root, 'dist'), { recursive: true })) {
  if (!f.endsWith('.d.ts')) continue;
  const p = path.join(root, 'dist', f);
  const text = await fs.readFile(p, 'utf8');
  await fs.writeFile(p, text.replace(/(from\s+|import\()(['"])(\.{1,2}\/[^'"]+)\.ts\2/g, '$1$2$3.js$2'));
}
// the agent bundle, by the same function a checkout's builds use
const { register } = await import('tsx/esm/api');
register();
const { bundleAgentFromSource } = await import('../builder/agent-bundle.ts');
await fs.mkdir(path.join(root, 'dist', 'guest-agent'), { recursive: true });
await fs.writeFile(path.join(root, 'dist', 'guest-agent', 'agent.mjs'), await bundleAgentFromSource());
// the shim's protobuf descriptors (generated from Debian's .proto files: npm run gen:proto)
await fs.mkdir(path.join(root, 'dist', 'shim', 'proto'), { recursive: true });
await fs.copyFile(path.join(root, 'shim', 'proto', 'descriptors.json'), path.join(root, 'dist', 'shim', 'proto', 'descriptors.json'));
console.error('[prepack] dist/ ready: compiled library, declarations, agent bundle, shim descriptors');
