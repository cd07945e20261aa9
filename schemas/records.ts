import type { KV } from '@nats-io/kv';
import { z } from 'zod';
import { decode } from './codec.ts';
import { cacheKey, NAME_PATTERN, runId, RUN_STATES, runSubmit, runView, stepFailed, stepSucceeded, tableDescriptor, type StepCompletion } from './messages.ts';

/**
 * The records Quiver keeps in KV, each read by more than one folder. Every reader parses with
 * these; a record that fails its schema is reported, never cast.
 */

const timestamp = z.number().int().nonnegative();

/**
 * A run in `quiver-runs`, written by the orchestrator's run store only: when the run is admitted,
 * when it leaves its queue, and once when it ends. Its steps' progress is not here: each step's
 * completion is its own record in `quiver-steps`, written once by the executor that ran it, so
 * a transition costs one small write instead of a rewrite of the whole run.
 */
export const runRecord = z.object({
  submit: runSubmit,
  state: z.enum(RUN_STATES),
  /** When the run was admitted, made unique: queued runs start in this order, across leaders too. */
  sequence: z.number().nonnegative(),
  /** When the run left its queue and its first steps became ready. */
  startedAt: timestamp.nullable(),
  finishedAt: timestamp.nullable(),
  /** The client read the result, or nobody will (event and schedule runs): outputs may go. */
  outputsReleased: z.boolean(),
  /** The run as it ended, kept once it has: a finished run is one read. Null while it goes. */
  view: runView.nullable(),
});
export type RunRecord = z.infer<typeof runRecord>;

/** Who runs a step, in `quiver-claims` under `<runId>.<step>`: created by the executor that claims it. */
export const claimRecord = z.object({
  executorId: z.string().min(1).max(200),
  hostId: z.string().min(1).max(128),
  attempt: z.number().int().positive(),
  at: timestamp,
  /**
   * The steps carried by the claimed step's ready message (StepReady.then), in order: the claim
   * covers them too, so the executor writes no claim of their own as it goes down the chain (one
   * claim per ready message). A step of the chain has its own claim only when a redelivery took
   * the chain over.
   */
  chain: z.array(z.string().regex(NAME_PATTERN)).min(1).optional(),
});
export type ClaimRecord = z.infer<typeof claimRecord>;

/** A leader lease in `quiver-leases`, changed only by compare-and-swap. */
export const leaseRecord = z.object({
  holder: z.string().min(1).max(300),
  pid: z.number().int().nonnegative(),
  expiresAt: timestamp,
});
export type LeaseRecord = z.infer<typeof leaseRecord>;

/** A step's completion in `quiver-steps` under `<runId>.<step>`: the fact the orchestrator drives runs by. */
export const stepCompletion = z.discriminatedUnion('type', [stepSucceeded, stepFailed]);

/** The key of a step's records in `quiver-steps` and `quiver-claims`. */
export const stepKey = (runId: string, step: string) => `${runId}.${step}`;

/** A run's record, or null when there is none. Throws InvalidMessageError when it is malformed. */
export async function readRunRecord(runs: KV, runId: string): Promise<RunRecord | null> {
  const entry = await runs.get(runId);
  if (!entry || entry.operation !== 'PUT' || entry.length === 0) return null;
  return decode(runRecord, `${entry.bucket}/${runId}`, entry.value);
}

/** A step's completion, or null when it has not finished. Throws InvalidMessageError when it is malformed. */
export async function readStepCompletion(steps: KV, runId: string, step: string): Promise<StepCompletion | null> {
  const key = stepKey(runId, step);
  const entry = await steps.get(key);
  if (!entry || entry.operation !== 'PUT' || entry.length === 0) return null;
  return decode(stepCompletion, `${entry.bucket}/${key}`, entry.value);
}

/**
 * Only the state of a run's record: what an executor checks before it runs a step, without
 * validating the whole submission (plan, event) on every step.
 */
export async function readRunState(runs: KV, runId: string): Promise<RunRecord['state'] | null> {
  const entry = await runs.get(runId);
  if (!entry || entry.operation !== 'PUT' || entry.length === 0) return null;
  return decode(runStateOnly, `${entry.bucket}/${runId}`, entry.value).state;
}
const runStateOnly = runRecord.pick({ state: true });

/** Who claimed a step, or null. Throws InvalidMessageError when it is malformed. */
export async function readClaim(claims: KV, runId: string, step: string): Promise<ClaimRecord | null> {
  const key = stepKey(runId, step);
  const entry = await claims.get(key);
  if (!entry || entry.operation !== 'PUT' || entry.length === 0) return null;
  return decode(claimRecord, `${entry.bucket}/${key}`, entry.value);
}

/**
 * A cached output in `quiver-cache` under its cache key: which host holds it, as what segments.
 * Written by the executor that cached it, deleted when it evicts it; read by the orchestrator
 * before it sends a step with that key, and by gc, which leaves cached segments alone.
 */
export const cacheEntry = z.object({
  key: cacheKey,
  hostId: z.string().min(1).max(128),
  executorId: z.string().min(1).max(200),
  output: tableDescriptor,
  /** The run and step that computed it. */
  runId,
  step: z.string().regex(NAME_PATTERN),
  at: timestamp,
});
export type CacheEntry = z.infer<typeof cacheEntry>;

/** A cache entry, or null when there is none. Throws InvalidMessageError when it is malformed. */
export async function readCacheEntry(cache: KV, key: string): Promise<CacheEntry | null> {
  const entry = await cache.get(key);
  if (!entry || entry.operation !== 'PUT' || entry.length === 0) return null;
  return decode(cacheEntry, `${entry.bucket}/${key}`, entry.value);
}
