import { readdirSync, readFileSync } from 'node:fs';

/** Live step processes (any cluster) and nats-servers that tests started in their temp homes. */
export function liveStepProcesses(): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      // A step process rewrites its title (`quiver-step <cluster> <run> <step>`) into one
      // space-separated string: split on both, or it would go unseen.
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split(/[\0 ]/).filter(Boolean);
      const testServer = argv[0]?.endsWith('nats-server') && argv.some((a) => a.includes('/quiver-test-'));
      if (argv.includes('quiver-step') || testServer) found.push(`${pid}: ${argv.join(' ')}`);
    } catch {
      // Gone while we looked.
    }
  }
  return found;
}
