import { readdirSync, readFileSync } from 'node:fs';

/** Live step processes (any cluster) and nats-servers that tests started in their temp homes. */
export function liveStepProcesses(): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const testServer = argv[0]?.endsWith('nats-server') && argv.some((a) => a.includes('/quiver-test-'));
      if (argv.includes('quiver-step') || testServer) found.push(`${pid}: ${argv.join(' ')}`);
    } catch {
      // Gone while we looked.
    }
  }
  return found;
}
