import { jetstream, jetstreamManager, type JetStreamClient } from '@nats-io/jetstream';
import { connect, type NatsConnection, type Subscription } from '@nats-io/transport-node';
import type { Table } from 'apache-arrow';
import { ulid } from 'ulid';
import {
  decode,
  encode,
  ensureTopology,
  logLine,
  runCancel,
  runRelease,
  runSubmit,
  runView,
  shmRoot,
  subjects,
  type LogLine,
  type RunView,
  type TableDescriptor,
  type Topology,
  type TopologyOptions,
} from '../schemas/index.ts';
import { readInput } from '../shm/index.ts';
import type { LoadedPipeline } from './load.ts';

/** Options for {@link QuiverClient.connect}. */
export interface ClientOptions {
  /** @default QUIVER_NATS_URL, else nats://127.0.0.1:4222 */
  natsUrl?: string;
  topology?: TopologyOptions;
  /** Who started runs, recorded with each run. @default the OS user name */
  submittedBy?: string;
}

export interface RunOptions {
  /** Strings every step receives as `ctx.params`. @default {} */
  params?: Record<string, string>;
  /** Keep the run's outputs in shared memory after the result is read. @default false */
  keep?: boolean;
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
  private constructor(
    readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    readonly topology: Topology,
    private readonly ownsConnection: boolean,
    private readonly submittedBy: string,
  ) {}

  /** Connects (or wraps an existing connection) and makes sure the streams and buckets exist. */
  static async connect(options: ClientOptions & { nc?: NatsConnection } = {}): Promise<QuiverClient> {
    const nc = options.nc ?? (await connect({ servers: options.natsUrl ?? process.env.QUIVER_NATS_URL ?? 'nats://127.0.0.1:4222' }));
    const topology = await ensureTopology(nc, await jetstreamManager(nc), options.topology);
    return new QuiverClient(nc, jetstream(nc), topology, !options.nc, options.submittedBy ?? process.env.USER ?? 'user');
  }

  async close(): Promise<void> {
    if (this.ownsConnection) await this.nc.close();
  }

  /** Stores the pipeline's code (once per hash) and submits a run of it. */
  async run(pipeline: LoadedPipeline, options: RunOptions = {}): Promise<RunHandle> {
    if (!(await this.topology.code.info(pipeline.codeHash))) {
      await this.topology.code.putBlob({ name: pipeline.codeHash }, pipeline.code);
    }
    const runId = ulid();
    // Subscribed before submitting: no early event is missed.
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
    await this.js.publish(
      subjects.runSubmit,
      encode(runSubmit, {
        type: 'run.submit',
        runId,
        plan: pipeline.plan,
        codeHash: pipeline.codeHash,
        params: options.params ?? {},
        keep: options.keep ?? false,
        submittedAt: Date.now(),
        submittedBy: this.submittedBy,
      }),
      { msgID: `${runId}.submit` },
    );
    const final = this.waitForEnd(runId, queue, [statusSub, logSub]);
    return {
      id: runId,
      events: () => queue,
      result: () => final,
      cancel: (reason = 'cancelled by the client') => this.cancel(runId, reason),
      release: () => this.release(runId),
    };
  }

  async cancel(runId: string, reason = 'cancelled by the client'): Promise<void> {
    await this.js.publish(subjects.runCancel, encode(runCancel, { type: 'run.cancel', runId, reason }));
  }

  async release(runId: string): Promise<void> {
    await this.js.publish(subjects.runRelease, encode(runRelease, { type: 'run.release', runId }), { msgID: `${runId}.release` });
  }

  /** The run's view as last persisted by the orchestrator, or null for an unknown run. */
  async getRun(runId: string): Promise<RunView | null> {
    const entry = await this.topology.runs.get(runId);
    if (!entry?.string()) return null;
    return runView.parse(entry.json<{ view: unknown }>().view);
  }

  /**
   * Maps a step output from this host's shared memory, without copying it. The table is valid
   * until the run is released: released segments are reused for later outputs.
   */
  openOutput(descriptor: TableDescriptor): OpenedTable {
    return readInput(descriptor.segments, { dir: `${shmRoot()}/${this.topology.clusterId}` });
  }

  /** The run ends when its KV record says so: status messages may be missed, the record is not. */
  private async waitForEnd(runId: string, queue: EventQueue, subs: Subscription[]): Promise<RunView> {
    const watch = await this.topology.runs.watch({ key: runId });
    try {
      for await (const entry of watch) {
        if (!entry.string()) continue;
        const view = runView.parse(entry.json<{ view: unknown }>().view);
        if (view.state !== 'running') {
          // Status messages published before the final record may still be in flight.
          await this.nc.flush();
          return view;
        }
      }
      throw new Error(`lost the watch on run ${runId}`);
    } finally {
      watch.stop();
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

  push(event: RunEvent): void {
    if (this.ended) return;
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
