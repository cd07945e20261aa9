/**
 * The executor's side of the output cache: outputs of steps sent with `cacheWrite` stay in
 * shared memory after their run, under a byte cap, and are found by their cache key in the
 * `quiver-cache` bucket (the orchestrator reads it before it sends a step; see
 * orchestrator/cached-outputs.ts).
 *
 * - A cached segment has a marker file `<shmDir>/cache/<segment id>`. Releases (from any
 *   executor of the host) and gc leave marked segments alone: the cache owns them now.
 * - Least recently used entries go first once the cap is passed. Reusing an entry (a running
 *   step maps it) pins it: a pinned entry is never evicted. An evicted entry leaves the bucket at
 *   once, so it is not handed out again; its segments go after a grace period, for steps that
 *   were sent it just before.
 * - A stopped executor evicts everything it cached: nothing is left behind. Entries of an
 *   executor that died are removed by gc on its host (see {@link removeOrphanedEntries}).
 * - Optionally (`persist`, QUIVER_CACHE_PERSIST=1), every output cached is also written, in the
 *   background, as an Arrow IPC stream into the table store (`cache/outputs/<key>.arrow`, a
 *   local folder or S3): the persisted tier. A step whose key shared memory no longer holds
 *   (evicted, another host, an executor restarted) is still sent to an executor, which reads
 *   the output back from there instead of running the step ({@link OutputCache.restore}). That
 *   tier has no cap: remove `cache/outputs/` from the store to empty it.
 */
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { KV } from '@nats-io/kv';
import { tableFromIPC, tableToIPC } from 'apache-arrow';
import { cacheEntry, encode, readCacheEntry, type CacheEntry, type Logger, type StepReady, type TableDescriptor } from '../schemas/index.ts';
import { readInput, unmapSegments } from '../shm/index.ts';
import type { ObjectStore } from '../storage/index.ts';
import type { RunnerReply } from './protocol.ts';
import { writeStepOutput } from './system-steps.ts';

/** Options of {@link OutputCache}. */
export interface OutputCacheOptions {
  /** Bytes of outputs kept; the least recently used go first. @default QUIVER_CACHE_BYTES, else 1 GiB */
  maxBytes?: number;
  /** How long an evicted entry's segments stay, for steps sent them just before. @default 60_000 */
  evictionGraceMs?: number;
  /**
   * Also keep cached outputs in the table store (the persisted tier), where they outlive
   * eviction and executor restarts. @default QUIVER_CACHE_PERSIST is 1 or true, else false
   */
  persist?: boolean;
}

/** Resolves {@link OutputCacheOptions} against their defaults. */
export function resolveOutputCacheOptions(options: OutputCacheOptions = {}): Required<OutputCacheOptions> {
  const fromEnv = Number(process.env.QUIVER_CACHE_BYTES);
  const persist = process.env.QUIVER_CACHE_PERSIST;
  if (options.persist === undefined && persist !== undefined && !['', '0', '1', 'true', 'false'].includes(persist)) {
    throw new RangeError(`QUIVER_CACHE_PERSIST must be 1 (keep cached outputs in the table store too) or 0; got ${JSON.stringify(persist)}`);
  }
  return {
    maxBytes: options.maxBytes ?? (Number.isFinite(fromEnv) && fromEnv >= 0 && process.env.QUIVER_CACHE_BYTES !== '' ? fromEnv : 1024 ** 3),
    evictionGraceMs: options.evictionGraceMs ?? 60_000,
    persist: options.persist ?? (persist === '1' || persist === 'true'),
  };
}

/** Where the persisted tier keeps the output of `key` in the table store. */
export const persistedOutputKey = (key: string) => `cache/outputs/${key}.arrow`;

const MARKERS = 'cache';
const markerDir = (shmDir: string) => join(shmDir, MARKERS);

/** Whether a segment belongs to the host's output cache (any executor's). */
export function isCachedSegment(shmDir: string, segmentId: string): boolean {
  return existsSync(join(markerDir(shmDir), segmentId));
}

/** The ids among `segmentIds` the output cache does not own: what a release may remove. */
export function releasable(shmDir: string, segmentIds: readonly string[]): string[] {
  if (!existsSync(markerDir(shmDir))) return [...segmentIds];
  return segmentIds.filter((id) => !isCachedSegment(shmDir, id));
}

interface Held {
  entry: CacheEntry;
  segments: string[];
  bytes: number;
}

export interface OutputCacheDeps {
  kv: KV;
  shmDir: string;
  hostId: string;
  executorId: string;
  /** Removes segments for good (the executor's release: pool or unlink, files or regions). */
  release: (segmentIds: string[]) => void;
  logger: Logger;
  /** The table store's objects, for the persisted tier (opened on first use). Without it, there is none. */
  objects?: () => Promise<ObjectStore>;
  /** How restored outputs are written into shared memory (the executor's segment options). */
  maxSegmentBytes?: number;
  poolMaxBytes?: number;
}

export class OutputCache {
  readonly maxBytes: number;
  private readonly graceMs: number;
  /** By cache key, least recently used first (a Map keeps insertion order; a use re-inserts). */
  private readonly held = new Map<string, Held>();
  private readonly keyOfSegment = new Map<string, string>();
  private readonly pins = new Map<string, number>();
  /** Evicted, waiting for their grace period and their last pin. */
  private readonly leaving = new Map<string, NodeJS.Timeout | null>();
  private used = 0;
  private stopped = false;
  private readonly persist: boolean;
  /** Writes to the persisted tier going on: a stopping executor lets them finish. */
  private readonly saving = new Set<Promise<void>>();
  /** Keys this executor wrote to or read from the persisted tier: not encoded again. */
  private readonly persisted = new Set<string>();
  evictions = 0;
  /** Outputs read back from the persisted tier instead of running their step. */
  restored = 0;

  constructor(
    private readonly deps: OutputCacheDeps,
    options: OutputCacheOptions = {},
  ) {
    const resolved = resolveOutputCacheOptions(options);
    this.maxBytes = resolved.maxBytes;
    this.graceMs = resolved.evictionGraceMs;
    this.persist = resolved.persist && deps.objects !== undefined;
  }

  get bytes(): number {
    return this.used;
  }

  get size(): number {
    return this.held.size;
  }

  /**
   * Keeps `output` under `key`. An output larger than the whole cache is not kept in shared
   * memory (the persisted tier, when on, keeps it still).
   */
  async store(key: string, output: TableDescriptor, from: { runId: string; step: string }): Promise<void> {
    if (this.stopped) return;
    if (this.persist && !this.persisted.has(key)) this.saveInBackground(key, output, from.step);
    if (output.byteSize > this.maxBytes || this.held.has(key)) return;
    const segments = output.segments.map((s) => s.id);
    mkdirSync(markerDir(this.deps.shmDir), { recursive: true, mode: 0o700 });
    for (const id of segments) writeFileSync(join(markerDir(this.deps.shmDir), id), key, { mode: 0o600 });
    const entry: CacheEntry = { key, hostId: this.deps.hostId, executorId: this.deps.executorId, output, runId: from.runId, step: from.step, at: Date.now() };
    this.held.set(key, { entry, segments, bytes: output.byteSize });
    for (const id of segments) this.keyOfSegment.set(id, key);
    this.used += output.byteSize;
    try {
      await this.deps.kv.put(key, encode(cacheEntry, entry));
    } catch (error) {
      // Not findable, so not worth keeping: the run releases the segments as usual.
      this.deps.logger.warn(`could not index cached output ${key} of step ${from.step}: ${(error as Error).message}`);
      this.forget(key);
      return;
    }
    await this.evictOverCap();
  }

  /** A step maps these segments now: cached ones are used (most recently) and cannot go until unpinned. */
  pin(segmentIds: readonly string[]): void {
    for (const id of segmentIds) {
      const key = this.keyOfSegment.get(id);
      if (key === undefined && !this.leaving.has(id)) continue;
      this.pins.set(id, (this.pins.get(id) ?? 0) + 1);
      const held = key === undefined ? undefined : this.held.get(key);
      if (held && key !== undefined) {
        this.held.delete(key);
        this.held.set(key, held);
      }
    }
  }

  unpin(segmentIds: readonly string[]): void {
    for (const id of segmentIds) {
      const pins = this.pins.get(id);
      if (pins === undefined) continue;
      if (pins > 1) this.pins.set(id, pins - 1);
      else {
        this.pins.delete(id);
        // Evicted while pinned, grace over: it can go now.
        if (this.leaving.get(id) === null) this.dropSegments([id]);
      }
    }
  }

  /** Evicts the least recently used unpinned entries until the cache is within its cap. */
  private async evictOverCap(): Promise<void> {
    for (const [key, held] of this.held) {
      if (this.used <= this.maxBytes) return;
      if (held.segments.some((id) => this.pins.has(id))) continue;
      await this.evict(key);
    }
  }

  /** Takes `key` out of the index now; its segments go after the grace period (or at once). */
  async evict(key: string, graceMs = this.graceMs): Promise<void> {
    const held = this.held.get(key);
    if (!held) return;
    this.forget(key);
    this.evictions++;
    await this.unindex(key);
    for (const id of held.segments) this.leaving.set(id, null);
    if (graceMs <= 0) {
      this.dropSegments(held.segments.filter((id) => !this.pins.has(id)));
      return;
    }
    const timer = setTimeout(() => {
      for (const id of held.segments) this.leaving.set(id, null);
      this.dropSegments(held.segments.filter((id) => !this.pins.has(id)));
    }, graceMs);
    timer.unref();
    for (const id of held.segments) this.leaving.set(id, timer);
  }

  /**
   * The step's output read back from the persisted tier into shared memory, as if it had run;
   * null when the tier is off, does not hold it, or the step may not reuse (see StepReady.cacheRead).
   */
  async restore(ready: StepReady, attempt: number): Promise<(RunnerReply & { type: 'result' }) | null> {
    if (!this.persist || this.stopped || !ready.cacheKey || !ready.cacheRead) return null;
    const objectKey = persistedOutputKey(ready.cacheKey);
    let bytes: Uint8Array;
    try {
      const objects = await this.deps.objects!();
      if ((await objects.size(objectKey)) === null) return null;
      bytes = await objects.get(objectKey);
    } catch (error) {
      this.deps.logger.warn(`could not read the persisted output ${ready.cacheKey} of step ${ready.step}, running it: ${(error as Error).message}`);
      return null;
    }
    let table;
    try {
      table = tableFromIPC(bytes);
    } catch (error) {
      this.deps.logger.warn(`the persisted output ${ready.cacheKey} of step ${ready.step} is unreadable, running it: ${(error as Error).message}`);
      return null;
    }
    const reply = writeStepOutput(table, {
      dir: this.deps.shmDir,
      idPrefix: `${ready.runId}.${ready.step}.${attempt}`,
      maxSegmentBytes: this.deps.maxSegmentBytes,
      poolMaxBytes: this.deps.poolMaxBytes,
    });
    this.restored++;
    this.persisted.add(ready.cacheKey);
    return reply;
  }

  /**
   * Writes the output into the persisted tier. Encoded now, while the run still holds its
   * segments (once released they may be reused for other data); written off the step's path.
   */
  private saveInBackground(key: string, output: TableDescriptor, step: string): void {
    let bytes: Uint8Array;
    try {
      const opened = readInput(output.segments, { dir: this.deps.shmDir });
      try {
        bytes = tableToIPC(opened.table, 'stream');
      } finally {
        unmapSegments(opened.mappings);
      }
    } catch (error) {
      this.deps.logger.warn(`could not persist the cached output ${key} of step ${step}: ${(error as Error).message}`);
      return;
    }
    const tracked: Promise<void> = (async () => {
      const objects = await this.deps.objects!();
      const objectKey = persistedOutputKey(key);
      // Content-addressed: an output already there is this one.
      if ((await objects.size(objectKey)) === null) await objects.put(objectKey, bytes);
      this.persisted.add(key);
    })()
      .catch((error: unknown) => this.deps.logger.warn(`could not persist the cached output ${key} of step ${step}: ${(error as Error).message}`))
      .finally(() => this.saving.delete(tracked));
    this.saving.add(tracked);
  }

  /** Evicts everything at once: the executor stops, and leaves nothing behind. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all([...this.saving]);
    for (const key of [...this.held.keys()]) await this.evict(key, 0);
    for (const [id, timer] of this.leaving) {
      if (timer) clearTimeout(timer);
      this.dropSegments([id]);
    }
  }

  private forget(key: string): void {
    const held = this.held.get(key);
    if (!held) return;
    this.held.delete(key);
    this.used -= held.bytes;
    for (const id of held.segments) this.keyOfSegment.delete(id);
  }

  /** Removes the bucket's entry only while it is still this executor's (another host may have cached the same key since). */
  private async unindex(key: string): Promise<void> {
    try {
      const current = await this.deps.kv.get(key);
      if (!current || current.operation !== 'PUT') return;
      const entry = cacheEntry.safeParse(current.json());
      if (entry.success && entry.data.executorId !== this.deps.executorId) return;
      await this.deps.kv.delete(key, { previousSeq: current.revision });
    } catch (error) {
      this.deps.logger.warn(`could not remove cache entry ${key}: ${(error as Error).message}`);
    }
  }

  private dropSegments(ids: string[]): void {
    if (ids.length === 0) return;
    for (const id of ids) {
      this.leaving.delete(id);
      rmSync(join(markerDir(this.deps.shmDir), id), { force: true });
    }
    this.deps.release(ids);
  }
}

/**
 * Entries of this host whose executor is gone (it died without stopping): their index entries
 * and markers are removed, and the segment ids returned for gc to release.
 */
export async function removeOrphanedEntries(args: { kv: KV; shmDir: string; hostId: string; liveExecutors: ReadonlySet<string>; logger: Logger }): Promise<string[]> {
  const orphaned: string[] = [];
  const keys: string[] = [];
  for await (const key of await args.kv.keys()) keys.push(key);
  for (const key of keys) {
    const entry = await readCacheEntry(args.kv, key).catch(() => null);
    if (!entry || entry.hostId !== args.hostId || args.liveExecutors.has(entry.executorId)) continue;
    await args.kv.delete(key).catch(() => undefined);
    orphaned.push(...entry.output.segments.map((s) => s.id));
  }
  const dir = markerDir(args.shmDir);
  if (existsSync(dir)) {
    for (const id of orphaned) rmSync(join(dir, id), { force: true });
  }
  if (orphaned.length > 0) args.logger.info(`gc: dropped ${orphaned.length} cached segment(s) of executors that are gone`);
  return orphaned;
}

/** Segment ids with a cache marker on this host. */
export function cachedSegmentIds(shmDir: string): string[] {
  const dir = markerDir(shmDir);
  return existsSync(dir) ? readdirSync(dir) : [];
}
