import { jetstream, jetstreamManager, type JetStreamClient, type PubAck } from '@nats-io/jetstream';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import type { KvEntry } from '@nats-io/kv';
import type { Table } from 'apache-arrow';
import { ulid } from 'ulid';
import {
  buckets,
  connectForever,
  deadEvent,
  decode,
  deployment as deploymentSchema,
  deploymentsSeen,
  encodeChecked,
  ensureTopology,
  EVENT_SUBJECT_PATTERN,
  isFinished,
  streams,
  logLine,
  runCancel,
  runRelease,
  runSubmit,
  runView,
  runRecord,
  resolveClusterSecret,
  shmRoot,
  subjects,
  type DeadEvent,
  type Deployment,
  type LogLine,
  readCacheEntry,
  readRunRecord,
  type CacheMode,
  type Plan,
  type PlanStep,
  type RunSubmit,
  type RunView,
  type TableDescriptor,
  type Topology,
  type TopologyOptions,
} from '../schemas/index.ts';
import { FlightClient, flightAccessToken } from '../flight/index.ts';
import { findLiveHost } from '../executor/index.ts';
import { plannedCacheKeys, readRunView, unchangedTables } from '../orchestrator/index.ts';
import { readInput } from '../shm/index.ts';
import type { LoadedPipeline } from './load.ts';
import { descendantsOf, planOnBranch } from '../planner/index.ts';
import { pinTableHeads, prepareSources, withoutTableHeads } from './sources.ts';
import { tableStoreFromEnv } from '../storage/index.ts';

/** Options for {@link QuiverClient.connect}. */
export interface ClientOptions {
  /** @default QUIVER_NATS_URL, else nats://127.0.0.1:4222 */
  natsUrl?: string;
  topology?: TopologyOptions;
  /** Who started runs, recorded with each run. @default the OS user name */
  submittedBy?: string;
  /** The cluster secret, from which readOutput derives its Flight access token. @default resolveClusterSecret() (QUIVER_CLUSTER_SECRET, …) */
  clusterSecret?: string;
}

export interface RunOptions {
  /** Strings every step receives as `ctx.params`. @default {} */
  params?: Record<string, string>;
  /** Keep the run's outputs in shared memory after the result is read. @default false */
  keep?: boolean;
  /** The branch the run reads its sources from and writes its tables to (docs/branches.md). @default the pipeline's, else 'main' */
  branch?: string;
  /**
   * Write to a temporary branch `run/<runId>`, merged into `branch` only when every step and
   * expectation passed. @default the pipeline's `transaction`, else false
   */
  transaction?: boolean;
  /**
   * The output cache: `readwrite` reuses the outputs of unchanged steps and caches what it
   * computes, `read` only reuses, `off` computes everything. `quiver run` uses `readwrite`.
   * @default 'off'
   */
  cache?: CacheMode;
}

/** A step output that cannot be read: unknown run or step, not succeeded, or released. */
export class OutputNotFoundError extends Error {
  override readonly name = 'OutputNotFoundError';
  readonly code = 'ERR_OUTPUT_NOT_FOUND';
}

/** A step output read by {@link QuiverClient.readOutput}. */
export interface ReadOutput {
  table: Table;
  /** `shm`: mapped here without a copy; `flight`: copied over the network from its host. */
  transport: 'shm' | 'flight';
}

/** A pipeline name that is not deployed. */
/**
 * The submission that runs `old` (run `runId`) again: the same plan (with its pinned snapshots),
 * code, deployed version, params and event, submitted by `by`. With `from`, that step and the
 * steps after it are computed again; the ones before come from the output cache when it holds
 * them. The caller checks that the step exists and the code is still stored.
 */
export function rerunOf(old: RunSubmit, runId: string, options: RerunOptions & { by: string }): Omit<RunSubmit, 'type' | 'runId' | 'submittedAt'> {
  const cache = options.cache ?? 'readwrite';
  return {
    // Its tables may have moved on since: the rerun writes them unless pinned again (QuiverClient.rerun).
    plan: withoutTableHeads(old.plan),
    codeHash: old.codeHash,
    params: old.params,
    keep: options.keep ?? false,
    ...(old.version !== undefined ? { version: old.version } : {}),
    ...(old.event ? { event: old.event } : {}),
    ...(old.admission ? { admission: old.admission } : {}),
    ...(cache !== 'off' ? { cache } : {}),
    ...(options.from !== undefined ? { recompute: [options.from, ...descendantsOf(old.plan, options.from)] } : {}),
    submittedBy: options.by,
    trigger: { kind: 'user', by: `${options.by} (rerun of ${runId})` },
  };
}

/** Pause before opening a run's watch again after it failed or ended early. */
const WATCH_RETRY_MS = 500;
/** A run's record is read when its watch has said nothing for this long (it may be stuck). */
const RECORD_POLL_MS = 5_000;

/** How long a publish (submit, event, cancel, release) is retried while JetStream elects a stream leader. */
const PUBLISH_RETRY_MS = 15_000;
/** How long a deploy or undeploy waits for the leading orchestrator to say its triggers reflect it. */
const DEPLOY_SEEN_TIMEOUT_MS = 10_000;

/** A run cannot be run again: it is unknown, has no such step, or its code is gone. */
export class RerunError extends Error {
  override readonly name = 'RerunError';
  readonly code = 'ERR_RERUN';
}

/** What {@link QuiverClient.dryRun} found. */
export interface DryRun {
  plan: Plan;
  /** In the order they would run. */
  steps: { step: PlanStep; cacheKey: string | null; cached: boolean }[];
}

export interface RerunOptions {
  /** Compute this step and every step after it again; the steps before come from the cache when it holds them. @default none: every step as the cache has it */
  from?: string;
  /** @default 'readwrite' */
  cache?: CacheMode;
  /** @default false */
  keep?: boolean;
}

export class NotDeployedError extends Error {
  override readonly name = 'NotDeployedError';
  readonly code = 'ERR_NOT_DEPLOYED';
}

/** Two deploys of one pipeline raced; this one lost and changed nothing. */
export class DeployConflictError extends Error {
  override readonly name = 'DeployConflictError';
  readonly code = 'ERR_DEPLOY_CONFLICT';
}

/** An event that cannot be published as given. */
export class InvalidEventError extends Error {
  override readonly name = 'InvalidEventError';
  readonly code = 'ERR_INVALID_EVENT';
}

export interface DeployResult {
  deployment: Deployment;
  /** False when the same code and triggers were deployed already: the version stays. */
  changed: boolean;
}

export interface PublishOptions {
  /** The event's id: a second publish with the same id (within an hour) is dropped. @default a new ULID */
  id?: string;
}

export interface PublishResult {
  id: string;
  /** The event's sequence in the events stream. */
  sequence: number;
  /** True when an event with this id had been published already: nothing new happens. */
  duplicate: boolean;
}

/** What a run reports while it goes: its view after each transition, and every log line. */
export type RunEvent = { type: 'status'; view: RunView } | { type: 'log'; log: LogLine };

/** A run in progress. */
export interface RunHandle {
  readonly id: string;
  /** Live events until the run ends (status views and log lines, in arrival order). */
  events(): AsyncIterable<RunEvent>;
  /** Resolves with the final view once the run succeeded, failed or was cancelled. */
  result(): Promise<RunView>;
  cancel(reason?: string): Promise<void>;
  /** Lets the run's outputs go (unless kept). Called after reading them. */
  release(): Promise<void>;
}

/** A step output mapped from shared memory on this host. */
export interface OpenedTable {
  table: Table;
  /** The mappings the table's buffers are views of. */
  mappings: ArrayBuffer[];
}

/** The client of a Quiver cluster: submits runs, follows them, reads their outputs. */
export class QuiverClient {
  /** Given at connect, else resolved when readOutput first needs it. */
  private clusterSecret: string | null = null;

  private constructor(
    readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    readonly topology: Topology,
    private readonly ownsConnection: boolean,
    private readonly submittedBy: string,
  ) {}

  /** Connects (or wraps an existing connection) and makes sure the streams and buckets exist. */
  static async connect(options: ClientOptions & { nc?: NatsConnection; ownConnection?: boolean } = {}): Promise<QuiverClient> {
    const nc = options.nc ?? (await connectForever(options.natsUrl ?? process.env.QUIVER_NATS_URL ?? 'nats://127.0.0.1:4222'));
    const topology = await ensureTopology(nc, await jetstreamManager(nc), options.topology);
    const owns = options.ownConnection ?? !options.nc;
    const client = new QuiverClient(nc, jetstream(nc), topology, owns, options.submittedBy ?? process.env.USER ?? 'user');
    client.clusterSecret = options.clusterSecret ?? null;
    return client;
  }

  async close(): Promise<void> {
    if (this.ownsConnection) await this.nc.close();
  }

  /**
   * Submits a run: of a loaded pipeline file (its code is stored once per hash), or of the
   * current version of a deployed pipeline, by name.
   */
  /** A run's plan as it would be submitted: the deployed or loaded pipeline on its branch, its scans pinned to today's snapshots. */
  private async prepare(pipeline: LoadedPipeline | string, options: RunOptions, storeCode: boolean): Promise<Pick<RunSubmit, 'plan' | 'codeHash' | 'version' | 'admission'>> {
    let submit: Pick<RunSubmit, 'plan' | 'codeHash' | 'version' | 'admission'>;
    if (typeof pipeline === 'string') {
      const deployed = await this.getDeployment(pipeline);
      if (!deployed) throw new NotDeployedError(await this.notDeployedMessage(pipeline));
      submit = {
        plan: deployed.plan,
        codeHash: deployed.codeHash,
        version: deployed.version,
        admission: { maxConcurrentRuns: deployed.maxConcurrentRuns, overlap: null },
      };
    } else {
      if (storeCode) await this.storeCode(pipeline);
      submit = {
        plan: pipeline.plan,
        codeHash: pipeline.codeHash,
        ...(pipeline.triggers.maxConcurrentRuns ? { admission: { maxConcurrentRuns: pipeline.triggers.maxConcurrentRuns, overlap: null } } : {}),
      };
    }
    // Branch options given to this run win over the pipeline's own.
    const onBranch = { ...(options.branch !== undefined ? { branch: options.branch } : {}), ...(options.transaction !== undefined ? { transaction: options.transaction } : {}) };
    submit = { ...submit, plan: planOnBranch(submit.plan, onBranch) };
    // Stored-table inputs are checked now, so a bad column or filter fails before anything runs.
    submit = { ...submit, plan: await prepareSources(submit.plan, this.nc) };
    return submit;
  }

  async run(pipeline: LoadedPipeline | string, options: RunOptions = {}): Promise<RunHandle> {
    const submit = await this.prepare(pipeline, options, true);
    return this.submit({
      ...submit,
      params: options.params ?? {},
      keep: options.keep ?? false,
      ...(options.cache && options.cache !== 'off' ? { cache: options.cache } : {}),
      submittedBy: this.submittedBy,
      trigger: { kind: 'user', by: this.submittedBy },
    });
  }

  /**
   * What `run` would do, without running anything: the physical plan (system steps, pushed-down
   * columns and filters, pinned snapshots) and, per step, its cache key and whether the cache
   * holds its output now (it would be reused, in a run whose cache mode reads).
   */
  async dryRun(pipeline: LoadedPipeline | string, options: RunOptions = {}): Promise<DryRun> {
    const { plan } = await this.prepare(pipeline, options, false);
    const submit = { plan, params: options.params ?? {}, keep: options.keep ?? false, ...(options.cache && options.cache !== 'off' ? { cache: options.cache } : {}) };
    // Keys as the orchestrator will compute them, each parent's key standing for its completion.
    const keys = plannedCacheKeys(submit);
    // Stages and commits are left out when storage holds the run's tables already.
    const tablesUnchanged = unchangedTables(submit) !== null;
    const steps: DryRun['steps'] = [];
    const live = new Set<string>();
    for await (const key of await this.topology.hosts.keys()) live.add(key);
    for (const step of plan.steps) {
      const key = keys[step.name] ?? null;
      if (step.system?.kind === 'stage' || step.system?.kind === 'commit') {
        steps.push({ step, cacheKey: key, cached: !!key && tablesUnchanged });
        continue;
      }
      const entry = key ? await readCacheEntry(this.topology.cache, key).catch(() => null) : null;
      steps.push({ step, cacheKey: key, cached: !!entry && live.has(entry.executorId) });
    }
    return { plan, steps };
  }

  /**
   * Runs a recorded run again: the same plan (with the same pinned table snapshots), code,
   * deployed version, params and event. With `from`, that step and every step after it are
   * computed again; the steps before it come from the output cache when it holds them.
   * @throws OutputNotFoundError-like errors as {@link RerunError}: an unknown run, a step it does not have, code no longer stored
   */
  async rerun(runId: string, options: RerunOptions = {}): Promise<RunHandle> {
    const record = await readRunRecord(this.topology.runs, runId);
    if (!record) throw new RerunError(`there is no run ${runId} (see \`quiver runs\`)`);
    const old = record.submit;
    if (options.from !== undefined && !old.plan.steps.some((s) => s.name === options.from)) {
      const steps = old.plan.steps.filter((s) => !s.system).map((s) => s.name);
      throw new RerunError(`run ${runId} has no step "${options.from}"; its steps are ${steps.join(', ')}`);
    }
    if (!(await this.topology.code.info(old.codeHash))) {
      throw new RerunError(`the code of run ${runId} is no longer stored: run the pipeline file again instead`);
    }
    const again = rerunOf(old, runId, { ...options, by: this.submittedBy });
    return this.submit({ ...again, plan: await this.pinTableHeadsIfReachable(again.plan) });
  }

  /** The plan with its tables pinned to their current snapshots; unpinned (they are written) when storage cannot be read from here. */
  private async pinTableHeadsIfReachable(plan: Plan): Promise<Plan> {
    if (!plan.steps.some((s) => s.system?.kind === 'stage')) return plan;
    try {
      const store = await tableStoreFromEnv({ nc: this.nc });
      try {
        return await pinTableHeads(plan, store);
      } finally {
        await store.close();
      }
    } catch {
      return plan;
    }
  }

  /** Submits a run and watches it from before it exists, so no early event is missed. */
  private async submit(fields: Omit<RunSubmit, 'type' | 'runId' | 'submittedAt'>): Promise<RunHandle> {
    const runId = ulid();
    const queue = new EventQueue();
    const statusSub = this.nc.subscribe(subjects.status(runId), {
      callback: (_e, msg) => {
        try {
          queue.push({ type: 'status', view: decode(runView, msg.subject, msg.data) });
        } catch {
          // A malformed status is not the run's state; the KV record stays authoritative.
        }
      },
    });
    const logSub = this.nc.subscribe(subjects.log(runId), {
      callback: (_e, msg) => {
        try {
          queue.push({ type: 'log', log: decode(logLine, msg.subject, msg.data) });
        } catch {
          // As above.
        }
      },
    });
    await this.nc.flush();
    await this.publishRetrying(subjects.runSubmit, encodeChecked(runSubmit, { type: 'run.submit', runId, ...fields, submittedAt: Date.now() }), `${runId}.submit`);
    const final = this.waitForEnd(runId, queue, [statusSub, logSub]);
    return {
      id: runId,
      events: () => queue,
      result: () => final,
      cancel: (reason = 'cancelled by the client') => this.cancel(runId, reason),
      release: () => this.release(runId),
    };
  }

  private async storeCode(pipeline: LoadedPipeline): Promise<void> {
    if (!(await this.topology.code.info(pipeline.codeHash))) {
      await this.topology.code.putBlob({ name: pipeline.codeHash }, pipeline.code);
    }
  }

  /**
   * Registers the pipeline with its triggers. Deploying changed code or triggers makes a new
   * version; runs already going keep theirs. Deploying the same again changes nothing.
   */
  async deploy(pipeline: LoadedPipeline): Promise<DeployResult> {
    // Checked now, so a missing table or a bad filter fails the deploy, not every triggered run.
    // Not pinned: each triggered run reads the snapshot current when its scan runs.
    await prepareSources(pipeline.plan, this.nc);
    await this.storeCode(pipeline);
    const name = pipeline.plan.pipeline;
    const kv = this.topology.pipelines;
    const current = await kv.get(name);
    const currentDeployment = current?.operation === 'PUT' ? deploymentSchema.parse(current.json()) : null;
    const spec = { codeHash: pipeline.codeHash, events: pipeline.triggers.events, schedule: pipeline.triggers.schedule, maxConcurrentRuns: pipeline.triggers.maxConcurrentRuns, plan: pipeline.plan };
    if (currentDeployment && sameSpec(currentDeployment, spec)) return { deployment: currentDeployment, changed: false };
    // Versions go on after an undeploy: a version number never names two different things.
    let last = 0;
    for (const key of await this.topology.keys(buckets.pipelines, `${name}.*`)) last = Math.max(last, Number(key.slice(name.length + 2)) || 0);
    const deployment: Deployment = {
      name,
      version: last + 1,
      ...spec,
      plan: pipeline.plan,
      deployedAt: Date.now(),
      deployedBy: this.submittedBy,
    };
    const json = JSON.stringify(deploymentSchema.parse(deployment));
    try {
      await kv.create(`${name}.v${deployment.version}`, json);
      if (current) await kv.update(name, json, current.revision);
      else await kv.create(name, json);
    } catch (error) {
      throw new DeployConflictError(`pipeline ${name} was deployed by someone else at the same time; deploy again (${(error as Error).message})`);
    }
    await this.triggersSeeDeployments();
    return { deployment, changed: true };
  }

  /** Stops the pipeline's triggers and schedule. Runs going on finish; versions stay recorded. */
  async undeploy(name: string): Promise<void> {
    if (!(await this.getDeployment(name))) throw new NotDeployedError(await this.notDeployedMessage(name));
    await this.topology.pipelines.delete(name);
    await this.topology.schedules.delete(name);
    await this.triggersSeeDeployments();
  }

  /**
   * Returns once the leading orchestrator's triggers reflect every deploy and undeploy made so
   * far, so an event published next is matched against them without the leader asking the bucket
   * per event. Without a leader it returns at once (the next one reads every deployment before it
   * takes an event); a leader too slow to answer leaves the event to be matched once its watch
   * delivers the deploy, as before this handshake.
   */
  private async triggersSeeDeployments(): Promise<void> {
    const asked = encodeChecked(deploymentsSeen, { type: 'deployments.seen' });
    await this.nc.request(subjects.deploymentsSeen, asked, { timeout: DEPLOY_SEEN_TIMEOUT_MS }).catch(() => undefined);
  }

  async getDeployment(name: string): Promise<Deployment | null> {
    const entry = await this.topology.pipelines.get(name).catch(() => null);
    return entry?.operation === 'PUT' ? deploymentSchema.parse(entry.json()) : null;
  }

  /** The current version of every deployed pipeline, by name. */
  async listDeployments(): Promise<Deployment[]> {
    const found: Deployment[] = [];
    for (const key of await this.topology.keys(buckets.pipelines, '*')) {
      const d = await this.getDeployment(key);
      if (d) found.push(d);
    }
    return found.sort((a, b) => a.name.localeCompare(b.name));
  }

  private async notDeployedMessage(name: string): Promise<string> {
    const names = (await this.listDeployments()).map((d) => d.name);
    return `pipeline "${name}" is not deployed; ${names.length ? `deployed: ${names.join(', ')}` : 'none is (deploy one with `quiver deploy FILE`)'}`;
  }

  /**
   * Publishes an event: every deployed pipeline whose trigger matches starts one run. JetStream
   * drops a second publish of the same id.
   */
  async publish(subject: string, payload: unknown, options: PublishOptions = {}): Promise<PublishResult> {
    if (!EVENT_SUBJECT_PATTERN.test(subject) || subject.length > 200) {
      throw new InvalidEventError(`event subject "${subject}" must be dot-separated tokens of letters, digits, _ or - (e.g. orders.uploaded)`);
    }
    const id = options.id ?? ulid();
    if (id.length === 0 || id.length > 200) throw new InvalidEventError(`event id must be 1 to 200 characters, got ${id.length}`);
    let data: string;
    try {
      data = JSON.stringify(payload) ?? 'null';
    } catch (error) {
      throw new InvalidEventError(`the payload of ${subject} cannot be sent as JSON: ${(error as Error).message}`);
    }
    // Retried through a stream leader election with the same id: the event is stored once. A
    // retry whose first try had been stored answers `duplicate`, as a second publish would.
    const ack = await this.publishRetrying(subjects.event(subject), data, id);
    return { id, sequence: ack.seq, duplicate: ack.duplicate };
  }

  /** Events that started nothing (schema failures, payloads that are not JSON), oldest first. */
  async deadEvents(options: { limit?: number } = {}): Promise<DeadEvent[]> {
    const jsm = await jetstreamManager(this.nc);
    const { first_seq: first, last_seq: last, messages } = (await jsm.streams.info(streams.dead)).state;
    if (messages === 0) return [];
    const found: DeadEvent[] = [];
    // Read by sequence: a short stream, and no consumer to create or clean up.
    for (let seq = Math.max(first, last - (options.limit ?? 1000) + 1); seq <= last; seq++) {
      const msg = await jsm.streams.getMessage(streams.dead, { seq }).catch(() => null);
      if (!msg) continue;
      try {
        found.push(decode(deadEvent, msg.subject, msg.data));
      } catch {
        // Someone else's message on our subject: not ours to show.
      }
    }
    return found;
  }

  /** Runs as last recorded, newest first. */
  async listRuns(options: { pipeline?: string; limit?: number } = {}): Promise<RunView[]> {
    const keys = [...(await this.topology.keys(buckets.runs))];
    // Run ids are ULIDs: their order is their submission order.
    keys.sort().reverse();
    const views: RunView[] = [];
    for (const key of keys) {
      if (options.limit !== undefined && views.length >= options.limit) break;
      const view = await this.getRun(key).catch(() => null);
      if (view && (!options.pipeline || view.pipeline === options.pipeline)) views.push(view);
    }
    return views;
  }

  /**
   * A run's step logs, as kept in the logs stream (within its limits: 7 days, 256 MiB by
   * default). With `follow`, lines keep coming until the run has ended.
   */
  async *logs(runId: string, options: { follow?: boolean } = {}): AsyncGenerator<LogLine> {
    // One subject, not a list: nats-server 2.9 (Debian's) takes no filter_subjects.
    const consumer = await this.js.consumers.get(streams.logs, { filter_subjects: subjects.log(runId) });
    // No line kept and none to wait for: done at once, not after a fetch's wait.
    if (!options.follow && (await consumer.info()).num_pending === 0) return;
    for (;;) {
      const msg = await consumer.next({ expires: 1000 });
      if (msg) {
        try {
          yield decode(logLine, msg.subject, msg.data);
        } catch {
          // A line that is not a log line (someone else published there) is no line of the run's.
        }
        if (msg.info.pending > 0 || options.follow) continue;
        return;
      }
      // Nothing for a second: done, unless following a run that still goes.
      if (!options.follow) return;
      const view = await this.getRun(runId);
      if (!view || isFinished(view.state)) return;
    }
  }

  async cancel(runId: string, reason = 'cancelled by the client'): Promise<void> {
    await this.publishRetrying(subjects.runCancel, encodeChecked(runCancel, { type: 'run.cancel', runId, reason }), `${runId}.cancel`);
  }

  async release(runId: string): Promise<void> {
    await this.publishRetrying(subjects.runRelease, encodeChecked(runRelease, { type: 'run.release', runId }), `${runId}.release`);
  }

  /**
   * Publishes to a stream, sending again while the stream has no leader (a NATS node died and
   * JetStream is electing another: its API answers "not enabled", no one answers, or the answer
   * times out, for a few seconds). The same id each time: a message stored before its answer was
   * lost is dropped as a duplicate rather than counted twice.
   */
  private async publishRetrying(subject: string, data: Uint8Array | string, msgID: string): Promise<PubAck> {
    const deadline = Date.now() + PUBLISH_RETRY_MS;
    for (;;) {
      try {
        return await this.js.publish(subject, data, { msgID });
      } catch (error) {
        const transient = ['JetStreamNotEnabled', 'TimeoutError', 'NoRespondersError'].includes((error as Error).name);
        if (!transient || Date.now() > deadline) throw error;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  /** The run as recorded now (its record and its steps' completions), or null for an unknown run. */
  getRun(runId: string): Promise<RunView | null> {
    return readRunView(this.topology, runId);
  }

  /**
   * Maps a step output from this host's shared memory, without copying it. The table is valid
   * until the run is released: released segments are reused for later outputs.
   */
  openOutput(descriptor: TableDescriptor): OpenedTable {
    return readInput(descriptor.segments, { dir: `${shmRoot()}/${this.topology.clusterId}` });
  }

  /**
   * A succeeded step's output wherever it lives: mapped from this host's shared memory when it
   * is here (no copy), else read over Arrow Flight from an executor of the host holding it.
   * Outputs stay readable until the run is released (or for good with `keep`).
   */
  async readOutput(runId: string, step: string, options: { accessToken?: string; rootCerts?: Buffer } = {}): Promise<ReadOutput> {
    const view = await this.getRun(runId);
    if (!view) throw new OutputNotFoundError(`no run ${runId}`);
    const facts = view.steps.find((s) => s.name === step);
    if (!facts) throw new OutputNotFoundError(`run ${runId} has no step "${step}"; its steps: ${view.steps.map((s) => s.name).join(', ')}`);
    if (!facts.output) throw new OutputNotFoundError(`step "${step}" of run ${runId} has no output: it is ${facts.state}`);
    if (view.outputsReleased && !view.keep) throw new OutputNotFoundError(`the outputs of run ${runId} were released; run with keep to read them later`);
    try {
      return { table: this.openOutput(facts.output).table, transport: 'shm' };
    } catch {
      // Not on this host: ask the one that has it.
    }
    const host = await findLiveHost(this.topology, facts.output.hostId);
    if (!host) throw new OutputNotFoundError(`step "${step}" of run ${runId} lives on host ${facts.output.hostId}, where no executor runs now`);
    const flight = new FlightClient(host.flightEndpoint, {
      ...(host.bulkEndpoint ? { bulkLocation: host.bulkEndpoint } : {}),
      accessToken: options.accessToken ?? flightAccessToken((this.clusterSecret ??= resolveClusterSecret())),
      ...(options.rootCerts ? { rootCerts: options.rootCerts } : {}),
    });
    try {
      return { table: await flight.readTable(['runs', runId, step]), transport: 'flight' };
    } finally {
      flight.close();
    }
  }

  /**
   * The run ends when its KV record says so: status messages may be missed, the record is not.
   * A watch can fail to start or end early while a NATS node is away (its consumer cannot be
   * made meanwhile): the record is then read directly and the watch opened again.
   */
  private async waitForEnd(runId: string, queue: EventQueue, subs: Subscription[]): Promise<RunView> {
    const finished = (entry: KvEntry | null): RunView | null => {
      if (!entry?.string()) return null;
      const { view } = decode(runRecord, `${entry.bucket}/${entry.key}`, entry.value);
      return view && isFinished(view.state) ? view : null;
    };
    const end = async (view: RunView) => {
      // Status messages published before the final record may still be in flight.
      await this.nc.flush();
      // The final status is published after the record: events() ends with it either way.
      if (!queue.sawFinalStatus) queue.push({ type: 'status', view });
      return view;
    };
    try {
      for (;;) {
        const watch = await this.topology.runs.watch({ key: runId }).catch((error: unknown) => {
          if (this.nc.isClosed()) throw error;
          return null;
        });
        if (watch) {
          try {
            // A watch whose consumer is being made again yields nothing, and may not end either:
            // the record is read between its entries too.
            const entries = watch[Symbol.asyncIterator]();
            let next = entries.next();
            for (;;) {
              const got = await Promise.race([next, new Promise<null>((r) => setTimeout(r, RECORD_POLL_MS, null).unref())]);
              const view = finished(got ? (got.done ? null : got.value) : await this.topology.runs.get(runId).catch(() => null));
              if (view) return await end(view);
              if (got?.done) break;
              if (got) next = entries.next();
            }
          } finally {
            watch.stop();
          }
        }
        if (this.nc.isClosed()) throw new Error(`lost the watch on run ${runId}: the NATS connection is closed`);
        const view = finished(await this.topology.runs.get(runId).catch(() => null));
        if (view) return await end(view);
        await new Promise((r) => setTimeout(r, WATCH_RETRY_MS));
      }
    } finally {
      for (const s of subs) s.unsubscribe();
      queue.end();
    }
  }
}

/** An unbounded async queue: events are kept until read, and reading ends when the run does. */
class EventQueue implements AsyncIterable<RunEvent> {
  private readonly items: RunEvent[] = [];
  private waiting: ((r: IteratorResult<RunEvent>) => void) | null = null;
  private ended = false;
  /** A status of the finished run has been queued. */
  sawFinalStatus = false;

  push(event: RunEvent): void {
    if (this.ended) return;
    if (event.type === 'status' && isFinished(event.view.state)) this.sawFinalStatus = true;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w({ value: event, done: false });
    } else this.items.push(event);
  }

  end(): void {
    this.ended = true;
    if (this.waiting) this.waiting({ value: undefined, done: true });
    this.waiting = null;
  }

  [Symbol.asyncIterator](): AsyncIterator<RunEvent> {
    return {
      next: () => {
        const item = this.items.shift();
        if (item) return Promise.resolve({ value: item, done: false });
        if (this.ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => (this.waiting = resolve));
      },
    };
  }
}

function sameSpec(d: Deployment, spec: Pick<Deployment, 'codeHash' | 'events' | 'schedule' | 'maxConcurrentRuns' | 'plan'>): boolean {
  // The packages too: a range resolving to a newer release is a new version of unchanged code.
  const pick = (x: typeof spec) => JSON.stringify([x.codeHash, x.events, x.schedule, x.maxConcurrentRuns, x.plan.steps.map((s) => s.packages ?? null)]);
  return pick(d) === pick(spec);
}
