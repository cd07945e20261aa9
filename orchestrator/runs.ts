/**
 * The runs this leader drives: one xstate machine each, fed by step completions (records in
 * `quiver-steps`), live step starts and cancellations. After each transition it sends the steps
 * that became ready and hands back segments no step needs any more; it publishes the run's view
 * at most every VIEW_INTERVAL_MS. When the run ends it writes the run's record once, with its
 * final view, and publishes that at once.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import { createActor, type Actor } from 'xstate';
import {
  encode,
  runKill,
  runView,
  segmentRelease,
  subjects,
  type Logger,
  type PlanStep,
  type RunRecord,
  type RunSubmit,
  type RunView,
  type StepCompletion,
  type StepReady,
  type StepStarted,
} from '../schemas/index.ts';
import { chainAfter, topologyOf } from '../planner/index.ts';
import type { Dispatcher } from './placement.ts';
import { SETTLED_STATES, claimsOf, replayRun, runMachineOf, runStateOf, stepStatesOf, type RunFacts, type RunMachine, type RunSnapshot } from './run-machine.ts';
import type { RunStore } from './run-store.ts';
import { NO_LANE, unlimitedRun, type Lane } from './lane.ts';
import { machineView } from './views.ts';
import { cacheKeyOf, cacheReadOf, cacheWriteOf, usesOutputCache, type CachedOutputs } from './cached-outputs.ts';

/** A ready step whose publish failed (NATS away) is sent again after this long. */
const DISPATCH_RETRY_MS = 500;

/**
 * A running run's view goes out at most once this often, the first one too: the last change of a
 * window goes at its end, and the view of a run that ended goes at once. A view holds every step,
 * so one per transition cost O(steps²) per run (a 300-step run spent ~350 ms building and
 * encoding views), and a three-step chain that finishes within a few milliseconds sent four
 * where its final view says it all. Views are live status only (core NATS): records and facts
 * stay the truth.
 */
export const VIEW_INTERVAL_MS = 50;

interface LiveRun {
  record: RunRecord;
  actor: Actor<RunMachine>;
  /** Segments handed back to their hosts (again after a restart: releasing twice is harmless). */
  released: Set<string>;
  /** Steps whose ready message this process has sent (re-sent after a restart: JetStream and claims dedupe). */
  dispatched: Set<string>;
  /**
   * Steps that go with the ready message of the step before them (StepReady.then): the executor
   * of that step runs them, so they are never sent alone. Known only to the process that sent
   * the chain: after a restart, a ready step of a chain is sent alone, and the claims keep it
   * from running twice.
   */
  carried: Set<string>;
  /** Its end being written (the lane let go meanwhile): later events of it change nothing. */
  ending?: Promise<void>;
  /** When its view last went out (options.now()), or when it was taken up here; and the timer sending the next one. */
  viewSentAt: number;
  viewTimer?: ReturnType<typeof setTimeout>;
}

export interface RunsOptions {
  store: RunStore;
  dispatcher: Dispatcher;
  nc: NatsConnection;
  logger: Logger;
  now: () => number;
  /** A run of this pipeline ended: queued runs may start. */
  onEnded: (pipeline: string) => Promise<void>;
  /** Reuses cached outputs for runs whose cache mode allows it; without it, every step runs. */
  cachedOutputs?: CachedOutputs;
}

export class Runs {
  private readonly live = new Map<string, LiveRun>();
  /** The same runs by pipeline. */
  private readonly byPipeline = new Map<string, Set<LiveRun>>();
  private stopped = false;
  /** Segments to hand back at the end of this turn, by host (releaseSoon). */
  private releasing = new Map<string, string[]>();
  private releaseScheduled = false;

  constructor(private readonly options: RunsOptions) {}

  has(runId: string): boolean {
    return this.live.has(runId);
  }

  /** The submissions of the runs of `pipeline` going now. */
  going(pipeline: string): RunSubmit[] {
    return [...(this.byPipeline.get(pipeline)?.values() ?? [])].map((r) => r.record.submit);
  }

  /** How many runs of `pipeline` go now: what admission asks of every run, so it costs no scan. */
  countGoing(pipeline: string): number {
    return this.byPipeline.get(pipeline)?.size ?? 0;
  }

  /** Starts a run whose record (state running) is written. */
  async start(record: RunRecord, lane: Lane = NO_LANE): Promise<void> {
    const actor = createActor(runMachineOf(record.submit.plan), { input: { runId: record.submit.runId } });
    await this.afterTransition(this.track(record, actor.start()), lane);
  }

  /** Takes up a run a previous leader drove, from its record and its steps' facts. */
  async resume(record: RunRecord, facts: RunFacts): Promise<void> {
    const { plan } = record.submit;
    const run = this.track(record, replayRun(plan, record.submit.runId, facts));
    // The steps a claimed ready message carried go with it (its executor runs them unclaimed):
    // sent alone as well, a second executor could claim and run one beside it.
    for (const claim of facts.claims.values()) for (const step of claim.chain ?? []) run.carried.add(step);
    // Where running steps run lived only in the old leader's memory: a host that dies now must
    // still have its steps placed again.
    const snapshot = run.actor.getSnapshot();
    const states = stepStatesOf(snapshot);
    const claims = claimsOf(plan, facts);
    for (const step of plan.steps) {
      const claim = claims.get(step.name);
      const hostId = claim?.hostId;
      if (states[step.name] !== 'running' || !hostId) continue;
      const { message, planStep } = readyMessage(run, step.name, snapshot);
      // Placed again, it carries the rest of its chain, which no one else sends.
      const rest = claim.chain ? claim.chain.slice(claim.chain.indexOf(step.name) + 1) : [];
      if (rest.length > 0) message.then = rest.map((name) => plan.steps.find((s) => s.name === name)!).map((s) => ({ step: s.name, inputs: s.inputs }));
      // Only work placed on a host's own queue strands there; the shared queue redelivers.
      const placedOnHost = planStep.host !== undefined || message.inputs.some((i) => i.descriptor.hostId === hostId);
      if (placedOnHost) this.options.dispatcher.remember(message, planStep, hostId);
    }
    this.options.logger.info(`resumed run ${record.submit.runId} of ${record.submit.plan.pipeline}`);
    await this.afterTransition(run);
  }

  /**
   * A step's completion, a live start, or a cancellation; events of runs not driven here are
   * dropped (false), and so are events of a run whose end is being written.
   */
  async apply(event: StepCompletion | StepStarted | { type: 'run.cancel'; runId: string; reason: string }, lane: Lane = NO_LANE): Promise<boolean> {
    const run = this.live.get(event.runId);
    if (!run) return false;
    if (run.ending) return true;
    run.actor.send(event);
    await this.afterTransition(run, lane);
    return true;
  }

  /** The client read the result (or gave up): outputs go once the run ends, unless it keeps them. */
  markOutputsReleased(runId: string): boolean | { ending: Promise<void> } {
    const run = this.live.get(runId);
    if (!run) return false;
    // The record being written says its outputs stay: the caller asks again once it is in.
    if (run.ending) return { ending: run.ending };
    run.record.outputsReleased = true;
    return true;
  }

  /** Forgets every run (the lead moved elsewhere); the records stay for the next leader. */
  stopAll(): void {
    this.stopped = true;
    for (const run of this.live.values()) {
      run.actor.stop();
      clearTimeout(run.viewTimer);
    }
    this.live.clear();
    this.byPipeline.clear();
  }

  private track(record: RunRecord, actor: Actor<RunMachine>): LiveRun {
    this.stopped = false;
    const run: LiveRun = { record: { ...record }, actor, released: new Set(), dispatched: new Set(), carried: new Set(), viewSentAt: this.options.now() };
    this.forget(record.submit.runId);
    this.live.set(record.submit.runId, run);
    const pipeline = record.submit.plan.pipeline;
    let runs = this.byPipeline.get(pipeline);
    if (!runs) this.byPipeline.set(pipeline, (runs = new Set()));
    runs.add(run);
    return run;
  }

  private forget(runId: string): void {
    const run = this.live.get(runId);
    if (!run) return;
    clearTimeout(run.viewTimer);
    this.live.delete(runId);
    const pipeline = run.record.submit.plan.pipeline;
    const runs = this.byPipeline.get(pipeline);
    runs?.delete(run);
    if (runs?.size === 0) this.byPipeline.delete(pipeline);
  }

  /**
   * Act on the machine's new state. Nothing here is written per transition: the facts are the
   * executors' records. A run's end is written once; a run no admission rule limits lets go of
   * `lane` meanwhile (lane.ts).
   */
  private async afterTransition(run: LiveRun, lane: Lane = NO_LANE): Promise<void> {
    const snapshot = run.actor.getSnapshot();
    const state = runStateOf(snapshot);
    const { plan, runId } = run.record.submit;
    const states = stepStatesOf(snapshot);

    const { children, outputs } = topologyOf(plan);
    const toRelease = new Map<string, string[]>();
    for (const step of plan.steps) {
      const output = snapshot.context.steps[step.name]?.output;
      if (!output || states[step.name] !== 'succeeded') continue;
      // A segment may go once no child can still map it; run outputs wait for the client.
      if (outputs.has(step.name) || !children.get(step.name)!.every((c) => SETTLED_STATES.has(states[c]!))) continue;
      for (const segment of output.segments) {
        if (run.released.has(segment.id)) continue;
        run.released.add(segment.id);
        addTo(toRelease, output.hostId, segment.id);
      }
    }

    if (state !== 'running') {
      run.record = { ...run.record, state, finishedAt: this.options.now() };
      run.record.view = machineView(run.record, snapshot);
      // Every segment the run no longer needs, again: a release sent while NATS was away is
      // lost (core NATS), and releasing twice is harmless.
      toRelease.clear();
      const outputsGo = run.record.outputsReleased && !run.record.submit.keep;
      for (const step of plan.steps) {
        const output = snapshot.context.steps[step.name]?.output;
        if (!output || (outputs.has(step.name) && !outputsGo)) continue;
        for (const segment of output.segments) addTo(toRelease, output.hostId, segment.id);
      }
      // Persist first, then act: a crash in between ends the run again on resume.
      const written = this.options.store.put(run.record);
      run.ending = written.then(
        () => undefined,
        () => undefined,
      );
      if (unlimitedRun(run.record.submit)) lane.release();
      try {
        await written;
      } catch (error) {
        // Not written: the redelivered event that ended it ends it again.
        delete run.ending;
        throw error;
      }
    }

    for (const step of plan.steps) {
      if (states[step.name] === 'ready' && !run.dispatched.has(step.name)) {
        run.dispatched.add(step.name);
        if (!run.carried.has(step.name)) this.dispatch(run, step.name, snapshot);
      }
    }
    this.releaseSoon(toRelease);
    if (state === 'cancelled') this.options.nc.publish(subjects.runKill, encode(runKill, { type: 'run.kill', runId }));
    this.sendView(run, snapshot);
    if (state !== 'running') {
      this.options.logger.info(`run ${runId} ${state}`);
      run.actor.stop();
      this.forget(runId);
      this.options.dispatcher.forgetRun(runId);
      await this.options.onEnded(plan.pipeline);
    }
  }

  /**
   * Hands segments back at the end of this event-loop turn, with those of every other transition
   * of the turn: one message per host, where each transition sent its own (two per three-step
   * chain; in a burst, completions of many runs arrive in one turn).
   */
  private releaseSoon(byHost: Map<string, string[]>): void {
    for (const [hostId, segments] of byHost) for (const segment of segments) addTo(this.releasing, hostId, segment);
    if (this.releasing.size === 0 || this.releaseScheduled) return;
    this.releaseScheduled = true;
    setImmediate(() => {
      this.releaseScheduled = false;
      const released = this.releasing;
      this.releasing = new Map();
      try {
        publishReleases(this.options.nc, released);
      } catch (error) {
        // The connection closed meanwhile (this process stops): gc frees what a lost release held.
        this.options.logger.warn(`could not hand back ${[...released.values()].flat().length} segment(s): ${(error as Error).message}`);
      }
    });
  }

  /** Publishes the run's view now, or at the end of its VIEW_INTERVAL_MS window (the view as it is then). */
  private sendView(run: LiveRun, snapshot: RunSnapshot): void {
    const { runId } = run.record.submit;
    const publish = (view: RunView) => {
      run.viewSentAt = this.options.now();
      this.options.nc.publish(subjects.status(runId), encode(runView, view));
    };
    if (run.record.view) {
      clearTimeout(run.viewTimer);
      delete run.viewTimer;
      publish(run.record.view);
      return;
    }
    if (run.viewTimer) return;
    const wait = run.viewSentAt + VIEW_INTERVAL_MS - this.options.now();
    if (wait <= 0) {
      publish(machineView(run.record, snapshot));
      return;
    }
    run.viewTimer = setTimeout(() => {
      delete run.viewTimer;
      if (this.live.get(runId) !== run || run.record.view) return;
      try {
        publish(machineView(run.record, run.actor.getSnapshot()));
      } catch (error) {
        // The connection closed meanwhile: a view is live status only.
        this.options.logger.warn(`could not publish the view of run ${runId}: ${(error as Error).message}`);
      }
    }, wait);
    run.viewTimer.unref();
  }

  /**
   * Sends a ready step without holding up the next message: its publish is retried until it is
   * stored, or the run is no longer driven here (a new leader sends it again on resume).
   */
  private dispatch(run: LiveRun, step: string, snapshot: RunSnapshot): void {
    const { message, planStep } = readyMessage(run, step, snapshot);
    // A cached output is looked up step by step, with keys built on the parents' completions: a
    // run that uses the cache sends each step alone.
    const chain = usesOutputCache(run.record.submit) ? [] : chainAfter(run.record.submit.plan, step);
    if (chain.length > 0) message.then = chain.map((s) => ({ step: s.name, inputs: s.inputs }));
    const carry = () => {
      for (const s of chain) run.carried.add(s.name);
    };
    const stillDriven = () => !this.stopped && this.live.get(message.runId) === run;
    const send = (): void => {
      this.options.dispatcher.dispatch(message, planStep, carry).catch((error: unknown) => {
        if (!stillDriven()) return;
        this.options.logger.warn(`sending ready step ${step} of run ${message.runId} failed, retrying: ${(error as Error).message}`);
        setTimeout(send, DISPATCH_RETRY_MS).unref();
      });
    };
    const { cachedOutputs } = this.options;
    if (!message.cacheKey || !cachedOutputs || run.record.submit.recompute?.includes(step)) {
      send();
      return;
    }
    // A reused output's completion, written from the cache, comes back as a fact like any other.
    void cachedOutputs.reuse(run.record.submit, planStep, message.cacheKey).then(
      (reused) => {
        if (!reused && stillDriven()) send();
      },
      () => stillDriven() && send(),
    );
  }
}

export function readyMessage(run: { record: RunRecord }, step: string, snapshot: RunSnapshot): { message: StepReady; planStep: PlanStep } {
  const { submit } = run.record;
  const planStep = submit.plan.steps.find((s) => s.name === step)!;
  const inputs = planStep.inputs.map((i) => {
    const descriptor = snapshot.context.steps[i.step]?.output;
    if (!descriptor) throw new Error(`step ${step} is ready but parent ${i.step} has no output`);
    return { ...i, descriptor };
  });
  const message: StepReady = {
    type: 'step.ready',
    runId: submit.runId,
    step,
    pipeline: submit.plan.pipeline,
    codeHash: submit.codeHash,
    params: submit.params,
    inputs,
    ...(submit.event ? { event: submit.event } : {}),
    ...(planStep.system ? { system: planStep.system } : {}),
    ...(planStep.isolation ? { isolation: planStep.isolation } : {}),
    ...(planStep.limits ? { limits: planStep.limits } : {}),
    ...(planStep.env ? { env: planStep.env } : {}),
    ...(planStep.packages ? { packages: planStep.packages } : {}),
  };
  const cacheKey = cacheKeyOf(submit, planStep, snapshot.context.steps);
  if (cacheKey) {
    message.cacheKey = cacheKey;
    if (cacheWriteOf(submit, planStep)) message.cacheWrite = true;
    if (cacheReadOf(submit, planStep)) message.cacheRead = true;
  }
  return { message, planStep };
}

export function addTo(byHost: Map<string, string[]>, hostId: string, segment: string): void {
  const segments = byHost.get(hostId);
  if (segments) segments.push(segment);
  else byHost.set(hostId, [segment]);
}

/** Segment ids per release message at most: well under NATS's default 1 MB payload. */
const MAX_SEGMENTS_PER_RELEASE = 2000;

export function publishReleases(nc: NatsConnection, byHost: Map<string, string[]>): void {
  for (const [hostId, all] of byHost) {
    for (let at = 0; at < all.length; at += MAX_SEGMENTS_PER_RELEASE) {
      const segments = all.slice(at, at + MAX_SEGMENTS_PER_RELEASE);
      nc.publish(subjects.segmentRelease(hostId), encode(segmentRelease, { type: 'segments.release', hostId, segments }));
    }
  }
}
