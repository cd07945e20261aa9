/**
 * Admission: one `admit()` for every run, whoever started it (a user, an event, a schedule). A
 * run starts at once, waits in its pipeline's queue behind others (`maxConcurrentRuns`, schedule
 * `overlap: 'queue'`), or, for a scheduled tick with `overlap: 'skip'`, is dropped.
 */
import { encode, runView, subjects, type Deployment, type Logger, type RunRecord, type RunSubmit } from '../schemas/index.ts';
import type { NatsConnection } from '@nats-io/transport-node';
import type { RunStore } from './run-store.ts';
import type { Runs } from './runs.ts';
import { NO_LANE, unlimitedRun, type Lane } from './lane.ts';
import { unstartedView } from './views.ts';

export interface AdmissionOptions {
  store: RunStore;
  runs: Runs;
  nc: NatsConnection;
  logger: Logger;
  now: () => number;
}

export class Admission {
  /** Per pipeline, runs waiting for a free place, oldest first. */
  private readonly queues = new Map<string, RunRecord[]>();
  /**
   * Runs whose record is being written before they start (just admitted, or taken from their
   * queue): counted among their pipeline's runs going, known to a second submission, and holding
   * a cancel that comes meanwhile until they have started.
   */
  private readonly starting = new Map<string, { submit: RunSubmit; cancelReason: string | null }>();
  private lastSequence = 0;

  constructor(private readonly options: AdmissionOptions) {}

  /**
   * Admits a run unless it is known: a submission may come twice (redelivery, a second leader).
   * A run that starts at once and that no admission rule limits lets go of `lane` while its
   * record is written (lane.ts): the next message is handled meanwhile. One that waits or that
   * a rule limits holds it, so the queues are only ever changed one message at a time.
   */
  async admit(submit: RunSubmit, lane: Lane = NO_LANE): Promise<void> {
    const { store, runs, logger, now } = this.options;
    if (runs.has(submit.runId) || this.queued(submit.runId) || this.starting.has(submit.runId)) return;
    const pipeline = submit.plan.pipeline;
    if (submit.trigger?.kind === 'schedule' && submit.admission?.overlap === 'skip' && this.scheduledRunGoing(pipeline)) {
      logger.info(`tick ${new Date(submit.trigger.tick).toISOString()} of ${pipeline} skipped: the previous scheduled run still goes (overlap: skip)`);
      return;
    }
    // Unique and increasing: the order queued runs keep across leaders.
    this.lastSequence = Math.max(now() * 1000, this.lastSequence + 1);
    const startsNow = !this.queues.has(pipeline) && this.hasRoomFor(submit);
    const record: RunRecord = {
      submit,
      state: startsNow ? 'running' : 'queued',
      sequence: this.lastSequence,
      startedAt: startsNow ? now() : null,
      finishedAt: null,
      // Nobody waits to read the outputs of a run an event or a schedule started.
      outputsReleased: (submit.trigger?.kind ?? 'user') !== 'user',
      view: null,
    };
    if (startsNow) {
      // Created, not put: the one write that admits the run also finds a second submission of it.
      const created = await this.writeThenStart(record, () => store.create(record), unlimitedRun(submit) ? lane : NO_LANE);
      if (created) logger.info(`run ${submit.runId} of ${pipeline} submitted by ${submit.submittedBy}`);
      return;
    }
    if (!(await store.create(record))) return;
    logger.info(`run ${submit.runId} of ${pipeline} submitted by ${submit.submittedBy}, queued`);
    this.enqueue(record);
    this.publish(record);
  }

  /** Ends a run being admitted or waiting in its queue; false when it is neither here. */
  async cancel(runId: string, reason: string): Promise<boolean> {
    const starting = this.starting.get(runId);
    if (starting) {
      // Applied once it has started: its machine ends it as any cancelled run.
      starting.cancelReason = reason;
      return true;
    }
    return this.cancelQueued(runId, reason);
  }

  /** Ends a run still waiting in its queue; false when it is not queued here. */
  private async cancelQueued(runId: string, reason: string): Promise<boolean> {
    for (const [pipeline, queue] of this.queues) {
      const index = queue.findIndex((q) => q.submit.runId === runId);
      if (index < 0) continue;
      const [waiting] = queue.splice(index, 1) as [RunRecord];
      if (queue.length === 0) this.queues.delete(pipeline);
      const record: RunRecord = { ...waiting, state: 'cancelled', finishedAt: this.options.now() };
      record.view = unstartedView(record);
      this.options.logger.info(`queued run ${runId} cancelled: ${reason}`);
      await this.options.store.put(record);
      this.publish(record);
      return true;
    }
    return false;
  }

  /**
   * Starts queued runs of the pipeline, in order, while there is room. The queue is read afresh
   * after each write: a run may have been queued meanwhile.
   */
  async startQueued(pipeline: string): Promise<void> {
    for (;;) {
      const queue = this.queues.get(pipeline);
      if (!queue || queue.length === 0 || !this.hasRoomFor(queue[0]!.submit)) return;
      const next: RunRecord = { ...queue.shift()!, state: 'running', startedAt: this.options.now() };
      if (queue.length === 0) this.queues.delete(pipeline);
      await this.writeThenStart(next, () => this.options.store.put(next).then(() => true), NO_LANE);
    }
  }

  /**
   * Writes a run's record, then starts it, counted as going all along; false when the write
   * found it known already. Lets go of `lane` while the record is written.
   */
  private async writeThenStart(record: RunRecord, write: () => Promise<boolean>, lane: Lane): Promise<boolean> {
    const { runId } = record.submit;
    const starting = { submit: record.submit, cancelReason: null as string | null };
    this.starting.set(runId, starting);
    lane.release();
    let written: boolean;
    try {
      written = await write();
    } finally {
      // Taken out right before it starts: it is never neither starting nor going.
      this.starting.delete(runId);
    }
    if (!written) return false;
    await this.options.runs.start(record, lane);
    if (starting.cancelReason !== null) await this.options.runs.apply({ type: 'run.cancel', runId, reason: starting.cancelReason });
    return true;
  }

  /** Takes up the queues a previous leader left (records in state queued), then starts what has room. */
  async restore(queued: RunRecord[]): Promise<void> {
    for (const record of [...queued].sort((a, b) => a.sequence - b.sequence)) {
      this.lastSequence = Math.max(this.lastSequence, record.sequence);
      this.enqueue(record);
    }
    for (const pipeline of [...this.queues.keys()]) await this.startQueued(pipeline);
  }

  clear(): void {
    this.queues.clear();
  }

  private enqueue(record: RunRecord): void {
    const pipeline = record.submit.plan.pipeline;
    this.queues.set(pipeline, [...(this.queues.get(pipeline) ?? []), record]);
  }

  private queued(runId: string): boolean {
    for (const queue of this.queues.values()) if (queue.some((q) => q.submit.runId === runId)) return true;
    return false;
  }

  /** For live views only: a view NATS refuses (too large) is reported, and the run goes on. */
  private publish(record: RunRecord): void {
    try {
      this.options.nc.publish(subjects.status(record.submit.runId), encode(runView, record.view ?? unstartedView(record)));
    } catch (error) {
      this.options.logger.warn(`could not publish the status of run ${record.submit.runId}: ${(error as Error).message}`);
    }
  }

  private scheduledRunGoing(pipeline: string): boolean {
    const scheduled = (s: RunSubmit) => s.plan.pipeline === pipeline && s.trigger?.kind === 'schedule';
    return this.going(pipeline).some(scheduled) || (this.queues.get(pipeline) ?? []).some((q) => scheduled(q.submit));
  }

  /** The submissions of the pipeline's runs going or about to (their record being written). */
  private going(pipeline: string): RunSubmit[] {
    return [...this.options.runs.going(pipeline), ...this.startingOf(pipeline)];
  }

  private startingOf(pipeline: string): RunSubmit[] {
    return [...this.starting.values()].filter((s) => s.submit.plan.pipeline === pipeline).map((s) => s.submit);
  }

  private hasRoomFor(submit: RunSubmit): boolean {
    const max = submit.admission?.maxConcurrentRuns;
    if (max && this.options.runs.countGoing(submit.plan.pipeline) + this.startingOf(submit.plan.pipeline).length >= max) return false;
    if (submit.trigger?.kind === 'schedule' && submit.admission?.overlap === 'queue') {
      return !this.going(submit.plan.pipeline).some((s) => s.trigger?.kind === 'schedule');
    }
    return true;
  }
}

/** The submission of a run of a deployed pipeline, started by an event or a schedule tick. */
export function deployedRun(
  deployment: Deployment,
  runId: string,
  trigger: NonNullable<RunSubmit['trigger']>,
  submittedBy: string,
  submittedAt: number,
  event?: RunSubmit['event'],
): RunSubmit {
  return {
    type: 'run.submit',
    runId,
    plan: deployment.plan,
    codeHash: deployment.codeHash,
    params: {},
    keep: false,
    submittedAt,
    submittedBy,
    trigger,
    version: deployment.version,
    admission: { maxConcurrentRuns: deployment.maxConcurrentRuns, overlap: deployment.schedule?.overlap ?? null },
    ...(event ? { event } : {}),
    // `pipeline(..., { cache: true })`: its triggered runs reuse and fill the output cache.
    ...(deployment.plan.cache ? { cache: 'readwrite' as const } : {}),
  };
}
