import { AckPolicy, DeliverPolicy, RetentionPolicy, type JetStreamManager } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import { Objm, type ObjectStore } from '@nats-io/obj';
import type { NatsConnection } from '@nats-io/transport-node';
import { ulid } from 'ulid';

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
  /** User events: `orders.uploaded` travels as `quiver.events.orders.uploaded`. */
  event: (subject: string) => `quiver.events.${subject}`,
  eventsPrefix: 'quiver.events.',
  /** Events that started nothing, with the reason. */
  deadEvent: 'quiver.dead.events',
} as const;

export const streams = {
  control: 'QUIVER_CONTROL',
  work: 'QUIVER_WORK',
  events: 'QUIVER_EVENTS',
  dead: 'QUIVER_DEAD',
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
} as const;

/** How long an executor's entry in `quiver-hosts` outlives its last heartbeat. */
export const HOST_TTL_MS = 10_000;

/** Options shared by every process that sets up the topology. */
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
   * How long JetStream remembers an event id to drop a second publish of it. Set when the
   * events stream is created. @default 3_600_000 (one hour)
   */
  eventDedupWindowMs?: number;
}

export const DEFAULT_ACK_WAIT_MS = 30_000;
export const DEFAULT_MAX_DELIVER = 5;
export const DEFAULT_EVENT_DEDUP_WINDOW_MS = 3_600_000;

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
  code: ObjectStore;
  /** A random id made once per cluster: it namespaces shared memory so clusters never touch each other's segments. */
  clusterId: string;
  ackWaitMs: number;
  maxDeliver: number;
}

const ms = (n: number) => n * 1_000_000;

/**
 * Creates the streams, consumers and buckets when missing and returns handles to them. Safe to
 * call from every process at start-up: existing ones are kept as they are.
 */
export async function ensureTopology(nc: NatsConnection, jsm: JetStreamManager, options: TopologyOptions = {}): Promise<Topology> {
  const wantedAckWaitMs = options.ackWaitMs ?? DEFAULT_ACK_WAIT_MS;
  const wantedMaxDeliver = options.maxDeliver ?? DEFAULT_MAX_DELIVER;
  await ensureStream(jsm, {
    name: streams.control,
    // Only what clients ask for; step completions live in the quiver-steps bucket.
    subjects: [subjects.runSubmit, subjects.runCancel, subjects.runRelease],
    retention: RetentionPolicy.Limits,
    max_age: ms(7 * 24 * 3600 * 1000),
    duplicate_window: ms(120_000),
  });
  await ensureStream(jsm, {
    name: streams.work,
    subjects: ['quiver.work.>'],
    retention: RetentionPolicy.Workqueue,
    duplicate_window: ms(120_000),
  });
  await ensureStream(jsm, {
    name: streams.events,
    subjects: ['quiver.events.>'],
    retention: RetentionPolicy.Limits,
    max_age: ms(7 * 24 * 3600 * 1000),
    duplicate_window: ms(options.eventDedupWindowMs ?? DEFAULT_EVENT_DEDUP_WINDOW_MS),
  });
  await ensureStream(jsm, {
    name: streams.dead,
    subjects: ['quiver.dead.>'],
    retention: RetentionPolicy.Limits,
    max_age: ms(30 * 24 * 3600 * 1000),
  });
  // Short ack waits: messages a dead leader had pulled but not handled reach the next leader soon.
  await ensureConsumer(jsm, streams.events, {
    durable_name: consumers.triggers,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: ms(5_000),
    max_ack_pending: 1000,
  });
  await ensureConsumer(jsm, streams.control, {
    durable_name: consumers.orchestrator,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: ms(5_000),
    max_ack_pending: 1000,
  });
  // A workqueue stream forbids overlapping consumers: the unfiltered one of older clusters must go.
  await jsm.consumers.delete(streams.work, 'executors').catch(() => false);
  await ensureConsumer(jsm, streams.work, {
    durable_name: consumers.executors,
    filter_subject: subjects.stepReady,
    ack_policy: AckPolicy.Explicit,
    ack_wait: ms(wantedAckWaitMs),
    max_deliver: wantedMaxDeliver,
    max_ack_pending: 10_000,
  });
  // The consumer that exists is the truth: whoever created it first chose these.
  const work = await jsm.consumers.info(streams.work, consumers.executors);
  const ackWaitMs = Math.round(work.config.ack_wait! / 1_000_000);
  const maxDeliver = work.config.max_deliver ?? wantedMaxDeliver;
  const kvm = new Kvm(nc);
  const [runs, steps, claims, meta, pipelines, leases, schedules, hosts] = await Promise.all([
    kvm.create(buckets.runs, { history: 1 }),
    kvm.create(buckets.steps, { history: 1, ttl: 7 * 24 * 3600 * 1000 }),
    kvm.create(buckets.claims, { history: 1, ttl: 7 * 24 * 3600 * 1000 }),
    kvm.create(buckets.meta, { history: 1 }),
    kvm.create(buckets.pipelines, { history: 1 }),
    kvm.create(buckets.leases, { history: 1 }),
    kvm.create(buckets.schedules, { history: 1 }),
    kvm.create(buckets.hosts, { history: 1, ttl: HOST_TTL_MS }),
  ]);
  await ensureConsumer(jsm, `KV_${buckets.steps}`, {
    durable_name: consumers.facts,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.New,
    ack_wait: ms(5_000),
    max_ack_pending: 10_000,
  });
  const code = await new Objm(nc).create(buckets.code);
  const clusterId = await ensureClusterId(meta);
  return { runs, steps, claims, meta, pipelines, leases, schedules, hosts, code, clusterId, ackWaitMs, maxDeliver };
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

async function ensureClusterId(meta: KV): Promise<string> {
  try {
    await meta.create('cluster.id', ulid().toLowerCase());
  } catch {
    // Another process made it first: theirs is the one.
  }
  const entry = await meta.get('cluster.id');
  const id = entry?.string();
  if (!id) throw new Error('the cluster id in the quiver-meta bucket is missing after creating it');
  return id;
}

async function ensureStream(jsm: JetStreamManager, config: Parameters<JetStreamManager['streams']['add']>[0]): Promise<void> {
  let existing;
  try {
    existing = await jsm.streams.info(config.name!);
  } catch {
    await jsm.streams.add(config);
    return;
  }
  // A cluster made by an older Quiver may capture subjects that moved elsewhere.
  const wanted = [...(config.subjects ?? [])].sort();
  if (JSON.stringify([...existing.config.subjects].sort()) !== JSON.stringify(wanted)) {
    await jsm.streams.update(config.name!, { ...existing.config, subjects: wanted });
  }
}

async function ensureConsumer(
  jsm: JetStreamManager,
  stream: string,
  config: Parameters<JetStreamManager['consumers']['add']>[1],
): Promise<void> {
  try {
    await jsm.consumers.info(stream, config.durable_name!);
  } catch {
    await jsm.consumers.add(stream, config);
  }
}
