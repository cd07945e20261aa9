import { spawnSync } from 'node:child_process';

/** Runs a command; never throws. */
export function sh(...args: string[]): { ok: boolean; err: string } {
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8' });
  return { ok: r.status === 0, err: `${r.stderr ?? ''}${r.error?.message ?? ''}`.trim() };
}

/** Runs a command; throws with its stderr when it fails. */
export function mustSh(...args: string[]): void {
  const r = sh(...args);
  if (!r.ok) throw new Error(`${args.join(' ')}: ${r.err}`);
}

/** Null when network namespaces can be made here (the test hosts), else why not. */
export function cannotMakeNamespaces(probe: string): string | null {
  const r = sh('ip', 'netns', 'add', probe);
  if (!r.ok) return `cannot create network namespaces (${r.err || 'ip netns add failed'}); needs root and iproute2`;
  sh('ip', 'netns', 'del', probe);
  return null;
}
