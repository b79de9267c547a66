#!/usr/bin/env node
// The scion CLI: a thin shell over the library (host/cli). An installed
// package runs the compiled dist/; a checkout (sources present) runs the
// TypeScript through tsx, a development dependency.
import { existsSync } from 'node:fs';

const source = new URL('../host/cli.ts', import.meta.url);
let runCli;
if (existsSync(source)) {
  const { register } = await import('tsx/esm/api');
  register();
  ({ runCli } = await import(source.href));
} else {
  ({ runCli } = await import('../dist/host/cli.js'));
}
process.exit(await runCli(process.argv.slice(2)));
