import { hostname } from 'node:os';
import { jetstream, jetstreamManager, type ConsumerMessages, type JetStreamClient, type JetStreamManager, type JsMsg } from '@nats-io/jetstream';
import { KvWatchInclude, type KvEntry } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { createActor, type Actor } from 'xstate';
import {
  buckets,
  consumers,
  consoleLogger,
  controlMessage,
  deadEvent,
  decode,
  deployment as deploymentSchema,
  encode,
  ensureTopology,
  runKill,
  runSubmit as runSubmitSchema,
  runView,
  segmentRelease,
  stepReady,
  streams,
  subjects,
  type ControlMessage,
  type Deployment,
  type Logger,
  type PlanStep,
  type RunSubmit,
  type StepReady,
  type RunView,
  type Topology,
  type TopologyOptions,
} from '../schemas/index.ts';
import { deterministicUlid, Lease } from './lease.ts';
import { childrenOf, outputSteps, schemaViolation, subjectMatches } from '../planner/index.ts';
import { createRunMachine, runStateOf, stepStatesOf, type RunMachine, type RunSnapshot } from './run-machine.ts';
import { Scheduler } from './scheduler.ts';
import { Dispatcher } from './placement.ts';

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

function addTo(byHost: Map<string, string[]>, hostId: string, segment: string): void {
  byHost.set(hostId, [...(byHost.get(hostId) ?? []), segment]);
}

const SETTLED = new Set(['succeeded', 'failed', 'skipped', 'cancelled']);

/** What the orchestrator keeps per run in the `quiver-runs` bucket, rewritten on every transition. */
interface RunRecord {
  submit: RunSubmit;
  /** The machine's persisted snapshot; null while the run waits in its pipeline's queue. */
  snapshot: unknown;
  view: RunView;
  /** Segments already handed back to their hosts. */
  released: string[];
  /** When the run was admitted, made unique: queued runs start in this order. */
  sequence?: number;
}

interface QueuedRun {
  submit: RunSubmit;
  sequence: number;
}

interface LiveRun {
  submit: RunSubmit;
  actor: Actor<RunMachine>;
  released: Set<string>;
  /** Steps whose ready message this process has sent (re-sent after a restart: JetStream dedupes). */
  dispatched: Set<string>;
  startedAt: number;
  finishedAt: number | null;
  outputsReleased: boolean;
}

/**
 * Drives runs: one xstate machine per run, fed by the control stream (submissions, step events,
 * cancellations), persisted to KV on every transition so that a restarted orchestrator resumes
 * every unfinished run where it stood.
 */
export class Orchestrator {
  private readonly runs = new Map<string, LiveRun>();
  /** Per pipeline, runs waiting for a free place, oldest first. */
  private readonly queues = new Map<string, QueuedRun[]>();
  private readonly deployments = new Map<string, Deployment>();
  private readonly consuming: { messages: ConsumerMessages; loop: Promise<void> }[] = [];
  private deploymentWatch: { stop(): void } | null = null;
  private readonly scheduler: Scheduler;
  private readonly lease: Lease;
  private readonly dispatcher: Dispatcher;
  /** The last revision of the `quiver-pipelines` bucket reflected in `deployments`. */
  private deploymentsRevision = 0;
  private lastAdmission = 0;
  /** Control messages and events are handled one at a time, whichever stream they come from. */
  private handling: Promise<void> = Promise.resolve();

  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    private readonly jsm: JetStreamManager,
    private readonly topology: Topology,
    private readonly logger: Logger,
    private readonly now: () => number,
    options: OrchestratorOptions,
  ) {
    const ttlMs = options.lease?.ttlMs ?? DEFAULT_LEASE_TTL_MS;
    this.dispatcher = new Dispatcher(js, () => jetstreamManager(nc), topology, logger, now);
    this.scheduler = new Scheduler({
      kv: topology.schedules,
      logger,
      now,
      graceMs: options.scheduleGraceMs ?? 2 * ttlMs,
      submit: (deployment, tick) => this.submitScheduled(deployment, tick),
    });
    this.lease = new Lease(topology.leases, LEADER_LEASE, {
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
    const orchestrator = new Orchestrator(nc, jetstream(nc), jsm, topology, options.logger ?? consoleLogger('orchestrator'), options.now ?? Date.now, options);
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
    await this.watchDeployments();
    const control = await this.js.consumers.get(streams.control, consumers.orchestrator);
    const controlMessages = await control.consume({ max_messages: 64 });
    this.consuming.push({ messages: controlMessages, loop: this.consumeLoop(controlMessages, (m) => this.handle(m)) });
    const events = await this.js.consumers.get(streams.events, consumers.triggers);
    const eventMessages = await events.consume({ max_messages: 64 });
    this.consuming.push({ messages: eventMessages, loop: this.consumeLoop(eventMessages, (m) => this.handleEvent(m)) });
    this.scheduler.start();
    this.dispatcher.start();
  }

  /** Lets go of everything a leader holds; the KV records stay for the next leader. */
  private async standBy(): Promise<void> {
    this.dispatcher.stop();
    await this.scheduler.stop();
    this.deploymentWatch?.stop();
    this.deploymentWatch = null;
    const consuming = this.consuming.splice(0);
    await Promise.all(consuming.map((c) => c.messages.close()));
    await Promise.all(consuming.map((c) => c.loop));
    for (const run of this.runs.values()) run.actor.stop();
    this.runs.clear();
    this.queues.clear();
    this.deployments.clear();
    this.deploymentsRevision = 0;
  }

  private async consumeLoop(messages: ConsumerMessages, handle: (msg: JsMsg) => Promise<void>): Promise<void> {
    for await (const msg of messages) {
      const turn = this.handling.then(() => handle(msg));
      this.handling = turn.catch(() => {});
      await turn;
    }
  }

  /** Keeps the deployed pipelines in memory for triggers and the scheduler. */
  private async watchDeployments(): Promise<void> {
    // Watching before reading the current ones: nothing deployed in between is missed. Every key
    // is watched (version keys too) so the revision seen can be compared with the bucket's last.
    const watch = await this.topology.pipelines.watch({ key: '>', include: KvWatchInclude.UpdatesOnly });
    this.deploymentWatch = watch;
    void (async () => {
      for await (const entry of watch) {
        this.deploymentsRevision = Math.max(this.deploymentsRevision, entry.revision);
        if (!entry.key.includes('.')) this.applyDeployment(entry);
      }
    })();
    const lastBeforeReading = await this.pipelinesLastRevision();
    // Only current versions: their keys are the bare names.
    for await (const key of await this.topology.pipelines.keys('*')) {
      const entry = await this.topology.pipelines.get(key);
      if (entry) this.applyDeployment(entry);
    }
    this.deploymentsRevision = Math.max(this.deploymentsRevision, lastBeforeReading);
  }

  private async pipelinesLastRevision(): Promise<number> {
    return (await this.jsm.streams.info(`KV_${buckets.pipelines}`)).state.last_seq;
  }

  /**
   * Waits until the deployments in memory include every deploy made before now: an event
   * published right after its pipeline was deployed must find it, although the deploy reaches
   * this process on another stream.
   */
  private async catchUpWithDeployments(): Promise<void> {
    const last = await this.pipelinesLastRevision();
    const deadline = this.now() + 5_000;
    while (this.deploymentsRevision < last && this.now() < deadline) await new Promise((r) => setTimeout(r, 2));
  }

  private applyDeployment(entry: KvEntry): void {
    if (entry.operation !== 'PUT') {
      this.deployments.delete(entry.key);
      this.scheduler.remove(entry.key);
      return;
    }
    try {
      const d = deploymentSchema.parse(entry.json());
      // The watch and the initial read may deliver one deployment twice, in either order.
      if ((this.deployments.get(d.name)?.version ?? 0) > d.version) return;
      this.deployments.set(d.name, d);
      this.scheduler.set(d);
    } catch (error) {
      this.logger.warn(`deployment ${entry.key} is malformed; ignoring it: ${(error as Error).message}`);
    }
  }

  /** Never throws: a bad message is rejected with its reason and the daemon goes on. */
  private async handle(msg: JsMsg): Promise<void> {
    let message: ControlMessage;
    try {
      message = decode(controlMessage, msg.subject, msg.data);
    } catch (error) {
      this.logger.warn((error as Error).message);
      msg.term((error as Error).message.slice(0, 200));
      return;
    }
    try {
      await this.apply(message);
      msg.ack();
    } catch (error) {
      this.logger.error(`could not apply ${message.type} of run ${message.runId}: ${(error as Error).stack ?? error}`);
      // Transient trouble (KV, publish): let JetStream redeliver; applying twice is harmless.
      msg.nak(1000);
    }
  }

  private async apply(message: ControlMessage): Promise<void> {
    if (message.type === 'run.submit') {
      await this.submit(message);
      return;
    }
    const run = this.runs.get(message.runId);
    if (message.type === 'run.release') {
      await this.releaseOutputs(message.runId, run);
      return;
    }
    if (message.type === 'run.cancel' && !run) {
      await this.cancelQueued(message.runId, message.reason);
      return;
    }
    if (!run) {
      // Events of finished or unknown runs: nothing to drive.
      return;
    }
    run.actor.send(message);
    await this.afterTransition(run);
  }

  /** Persist first, then act: a crash in between re-acts on resume, and every action is idempotent. */
  private async afterTransition(run: LiveRun): Promise<void> {
    const snapshot = run.actor.getSnapshot();
    const state = runStateOf(snapshot);
    if (state !== 'running' && run.finishedAt === null) run.finishedAt = this.now();
    const plan = run.submit.plan;
    const states = stepStatesOf(snapshot);

    const outputs = outputSteps(plan);
    const toRelease = new Map<string, string[]>();
    for (const step of plan.steps) {
      const output = snapshot.context.steps[step.name]?.output;
      if (!output || states[step.name] !== 'succeeded') continue;
      // A segment may go once no child can still map it; run outputs wait for the client.
      const noLongerNeeded = childrenOf(plan, step.name).every((c) => SETTLED.has(states[c]!));
      if (outputs.includes(step.name) || !noLongerNeeded) continue;
      for (const segment of output.segments) {
        if (run.released.has(segment.id)) continue;
        run.released.add(segment.id);
        addTo(toRelease, output.hostId, segment.id);
      }
    }

    const view = this.viewOf(run, snapshot);
    const record: RunRecord = { submit: run.submit, snapshot: run.actor.getPersistedSnapshot(), view, released: [...run.released] };
    await this.topology.runs.put(run.submit.runId, JSON.stringify(record));

    for (const step of plan.steps) {
      if (states[step.name] === 'ready' && !run.dispatched.has(step.name)) {
        await this.dispatch(run, step.name, snapshot);
        run.dispatched.add(step.name);
      }
    }
    this.publishReleases(toRelease);
    if (state === 'cancelled') {
      this.nc.publish(subjects.runKill, encode(runKill, { type: 'run.kill', runId: run.submit.runId }));
    }
    this.nc.publish(subjects.status(run.submit.runId), encode(runView, view));
    if (state !== 'running') {
      this.logger.info(`run ${run.submit.runId} ${state}`);
      run.actor.stop();
      this.runs.delete(run.submit.runId);
      this.dispatcher.forgetRun(run.submit.runId);
      if (run.outputsReleased) await this.releaseOutputs(run.submit.runId, undefined);
      await this.startQueued(run.submit.plan.pipeline);
    }
  }

  private track(submit: RunSubmit, actor: Actor<RunMachine>, released: string[], startedAt: number): LiveRun {
    const run: LiveRun = {
      submit,
      actor,
      released: new Set(released),
      dispatched: new Set(),
      startedAt,
      finishedAt: null,
      // Nobody waits to read the outputs of a run an event or a schedule started.
      outputsReleased: (submit.trigger?.kind ?? 'user') !== 'user',
    };
    actor.start();
    this.runs.set(submit.runId, run);
    return run;
  }

  private queuedRun(runId: string): QueuedRun | undefined {
    for (const queue of this.queues.values()) {
      const found = queue.find((q) => q.submit.runId === runId);
      if (found) return found;
    }
    return undefined;
  }

  /** Admits a run unless it is known: a submission may come twice (redelivery, a second leader). */
  private async submit(submit: RunSubmit): Promise<void> {
    if (this.runs.has(submit.runId) || this.queuedRun(submit.runId) || (await this.topology.runs.get(submit.runId))) return;
    this.logger.info(`run ${submit.runId} of ${submit.plan.pipeline} submitted by ${submit.submittedBy}`);
    // Unique and increasing: the order queued runs keep across leaders.
    this.lastAdmission = Math.max(this.now() * 1000, this.lastAdmission + 1);
    await this.admit(submit, this.lastAdmission);
  }

  /** Starts the run now, queues it behind others, or (overlap: skip) drops its tick. */
  private async admit(submit: RunSubmit, sequence: number): Promise<void> {
    const pipeline = submit.plan.pipeline;
    if (submit.trigger?.kind === 'schedule' && submit.admission?.overlap === 'skip' && this.scheduledRunGoing(pipeline)) {
      this.logger.info(`tick ${new Date(submit.trigger.tick).toISOString()} of ${pipeline} skipped: the previous scheduled run still goes (overlap: skip)`);
      return;
    }
    const queue = this.queues.get(pipeline) ?? [];
    if (queue.length > 0 || !this.hasRoomFor(submit)) {
      queue.push({ submit, sequence });
      this.queues.set(pipeline, queue);
      const view = this.queuedView(submit, 'queued', null);
      await this.topology.runs.put(submit.runId, JSON.stringify({ submit, snapshot: null, view, released: [], sequence } satisfies RunRecord));
      this.nc.publish(subjects.status(submit.runId), encode(runView, view));
      return;
    }
    await this.startRun(submit);
  }

  private scheduledRunGoing(pipeline: string): boolean {
    const scheduled = (s: RunSubmit) => s.plan.pipeline === pipeline && s.trigger?.kind === 'schedule';
    return [...this.runs.values()].some((r) => scheduled(r.submit)) || (this.queues.get(pipeline) ?? []).some((q) => scheduled(q.submit));
  }

  private hasRoomFor(submit: RunSubmit): boolean {
    const pipeline = submit.plan.pipeline;
    const going = [...this.runs.values()].filter((r) => r.submit.plan.pipeline === pipeline);
    const max = submit.admission?.maxConcurrentRuns;
    if (max && going.length >= max) return false;
    if (submit.trigger?.kind === 'schedule' && submit.admission?.overlap === 'queue') {
      return !going.some((r) => r.submit.trigger?.kind === 'schedule');
    }
    return true;
  }

  private async startRun(submit: RunSubmit): Promise<void> {
    const run = this.track(submit, createActor(createRunMachine(submit.plan), { input: { runId: submit.runId } }), [], this.now());
    await this.afterTransition(run);
  }

  /** Starts queued runs of the pipeline, in order, while there is room. */
  private async startQueued(pipeline: string): Promise<void> {
    const queue = this.queues.get(pipeline);
    while (queue && queue.length > 0 && this.hasRoomFor(queue[0]!.submit)) {
      const next = queue.shift()!;
      await this.startRun(next.submit);
    }
    if (queue?.length === 0) this.queues.delete(pipeline);
  }

  private async cancelQueued(runId: string, reason: string): Promise<void> {
    for (const [pipeline, queue] of this.queues) {
      const index = queue.findIndex((q) => q.submit.runId === runId);
      if (index < 0) continue;
      const [{ submit, sequence }] = queue.splice(index, 1) as [QueuedRun];
      if (queue.length === 0) this.queues.delete(pipeline);
      const view = this.queuedView(submit, 'cancelled', this.now());
      this.logger.info(`queued run ${runId} cancelled: ${reason}`);
      await this.topology.runs.put(runId, JSON.stringify({ submit, snapshot: null, view, released: [], sequence } satisfies RunRecord));
      this.nc.publish(subjects.status(runId), encode(runView, view));
      return;
    }
  }

  private queuedView(submit: RunSubmit, state: 'queued' | 'cancelled', finishedAt: number | null): RunView {
    return {
      runId: submit.runId,
      pipeline: submit.plan.pipeline,
      state,
      submittedAt: submit.submittedAt,
      startedAt: null,
      finishedAt,
      keep: submit.keep,
      outputsReleased: false,
      trigger: submit.trigger ?? { kind: 'user', by: submit.submittedBy },
      version: submit.version ?? null,
      outputs: outputSteps(submit.plan),
      steps: submit.plan.steps.map((s) => ({
        name: s.name,
        state: state === 'queued' ? 'waiting' : 'cancelled',
        attempt: 0,
        executorId: null,
        hostId: null,
        startedAt: null,
        finishedAt: null,
        rows: null,
        bytes: null,
        transport: null,
        copiedBytes: null,
        scan: null,
        isolation: null,
        codeStartedAt: null,
        output: null,
        error: null,
      })),
    };
  }

  /** Starts one run per deployed pipeline whose trigger matches the event; never throws. */
  private async handleEvent(msg: JsMsg): Promise<void> {
    const subject = msg.subject.slice(subjects.eventsPrefix.length);
    const eventId = msg.headers?.get('Nats-Msg-Id') || `seq-${msg.seq}`;
    try {
      await this.catchUpWithDeployments();
      const matching = [...this.deployments.values()].flatMap((d) => {
        const trigger = d.events.find((t) => subjectMatches(t.subject, subject));
        return trigger ? [{ deployment: d, trigger }] : [];
      });
      if (matching.length === 0) {
        msg.ack();
        return;
      }
      const text = new TextDecoder().decode(msg.data);
      let payload: unknown;
      try {
        payload = text === '' ? null : JSON.parse(text);
      } catch (error) {
        await this.deadLetter(subject, eventId, null, `the payload is not JSON: ${(error as Error).message}`, text);
        msg.ack();
        return;
      }
      const publishedAt = Math.floor(msg.info.timestampNanos / 1_000_000);
      for (const { deployment, trigger } of matching) {
        const violation = trigger.schema ? schemaViolation(trigger.schema, payload) : null;
        if (violation) {
          await this.deadLetter(subject, eventId, deployment.name, `fails the event schema of pipeline ${deployment.name}: ${violation}`, text);
          continue;
        }
        const runId = deterministicUlid(publishedAt, `event:${eventId}:${deployment.name}`);
        // Admitted here rather than through the control stream: one round trip less per event,
        // and the run id derived from the event keeps a redelivered event from starting twice.
        await this.submit(
          this.submissionOf(deployment, runId, { kind: 'event', subject, eventId, sequence: msg.seq }, `event ${subject}`, {
            subject,
            id: eventId,
            payload,
            publishedAt,
          }),
        );
      }
      msg.ack();
    } catch (error) {
      this.logger.error(`could not handle event ${eventId} on ${subject}: ${(error as Error).stack ?? error}`);
      msg.nak(1000);
    }
  }

  private async deadLetter(subject: string, eventId: string, pipeline: string | null, reason: string, payload: string): Promise<void> {
    this.logger.warn(`event ${eventId} on ${subject} dead-lettered: ${reason}`);
    const dead = { subject, eventId, pipeline, reason: reason.slice(0, 4000), payload: payload.slice(0, 65_536), at: this.now() };
    await this.js.publish(subjects.deadEvent, encode(deadEvent, dead), { msgID: `${eventId}.${pipeline ?? '*'}.dead` });
  }

  /** Through the control stream: the scheduler runs beside the handling of messages, not in it. */
  private async submitScheduled(deployment: Deployment, tick: number): Promise<void> {
    const runId = deterministicUlid(tick, `schedule:${deployment.name}:${tick}`);
    const submit = this.submissionOf(deployment, runId, { kind: 'schedule', tick }, 'schedule');
    await this.js.publish(subjects.runSubmit, encode(runSubmitSchema, submit), { msgID: `${runId}.submit` });
  }

  private submissionOf(
    deployment: Deployment,
    runId: string,
    trigger: NonNullable<RunSubmit['trigger']>,
    submittedBy: string,
    event?: RunSubmit['event'],
  ): RunSubmit {
    return {
      type: 'run.submit',
      runId,
      plan: deployment.plan,
      codeHash: deployment.codeHash,
      params: {},
      keep: false,
      submittedAt: this.now(),
      submittedBy,
      trigger,
      version: deployment.version,
      admission: { maxConcurrentRuns: deployment.maxConcurrentRuns, overlap: deployment.schedule?.overlap ?? null },
      ...(event ? { event } : {}),
    };
  }

  private publishReleases(byHost: Map<string, string[]>): void {
    for (const [hostId, segments] of byHost) {
      this.nc.publish(subjects.segmentRelease(hostId), encode(segmentRelease, { type: 'segments.release', hostId, segments }));
    }
  }

  private async dispatch(run: LiveRun, step: string, snapshot: RunSnapshot): Promise<void> {
    const { message, planStep } = this.readyMessage(run, step, snapshot);
    await this.dispatcher.dispatch(message, planStep);
  }

  private readyMessage(run: LiveRun, step: string, snapshot: RunSnapshot): { message: StepReady; planStep: PlanStep } {
    const planStep = run.submit.plan.steps.find((s) => s.name === step)!;
    const inputs = planStep.inputs.map((i) => {
      const descriptor = snapshot.context.steps[i.step]?.output;
      if (!descriptor) throw new Error(`step ${step} is ready but parent ${i.step} has no output`);
      return { ...i, descriptor };
    });
    const message: StepReady = {
      type: 'step.ready',
      runId: run.submit.runId,
      step,
      pipeline: run.submit.plan.pipeline,
      codeHash: run.submit.codeHash,
      params: run.submit.params,
      inputs,
      ...(run.submit.event ? { event: run.submit.event } : {}),
      ...(planStep.system ? { system: planStep.system } : {}),
      ...(planStep.isolation ? { isolation: planStep.isolation } : {}),
    };
    return { message, planStep };
  }

  /** The client read the result (or gave up): the run's outputs may go, unless it asked to keep them. */
  private async releaseOutputs(runId: string, live: LiveRun | undefined): Promise<void> {
    if (live) {
      // Still running: release when it finishes.
      live.outputsReleased = true;
      return;
    }
    const entry = await this.topology.runs.get(runId);
    if (!entry) return;
    const record = entry.json<RunRecord>();
    if (record.view.outputsReleased) return;
    record.view.outputsReleased = true;
    const byHost = new Map<string, string[]>();
    if (!record.submit.keep) {
      for (const step of record.view.steps) {
        if (!step.output || !record.view.outputs.includes(step.name)) continue;
        for (const s of step.output.segments) {
          record.released.push(s.id);
          addTo(byHost, step.output.hostId, s.id);
        }
      }
    }
    await this.topology.runs.put(runId, JSON.stringify(record));
    this.publishReleases(byHost);
  }

  private viewOf(run: LiveRun, snapshot: RunSnapshot): RunView {
    const states = stepStatesOf(snapshot);
    return {
      runId: run.submit.runId,
      pipeline: run.submit.plan.pipeline,
      state: runStateOf(snapshot),
      submittedAt: run.submit.submittedAt,
      startedAt: run.startedAt,
      finishedAt: run.finishedAt,
      keep: run.submit.keep,
      outputsReleased: false,
      trigger: run.submit.trigger ?? { kind: 'user', by: run.submit.submittedBy },
      version: run.submit.version ?? null,
      outputs: outputSteps(run.submit.plan),
      steps: run.submit.plan.steps.map((s) => {
        const facts = snapshot.context.steps[s.name]!;
        return {
          name: s.name,
          state: states[s.name]!,
          attempt: facts.attempt,
          executorId: facts.executorId,
          hostId: facts.hostId,
          startedAt: facts.startedAt,
          finishedAt: facts.finishedAt,
          rows: facts.output?.rows ?? null,
          bytes: facts.output?.byteSize ?? null,
          transport: facts.transport,
          copiedBytes: facts.copiedBytes,
          scan: facts.scan ?? null,
          isolation: facts.isolation ?? null,
          codeStartedAt: facts.codeStartedAt ?? null,
          output: facts.output,
          error: facts.error,
        };
      }),
    };
  }

  /** Rebuilds the machine of every unfinished run from its persisted snapshot, and the queues. */
  private async resume(): Promise<void> {
    // A key listing can name a key twice when it changes meanwhile: each run is resumed once.
    const keys = new Set<string>();
    for await (const key of await this.topology.runs.keys()) keys.add(key);
    const queued: QueuedRun[] = [];
    for (const key of keys) {
      const entry = await this.topology.runs.get(key);
      if (!entry) continue;
      let record: RunRecord;
      try {
        record = entry.json<RunRecord>();
      } catch {
        this.logger.warn(`run record ${key} is not JSON; leaving it alone`);
        continue;
      }
      if (record.view.state === 'queued') {
        queued.push({ submit: record.submit, sequence: record.sequence ?? 0 });
        continue;
      }
      if (record.view.state !== 'running') continue;
      const actor = createActor(createRunMachine(record.submit.plan), { snapshot: record.snapshot as never, input: { runId: key } });
      const run = this.track(record.submit, actor, record.released, record.view.startedAt ?? record.view.submittedAt);
      run.outputsReleased ||= record.view.outputsReleased;
      // Where running steps run lived only in the old leader's memory: a host that dies now must
      // still have its steps placed again.
      const snapshot = actor.getSnapshot();
      const states = stepStatesOf(snapshot);
      for (const step of record.submit.plan.steps) {
        const hostId = snapshot.context.steps[step.name]?.hostId;
        if (states[step.name] !== 'running' || !hostId) continue;
        const { message, planStep } = this.readyMessage(run, step.name, snapshot);
        // Only work placed on a host's own queue strands there; the shared queue redelivers.
        const placedOnHost = planStep.host !== undefined || message.inputs.some((i) => i.descriptor.hostId === hostId);
        if (placedOnHost) this.dispatcher.remember(message, planStep, hostId);
      }
      this.logger.info(`resumed run ${key} of ${record.submit.plan.pipeline}`);
      await this.afterTransition(run);
    }
    queued.sort((a, b) => a.sequence - b.sequence);
    for (const q of queued) {
      const queue = this.queues.get(q.submit.plan.pipeline) ?? [];
      queue.push(q);
      this.queues.set(q.submit.plan.pipeline, queue);
    }
    for (const pipeline of [...this.queues.keys()]) await this.startQueued(pipeline);
  }
}

