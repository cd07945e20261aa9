import { existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { connect } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { collectGarbage, Executor } from '../executor/index.ts';
import { parseListenAddress } from '../flight/index.ts';
import { Orchestrator } from '../orchestrator/index.ts';
import { PlanError } from '../planner/index.ts';
import { CACHE_MODES, connectForever, consoleLogger, ensureTopology, NAME_PATTERN, natsConnectionOptions, natsServers, shmRoot, silentLogger, readRunRecord, type CacheMode, type Plan, type PlanStep, type RunView, type StepState } from '../schemas/index.ts';
import {
  InvalidEventError,
  loadPipeline,
  NotDeployedError,
  PipelineLoadError,
  QuiverClient,
  RerunError,
  startLocalCluster,
  TriggerError,
  type DryRun,
  type LocalCluster,
  type RunHandle,
} from '../sdk/index.ts';
import {
  deployCommand,
  eventsCommand,
  findCluster,
  NoClusterError,
  pipelinesCommand,
  publishCommand,
  runsCommand,
  undeployCommand,
  upCommand,
  UsageError,
} from './cluster.ts';
import { formatBytes, formatDuration, previewTable, stepDuration, summaryTable, textTable } from './format.ts';
import { BRANCH_USAGE, branchCommand, ExpectationLog, tagCommand, transactionHint } from './branch.ts';
import { TABLE_USAGE, tableCommand } from './table.ts';
import { UI_USAGE, uiCommand } from './ui.ts';
import { ENV_USAGE, envCommand } from './env.ts';
import { UiOptionError, UiTokenRequiredError } from '../ui/index.ts';
import { StorageError } from '../storage/index.ts';

const USAGE = `Usage: quiver <command> [options]

Commands:
  run FILE|NAME [--json] [--params key=value]... [--keep] [--branch NAME] [--transaction]
                 [--cache readwrite|read|off] [--dry-run]
                 Run a pipeline file (or a deployed pipeline by name) and show each
                 step's state and logs live. With no cluster (QUIVER_NATS_URL or
                 \`quiver up\`), a private nats-server, orchestrator and executor are
                 started for the run and stopped after it. --branch: read and
                 write tables on that branch; --transaction: write to run/<runId>,
                 merged only when every step and expectation passes. --cache:
                 reuse outputs of steps whose code, inputs and params did not
                 change and keep what is computed (readwrite, the default), only
                 reuse (read), or compute everything (off). --dry-run prints the
                 physical plan (scans with their columns, filters and snapshots;
                 stages, commits) and what the cache would reuse, and runs nothing.
  up [--concurrency N] [--ui-port P] [--no-ui] [--nats-cluster 3]
                 Start a local cluster that keeps its state (deployments, runs,
                 events) under QUIVER_HOME/cluster; the commands below find it.
                 It serves the web UI too (see \`quiver ui\`) and prints its address.
                 --nats-cluster 3 runs three NATS nodes on loopback (streams and
                 buckets with three replicas) instead of one, to try failover.
  deploy FILE    Deploy a pipeline with the triggers its file declares (a new
                 version when the code or triggers changed).
  pipelines [--json]
                 List deployed pipelines: versions, triggers, next fire times.
  undeploy NAME  Turn a deployed pipeline's triggers and schedule off.
  publish SUBJECT JSON [--id ID]
                 Publish an event; pipelines whose trigger matches start a run.
                 A second event with the same id is dropped.
  events dead [--json] [--limit N]
                 Events that started nothing, with the reason.
  runs [--pipeline NAME] [--limit N] [--json]
                 List runs, newest first: trigger, state, duration.
  runs show ID   One run's step table and errors.
  rerun RUN_ID [--from STEP] [--cache readwrite|read|off] [--json] [--keep]
                 Run a recorded run again: same code, params, event and table
                 snapshots. --from STEP computes STEP and the steps after it again;
                 the steps before come from the output cache when it holds them.
  cancel RUN_ID [--reason TEXT]
                 Cancel a queued or running run.
  release RUN_ID Let go of the outputs a run kept (run --keep).
  logs RUN_ID [--follow] [--step NAME]
                 A run's step logs (kept 7 days, at most 256 MiB for the cluster);
                 --follow keeps printing until the run ends.
  orchestrator   Run the orchestrator daemon against QUIVER_NATS_URL.
  executor [--concurrency N] [--host-id ID] [--labels a,b] [--flight-listen ADDR]
                 Run an executor daemon against QUIVER_NATS_URL. Steps pinned with
                 step(..., { host: 'a' }) run on executors labelled a. Flight listens on
                 ADDR (host[:port]; default QUIVER_FLIGHT_LISTEN, else every address), its
                 bulk port on QUIVER_FLIGHT_BULK_PORT (default: any free one), and every
                 call needs the cluster's token (docs/security-flight.md).
  gc             Remove shared memory and step processes of runs that are no longer alive.
${TABLE_USAGE}
${BRANCH_USAGE}
${UI_USAGE}
${ENV_USAGE}

Environment:
  QUIVER_NATS_URL   an existing NATS with JetStream (default: embedded private server)
  QUIVER_HOME       local state (default: <quiver>/.quiver)
  QUIVER_HOST_ID    this host's id (default: the hostname)
  QUIVER_STORAGE    where tables live: a directory or s3://bucket/prefix
                    (default: QUIVER_HOME/storage; S3 settings in storage/README.md)
  QUIVER_LEASE_TTL_MS  how long a silent leading orchestrator keeps the lead (default 5000)
  QUIVER_UI_TOKEN   the secret the web UI requires (needed to listen beyond 127.0.0.1)
`;


/** The lines of USAGE about `command`: what `quiver COMMAND --help` prints. */
function commandUsage(command: string): string | null {
  const lines = USAGE.split('\n');
  const picked: string[] = [];
  let inside = false;
  for (const line of lines) {
    const starts = new RegExp(`^  ${command}( |$)`).test(line);
    if (starts) inside = true;
    else if (inside && !/^ {4,}\S/.test(line)) inside = false;
    if (inside) picked.push(line);
  }
  return picked.length > 0 ? `Usage: quiver ${command} …\n\n${picked.join('\n')}\n` : null;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  // Every command answers --help with its own part of the usage, before its options are parsed.
  if (command && !command.startsWith('-') && command !== 'help' && (rest.includes('--help') || rest.includes('-h'))) {
    const usage = commandUsage(command);
    if (!usage) throw new UsageError(`unknown command "${command}"`);
    process.stdout.write(usage);
    return 0;
  }
  switch (command) {
    case 'run':
      return runCommand(rest);
    case 'orchestrator':
      return orchestratorCommand();
    case 'executor':
      return executorCommand(rest);
    case 'gc':
      return gcCommand();
    case 'up':
      return upCommand(rest, untilSignal);
    case 'deploy':
      return deployCommand(rest);
    case 'undeploy':
      return undeployCommand(rest);
    case 'pipelines':
      return pipelinesCommand(rest);
    case 'publish':
      return publishCommand(rest);
    case 'events':
      return eventsCommand(rest);
    case 'runs':
      return runsCommand(rest);
    case 'rerun':
      return rerunCommand(rest);
    case 'logs':
      return logsCommand(rest);
    case 'cancel':
    case 'release':
      return controlCommand(command, rest);
    case 'branch':
      return branchCommand(rest);
    case 'tag':
      return tagCommand(rest);
    case 'table':
      return tableCommand(rest);
    case 'ui':
      return uiCommand(rest, untilSignal);
    case 'env':
      return envCommand(rest);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

function parseParams(values: string[]): Record<string, string> {
  const params: Record<string, string> = {};
  for (const v of values) {
    const eq = v.indexOf('=');
    if (eq <= 0) throw new UsageError(`--params takes key=value, got "${v}"`);
    params[v.slice(0, eq)] = v.slice(eq + 1);
  }
  return params;
}

async function runCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      json: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      params: { type: 'string', multiple: true, default: [] },
      branch: { type: 'string' },
      transaction: { type: 'boolean' },
      cache: { type: 'string', default: 'readwrite' },
      'dry-run': { type: 'boolean', default: false },
    },
  });
  const file = positionals[0];
  if (!file || positionals.length > 1) throw new UsageError('run takes one pipeline file, or the name of a deployed pipeline');
  const cache = values.cache as CacheMode;
  if (!CACHE_MODES.includes(cache)) throw new UsageError(`--cache takes ${CACHE_MODES.join(', ')}; got "${values.cache}"`);
  const params = parseParams(values.params ?? []);
  // With --json, stdout carries only the final JSON object; the live view goes to stderr.
  const out = values.json ? process.stderr : process.stdout;
  const say = (line: string) => out.write(line + '\n');

  const byName = !existsSync(file) && NAME_PATTERN.test(file);
  const found = await findCluster();
  if (byName && !found) {
    throw new NoClusterError(`"${file}" is no file; to run a deployed pipeline by name, start a cluster with \`quiver up\` or set QUIVER_NATS_URL`);
  }
  const loaded = byName ? null : await loadPipeline(file);
  const natsUrl = found?.url;
  let cluster: LocalCluster | null = null;
  let client: QuiverClient;
  if (found) {
    client = await QuiverClient.connect({ nc: found.nc, ownConnection: true });
  } else {
    cluster = await startLocalCluster({ logger: process.env.QUIVER_DEBUG ? consoleLogger('quiver') : silentLogger });
    client = cluster.client;
  }
  try {
    if (values['dry-run']) {
      const dry = await client.dryRun(loaded ?? file, {
        params,
        ...(values.branch !== undefined ? { branch: values.branch } : {}),
        ...(values.transaction !== undefined ? { transaction: values.transaction } : {}),
        cache,
      });
      if (values.json) process.stdout.write(JSON.stringify(dry) + '\n');
      else say(dryRunTable(dry, cluster !== null));
      return 0;
    }
    const handle = await client.run(loaded ?? file, {
      params,
      keep: values.keep ?? false,
      ...(values.branch !== undefined ? { branch: values.branch } : {}),
      ...(values.transaction !== undefined ? { transaction: values.transaction } : {}),
      cache,
    });
    const plan = loaded?.plan ?? (await client.getDeployment(file))!.plan;
    return await followRun(client, handle, plan, {
      where: cluster ? 'on an embedded NATS' : `on ${natsUrl}`,
      json: values.json ?? false,
      keep: values.keep ?? false,
      embedded: cluster !== null,
      say,
      hint: (view) => (view.state === 'succeeded' ? '' : transactionHint(plan, view.runId, { branch: values.branch, transaction: values.transaction })),
    });
  } finally {
    if (cluster) await cluster.stop();
    else await client.close();
  }
}

interface FollowOptions {
  where: string;
  json: boolean;
  keep: boolean;
  /** The cluster stops with this command: kept outputs go with it. */
  embedded: boolean;
  say: (line: string) => void;
  /** A line to add when the run ended (how to look at a failed transaction's branch). */
  hint?: (view: RunView) => string;
}

/** Shows a submitted run live (states, logs), then its summary and outputs; the exit code says whether it succeeded. */
async function followRun(client: QuiverClient, handle: RunHandle, plan: Plan, options: FollowOptions): Promise<number> {
  const { say } = options;
  const expectations = new ExpectationLog();
  say(`run ${handle.id}: ${plan.pipeline} (${plan.steps.length} steps) ${options.where}`);
  let interrupted = 0;
  const onSigint = () => {
    interrupted++;
    if (interrupted === 1) {
      say('cancelling the run (Ctrl-C again to leave now)…');
      void handle.cancel('interrupted from the terminal');
    } else process.exit(130);
  };
  process.on('SIGINT', onSigint);

  const width = Math.max(...plan.steps.map((s) => s.name.length));
  const lastState = new Map<string, StepState>();
  for await (const event of handle.events()) {
    if (event.type === 'log') {
      // A step's first lines can overtake the status saying it runs: they travel separately.
      if (!['running', 'succeeded', 'failed'].includes(lastState.get(event.log.step) ?? '')) {
        lastState.set(event.log.step, 'running');
        say(`${event.log.step.padEnd(width)} ● running`);
      }
      say(`${event.log.step.padEnd(width)} │ ${event.log.line}`);
      expectations.log(event.log.step, event.log.line);
      continue;
    }
    for (const step of event.view.steps) {
      if (lastState.get(step.name) === step.state) continue;
      lastState.set(step.name, step.state);
      if (step.state === 'waiting') continue;
      let detail = '';
      if (step.state === 'succeeded') detail = succeededDetail(step);
      if (step.state === 'running') detail = `on ${step.hostId}${step.attempt > 1 ? ` (attempt ${step.attempt})` : ''}`;
      // Getting its packages' environment (built, fetched from the cluster or found) is part of the step's time.
      if (step.envMs !== undefined && step.envMs >= 1) detail += `${detail ? ', ' : ''}packages ${formatDuration(step.envMs)}`;
      say(`${step.name.padEnd(width)} ● ${step.state}${detail ? `  ${detail}` : ''}`);
      if (step.state === 'failed' && step.error) say(indent(step.error.stack ?? `${step.error.name}: ${step.error.message}`, `${' '.repeat(width)} │ `));
    }
  }
  const view = await handle.result();
  process.off('SIGINT', onSigint);

  say('');
  say(summaryTable(view));
  expectations.report(view, say);
  if (view.state === 'succeeded') await previewOutputs(client, view, say);
  const hint = options.hint?.(view);
  if (hint) say(hint);
  say(`\nrun ${view.state}${view.finishedAt ? ` in ${formatDuration(view.finishedAt - view.submittedAt)}` : ''}`);
  if (options.json) process.stdout.write(JSON.stringify(jsonResult(view)) + '\n');
  if (!options.keep) await handle.release();
  else if (options.embedded) say('note: --keep has no effect on the embedded NATS, which stops with this command');
  return view.state === 'succeeded' ? 0 : 1;
}

/** What a succeeded step's line says: its output, and how long it ran or that it was reused. */
function succeededDetail(step: RunView['steps'][number]): string {
  if (step.committed) return `cached: ${step.committed.map((c) => `${c.table} is at snapshot ${c.snapshotId}`).join(', ')} already, nothing committed`;
  // A stage left out because its table holds the run's output already: there is no output to size.
  if (step.transport === 'cache' && step.output?.segments.length === 0) return 'cached: the table holds this output already, nothing staged';
  return `${(step.rows ?? 0).toLocaleString('en-US')} rows, ${formatBytes(step.bytes)}, ${step.transport === 'cache' ? 'cached, nothing ran' : formatDuration(stepDuration(step))}`;
}

/** The physical plan as `quiver run --dry-run` prints it: what each step reads and whether the cache would give it. */
function dryRunTable(dry: DryRun, embedded: boolean): string {
  const reads = (step: PlanStep): string => {
    const system = step.system;
    if (system?.kind === 'scan') {
      const at = system.snapshot ? `snapshot ${system.snapshot}` : system.asOf !== undefined ? `as of ${new Date(system.asOf).toISOString()}` : 'the snapshot current when it runs';
      return `table ${system.table}${system.ref ? `@${system.ref}` : ''}, ${at}; columns ${system.columns?.join(', ') ?? 'all'}${system.filter ? `; filter ${system.filter}` : ''}`;
    }
    const inputs = step.inputs.map((i) => `${i.param} ← ${i.step}${i.columns ? ` [${i.columns.join(', ')}]` : ''}`).join(', ');
    return system ? `${system.kind}${inputs ? `: ${inputs}` : ''}` : inputs || '-';
  };
  const cacheState = (s: DryRun['steps'][number]) => (s.cached ? `reuse ${s.cacheKey!.slice(0, 12)}` : s.cacheKey ? `compute, cache ${s.cacheKey.slice(0, 12)}` : 'compute');
  const rows = dry.steps.map((s) => [s.step.name, s.step.system?.kind ?? 'step', reads(s.step), cacheState(s)]);
  const note = embedded ? '\n(no cluster found: the embedded one starts with an empty cache; `quiver up` keeps one)' : '';
  return `dry run of ${dry.plan.pipeline}: ${dry.steps.length} steps, nothing ran\n\n${textTable(['step', 'kind', 'reads', 'cache'], rows)}${note}`;
}

/** `quiver rerun RUN_ID [--from STEP]`: the recorded run again, on the cluster that ran it. */
async function rerunCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { from: { type: 'string' }, json: { type: 'boolean', default: false }, keep: { type: 'boolean', default: false }, cache: { type: 'string', default: 'readwrite' } },
  });
  if (positionals.length !== 1) throw new UsageError('rerun takes one run id (see `quiver runs`)');
  const cache = values.cache as CacheMode;
  if (!CACHE_MODES.includes(cache)) throw new UsageError(`--cache takes ${CACHE_MODES.join(', ')}; got "${values.cache}"`);
  const found = await findCluster();
  if (!found) throw new NoClusterError('rerun needs the cluster that ran the run: start one with `quiver up` or set QUIVER_NATS_URL');
  const client = await QuiverClient.connect({ nc: found.nc, ownConnection: true });
  try {
    const handle = await client.rerun(positionals[0]!, { ...(values.from !== undefined ? { from: values.from } : {}), cache, keep: values.keep ?? false });
    // The rerun's plan is the recorded run's.
    const { plan } = (await readRunRecord(client.topology.runs, positionals[0]!))!.submit;
    const out = values.json ? process.stderr : process.stdout;
    return await followRun(client, handle, plan, { where: `on ${found.url}`, json: values.json ?? false, keep: values.keep ?? false, embedded: false, say: (line) => out.write(line + '\n') });
  } finally {
    await client.close();
  }
}

/** `quiver logs RUN_ID [--follow] [--step NAME]`: a run's step logs, kept in the logs stream. */
async function logsCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { follow: { type: 'boolean', short: 'f', default: false }, step: { type: 'string' } } });
  if (positionals.length !== 1) throw new UsageError('logs takes one run id (see `quiver runs`)');
  const found = await findCluster();
  if (!found) throw new NoClusterError('logs needs the cluster of the run: start one with `quiver up` or set QUIVER_NATS_URL');
  const client = await QuiverClient.connect({ nc: found.nc, ownConnection: true });
  try {
    const runId = positionals[0]!;
    const view = await client.getRun(runId);
    if (!view) throw new UsageError(`there is no run ${runId} (see \`quiver runs\`)`);
    const width = Math.max(...view.steps.map((s) => s.name.length));
    let lines = 0;
    for await (const line of client.logs(runId, { follow: values.follow ?? false })) {
      if (values.step !== undefined && line.step !== values.step) continue;
      lines++;
      process.stdout.write(`${line.step.padEnd(width)} │ ${line.line}\n`);
    }
    if (lines === 0) console.error(`no log lines kept for run ${runId}${values.step !== undefined ? ` step ${values.step}` : ''}`);
    return 0;
  } finally {
    await client.close();
  }
}

/** `quiver cancel RUN_ID` and `quiver release RUN_ID`: the control messages a client sends. */
async function controlCommand(command: 'cancel' | 'release', args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { reason: { type: 'string' } } });
  if (positionals.length !== 1) throw new UsageError(`${command} takes one run id (see \`quiver runs\`)`);
  const runId = positionals[0]!;
  const found = await findCluster();
  if (!found) throw new NoClusterError(`${command} needs the cluster of the run: start one with \`quiver up\` or set QUIVER_NATS_URL`);
  const client = await QuiverClient.connect({ nc: found.nc, ownConnection: true });
  try {
    const view = await client.getRun(runId);
    if (!view) throw new UsageError(`there is no run ${runId} (see \`quiver runs\`)`);
    if (command === 'cancel') {
      if (view.state !== 'running' && view.state !== 'queued') {
        console.error(`run ${runId} is ${view.state} already: nothing to cancel`);
        return 1;
      }
      await client.cancel(runId, values.reason ?? 'cancelled from the terminal');
      console.log(`cancelling run ${runId}`);
      return 0;
    }
    await client.release(runId);
    console.log(`released the outputs of run ${runId}${view.state === 'running' || view.state === 'queued' ? ' (they go when it ends)' : ''}`);
    return 0;
  } finally {
    await client.close();
  }
}

async function previewOutputs(client: QuiverClient, view: RunView, say: (line: string) => void): Promise<void> {
  for (const name of view.outputs) {
    const step = view.steps.find((s) => s.name === name);
    if (!step?.output) continue;
    say(`\n${name}:`);
    try {
      const { table, transport } = await client.readOutput(view.runId, name);
      say(previewTable(table) + (transport === 'flight' ? `\n(read over Arrow Flight from ${step.output.hostId})` : ''));
    } catch (error) {
      say(`(not readable from this host: it lives on ${step.output.hostId}; ${(error as Error).message})`);
    }
  }
}

/** The contract for scripts: one JSON object, stable field names. */
function jsonResult(view: RunView) {
  return {
    runId: view.runId,
    state: view.state,
    steps: view.steps.map((s) => ({
      name: s.name,
      state: s.state,
      rows: s.rows,
      bytes: s.bytes,
      transport: s.transport,
      /** The output was reused from the cache: the step did not run. */
      cached: s.transport === 'cache',
      /** The step's cache key (null: not cacheable in this run, see --cache and step(..., { cache: false })). */
      cacheKey: s.cacheKey,
      copiedBytes: s.copiedBytes,
      /** 'process' or 'worker' for user steps; null for Quiver's own steps and steps that never ran. */
      isolation: s.isolation,
      durationMs: stepDuration(s),
      /** From the step's claim to its function's first line: what starting it cost. */
      startMs: s.codeStartedAt !== null && s.startedAt !== null ? Math.max(0, Math.round((s.codeStartedAt - s.startedAt) * 10) / 10) : null,
      /** Time spent getting the step's package environment (built, fetched from the cluster, or found); absent without packages. */
      ...(s.envMs !== undefined ? { envMs: s.envMs } : {}),
      ...(s.scan ? { scan: s.scan } : {}),
      /** A commit left unchanged: the snapshots that hold the run's tables already. */
      ...(s.committed ? { committed: s.committed } : {}),
      ...(s.error ? { error: s.error } : {}),
    })),
  };
}

function indent(text: string, prefix: string): string {
  return text
    .split('\n')
    .map((l) => prefix + l)
    .join('\n');
}

/** The servers QUIVER_NATS_URL names (one, or a cluster's, comma-separated). */
function requireNatsUrl(command: string): string[] {
  const url = process.env.QUIVER_NATS_URL;
  if (!url) throw new UsageError(`${command} needs QUIVER_NATS_URL: the NATS (with JetStream) it serves, e.g. nats://127.0.0.1:4222, or a cluster's servers comma-separated`);
  return natsServers(url);
}

async function untilSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    process.once('SIGINT', () => resolve('SIGINT'));
    process.once('SIGTERM', () => resolve('SIGTERM'));
  });
}

async function orchestratorCommand(): Promise<number> {
  const nc = await connectForever(requireNatsUrl('quiver orchestrator'), { name: 'quiver-orchestrator', waitOnFirstConnect: true, logger: consoleLogger('orchestrator') });
  const leaseTtlMs = Number(process.env.QUIVER_LEASE_TTL_MS);
  const orchestrator = await Orchestrator.start(nc, {
    topology: topologyFromEnv(),
    ...(Number.isFinite(leaseTtlMs) && leaseTtlMs > 0 ? { lease: { ttlMs: leaseTtlMs } } : {}),
  });
  console.error(`orchestrator running against ${nc.getServer()} (${orchestrator.isLeader ? 'leading' : 'standing by for the leader'})`);
  await untilSignal();
  await orchestrator.stop();
  await nc.close();
  return 0;
}

async function executorCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { concurrency: { type: 'string' }, 'host-id': { type: 'string' }, labels: { type: 'string' }, 'flight-listen': { type: 'string' } } });
  const concurrency = values.concurrency === undefined ? undefined : Number(values.concurrency);
  if (concurrency !== undefined && (!Number.isInteger(concurrency) || concurrency < 1)) {
    throw new UsageError(`--concurrency takes a whole number ≥ 1, got "${values.concurrency}"`);
  }
  let listen: ReturnType<typeof parseListenAddress> | null = null;
  try {
    listen = values['flight-listen'] === undefined ? null : parseListenAddress(values['flight-listen'], '--flight-listen');
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  const nc = await connectForever(requireNatsUrl('quiver executor'), { name: 'quiver-executor', waitOnFirstConnect: true, logger: consoleLogger('executor') });
  const executor = await Executor.start(nc, {
    topology: topologyFromEnv(),
    ...(concurrency ? { concurrency } : {}),
    ...(values['host-id'] ? { hostId: values['host-id'] } : {}),
    ...(values.labels !== undefined ? { labels: values.labels.split(',').map((l) => l.trim()).filter(Boolean) } : {}),
    ...(listen ? { flight: { host: listen.host, ...(listen.port !== null ? { port: listen.port } : {}) } } : {}),
  });
  await untilSignal();
  await executor.stop();
  await nc.close();
  return 0;
}

async function gcCommand(): Promise<number> {
  const servers = requireNatsUrl('quiver gc');
  const nc = await connect({ servers, ...natsConnectionOptions({ url: servers[0]! }) });
  const topology = await ensureTopology(nc, await jetstreamManager(nc), topologyFromEnv());
  const removed = await collectGarbage({ topology, shmDir: `${shmRoot()}/${topology.clusterId}`, logger: consoleLogger('gc') });
  console.log(`removed ${removed.segments} segment(s) and ${removed.processes} process(es)`);
  await nc.close();
  return 0;
}

/** Test and operations knob: how long a silent executor keeps a step before another takes it. */
function topologyFromEnv() {
  const ackWaitMs = Number(process.env.QUIVER_ACK_WAIT_MS);
  return Number.isFinite(ackWaitMs) && ackWaitMs > 0 ? { ackWaitMs } : {};
}

export async function runCli(argv: string[]): Promise<void> {
  try {
    process.exitCode = await main(argv);
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`quiver: ${error.message}\n\n${USAGE}`);
      process.exitCode = 2;
    } else if (
      error instanceof PlanError ||
      error instanceof PipelineLoadError ||
      error instanceof TriggerError ||
      error instanceof NoClusterError ||
      error instanceof NotDeployedError ||
      error instanceof InvalidEventError ||
      error instanceof StorageError ||
      error instanceof RerunError ||
      error instanceof UiTokenRequiredError ||
      error instanceof UiOptionError
    ) {
      process.stderr.write(`quiver: ${error.message}\n`);
      process.exitCode = 2;
    } else if ((error as { code?: string }).code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') {
      process.stderr.write(`quiver: ${(error as Error).message}\n\n${USAGE}`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`quiver: ${(error as Error).stack ?? error}\n`);
      process.exitCode = 1;
    }
  }
}
