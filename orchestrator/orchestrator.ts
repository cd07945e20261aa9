import { hostname } from 'node:os';
import { jetstream, jetstreamManager, type ConsumerMessages, type JetStreamClient, type JetStreamManager, type JsMsg } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import {
  buckets,
  consumers,
  consoleLogger,
  controlMessage,
  decode,
  deploymentsSeen,
  encode,
  ensureTopology,
  refuse,
  retryOrDeadLetter,
  stepCompletion,
  stepStarted,
  streams,
  subjects,
  type ControlMessage,
  type Deployment,
  type Logger,
  type Topology,
  type TopologyOptions,
} from '../schemas/index.ts';
import { Admission, deployedRun } from './admission.ts';
import { EventTriggers } from './event-triggers.ts';
import { MaxDeliveriesWatch } from './dead-letters.ts';
import type { Lane } from './lane.ts';
import { deterministicUlid, Lease } from './lease.ts';
import { CachedOutputs } from './cached-outputs.ts';
import { Dispatcher } from './placement.ts';
import { addTo, publishReleases, Runs } from './runs.ts';
import { RunStore } from './run-store.ts';
import { Scheduler } from './scheduler.ts';

/** Options for {@link Orchestrator.start}. */
export interface OrchestratorOptions {
  topology?: TopologyOptions;
  /** @default console, prefixed "orchestrator" */
  logger?: Logger;
  /** The clock for run start and finish times, leases and schedules. @default Date.now */
  now?: () => number;
  /**
   * One orchestrator leads at a time; others stand by and take over when its lease lapses.
   * @default { ttlMs: 5_000 }
   */
  lease?: { ttlMs?: number };
  /** A tick this late is still on time (not subject to catchUp). @default twice the lease ttl */
  scheduleGraceMs?: number;
  /** Shown in the lease and logs. @default `<hostname>:<pid>` */
  id?: string;
}

export const DEFAULT_LEASE_TTL_MS = 5_000;
const LEADER_LEASE = 'orchestrator';
/** Messages a consumer buffers ahead of the one being handled. */
const PREFETCH = 256;
/**
 * How long one pull waits. Its heartbeats come every half of it, and a pull lost with a stream
 * leader that died is noticed when they stop: nats.js' 30 s default left requests, events and
 * completions unread for up to that long after a NATS node was lost.
 */
const PULL_EXPIRES_MS = 5_000;

/**
 * Leads or stands by. The leader takes up every unfinished run, then handles, one at a time and
 * in the order they arrive: clients' requests (control stream), step completions (the stream
 * behind the `quiver-steps` bucket), events, schedule ticks and live step starts; a handler that
 * waits for a run record's write lets the next one start meanwhile (lane.ts). The state
 * each part owns lives apart: {@link Admission} (queues), {@link EventTriggers} (deployments),
 * {@link Runs} (machines) and {@link RunStore} (run records).
 */
export class Orchestrator {
  private readonly consuming: { messages: ConsumerMessages; loop: Promise<void> }[] = [];
  /** What the leader listens to on core NATS: live step starts, and clients asking whether it has seen their deploy. */
  private leaderSubscriptions: Subscription[] = [];
  private readonly scheduler: Scheduler;
  private readonly lease: Lease;
  private readonly dispatcher: Dispatcher;
  private readonly store: RunStore;
  private readonly runs: Runs;
  private readonly admission: Admission;
  private readonly triggers: EventTriggers;
  private readonly maxDeliveries: MaxDeliveriesWatch;
  /** Everything is handled one at a time, whichever stream or timer it comes from. */
  private handling: Promise<void> = Promise.resolve();
  /** Handling not finished yet, whether it holds the lane or let go of it. */
  private readonly detached = new Set<Promise<void>>();

  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    jsm: JetStreamManager,
    private readonly topology: Topology,
    private readonly logger: Logger,
    private readonly now: () => number,
    leases: KV,
    options: OrchestratorOptions,
  ) {
    const ttlMs = options.lease?.ttlMs ?? DEFAULT_LEASE_TTL_MS;
    this.dispatcher = new Dispatcher(js, () => jetstreamManager(nc), topology, logger, now);
    this.store = new RunStore(topology, logger);
    const cachedOutputs = new CachedOutputs({ kv: topology, liveHosts: () => this.dispatcher.liveHosts(), logger, now });
    this.runs = new Runs({ store: this.store, dispatcher: this.dispatcher, nc, logger, now, cachedOutputs, onEnded: (pipeline) => this.admission.startQueued(pipeline) });
    this.admission = new Admission({ store: this.store, runs: this.runs, nc, logger, now });
    this.scheduler = new Scheduler({
      kv: topology.schedules,
      logger,
      now,
      graceMs: options.scheduleGraceMs ?? 2 * ttlMs,
      submit: (deployment, tick) => this.serially((lane) => this.admitTick(deployment, tick, lane)),
    });
    this.triggers = new EventTriggers({
      topology,
      js,
      jsm,
      logger,
      now,
      admit: (submit, lane) => this.admission.admit(submit, lane),
      onDeployment: (name, deployment) => (deployment ? this.scheduler.set(deployment) : this.scheduler.remove(name)),
    });
    this.maxDeliveries = new MaxDeliveriesWatch({ nc, js, jsm, logger, now });
    this.lease = new Lease(leases, LEADER_LEASE, {
      holder: options.id ?? `${hostname()}:${process.pid}`,
      ttlMs,
      logger,
      now,
      onAcquired: () => this.lead(),
      onLost: () => this.standBy(),
    });
  }

  /**
   * Starts an orchestrator. It leads at once when no other does (it has resumed every unfinished
   * run when this resolves); otherwise it stands by and takes over when the leader's lease lapses.
   */
  static async start(nc: NatsConnection, options: OrchestratorOptions = {}): Promise<Orchestrator> {
    const jsm = await jetstreamManager(nc);
    const topology = await ensureTopology(nc, jsm, options.topology);
    // Renewals answer within a third of the ttl or count as failed, so a slow or restarting NATS
    // leaves time for another try before the lease runs out.
    const ttlMs = options.lease?.ttlMs ?? DEFAULT_LEASE_TTL_MS;
    const leases = await new Kvm(jetstream(nc, { timeout: Math.max(250, Math.floor(ttlMs / 3)) })).open(buckets.leases);
    const orchestrator = new Orchestrator(nc, jetstream(nc), jsm, topology, options.logger ?? consoleLogger('orchestrator'), options.now ?? Date.now, leases, options);
    await orchestrator.lease.start();
    return orchestrator;
  }

  get isLeader(): boolean {
    return this.lease.isLeader;
  }

  async stop(): Promise<void> {
    await this.lease.stop();
  }

  private async lead(): Promise<void> {
    await this.resume();
    await this.triggers.start();
    const liveStarts = this.nc.subscribe(subjects.stepStarted, {
      callback: (error, msg) => {
        if (error) return;
        try {
          const started = decode(stepStarted, msg.subject, msg.data);
          void this.serially((lane) => this.runs.apply(started, lane));
        } catch (e) {
          this.logger.warn((e as Error).message);
        }
      },
    });
    const deploysSeen = this.nc.subscribe(subjects.deploymentsSeen, {
      callback: (error, msg) => {
        if (error) return;
        try {
          decode(deploymentsSeen, msg.subject, msg.data);
        } catch (e) {
          this.logger.warn((e as Error).message);
          return;
        }
        this.triggers.reflect().then(
          (revision) => msg.respond(encode(deploymentsSeen, { type: 'deployments.seen', revision })),
          (e: unknown) => this.logger.warn(`could not tell a client its deploy was seen: ${(e as Error).message}`),
        );
      },
    });
    this.leaderSubscriptions = [liveStarts, deploysSeen];
    await this.consume(streams.control, consumers.orchestrator, (msg, _arrivedAt, lane) => this.handleControl(msg, lane));
    await this.consume(`KV_${buckets.steps}`, consumers.facts, (msg, _arrivedAt, lane) => this.handleCompletion(msg, lane));
    await this.consume(streams.events, consumers.triggers, (msg, arrivedAt, lane) => this.triggers.handle(msg, arrivedAt, lane));
    this.scheduler.start();
    this.dispatcher.start();
    this.maxDeliveries.start();
  }

  /** Lets go of everything a leader holds; the KV records stay for the next leader. */
  private async standBy(): Promise<void> {
    this.dispatcher.stop();
    await this.maxDeliveries.stop();
    await this.scheduler.stop();
    this.triggers.stop();
    for (const subscription of this.leaderSubscriptions.splice(0)) subscription.unsubscribe();
    const consuming = this.consuming.splice(0);
    await Promise.all(consuming.map((c) => c.messages.close()));
    await Promise.all(consuming.map((c) => c.loop));
    await this.handling;
    await Promise.all(this.detached);
    this.runs.stopAll();
    this.admission.clear();
  }

  /**
   * Runs `work` after everything handed in before it has run or let go of the lane (see lane.ts);
   * its failure is its caller's, never the chain's.
   */
  private serially(work: (lane: Lane) => Promise<unknown>): Promise<void> {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const turn = this.handling.then(() => work({ release }));
    const settled = turn.then(
      () => undefined,
      () => undefined,
    );
    this.handling = Promise.race([released, settled]);
    // Work that let go of its lane is still the leader's: stepping down waits for it.
    this.detached.add(settled);
    void settled.then(() => this.detached.delete(settled));
    return turn.then(() => undefined);
  }

  /**
   * Hands each message to `handle` in arrival order without waiting for the one before to be
   * handled: the next ones arrive meanwhile, so an event can tell it came before a catch-up.
   */
  private async consume(stream: string, consumer: string, handle: (msg: JsMsg, arrivedAt: number, lane: Lane) => Promise<void>): Promise<void> {
    const messages = await (await this.js.consumers.get(stream, consumer)).consume({ max_messages: PREFETCH, expires: PULL_EXPIRES_MS });
    const loop = (async () => {
      for await (const msg of messages) {
        const arrivedAt = performance.now();
        void this.serially((lane) => handle(msg, arrivedAt, lane));
      }
    })();
    this.consuming.push({ messages, loop });
  }

  /** Never throws: a bad message is rejected with its reason and the daemon goes on. */
  private async handleControl(msg: JsMsg, lane: Lane): Promise<void> {
    let message: ControlMessage;
    try {
      message = decode(controlMessage, msg.subject, msg.data);
    } catch (error) {
      await refuse(msg, { js: this.js, kind: 'control', reason: (error as Error).message, logger: this.logger, now: this.now() });
      return;
    }
    try {
      await this.applyControl(message, lane);
      msg.ack();
    } catch (error) {
      this.logger.error(`could not apply ${message.type} of run ${message.runId}: ${(error as Error).stack ?? error}`);
      // Transient trouble (KV, publish): let JetStream redeliver; applying twice is harmless.
      await retryOrDeadLetter(msg, { js: this.js, kind: 'control', maxDeliver: this.topology.messageMaxDeliver, error, logger: this.logger, now: this.now(), what: `${message.type} of run ${message.runId}` });
    }
  }

  private async applyControl(message: ControlMessage, lane: Lane): Promise<void> {
    switch (message.type) {
      case 'run.submit':
        return this.admission.admit(message, lane);
      case 'run.release':
        return this.releaseOutputs(message.runId);
      case 'run.cancel':
        if (!(await this.runs.apply(message, lane))) await this.admission.cancel(message.runId, message.reason);
        return;
    }
  }

  /** A step's completion, as an executor recorded it in `quiver-steps`. Never throws. */
  private async handleCompletion(msg: JsMsg, lane: Lane): Promise<void> {
    // Deletes and purges of the bucket (its ttl) carry no completion.
    if (msg.data.length === 0 || msg.headers?.get('KV-Operation')) {
      msg.ack();
      return;
    }
    let completion;
    try {
      completion = decode(stepCompletion, msg.subject, msg.data);
    } catch (error) {
      await refuse(msg, { js: this.js, kind: 'steps', reason: (error as Error).message, logger: this.logger, now: this.now() });
      return;
    }
    try {
      await this.runs.apply(completion, lane);
      msg.ack();
    } catch (error) {
      this.logger.error(`could not apply ${completion.type} of ${completion.step} in run ${completion.runId}: ${(error as Error).stack ?? error}`);
      await retryOrDeadLetter(msg, { js: this.js, kind: 'steps', maxDeliver: this.topology.messageMaxDeliver, error, logger: this.logger, now: this.now(), what: `${completion.type} of ${completion.step} in run ${completion.runId}` });
    }
  }

  /** Admitted like any other run; the run id derived from the tick makes a tick fired twice start once. */
  private async admitTick(deployment: Deployment, tick: number, lane: Lane): Promise<void> {
    const runId = deterministicUlid(tick, `schedule:${deployment.name}:${tick}`);
    await this.admission.admit(deployedRun(deployment, runId, { kind: 'schedule', tick }, 'schedule', this.now()), lane);
  }

  /** The client read the result (or gave up): the run's outputs may go, unless it asked to keep them. */
  private async releaseOutputs(runId: string): Promise<void> {
    // Still running: released when it ends. Ending: asked again once its end is written (or not).
    let marked = this.runs.markOutputsReleased(runId);
    while (typeof marked === 'object') {
      await marked.ending;
      marked = this.runs.markOutputsReleased(runId);
    }
    if (marked) return;
    const record = await this.store.read(runId);
    if (!record || record.outputsReleased || record.state === 'running') return;
    record.outputsReleased = true;
    const byHost = new Map<string, string[]>();
    if (!record.submit.keep && record.view) {
      for (const step of record.view.steps) {
        if (!step.output || !record.view.outputs.includes(step.name)) continue;
        for (const segment of step.output.segments) addTo(byHost, step.output.hostId, segment.id);
      }
    }
    await this.store.put(record);
    publishReleases(this.nc, byHost);
  }

  /** Takes up every unfinished run from its record and its steps' facts, and the queues. */
  private async resume(): Promise<void> {
    const unfinished = await this.store.unfinished();
    for (const record of unfinished.filter((r) => r.state === 'running')) {
      await this.runs.resume(record, await this.store.facts(record.submit.plan, record.submit.runId));
    }
    await this.admission.restore(unfinished.filter((r) => r.state === 'queued'));
  }
}
