import { AckPolicy, DeliverPolicy, DiscardPolicy, RetentionPolicy, type JetStreamClient, type JetStreamManager, type JsMsg, type StreamConfig } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import { Objm, type ObjectStore } from '@nats-io/obj';
import type { NatsConnection } from '@nats-io/transport-node';
import { ulid } from 'ulid';
import { encode } from './codec.ts';
import type { Logger } from './logger.ts';
import { deadEvent } from './messages.ts';

/** Subjects, streams and buckets: the names every Quiver process agrees on. */
export const subjects = {
  runSubmit: 'quiver.run.submit',
  runCancel: 'quiver.run.cancel',
  runRelease: 'quiver.run.release',
  /**
   * A step's claim, as it happens (core NATS, not persisted): for live views only. What a run is
   * driven by are step completions, records in the `quiver-steps` bucket.
   */
  stepStarted: 'quiver.live.started',
  /** Where a step's completion is written: the `quiver-steps` bucket's subject for its key. */
  stepCompletion: (runId: string, step: string) => `$KV.quiver-steps.${runId}.${step}`,
  /** A ready step any executor may take. */
  stepReady: 'quiver.work.ready.any',
  /** A ready step placed on one host (its data is there, or it is pinned there). */
  stepReadyOnHost: (hostId: string) => `quiver.work.ready.host.${hostId}`,
  /** Live log lines of one run (core NATS: real time, not persisted). */
  log: (runId: string) => `quiver.log.${runId}`,
  logAll: 'quiver.log.>',
  /** The run's view after every transition (core NATS). */
  status: (runId: string) => `quiver.status.${runId}`,
  statusAll: 'quiver.status.>',
  /** Segments no step needs any more, for the executors of one host. */
  segmentRelease: (hostId: string) => `quiver.shm.release.${hostId}`,
  /** Kill the step processes of a cancelled run, on every host. */
  runKill: 'quiver.run.kill',
  /**
   * Asked by a client after it deployed or undeployed (core NATS request): the leading
   * orchestrator answers once its triggers reflect the last revision of `quiver-pipelines`, so
   * an event published after the deploy returned is matched against it.
   */
  deploymentsSeen: 'quiver.deployments.seen',
  /** User events: `orders.uploaded` travels as `quiver.events.orders.uploaded`. */
  event: (subject: string) => `quiver.events.${subject}`,
  eventsPrefix: 'quiver.events.',
  /** Events that started nothing, with the reason. */
  deadEvent: 'quiver.dead.events',
  /** Any other message a Quiver process refused or kept failing on, by the stream it came from. */
  deadLetter: (kind: DeadLetterKind) => `quiver.dead.${kind}`,
} as const;

/** Where a dead letter came from: `events` for events, else the stream whose message it was. */
export type DeadLetterKind = 'events' | 'control' | 'work' | 'steps' | 'other';

export const streams = {
  control: 'QUIVER_CONTROL',
  work: 'QUIVER_WORK',
  events: 'QUIVER_EVENTS',
  dead: 'QUIVER_DEAD',
  /** Step logs (`quiver.log.<runId>`), kept for `quiver logs` within their limits. */
  logs: 'QUIVER_LOGS',
} as const;
export const consumers = {
  orchestrator: 'orchestrator',
  /** Work any executor may take. Named apart from the unfiltered `executors` of older clusters, which is removed. */
  executors: 'executors-any',
  triggers: 'triggers',
  /** The orchestrator's reading of step completions, on the stream behind the `quiver-steps` bucket. */
  facts: 'orchestrator-facts',
  /** Work placed on one host: shared by that host's executors (consumer names cannot hold dots). */
  executorsOnHost: (hostId: string) => `executors-host-${hostId.replace(/[^A-Za-z0-9_-]/g, (c) => `_${c.charCodeAt(0).toString(16)}`)}`,
} as const;
export const buckets = {
  runs: 'quiver-runs',
  steps: 'quiver-steps',
  claims: 'quiver-claims',
  meta: 'quiver-meta',
  code: 'quiver-code',
  pipelines: 'quiver-pipelines',
  leases: 'quiver-leases',
  schedules: 'quiver-schedules',
  /** Live executors: host id, Flight endpoint, labels, capacity; entries expire without heartbeats. */
  hosts: 'quiver-hosts',
  /** The output cache's index: a step's cache key → where its output lives (see executor/output-cache.ts). */
  cache: 'quiver-cache',
  /** Packed package environments (`<hash>.tar.gz`), so a host fetches one instead of installing it (executor/environments.ts). */
  envs: 'quiver-envs',
} as const;

/** How long an executor's entry in `quiver-hosts` outlives its last heartbeat. */
export const HOST_TTL_MS = 10_000;

/**
 * Options shared by every process that sets up the topology. Limits apply when a stream or
 * bucket is created; a stream that exists with no limit at all (made by an older Quiver) gets
 * them too. A limit already set is kept: the process that created it chose it.
 */
export interface TopologyOptions {
  /**
   * How long a claimed step may go without an in-progress ack before JetStream hands it to
   * another executor. Executors ack in progress every third of this while a step runs.
   * @default 30_000
   */
  ackWaitMs?: number;
  /** Deliveries of one ready step before it is given up as failed. @default 5 */
  maxDeliver?: number;
  /**
   * Deliveries of a control message, event or step completion the leader keeps failing to
   * handle (retried with a growing delay, up to {@link MAX_RETRY_DELAY_MS}) before it goes to the
   * dead letters. High enough to ride out a NATS restart. @default 20
   */
  messageMaxDeliver?: number;
  /**
   * How long JetStream remembers an event id to drop a second publish of it. Set when the
   * events stream is created. @default 3_600_000 (one hour)
   */
  eventDedupWindowMs?: number;
  /** How long events are kept. @default 7 days */
  eventMaxAgeMs?: number;
  /** Bytes of events kept; the oldest go first. @default 1 GiB */
  eventMaxBytes?: number;
  /**
   * The largest event JetStream accepts; a bigger one is refused to its publisher. Its payload
   * is copied into the run record, which must stay under the NATS payload limit. @default 256 KiB
   */
  eventMaxMessageBytes?: number;
  /** How long run records, step completions and claims are kept. @default 30 days */
  runHistoryTtlMs?: number;
  /** How long dead letters are kept. @default 30 days */
  deadLetterMaxAgeMs?: number;
  /** Dead letters kept; the oldest go first. @default 100_000 */
  deadLetterMaxMessages?: number;
  /** Bytes of dead letters kept; the oldest go first. @default 256 MiB */
  deadLetterMaxBytes?: number;
  /** How long clients' requests and ready steps are kept when nothing takes them. @default 7 days */
  controlMaxAgeMs?: number;
  /** How long step logs are kept for `quiver logs`. @default 7 days */
  logMaxAgeMs?: number;
  /** Bytes of step logs kept; the oldest lines go first. @default 256 MiB */
  logMaxBytes?: number;
  /**
   * Replicas of every stream, bucket and object store Quiver creates; one that exists with fewer
   * is scaled up. @default QUIVER_REPLICAS, else min(3, the servers of the NATS cluster)
   */
  replicas?: number;
}

/** The topology options that are limits: whole numbers with a default each. */
type LimitOptions = Omit<TopologyOptions, 'replicas'>;

export const DEFAULT_ACK_WAIT_MS = 30_000;
export const DEFAULT_MAX_DELIVER = 5;
export const DEFAULT_EVENT_DEDUP_WINDOW_MS = 3_600_000;
const DAY_MS = 24 * 3600 * 1000;

/** Every {@link TopologyOptions} default, in one place. */
export const TOPOLOGY_DEFAULTS: Required<LimitOptions> = {
  ackWaitMs: DEFAULT_ACK_WAIT_MS,
  maxDeliver: DEFAULT_MAX_DELIVER,
  messageMaxDeliver: 20,
  eventDedupWindowMs: DEFAULT_EVENT_DEDUP_WINDOW_MS,
  eventMaxAgeMs: 7 * DAY_MS,
  eventMaxBytes: 1024 ** 3,
  eventMaxMessageBytes: 256 * 1024,
  runHistoryTtlMs: 30 * DAY_MS,
  deadLetterMaxAgeMs: 30 * DAY_MS,
  deadLetterMaxMessages: 100_000,
  deadLetterMaxBytes: 256 * 1024 ** 2,
  controlMaxAgeMs: 7 * DAY_MS,
  logMaxAgeMs: 7 * DAY_MS,
  logMaxBytes: 256 * 1024 ** 2,
};

/** The longest a failing message waits before its next delivery. */
export const MAX_RETRY_DELAY_MS = 30_000;

/** Options with their defaults; throws a TypeError naming an option that is not a positive whole number. */
export function resolveTopologyOptions(options: TopologyOptions = {}): Required<LimitOptions> {
  const resolved = { ...TOPOLOGY_DEFAULTS };
  const { replicas: _replicas, ...limits } = options;
  for (const [key, value] of Object.entries(limits) as [keyof LimitOptions, number | undefined][]) {
    if (value === undefined) continue;
    if (!(key in TOPOLOGY_DEFAULTS)) throw new TypeError(`unknown topology option "${key}"; known: ${Object.keys(TOPOLOGY_DEFAULTS).join(', ')}`);
    if (!Number.isSafeInteger(value) || value < 1) throw new TypeError(`topology option ${key} must be a whole number ≥ 1, got ${value}`);
    resolved[key] = value;
  }
  return resolved;
}

export interface Topology {
  runs: KV;
  steps: KV;
  claims: KV;
  meta: KV;
  /** Deployed pipelines: the current version under its name, each version under `<name>.v<version>`. */
  pipelines: KV;
  /** Leader leases (the orchestrator that drives runs, triggers and schedules). */
  leases: KV;
  /** Per scheduled pipeline: the last tick fired. */
  schedules: KV;
  /** Live executors (see HOST_TTL_MS). */
  hosts: KV;
  /** The output cache's index, by cache key. */
  cache: KV;
  code: ObjectStore;
  /** Packed package environments, by hash (see executor/environments.ts). */
  envs: ObjectStore;
  /** A random id made once per cluster: it namespaces shared memory so clusters never touch each other's segments. */
  clusterId: string;
  ackWaitMs: number;
  maxDeliver: number;
  /** Deliveries of a control message, event or completion before it is dead-lettered (see TopologyOptions). */
  messageMaxDeliver: number;
  /**
   * The keys `bucket` has held that match `filter` (deleted ones too: their readers skip them),
   * each once, from one stream-info request. Use it instead of `kv.keys()`: that creates an
   * ephemeral consumer, which nats-server 2.9 may place on a cluster node that is down (the
   * request then times out, again and again, while the node stays down), and whose listing ends
   * only when it catches up, which a bucket written every second may never let it do.
   */
  keys(bucket: string, filter?: string): Promise<Set<string>>;
}

/** See {@link Topology.keys}. */
export async function bucketKeys(jsm: JetStreamManager, bucket: string, filter = '>'): Promise<Set<string>> {
  const prefix = `$KV.${bucket}.`;
  const info = await jsm.streams.info(`KV_${bucket}`, { subjects_filter: `${prefix}${filter}` });
  return new Set(Object.keys(info.state.subjects ?? {}).map((subject) => subject.slice(prefix.length)));
}

const ms = (n: number) => n * 1_000_000;

/**
 * Creates the streams, consumers and buckets when missing and returns handles to them. Safe to
 * call from every process at start-up: existing ones are kept as they are, except that one an
 * older Quiver made without limits or max_deliver gets them (see TopologyOptions).
 */
export async function ensureTopology(nc: NatsConnection, jsm: JetStreamManager, options: TopologyOptions = {}): Promise<Topology> {
  const o = resolveTopologyOptions(options);
  const replicas = replicasFor(nc, options.replicas);
  await ensureStream(jsm, {
    num_replicas: replicas,
    name: streams.control,
    // Only what clients ask for; step completions live in the quiver-steps bucket.
    subjects: [subjects.runSubmit, subjects.runCancel, subjects.runRelease],
    retention: RetentionPolicy.Limits,
    max_age: ms(o.controlMaxAgeMs),
    duplicate_window: ms(120_000),
  });
  await ensureStream(jsm, {
    num_replicas: replicas,
    name: streams.work,
    subjects: ['quiver.work.>'],
    retention: RetentionPolicy.Workqueue,
    max_age: ms(o.controlMaxAgeMs),
    duplicate_window: ms(120_000),
  });
  await ensureStream(jsm, {
    num_replicas: replicas,
    name: streams.events,
    subjects: ['quiver.events.>'],
    retention: RetentionPolicy.Limits,
    max_age: ms(o.eventMaxAgeMs),
    max_bytes: o.eventMaxBytes,
    max_msg_size: o.eventMaxMessageBytes,
    discard: DiscardPolicy.Old,
    duplicate_window: ms(o.eventDedupWindowMs),
  });
  await ensureStream(jsm, {
    num_replicas: replicas,
    name: streams.logs,
    subjects: ['quiver.log.>'],
    retention: RetentionPolicy.Limits,
    max_age: ms(o.logMaxAgeMs),
    max_bytes: o.logMaxBytes,
    // Full, the oldest lines go: logging never fails for want of room.
    discard: DiscardPolicy.Old,
  });
  await ensureStream(jsm, {
    num_replicas: replicas,
    name: streams.dead,
    subjects: ['quiver.dead.>'],
    retention: RetentionPolicy.Limits,
    max_age: ms(o.deadLetterMaxAgeMs),
    max_msgs: o.deadLetterMaxMessages,
    max_bytes: o.deadLetterMaxBytes,
    // A full dead-letter stream drops its oldest: dead-lettering never fails for want of room.
    discard: DiscardPolicy.Old,
    duplicate_window: ms(120_000),
  });
  // Short ack waits: messages a dead leader had pulled but not handled reach the next leader soon.
  await ensureConsumer(jsm, streams.events, {
    durable_name: consumers.triggers,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: ms(5_000),
    max_deliver: o.messageMaxDeliver,
    max_ack_pending: 1000,
  });
  await ensureConsumer(jsm, streams.control, {
    durable_name: consumers.orchestrator,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: ms(5_000),
    max_deliver: o.messageMaxDeliver,
    max_ack_pending: 1000,
  });
  // A workqueue stream forbids overlapping consumers: the unfiltered one of older clusters must go.
  await jsm.consumers.delete(streams.work, 'executors').catch(() => false);
  await ensureConsumer(jsm, streams.work, {
    durable_name: consumers.executors,
    filter_subject: subjects.stepReady,
    ack_policy: AckPolicy.Explicit,
    ack_wait: ms(o.ackWaitMs),
    max_deliver: o.maxDeliver,
    max_ack_pending: 10_000,
  });
  // The consumer that exists is the truth: whoever created it first chose these.
  const work = await jsm.consumers.info(streams.work, consumers.executors);
  const ackWaitMs = Math.round(work.config.ack_wait! / 1_000_000);
  const maxDeliver = work.config.max_deliver && work.config.max_deliver > 0 ? work.config.max_deliver : o.maxDeliver;
  const kvm = new Kvm(nc);
  const [runs, steps, claims, meta, pipelines, leases, schedules, hosts, cache] = await Promise.all([
    kvm.create(buckets.runs, { history: 1, ttl: o.runHistoryTtlMs, replicas }),
    kvm.create(buckets.steps, { history: 1, ttl: o.runHistoryTtlMs, replicas }),
    kvm.create(buckets.claims, { history: 1, ttl: o.runHistoryTtlMs, replicas }),
    kvm.create(buckets.meta, { history: 1, replicas }),
    kvm.create(buckets.pipelines, { history: 1, replicas }),
    kvm.create(buckets.leases, { history: 1, replicas }),
    kvm.create(buckets.schedules, { history: 1, replicas }),
    kvm.create(buckets.hosts, { history: 1, ttl: HOST_TTL_MS, replicas }),
    // Entries go when their output is evicted; the ttl bounds those of executors that died.
    kvm.create(buckets.cache, { history: 1, ttl: o.runHistoryTtlMs, replicas }),
  ]);
  await ensureConsumer(jsm, `KV_${buckets.steps}`, {
    durable_name: consumers.facts,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.New,
    ack_wait: ms(5_000),
    max_deliver: o.messageMaxDeliver,
    max_ack_pending: 10_000,
  });
  // Buckets an older Quiver made without a ttl (the runs) get the run history's.
  for (const bucket of [buckets.runs, buckets.steps, buckets.claims]) await ensureLimits(jsm, `KV_${bucket}`, { max_age: ms(o.runHistoryTtlMs) });
  const facts = await jsm.consumers.info(`KV_${buckets.steps}`, consumers.facts);
  const messageMaxDeliver = facts.config.max_deliver && facts.config.max_deliver > 0 ? facts.config.max_deliver : o.messageMaxDeliver;
  const code = await new Objm(nc).create(buckets.code, { replicas });
  const envs = await new Objm(nc).create(buckets.envs, { replicas });
  // Buckets and object stores made with fewer replicas (a cluster that grew) are scaled up too.
  for (const name of [...Object.values(buckets).filter((b) => b !== buckets.code && b !== buckets.envs).map((b) => `KV_${b}`), `OBJ_${buckets.code}`, `OBJ_${buckets.envs}`]) {
    await ensureReplicas(jsm, name, replicas);
  }
  const clusterId = await ensureClusterId(meta);
  // Older Quivers kept a generated cluster secret here, where every NATS client could read it.
  if (await meta.get(LEGACY_SECRET_KEY)) await meta.purge(LEGACY_SECRET_KEY);
  return {
    runs, steps, claims, meta, pipelines, leases, schedules, hosts, cache, code, envs, clusterId, ackWaitMs, maxDeliver, messageMaxDeliver,
    keys: (bucket, filter) => bucketKeys(jsm, bucket, filter),
  };
}

/** The consumer of the work placed on `hostId`, made like the shared one. */
export async function ensureHostConsumer(jsm: JetStreamManager, hostId: string, topology: Pick<Topology, 'ackWaitMs' | 'maxDeliver'>): Promise<string> {
  const name = consumers.executorsOnHost(hostId);
  await ensureConsumer(jsm, streams.work, {
    durable_name: name,
    filter_subject: subjects.stepReadyOnHost(hostId),
    ack_policy: AckPolicy.Explicit,
    ack_wait: ms(topology.ackWaitMs),
    max_deliver: topology.maxDeliver,
    max_ack_pending: 10_000,
  });
  return name;
}

const LEGACY_SECRET_KEY = 'cluster.secret';

/** How long the cluster id is tried for: a bucket just made with replicas has no leader for a moment. */
const CLUSTER_ID_WAIT_MS = 15_000;

async function ensureClusterId(meta: KV): Promise<string> {
  const deadline = Date.now() + CLUSTER_ID_WAIT_MS;
  for (;;) {
    let failure: unknown = null;
    try {
      await meta.create('cluster.id', ulid().toLowerCase());
    } catch (error) {
      // Another process made it first (theirs is the one), or the bucket, just made on a
      // cluster, is still electing its leader and neither write nor read answers yet.
      failure = error;
    }
    const id = (await meta.get('cluster.id').catch((error: unknown) => void (failure = error)))?.string();
    if (id) return id;
    if (Date.now() > deadline) throw new Error(`the cluster id in the quiver-meta bucket is missing after creating it: ${(failure as Error | null)?.message ?? 'no entry'}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Gives a stream that has none of these limits ours; a limit already set stays. */
async function ensureLimits(jsm: JetStreamManager, name: string, limits: Pick<Partial<StreamConfig>, 'max_age' | 'max_bytes' | 'max_msgs' | 'max_msg_size'>): Promise<void> {
  const existing = await jsm.streams.info(name);
  const update: Partial<StreamConfig> = {};
  for (const key of ['max_age', 'max_bytes', 'max_msgs', 'max_msg_size'] as const) {
    const have = existing.config[key];
    if (limits[key] !== undefined && (have === undefined || have <= 0)) update[key] = limits[key];
  }
  if (Object.keys(update).length > 0) await jsm.streams.update(name, { ...existing.config, ...update });
}

async function ensureStream(jsm: JetStreamManager, config: Partial<StreamConfig> & { name: string }): Promise<void> {
  let existing;
  try {
    existing = await jsm.streams.info(config.name);
  } catch {
    await jsm.streams.add(config);
    return;
  }
  const update: Partial<StreamConfig> = {};
  // A cluster made by an older Quiver may capture subjects that moved elsewhere.
  const wanted = [...(config.subjects ?? [])].sort();
  if (JSON.stringify([...existing.config.subjects].sort()) !== JSON.stringify(wanted)) update.subjects = wanted;
  if (Object.keys(update).length > 0) await jsm.streams.update(config.name, { ...existing.config, ...update });
  // ...and have no limits at all: it gets ours. A limit someone set stays.
  await ensureLimits(jsm, config.name, config);
  if (config.num_replicas) await ensureReplicas(jsm, config.name, config.num_replicas);
}

/** A topology that cannot be what this Quiver needs; the message says how to migrate. */
export class TopologyError extends Error {
  override readonly name = 'TopologyError';
  constructor(
    readonly code: 'ERR_TOPOLOGY_REPLICAS',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * Replicas of what Quiver creates: `wanted`, else QUIVER_REPLICAS, else min(3, the servers of the
 * cluster the connection is in, as its server announces them).
 */
export function replicasFor(nc: NatsConnection, wanted?: number): number {
  const fromEnv = process.env.QUIVER_REPLICAS;
  const value = wanted ?? (fromEnv !== undefined && fromEnv !== '' ? Number(fromEnv) : undefined);
  if (value !== undefined) {
    if (!Number.isInteger(value) || value < 1 || value > 5) throw new TypeError(`replicas (QUIVER_REPLICAS) must be a whole number from 1 to 5, got ${fromEnv ?? value}`);
    return value;
  }
  const servers = new Set(nc.info?.connect_urls ?? []).size;
  return Math.min(3, Math.max(1, servers));
}

/** Scales a stream (or a bucket's) up to `replicas`; one that has more keeps them. */
async function ensureReplicas(jsm: JetStreamManager, name: string, replicas: number): Promise<void> {
  const existing = await jsm.streams.info(name);
  const have = existing.config.num_replicas ?? 1;
  if (have >= replicas) return;
  try {
    await jsm.streams.update(name, { ...existing.config, num_replicas: replicas });
  } catch (error) {
    throw new TopologyError(
      'ERR_TOPOLOGY_REPLICAS',
      `stream ${name} has ${have} replica(s) and ${replicas} are wanted (QUIVER_REPLICAS or the cluster's size), but JetStream refused to scale it: ${(error as Error).message}. ` +
        `Scale it by hand (\`nats stream edit ${name} --replicas ${replicas}\`), or set QUIVER_REPLICAS=${have} to keep it as it is.`,
      { cause: error },
    );
  }
}

/** Creates the consumer when missing; gives one made by an older Quiver without max_deliver a bound. */
async function ensureConsumer(
  jsm: JetStreamManager,
  stream: string,
  config: Parameters<JetStreamManager['consumers']['add']>[1],
): Promise<void> {
  let existing;
  try {
    existing = await jsm.consumers.info(stream, config.durable_name!);
  } catch {
    await jsm.consumers.add(stream, config);
    return;
  }
  if (config.max_deliver !== undefined && !(existing.config.max_deliver && existing.config.max_deliver > 0)) {
    // A server that cannot edit it keeps the consumer as it is: still working, only unbounded.
    await jsm.consumers.update(stream, config.durable_name!, { max_deliver: config.max_deliver }).catch(() => undefined);
  }
}

/** A message that starts nothing and is not retried, for `deadLetter`. */
export interface DeadLetter {
  /** The subject it arrived on (for events, without the `quiver.events.` prefix). */
  subject: string;
  /** Its id: the event id, the Nats-Msg-Id header, or `<stream>-<sequence>`. */
  id: string;
  /** What was wrong, and what to do. */
  reason: string;
  /** The body as received. */
  payload: Uint8Array | string;
  /** The pipeline it was meant for, when known. */
  pipeline?: string | null;
  at: number;
}

/** Longest reason and payload kept in a dead letter: enough to see what was wrong, never too big to publish. */
const DEAD_REASON_CHARS = 4000;
const DEAD_PAYLOAD_CHARS = 65_536;

/**
 * Publishes a dead letter on `quiver.dead.<kind>` (the `QUIVER_DEAD` stream). Published with a
 * message id made from the message's, so dead-lettering one message twice (a redelivery, two
 * leaders) keeps one letter.
 */
export async function deadLetter(js: JetStreamClient, kind: DeadLetterKind, letter: DeadLetter): Promise<void> {
  const payload = typeof letter.payload === 'string' ? letter.payload : new TextDecoder().decode(letter.payload.subarray(0, DEAD_PAYLOAD_CHARS * 4));
  const pipelineName = letter.pipeline && /^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(letter.pipeline) ? letter.pipeline : null;
  const record = {
    subject: letter.subject.slice(0, 1000),
    eventId: letter.id.slice(0, 1000),
    pipeline: pipelineName,
    reason: letter.reason.slice(0, DEAD_REASON_CHARS),
    payload: payload.slice(0, DEAD_PAYLOAD_CHARS),
    at: letter.at,
  };
  await js.publish(subjects.deadLetter(kind), encode(deadEvent, record), { msgID: `${kind}.${letter.id.slice(0, 200)}.${pipelineName ?? '*'}.dead` });
}

/** The id a dead letter of a JetStream message goes by: its Nats-Msg-Id, else its stream and sequence. */
export function messageId(msg: JsMsg): string {
  return msg.headers?.get('Nats-Msg-Id') || `${msg.info.stream}-${msg.seq}`;
}

/*
 * Both below term without a reason: nats-server before 2.10 does not parse `+TERM <reason>` and
 * delivers the message again after the ack wait, for ever without max_deliver. The reason is in
 * the dead letter and the log instead.
 */

/**
 * What to do with a message whose handling failed: deliver it again later (a growing delay),
 * or, on its last allowed delivery, dead-letter it with the error and stop (term). Never throws;
 * when even the dead letter cannot be published, the message is left to be delivered again.
 */
export async function retryOrDeadLetter(
  msg: JsMsg,
  args: { js: JetStreamClient; kind: DeadLetterKind; maxDeliver: number; error: unknown; logger: Logger; now: number; what: string },
): Promise<void> {
  const deliveries = msg.info.deliveryCount;
  const why = args.error instanceof Error ? args.error.message : String(args.error);
  if (deliveries < args.maxDeliver) {
    msg.nak(Math.min(MAX_RETRY_DELAY_MS, 1000 * 2 ** (deliveries - 1)));
    return;
  }
  const reason = `${args.what} failed on all ${deliveries} deliveries; the last error: ${why}`;
  try {
    await deadLetter(args.js, args.kind, { subject: msg.subject, id: messageId(msg), reason, payload: msg.data, at: args.now });
    args.logger.error(`dead-lettered ${args.what}: ${reason}`);
    msg.term();
  } catch (error) {
    args.logger.error(`could not dead-letter ${args.what} (${(error as Error).message}); it is delivered again`);
    msg.nak(MAX_RETRY_DELAY_MS);
  }
}

/**
 * Refuses a message that can never be handled (not a Quiver message, failing its schema): a
 * dead letter with the reason, then term. Never throws.
 */
export async function refuse(msg: JsMsg, args: { js: JetStreamClient; kind: DeadLetterKind; reason: string; logger: Logger; now: number }): Promise<void> {
  args.logger.warn(`refused ${msg.subject} #${msg.seq}: ${args.reason}`);
  try {
    await deadLetter(args.js, args.kind, { subject: msg.subject, id: messageId(msg), reason: args.reason, payload: msg.data, at: args.now });
  } catch (error) {
    args.logger.error(`could not dead-letter ${msg.subject} #${msg.seq}: ${(error as Error).message}`);
  }
  msg.term();
}
