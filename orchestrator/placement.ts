/**
 * Where a ready step runs. Executors announce themselves in the `quiver-hosts` bucket (host
 * id, Flight endpoint, labels, capacity, load), refreshed by heartbeats. A step pinned to a
 * label goes to a live host carrying it; otherwise to the host holding most of its input
 * bytes when that host has room, else to any executor. Work placed on a host that stops
 * heartbeating is re-sent elsewhere, since only that host's executors read its queue.
 */
import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';
import { KvWatchInclude } from '@nats-io/kv';
import {
  buckets,
  encode,
  hostRecord,
  stepCompletion,
  stepReady,
  streams,
  subjects,
  HOST_TTL_MS,
  type HostRecord,
  type Logger,
  type PlanStep,
  type StepReady,
  type TableDescriptor,
  type Topology,
} from '../schemas/index.ts';

/** Where to send a step: one host, any executor, or nowhere (with the reason). */
export type Placement = { hostId: string; reason: string } | { hostId: null; reason: string } | { error: string };

/**
 * The placement rule, without I/O. `hosts` are the live executors (several may share a host id).
 */
export function placeStep(step: Pick<PlanStep, 'name' | 'host'>, inputs: readonly { descriptor: TableDescriptor }[], hosts: readonly HostRecord[]): Placement {
  const byHost = new Map<string, { labels: Set<string>; capacity: number; running: number }>();
  for (const h of hosts) {
    const entry = byHost.get(h.hostId) ?? { labels: new Set([h.hostId]), capacity: 0, running: 0 };
    for (const l of h.labels) entry.labels.add(l);
    entry.capacity += h.capacity;
    entry.running += h.running;
    byHost.set(h.hostId, entry);
  }
  const inputBytes = new Map<string, number>();
  for (const i of inputs) inputBytes.set(i.descriptor.hostId, (inputBytes.get(i.descriptor.hostId) ?? 0) + i.descriptor.byteSize);
  const freeOf = (id: string) => byHost.get(id)!.capacity - byHost.get(id)!.running;
  if (step.host) {
    const candidates = [...byHost.keys()].filter((id) => byHost.get(id)!.labels.has(step.host!));
    if (candidates.length === 0) {
      return { error: `step "${step.name}" is pinned to hosts labelled "${step.host}", and no live executor has that label (live hosts: ${[...byHost.keys()].join(', ') || 'none'})` };
    }
    // Among the labelled hosts, data first, then room.
    candidates.sort((a, b) => (inputBytes.get(b) ?? 0) - (inputBytes.get(a) ?? 0) || freeOf(b) - freeOf(a));
    return { hostId: candidates[0]!, reason: `pinned to label ${step.host}` };
  }
  const [richest] = [...inputBytes.entries()].filter(([id]) => byHost.has(id)).sort((a, b) => b[1] - a[1]);
  if (richest && freeOf(richest[0]) > 0) return { hostId: richest[0], reason: `holds ${richest[1]} input bytes` };
  return { hostId: null, reason: richest ? `host ${richest[0]} is full` : 'no input lives on a live host' };
}

interface Sent {
  message: StepReady;
  step: PlanStep;
  hostId: string;
}

/** How often the orchestrator looks for hosts that stopped heartbeating, and retries waiting steps. */
const WATCH_INTERVAL_MS = 2_000;
/** How long a pinned step waits for a host with its label (one may be starting) before it fails. */
export const PLACEMENT_GRACE_MS = 30_000;

interface Waiting {
  message: StepReady;
  step: PlanStep;
  msgID: string;
  since: number;
  onChain: (() => void) | undefined;
}

/** Steps by run: a finished run's steps are forgotten at once, however many other runs are in flight. */
class ByRun<T> {
  private readonly runs = new Map<string, Map<string, T>>();
  set(runId: string, step: string, value: T): void {
    let steps = this.runs.get(runId);
    if (!steps) this.runs.set(runId, (steps = new Map()));
    steps.set(step, value);
  }
  delete(runId: string, step: string): void {
    const steps = this.runs.get(runId);
    if (steps?.delete(step) && steps.size === 0) this.runs.delete(runId);
  }
  deleteRun(runId: string): void {
    this.runs.delete(runId);
  }
  /** A snapshot: the caller may change the set while it goes through them. */
  values(): T[] {
    return [...this.runs.values()].flatMap((steps) => [...steps.values()]);
  }
}

/** Sends ready steps where {@link placeStep} says, and re-sends those stranded on dead hosts. */
export class Dispatcher {
  private readonly sent = new ByRun<Sent>();
  private readonly waiting = new ByRun<Waiting>();
  private known = new Set<string>();
  private timer: NodeJS.Timeout | null = null;
  /** Host records as the watch last saw them; null until its first full read. */
  private cache: Map<string, HostRecord> | null = null;
  private watch: { stop(): void } | null = null;
  /** When the watch last delivered a heartbeat (or the cache was first filled). */
  private watchSeenAt = 0;

  constructor(
    private readonly js: JetStreamClient,
    private readonly jsm: () => Promise<JetStreamManager>,
    private readonly kv: Pick<Topology, 'hosts' | 'steps' | 'claims' | 'keys'>,
    private readonly logger: Logger,
    private readonly now: () => number,
  ) {}

  async liveHosts(): Promise<HostRecord[]> {
    if (this.cache && this.cache.size > 0 && this.now() - this.watchSeenAt > HOST_TTL_MS / 2) {
      // Every executor heartbeats several times a ttl: a watch that heard none for this long
      // is stuck (its consumer could not be made again while a NATS node was away), and its
      // cache would age every host out. Listing takes over until checkHosts watches again.
      this.logger.warn('the watch on quiver-hosts went silent; listing it instead');
      this.watch?.stop();
      this.watch = null;
      this.cache = null;
    }
    if (this.cache) {
      // Expiry removes a record without a notice to watchers: a silent host ages out here.
      const oldest = this.now() - HOST_TTL_MS;
      const live = [...this.cache.values()].filter((h) => h.at >= oldest);
      if (live.length > 0) return live;
      // An empty view cannot tell a stuck watch from no hosts (a watch made while a NATS node
      // was away may never deliver, and then no heartbeat marks it silent): the bucket decides.
      const listed = await this.listHosts();
      if (listed.length > 0 && this.cache) {
        this.logger.warn('the watch on quiver-hosts missed live hosts; watching it again');
        this.watch?.stop();
        this.watch = null;
        this.cache = null;
      }
      return listed;
    }
    return this.listHosts();
  }

  private async listHosts(): Promise<HostRecord[]> {
    const hosts: HostRecord[] = [];
    // Each key once: a host counted twice would double its capacity.
    for (const key of await this.kv.keys(buckets.hosts)) {
      const entry = await this.kv.hosts.get(key);
      if (!entry?.string()) continue;
      const parsed = hostRecord.safeParse(entry.json());
      if (parsed.success) hosts.push(parsed.data);
    }
    return hosts;
  }

  /**
   * Places and publishes `message`. Only the first publish of a step uses the plain id, so
   * JetStream dedupes a resumed orchestrator's repeat. A chain (`message.then`) goes with it only
   * on the queue every executor reads, whose redelivery takes a chain up wherever its executor
   * died; `onChain` is called, before the publish, when it does. A step placed on one host goes
   * alone, and the steps after it are sent when they are ready, as any step.
   */
  async dispatch(message: StepReady, step: PlanStep, onChain?: () => void): Promise<void> {
    await this.place(message, step, `${message.runId}.${message.step}.ready`, this.now(), onChain);
  }

  private async place(message: StepReady, step: PlanStep, msgID: string, since = this.now(), onChain?: () => void): Promise<void> {
    const hosts = await this.liveHosts();
    const placed = placeStep(step, message.inputs, hosts);
    const key = `${message.runId}.${message.step}`;
    this.waiting.delete(message.runId, message.step);
    if ('error' in placed && this.now() - since < PLACEMENT_GRACE_MS) {
      this.waiting.set(message.runId, message.step, { message, step, msgID, since, onChain });
      return;
    }
    if ('error' in placed) {
      this.logger.warn(placed.error);
      const failed = {
        type: 'step.failed' as const,
        runId: message.runId,
        step: message.step,
        attempt: 1,
        executorId: 'orchestrator',
        error: { name: 'PlacementError', code: 'ERR_NO_HOST', message: placed.error },
        at: this.now(),
      };
      // Created, not put: a completion already there (the step ran after all) wins.
      await this.kv.steps.create(key, encode(stepCompletion, failed)).catch(() => undefined);
      return;
    }
    for (const h of hosts) this.known.add(h.hostId);
    const subject = placed.hostId === null ? subjects.stepReady : subjects.stepReadyOnHost(placed.hostId);
    const { then, ...alone } = message;
    const sent = placed.hostId === null ? message : alone;
    if (then && sent === message) onChain?.();
    await this.js.publish(subject, encode(stepReady, sent), { msgID });
    if (placed.hostId !== null) this.sent.set(message.runId, message.step, { message: alone, step, hostId: placed.hostId });
  }

  /**
   * Takes note of a step already running on a host (a resumed run), so that the host dying
   * sends it elsewhere as if this process had placed it.
   */
  remember(message: StepReady, step: PlanStep, hostId: string): void {
    this.sent.set(message.runId, message.step, { message, step, hostId });
    this.known.add(hostId);
  }

  /** Forgets the steps of a finished run. */
  forgetRun(runId: string): void {
    this.sent.deleteRun(runId);
    this.waiting.deleteRun(runId);
  }

  start(): void {
    this.timer ??= setInterval(() => void this.checkHosts().catch((e) => this.logger.warn(`host check failed: ${(e as Error).message}`)), WATCH_INTERVAL_MS);
    this.timer.unref();
    void this.watchHosts().catch((e) => this.logger.warn(`cannot watch quiver-hosts, listing it per step instead: ${(e as Error).message}`));
  }

  /** Keeps the host records in memory: listing the bucket for every ready step costs round trips. */
  private async watchHosts(): Promise<void> {
    if (this.watch) return;
    const cache = new Map<string, HostRecord>();
    // Watching before the first read, so no heartbeat in between is missed.
    const watch = await this.kv.hosts.watch({ include: KvWatchInclude.UpdatesOnly });
    this.watch = watch;
    void (async () => {
      for await (const entry of watch) {
        if (entry.operation !== 'PUT') {
          cache.delete(entry.key);
          continue;
        }
        const parsed = hostRecord.safeParse(entry.json());
        if (parsed.success) cache.set(entry.key, parsed.data);
        this.watchSeenAt = this.now();
      }
      // The watch died (its consumer could not be made again while a NATS node was away): a
      // cache no heartbeat refreshes would age every host out. Listing takes over until
      // checkHosts watches again.
      if (this.watch === watch) {
        this.watch = null;
        this.cache = null;
      }
    })();
    for (const host of await this.listHosts()) cache.set(host.executorId, host);
    this.watchSeenAt = this.now();
    if (this.watch === watch) this.cache = cache;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.watch?.stop();
    this.watch = null;
    this.cache = null;
  }

  /** Places again the unfinished steps placed on hosts that disappeared. */
  async checkHosts(): Promise<void> {
    if (this.timer && !this.watch) void this.watchHosts().catch((e) => this.logger.warn(`cannot watch quiver-hosts, listing it per step instead: ${(e as Error).message}`));
    for (const w of this.waiting.values()) await this.place(w.message, w.step, w.msgID, w.since, w.onChain);
    const live = new Set((await this.liveHosts()).map((h) => h.hostId));
    const lost = [...this.known].filter((id) => !live.has(id));
    this.known = live;
    for (const hostId of lost) {
      this.logger.warn(`host ${hostId} stopped heartbeating: re-sending its unfinished steps`);
      // Nobody reads that queue any more; a host coming back under that id starts clean.
      const jsm = await this.jsm();
      await jsm.streams.purge(streams.work, { filter: subjects.stepReadyOnHost(hostId) }).catch(() => undefined);
      for (const sent of this.sent.values()) {
        if (sent.hostId !== hostId) continue;
        const key = `${sent.message.runId}.${sent.message.step}`;
        this.sent.delete(sent.message.runId, sent.message.step);
        if ((await this.kv.steps.get(key))?.string()) continue;
        // The dead host's claim would make the next executor drop the step as a duplicate.
        await this.kv.claims.delete(key).catch(() => undefined);
        await this.place(sent.message, sent.step, `${key}.ready.after.${hostId}.${this.now()}`);
      }
    }
  }
}
