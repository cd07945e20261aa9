import { jetstream, jetstreamManager, type ConsumerMessages, type JetStreamClient, type JsMsg } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import { createActor, type Actor } from 'xstate';
import {
  consumers,
  consoleLogger,
  controlMessage,
  decode,
  encode,
  ensureTopology,
  runKill,
  runView,
  segmentRelease,
  stepReady,
  streams,
  subjects,
  type ControlMessage,
  type Logger,
  type RunSubmit,
  type StepReady,
  type RunView,
  type Topology,
  type TopologyOptions,
} from '../schemas/index.ts';
import { childrenOf, outputSteps } from './plan.ts';
import { createRunMachine, runStateOf, stepStatesOf, type RunMachine, type RunSnapshot } from './run-machine.ts';

/** Options for {@link Orchestrator.start}. */
export interface OrchestratorOptions {
  topology?: TopologyOptions;
  /** @default console, prefixed "orchestrator" */
  logger?: Logger;
  /** The clock for run start and finish times. @default Date.now */
  now?: () => number;
}

function addTo(byHost: Map<string, string[]>, hostId: string, segment: string): void {
  byHost.set(hostId, [...(byHost.get(hostId) ?? []), segment]);
}

const SETTLED = new Set(['succeeded', 'failed', 'skipped', 'cancelled']);

/** What the orchestrator keeps per run in the `quiver-runs` bucket, rewritten on every transition. */
interface RunRecord {
  submit: RunSubmit;
  snapshot: unknown;
  view: RunView;
  /** Segments already handed back to their hosts. */
  released: string[];
}

interface LiveRun {
  submit: RunSubmit;
  actor: Actor<RunMachine>;
  released: Set<string>;
  /** Steps whose ready message this process has sent (re-sent after a restart: JetStream dedupes). */
  dispatched: Set<string>;
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
  private messages: ConsumerMessages | null = null;
  private loop: Promise<void> | null = null;

  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    private readonly topology: Topology,
    private readonly logger: Logger,
    private readonly now: () => number,
  ) {}

  static async start(nc: NatsConnection, options: OrchestratorOptions = {}): Promise<Orchestrator> {
    const jsm = await jetstreamManager(nc);
    const topology = await ensureTopology(nc, jsm, options.topology);
    const orchestrator = new Orchestrator(nc, jetstream(nc), topology, options.logger ?? consoleLogger('orchestrator'), options.now ?? Date.now);
    await orchestrator.resume();
    const consumer = await orchestrator.js.consumers.get(streams.control, consumers.orchestrator);
    orchestrator.messages = await consumer.consume({ max_messages: 256 });
    orchestrator.loop = orchestrator.consumeLoop(orchestrator.messages);
    return orchestrator;
  }

  async stop(): Promise<void> {
    await this.messages?.close();
    await this.loop;
    for (const run of this.runs.values()) run.actor.stop();
    this.runs.clear();
  }

  private async consumeLoop(messages: ConsumerMessages): Promise<void> {
    for await (const msg of messages) {
      await this.handle(msg);
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
      if (this.runs.has(message.runId) || (await this.topology.runs.get(message.runId))) return;
      const run = this.track(message, createActor(createRunMachine(message.plan), { input: { runId: message.runId } }), []);
      this.logger.info(`run ${message.runId} of ${message.plan.pipeline} submitted by ${message.submittedBy}`);
      await this.afterTransition(run);
      return;
    }
    const run = this.runs.get(message.runId);
    if (message.type === 'run.release') {
      await this.releaseOutputs(message.runId, run);
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
      if (run.outputsReleased) await this.releaseOutputs(run.submit.runId, undefined);
    }
  }

  private track(submit: RunSubmit, actor: Actor<RunMachine>, released: string[]): LiveRun {
    const run: LiveRun = { submit, actor, released: new Set(released), dispatched: new Set(), finishedAt: null, outputsReleased: false };
    actor.start();
    this.runs.set(submit.runId, run);
    return run;
  }

  private publishReleases(byHost: Map<string, string[]>): void {
    for (const [hostId, segments] of byHost) {
      this.nc.publish(subjects.segmentRelease(hostId), encode(segmentRelease, { type: 'segments.release', hostId, segments }));
    }
  }

  private async dispatch(run: LiveRun, step: string, snapshot: RunSnapshot): Promise<void> {
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
    };
    await this.js.publish(subjects.stepReady, encode(stepReady, message), { msgID: `${run.submit.runId}.${step}.ready` });
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
      finishedAt: run.finishedAt,
      keep: run.submit.keep,
      outputsReleased: false,
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
          output: facts.output,
          error: facts.error,
        };
      }),
    };
  }

  /** Rebuilds the machine of every unfinished run from its persisted snapshot. */
  private async resume(): Promise<void> {
    const keys = await this.topology.runs.keys();
    for await (const key of keys) {
      const entry = await this.topology.runs.get(key);
      if (!entry) continue;
      let record: RunRecord;
      try {
        record = entry.json<RunRecord>();
      } catch {
        this.logger.warn(`run record ${key} is not JSON; leaving it alone`);
        continue;
      }
      if (record.view.state !== 'running') continue;
      const actor = createActor(createRunMachine(record.submit.plan), { snapshot: record.snapshot as never, input: { runId: key } });
      const run = this.track(record.submit, actor, record.released);
      this.logger.info(`resumed run ${key} of ${record.submit.plan.pipeline}`);
      await this.afterTransition(run);
    }
  }
}

