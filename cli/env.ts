/** `quiver env`: this host's package environments (docs/packages.md). */
import { parseArgs } from 'node:util';
import { environmentsDir, listEnvironments, pruneEnvironments, type EnvironmentInfo } from '../executor/index.ts';
import { UsageError } from './cluster.ts';
import { formatBytes, textTable } from './format.ts';
import { parseDuration } from './table.ts';

export const ENV_USAGE = `  env list [--json]
                 This host's package environments (QUIVER_HOME/envs): hash, packages,
                 size on disk, when a step last used it.
  env prune [--older-than DURATION]
                 Remove environments no step used for DURATION (30m, 12h, 7d; default
                 7d; 0 removes all). A step needing one again fetches it from the
                 cluster or installs it.`;

export async function envCommand(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'list':
      return listCommand(rest);
    case 'prune':
      return pruneCommand(rest);
    default:
      throw new UsageError(sub ? `unknown env command "${sub}"; it is list or prune` : 'quiver env needs list or prune');
  }
}

function listCommand(args: string[]): number {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean', default: false } } });
  const envs = listEnvironments();
  if (values.json) {
    process.stdout.write(`${JSON.stringify(envs.map(({ hash, packages, bytes, builtAt, lastUsedAt }) => ({ hash, packages, bytes, builtAt, lastUsedAt })), null, 2)}\n`);
    return 0;
  }
  if (envs.length === 0) {
    process.stdout.write(`No environments in ${environmentsDir()}.\n`);
    return 0;
  }
  process.stdout.write(`${textTable(['HASH', 'PACKAGES', 'SIZE', 'LAST USED'], envs.map(row))}\n`);
  return 0;
}

function pruneCommand(args: string[]): number {
  const { values } = parseArgs({ args, options: { 'older-than': { type: 'string', default: '7d' } } });
  const removed = pruneEnvironments(environmentsDir(), parseDuration(values['older-than']));
  const bytes = removed.reduce((sum, e) => sum + e.bytes, 0);
  process.stdout.write(removed.length === 0 ? 'No environment to prune.\n' : `Removed ${removed.length} environment${removed.length === 1 ? '' : 's'} (${formatBytes(bytes)}).\n`);
  return 0;
}

function row(env: EnvironmentInfo): string[] {
  const packages = Object.entries(env.packages).map(([name, version]) => `${name}@${version}`).join(' ');
  return [env.hash.slice(0, 12), packages, formatBytes(env.bytes), ago(Date.now() - env.lastUsedAt)];
}

function ago(ms: number): string {
  const [value, unit] = ms < 60_000 ? [ms / 1000, 's'] : ms < 3_600_000 ? [ms / 60_000, 'min'] : ms < 86_400_000 ? [ms / 3_600_000, 'h'] : [ms / 86_400_000, 'd'];
  return `${Math.floor(value)} ${unit} ago`;
}

