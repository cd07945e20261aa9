/**
 * The live hub: one set of NATS subscriptions and KV watches for the whole server, fanned out to
 * every browser. Browsers never cause a KV read per change: a page reads once when it opens,
 * then follows the hub.
 */
import { KvWatchInclude, type KvEntry, type KvWatchEntry } from '@nats-io/kv';
import type { Subscription } from '@nats-io/transport-node';
import {
  deadEvent,
  decode,
  logLine,
  runRecord,
  runView,
  stepCompletion,
  stepStarted,
  subjects,
  type Logger,
  type LogLine,
  type RunRecord,
  type Topology,
} from '../schemas/index.ts';
import type { NatsConnection } from '@nats-io/transport-node';

/** A run as the runs list shows it: small, kept in memory for every run the cluster remembers. */
export interface RunSummary {
  runId: string;
  pipeline: string;
  version: number | null;
  state: RunRecord['state'];
  trigger: NonNullable<RunRecord['submit']['trigger']>;
  submittedAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  steps: number;
}

/** What the browser is sent, on the topics it follows: `runs`, `dead`, or `run:<id>`. */
export type LiveMessage =
  | { type: 'run'; summary: RunSummary }
  | { type: 'run-removed'; runId: string }
  | { type: 'view'; view: unknown }
  | { type: 'started'; runId: string; step: string; attempt: number; hostId: string; at: number }
  | { type: 'completion'; completion: unknown }
  | { type: 'log'; log: LogLine }
  | { type: 'dead'; dead: unknown };

export type Listener = (message: LiveMessage) => void;

export interface HubOptions {
  logLinesPerRun: number;
  logRuns: number;
  logger: Logger;
}

export class LiveHub {
  private readonly summaries = new Map<string, RunSummary>();
  /** Insertion order is age: the first run is the one to drop. */
  private readonly logs = new Map<string, LogLine[]>();
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly subscriptions: Subscription[] = [];
  private readonly watches: { stop(): void }[] = [];
  private readonly finishedListeners = new Set<(summary: RunSummary) => void>();

  private constructor(
    private readonly nc: NatsConnection,
    private readonly topology: Topology,
    private readonly options: HubOptions,
  ) {}

  /** Resolves once the runs list holds every run the cluster has now. */
  static async start(nc: NatsConnection, topology: Topology, options: HubOptions): Promise<LiveHub> {
    const hub = new LiveHub(nc, topology, options);
    try {
      await hub.follow();
    } catch (error) {
      hub.stop();
      throw error;
    }
    return hub;
  }

  private async follow(): Promise<void> {
    // Core subjects first, so nothing said while the watches start is missed.
    this.subscribe(subjects.statusAll, (subject, data) => {
      const view = decode(runView, subject, data);
      this.emit(`run:${view.runId}`, { type: 'view', view });
    });
    this.subscribe(subjects.stepStarted, (subject, data) => {
      const s = decode(stepStarted, subject, data);
      this.emit(`run:${s.runId}`, { type: 'started', runId: s.runId, step: s.step, attempt: s.attempt, hostId: s.hostId, at: s.at });
    });
    this.subscribe(subjects.logAll, (subject, data) => {
      const log = decode(logLine, subject, data);
      this.keepLog(log);
      this.emit(`run:${log.runId}`, { type: 'log', log });
    });
    this.subscribe(subjects.deadEvent, (subject, data) => {
      this.emit('dead', { type: 'dead', dead: decode(deadEvent, subject, data) });
    });
    await this.nc.flush();

    // Step completions straight from the bucket: the browser sees them before the orchestrator's view.
    const steps = await this.topology.steps.watch({ include: KvWatchInclude.UpdatesOnly });
    this.watches.push(steps);
    void this.consume(steps, (entry) => {
      if (entry.operation !== 'PUT' || entry.length === 0) return;
      const completion = decode(stepCompletion, `${entry.bucket}/${entry.key}`, entry.value);
      this.emit(`run:${completion.runId}`, { type: 'completion', completion });
    });

    // The watch first hands over every run's last record; the last of those has nothing pending after it.
    const empty = (await this.topology.runs.status()).values === 0;
    const runs = await this.topology.runs.watch({ include: KvWatchInclude.LastValue });
    this.watches.push(runs);
    let markInitialDone!: () => void;
    const initialDone = new Promise<void>((resolve) => (markInitialDone = resolve));
    if (empty) markInitialDone();
    void this.consume(runs, (entry) => {
      try {
        this.onRunEntry(entry);
      } finally {
        if (entry.isUpdate || entry.delta === 0) markInitialDone();
      }
    });
    await initialDone;
  }

  private onRunEntry(entry: KvEntry): void {
    if (entry.operation !== 'PUT' || entry.length === 0) {
      if (this.summaries.delete(entry.key)) this.emit('runs', { type: 'run-removed', runId: entry.key });
      return;
    }
    const record = decode(runRecord, `${entry.bucket}/${entry.key}`, entry.value);
    const summary = summaryOf(record);
    const before = this.summaries.get(summary.runId);
    this.summaries.set(summary.runId, summary);
    this.emit('runs', { type: 'run', summary });
    if (summary.finishedAt !== null && before?.finishedAt == null) for (const l of this.finishedListeners) l(summary);
  }

  private subscribe(subject: string, handle: (subject: string, data: Uint8Array) => void): void {
    this.subscriptions.push(
      this.nc.subscribe(subject, {
        callback: (error, msg) => {
          if (error) return;
          try {
            handle(msg.subject, msg.data);
          } catch (e) {
            // A malformed message on a Quiver subject is not the cluster's state: reported, skipped.
            this.options.logger.warn(`ui: ${(e as Error).message}`);
          }
        },
      }),
    );
  }

  private async consume(watch: AsyncIterable<KvWatchEntry>, handle: (entry: KvWatchEntry) => void): Promise<void> {
    try {
      for await (const entry of watch) {
        try {
          handle(entry);
        } catch (e) {
          this.options.logger.warn(`ui: ${(e as Error).message}`);
        }
      }
    } catch (e) {
      this.options.logger.warn(`ui: a watch ended: ${(e as Error).message}`);
    }
  }

  private keepLog(log: LogLine): void {
    let lines = this.logs.get(log.runId);
    if (!lines) {
      lines = [];
      this.logs.set(log.runId, lines);
      if (this.logs.size > this.options.logRuns) this.logs.delete(this.logs.keys().next().value!);
    }
    lines.push(log);
    if (lines.length > this.options.logLinesPerRun) lines.splice(0, lines.length - this.options.logLinesPerRun);
  }

  private emit(topic: string, message: LiveMessage): void {
    for (const listener of this.listeners.get(topic) ?? []) listener(message);
  }

  /** Follows a topic until the returned function is called. */
  listen(topic: string, listener: Listener): () => void {
    let set = this.listeners.get(topic);
    if (!set) this.listeners.set(topic, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0) this.listeners.delete(topic);
    };
  }

  /** Called once for each run that finishes while the hub runs. */
  onRunFinished(listener: (summary: RunSummary) => void): () => void {
    this.finishedListeners.add(listener);
    return () => this.finishedListeners.delete(listener);
  }

  /** Every run, newest first. */
  runs(): RunSummary[] {
    // Run ids are ULIDs: their order is their submission order.
    return [...this.summaries.values()].sort((a, b) => (a.runId < b.runId ? 1 : -1));
  }

  /** The log lines this hub heard for a run since it started (older ones are in the logs stream: see api getRun). */
  logsOf(runId: string): LogLine[] {
    return this.logs.get(runId) ?? [];
  }

  stop(): void {
    for (const s of this.subscriptions) s.unsubscribe();
    for (const w of this.watches) w.stop();
    this.subscriptions.length = 0;
    this.watches.length = 0;
    this.listeners.clear();
  }
}

function summaryOf(record: RunRecord): RunSummary {
  const s = record.submit;
  return {
    runId: s.runId,
    pipeline: s.plan.pipeline,
    version: s.version ?? null,
    state: record.state,
    trigger: s.trigger ?? { kind: 'user', by: s.submittedBy },
    submittedAt: s.submittedAt,
    startedAt: record.startedAt,
    finishedAt: record.finishedAt,
    steps: s.plan.steps.length,
  };
}
