/** `quiver env`: package environments, on this host and in the cluster's store (docs/packages.md). */
import { parseArgs } from 'node:util';
import {
  environmentsDir,
  listClusterEnvironments,
  listEnvironments,
  pruneClusterEnvironments,
  pruneEnvironments,
  type ClusterEnvironmentInfo,
  type EnvironmentInfo,
} from '../executor/index.ts';
import { QuiverClient } from '../sdk/index.ts';
import { findCluster, UsageError } from './cluster.ts';
import { formatBytes, textTable } from './format.ts';
import { parseDuration } from './table.ts';

export const ENV_USAGE = `  env list [--json] [--cluster]
                 This host's package environments (QUIVER_HOME/envs): hash, packages,
                 size on disk, when a step last used it. --cluster: the packed copies
                 in the cluster's object store (quiver-envs) instead, when a host last
                 packed or fetched each.
  env prune [--older-than DURATION | --all]
                 Remove environments no step used for DURATION (30m, 12h, 7d; default
                 7d; --all or 0 removes all): this host's, and, when a cluster is
                 found (QUIVER_NATS_URL or \`quiver up\`), the cluster's copies no host
                 packed or fetched for as long. A step needing one again fetches it
                 from the cluster or installs it.`;

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

async function listCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean', default: false }, cluster: { type: 'boolean', default: false } } });
  if (values.cluster) {
    const envs = await withClusterEnvs((store) => listClusterEnvironments(store));
    if (envs === null) throw new UsageError('env list --cluster needs a cluster: start one with `quiver up` or set QUIVER_NATS_URL');
    if (values.json) {
      process.stdout.write(`${JSON.stringify(envs, null, 2)}\n`);
      return 0;
    }
    process.stdout.write(envs.length === 0 ? 'No environments in the cluster.\n' : `${textTable(['HASH', 'PACKAGES', 'SIZE', 'LAST USED'], envs.map(clusterRow))}\n`);
    return 0;
  }
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

async function pruneCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { 'older-than': { type: 'string' }, all: { type: 'boolean', default: false } } });
  if (values.all && values['older-than'] !== undefined) throw new UsageError('env prune takes --older-than DURATION or --all, not both');
  const olderThanMs = values.all ? 0 : parseDuration(values['older-than'] ?? '7d');
  const removed = pruneEnvironments(environmentsDir(), olderThanMs);
  const bytes = removed.reduce((sum, e) => sum + e.bytes, 0);
  process.stdout.write(removed.length === 0 ? 'No environment to prune on this host.\n' : `Removed ${plural(removed.length)} from this host (${formatBytes(bytes)}).\n`);
  const fromCluster = await withClusterEnvs((store) => pruneClusterEnvironments(store, olderThanMs));
  if (fromCluster === null) process.stdout.write('No cluster found (QUIVER_NATS_URL or `quiver up`): its environments were left alone.\n');
  else {
    const clusterBytes = fromCluster.reduce((sum, e) => sum + e.bytes, 0);
    process.stdout.write(fromCluster.length === 0 ? 'No environment to prune in the cluster.\n' : `Removed ${plural(fromCluster.length)} from the cluster (${formatBytes(clusterBytes)} packed).\n`);
  }
  return 0;
}

/** Runs `fn` on the cluster's store of packed environments; null when no cluster is found. */
async function withClusterEnvs<T>(fn: (store: QuiverClient['topology']['envs']) => Promise<T>): Promise<T | null> {
  const found = await findCluster();
  if (!found) return null;
  const client = await QuiverClient.connect({ nc: found.nc, ownConnection: true });
  try {
    return await fn(client.topology.envs);
  } finally {
    await client.close();
  }
}

const plural = (n: number) => `${n} environment${n === 1 ? '' : 's'}`;

function row(env: EnvironmentInfo): string[] {
  const packages = Object.entries(env.packages).map(([name, version]) => `${name}@${version}`).join(' ');
  return [env.hash.slice(0, 12), packages, formatBytes(env.bytes), ago(Date.now() - env.lastUsedAt)];
}

function clusterRow(env: ClusterEnvironmentInfo): string[] {
  return [env.hash.slice(0, 12), env.packages, formatBytes(env.bytes), ago(Date.now() - env.lastUsedAt)];
}

function ago(ms: number): string {
  const [value, unit] = ms < 60_000 ? [ms / 1000, 's'] : ms < 3_600_000 ? [ms / 60_000, 'min'] : ms < 86_400_000 ? [ms / 3_600_000, 'h'] : [ms / 86_400_000, 'd'];
  return `${Math.floor(value)} ${unit} ago`;
}
