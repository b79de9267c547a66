#!/usr/bin/env node
// The scion CLI: a thin shell over the library (cli/). An installed
// package runs the compiled dist/; a checkout (sources present) runs the
// TypeScript through tsx, a development dependency.
import { existsSync } from 'node:fs';

const source = new URL('../cli/main.ts', import.meta.url);
let runCli;
if (existsSync(source)) {
  const { register } = await import('tsx/esm/api');
  register();
  ({ runCli } = await import(source.href));
} else {
  ({ runCli } = await import('../dist/cli/main.js'));
}
process.exit(await runCli(process.argv.slice(2)));
