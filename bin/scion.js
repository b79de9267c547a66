#!/usr/bin/env node
// The scion CLI: a thin shell over the library (host/cli.ts), run through tsx.
import { register } from 'tsx/esm/api';
register();
const { runCli } = await import('../host/cli.ts');
process.exit(await runCli(process.argv.slice(2)));
