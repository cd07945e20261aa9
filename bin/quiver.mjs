#!/usr/bin/env node
// The CLI is TypeScript run through tsx; step processes run a prebuilt bundle and skip it.
import { register } from 'tsx/esm/api';

register();
const { runCli } = await import('../cli/main.ts');
await runCli(process.argv.slice(2));
