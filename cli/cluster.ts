import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { nextTick } from '../planner/index.ts';
import {
  connectOnce,
  consoleLogger,
  isFinished,
  natsConnectionOptions,
  natsServers,
  quiverHome,
  resolveClusterSecret,
  storedCredentialsFile,
  writeStoredCredentials,
  type Deployment,
  type RunView,
} from '../schemas/index.ts';
import { loadPipeline, QuiverClient, startLocalCluster } from '../sdk/index.ts';
import { formatDuration, summaryTable, textTable } from './format.ts';
import { serveUiBeside } from './ui.ts';
import type { UiServer } from '../ui/index.ts';

/** A command-line mistake: reported with the usage, exit code 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
  readonly code = 'ERR_USAGE';
}

/** There is no cluster to talk to. */
export class NoClusterError extends Error {
  override readonly name = 'NoClusterError';
  readonly code = 'ERR_NO_CLUSTER';
}

const clusterDir = () => join(quiverHome(), 'cluster');
const urlFile = () => join(clusterDir(), 'url');

/**
 * The NATS of the cluster this machine talks to: QUIVER_NATS_URL, else the one `quiver up`
 * started (when it still answers), else null. Credentials as {@link natsConnectionOptions}
 * resolves them: the variables, else the ones `quiver up` stored for its server.
 */
export async function findCluster(): Promise<{ url: string; nc: NatsConnection } | null> {
  const explicit = process.env.QUIVER_NATS_URL;
  if (explicit) {
    const servers = natsServers(explicit);
    return { url: explicit, nc: await connect({ servers, ...natsConnectionOptions({ url: servers[0]! }) }) };
  }
  if (!existsSync(urlFile())) return null;
  const url = readFileSync(urlFile(), 'utf8').trim();
  try {
    return { url, nc: await connectOnce(url, { timeoutMs: 1000 }) };
  } catch (error) {
    // Something answers but refuses us: say so rather than start a second cluster beside it.
    if (isAuthorizationError(error)) {
      throw new NoClusterError(`the cluster at ${url} refused the credentials in ${storedCredentialsFile(quiverHome())}: restart \`quiver up\` to make new ones`);
    }
    // Left behind by a `quiver up` that was killed: nothing listens there any more.
    return null;
  }
}

function isAuthorizationError(error: unknown): boolean {
  for (let e = error as { name?: string; message?: string; cause?: unknown } | undefined; e; e = e.cause as typeof e) {
    if (/authori[sz]ation/i.test(`${e.name ?? ''} ${e.message ?? ''}`)) return true;
  }
  return false;
}

async function clusterClient(command: string): Promise<QuiverClient> {
  const found = await findCluster();
  if (!found) {
    throw new NoClusterError(
      `quiver ${command} needs a running cluster: start one with \`quiver up\` (in another terminal) or set QUIVER_NATS_URL to a NATS with JetStream that a Quiver orchestrator serves`,
    );
  }
  return QuiverClient.connect({ nc: found.nc, ownConnection: true });
}

async function withClient<T>(command: string, body: (client: QuiverClient) => Promise<T>): Promise<T> {
  const client = await clusterClient(command);
  try {
    return await body(client);
  } finally {
    await client.close();
  }
}

/** `quiver up`: a local cluster whose state survives restarts, for deployed pipelines. */
export async function upCommand(args: string[], untilSignal: () => Promise<unknown>): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { concurrency: { type: 'string' }, 'ui-port': { type: 'string' }, 'no-ui': { type: 'boolean', default: false }, 'nats-cluster': { type: 'string', default: '1' } },
  });
  const concurrency = values.concurrency === undefined ? undefined : Number(values.concurrency);
  if (concurrency !== undefined && (!Number.isInteger(concurrency) || concurrency < 1)) {
    throw new UsageError(`--concurrency takes a whole number ≥ 1, got "${values.concurrency}"`);
  }
  const natsNodes = Number(values['nats-cluster']);
  if (!Number.isInteger(natsNodes) || natsNodes < 1 || natsNodes > 7) throw new UsageError(`--nats-cluster takes the number of NATS nodes, 1 to 7; got "${values['nats-cluster']}"`);
  const running = await findCluster();
  if (running) {
    await running.nc.close();
    throw new UsageError(`a cluster already answers at ${running.url}; stop it first`);
  }
  mkdirSync(clusterDir(), { recursive: true, mode: 0o700 });
  // From the home (or QUIVER_CLUSTER_SECRET): executors started beside this cluster share it.
  const clusterSecret = resolveClusterSecret();
  const cluster = await startLocalCluster({
    persistentDir: join(clusterDir(), natsNodes > 1 ? `nats-cluster-${natsNodes}` : 'nats'),
    natsNodes,
    logger: consoleLogger('quiver'),
    executor: { clusterSecret, ...(concurrency ? { concurrency } : {}) },
  });
  // The credentials first: a command that finds the url must find them too.
  writeStoredCredentials(quiverHome(), { url: cluster.server.url, seed: cluster.server.credentials!.seed });
  writeFileSync(urlFile(), cluster.server.url + '\n');
  console.error(`quiver cluster up at ${cluster.server.url} (state in ${clusterDir()}, credentials in ${storedCredentialsFile(quiverHome())}); Ctrl-C stops it`);
  let ui: UiServer | null = null;
  try {
    ui = await serveUiBeside(cluster.client, { port: values['ui-port'], off: values['no-ui'] });
    await untilSignal();
  } finally {
    await ui?.close();
    rmSync(urlFile(), { force: true });
    rmSync(storedCredentialsFile(quiverHome()), { force: true });
    await cluster.stop();
  }
  return 0;
}

export async function deployCommand(args: string[]): Promise<number> {
  const { positionals } = parseArgs({ args, allowPositionals: true });
  if (positionals.length !== 1) throw new UsageError('deploy takes one pipeline file');
  const loaded = await loadPipeline(positionals[0]!);
  return withClient('deploy', async (client) => {
    const { deployment, changed } = await client.deploy(loaded);
    console.log(
      changed
        ? `deployed ${deployment.name} version ${deployment.version}: ${describeTriggers(deployment)}`
        : `${deployment.name} version ${deployment.version} is already deployed with this code and these triggers`,
    );
    return 0;
  });
}

export async function undeployCommand(args: string[]): Promise<number> {
  const { positionals } = parseArgs({ args, allowPositionals: true });
  if (positionals.length !== 1) throw new UsageError('undeploy takes one pipeline name');
  return withClient('undeploy', async (client) => {
    await client.undeploy(positionals[0]!);
    console.log(`undeployed ${positionals[0]}: its triggers and schedule are off; runs going on finish`);
    return 0;
  });
}

export async function pipelinesCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean', default: false } } });
  return withClient('pipelines', async (client) => {
    const deployed = await client.listDeployments();
    const now = Date.now();
    const rows = deployed.map((d) => ({
      name: d.name,
      version: d.version,
      triggers: describeTriggers(d),
      nextFire: d.schedule ? nextTick(d.schedule, now) : null,
      maxConcurrentRuns: d.maxConcurrentRuns,
      deployedAt: d.deployedAt,
      // The version's lock: every exact package version its steps run with.
      packages: [...new Set(d.plan.steps.flatMap((s) => Object.entries(s.packages ?? {}).map(([n, v]) => `${n}@${v}`)))].sort(),
    }));
    if (values.json) {
      console.log(JSON.stringify(rows));
      return 0;
    }
    if (rows.length === 0) {
      console.log('no pipeline is deployed (deploy one with `quiver deploy FILE`)');
      return 0;
    }
    console.log(
      textTable(
        ['pipeline', 'version', 'triggers', 'next fire', 'max runs', 'deployed'],
        rows.map((r) => [
          r.name,
          String(r.version),
          r.triggers,
          r.nextFire === null ? '-' : new Date(r.nextFire).toISOString(),
          r.maxConcurrentRuns === null ? '-' : String(r.maxConcurrentRuns),
          new Date(r.deployedAt).toISOString(),
        ]),
      ),
    );
    for (const r of rows.filter((r) => r.packages.length > 0)) console.log(`${r.name} v${r.version} packages: ${r.packages.join(' ')}`);
    return 0;
  });
}

function describeTriggers(d: Deployment): string {
  const parts = d.events.map((e) => `event ${e.subject}${e.schema ? ' (schema)' : ''}`);
  if (d.schedule) parts.push(`cron "${d.schedule.cron}" ${d.schedule.timezone} catchUp=${d.schedule.catchUp} overlap=${d.schedule.overlap}`);
  return parts.length ? parts.join('; ') : 'none (run it with `quiver run NAME`)';
}

export async function publishCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { id: { type: 'string' } } });
  if (positionals.length !== 2) throw new UsageError("publish takes a subject and a JSON payload, e.g. quiver publish orders.uploaded '{\"orderId\": 7}'");
  const [subject, text] = positionals as [string, string];
  let payload: unknown;
  try {
    payload = JSON.parse(text);
  } catch (error) {
    throw new UsageError(`the payload is not JSON (${(error as Error).message}); quote it for the shell, e.g. '{"orderId": 7}'`);
  }
  return withClient('publish', async (client) => {
    const result = await client.publish(subject, payload, values.id ? { id: values.id } : {});
    console.log(
      result.duplicate
        ? `event ${result.id} was published before: dropped as a duplicate`
        : `published event ${result.id} on ${subject} (sequence ${result.sequence})`,
    );
    return 0;
  });
}

export async function eventsCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { json: { type: 'boolean', default: false }, limit: { type: 'string' } } });
  if (positionals[0] !== 'dead' || positionals.length !== 1) throw new UsageError('events takes a subcommand: events dead [--json] [--limit N]');
  const limit = values.limit === undefined ? 100 : Number(values.limit);
  return withClient('events dead', async (client) => {
    const dead = await client.deadEvents({ limit });
    if (values.json) {
      console.log(JSON.stringify(dead));
      return 0;
    }
    if (dead.length === 0) {
      console.log('no dead-lettered events');
      return 0;
    }
    console.log(
      textTable(
        ['at', 'subject', 'event id', 'pipeline', 'reason'],
        dead.map((d) => [new Date(d.at).toISOString(), d.subject, d.eventId, d.pipeline ?? '-', d.reason]),
      ),
    );
    return 0;
  });
}

export async function runsCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { json: { type: 'boolean', default: false }, pipeline: { type: 'string' }, limit: { type: 'string' } },
  });
  if (positionals[0] === 'show') {
    if (positionals.length !== 2) throw new UsageError('runs show takes one run id');
    return withClient('runs show', async (client) => {
      const view = await client.getRun(positionals[1]!);
      if (!view) {
        console.error(`quiver: no run ${positionals[1]} (list them with \`quiver runs\`)`);
        return 1;
      }
      if (values.json) {
        console.log(JSON.stringify(view));
        return 0;
      }
      console.log(`run ${view.runId}: ${view.pipeline}${view.version ? ` version ${view.version}` : ''}, ${view.state}, started by ${describeTrigger(view)}`);
      console.log(`submitted ${new Date(view.submittedAt).toISOString()}${view.finishedAt ? `, took ${formatDuration(view.finishedAt - view.submittedAt)}` : ''}\n`);
      console.log(summaryTable(view));
      for (const step of view.steps) {
        if (step.error) console.log(`\n${step.name} failed:\n${step.error.stack ?? `${step.error.name}: ${step.error.message}`}`);
      }
      return 0;
    });
  }
  if (positionals.length > 0) throw new UsageError('runs takes no arguments, or: runs show ID');
  const limit = values.limit === undefined ? 50 : Number(values.limit);
  if (!Number.isInteger(limit) || limit < 1) throw new UsageError(`--limit takes a whole number ≥ 1, got "${values.limit}"`);
  return withClient('runs', async (client) => {
    const views = await client.listRuns({ limit, ...(values.pipeline ? { pipeline: values.pipeline } : {}) });
    if (values.json) {
      console.log(JSON.stringify(views.map((v) => ({ runId: v.runId, pipeline: v.pipeline, version: v.version, state: v.state, trigger: v.trigger, submittedAt: v.submittedAt, durationMs: runDuration(v) }))));
      return 0;
    }
    if (views.length === 0) {
      console.log('no runs yet');
      return 0;
    }
    console.log(
      textTable(
        ['run', 'pipeline', 'trigger', 'state', 'duration', 'submitted'],
        views.map((v) => [v.runId, v.version ? `${v.pipeline} v${v.version}` : v.pipeline, describeTrigger(v), v.state, formatDuration(runDuration(v)), new Date(v.submittedAt).toISOString()]),
      ),
    );
    return 0;
  });
}

function runDuration(view: RunView): number | null {
  return isFinished(view.state) && view.finishedAt !== null ? view.finishedAt - view.submittedAt : null;
}

function describeTrigger(view: RunView): string {
  const t = view.trigger;
  if (t.kind === 'event') return `event ${t.subject} #${t.eventId}`;
  if (t.kind === 'schedule') return `schedule ${new Date(t.tick).toISOString()}`;
  return `user ${t.by}`;
}
