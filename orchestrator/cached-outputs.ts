/**
 * The orchestrator's side of the output cache: a step about to be sent whose cache key a host
 * holds an output for is not sent at all. Its completion is written as if it had run, pointing
 * at the cached output (transport `cache`), and the run goes on from that fact like from any
 * other. Keys are computed here from the plan and the parents' completions (planner
 * `stepCacheKey`); the executors keep the outputs (executor/output-cache.ts).
 */
import type { KV } from '@nats-io/kv';
import { stepCacheKey } from '../planner/index.ts';
import {
  encode,
  readCacheEntry,
  stepCompletion,
  stepKey,
  type CacheMode,
  type Logger,
  type PlanStep,
  type RunSubmit,
  type StepSucceeded,
} from '../schemas/index.ts';
import type { StepFacts } from './run-machine.ts';

export interface CachedOutputsOptions {
  kv: { cache: KV; steps: KV };
  /** Hosts alive now: an entry on a host that stopped heartbeating is not reused. */
  liveHosts: () => Promise<{ hostId: string }[]>;
  logger: Logger;
  now: () => number;
}

/** A run's cache mode: runs that do not say use no cache. */
export const cacheModeOf = (submit: Pick<RunSubmit, 'cache'>): CacheMode => submit.cache ?? 'off';

/**
 * The cache key of `step` in `submit`'s run, or null when its output is not to be cached or
 * reused: the run's cache is off, the step opted out, it is a system step other than a scan
 * pinned to a snapshot, or a parent has no key (it opted out, or it scanned an empty table).
 */
export function cacheKeyOf(
  submit: Pick<RunSubmit, 'cache' | 'keep' | 'plan' | 'params' | 'event'>,
  step: PlanStep,
  parents: Readonly<Record<string, ParentFacts | undefined>>,
): string | null {
  // A kept output must outlive any eviction: runs that keep theirs neither reuse nor fill the cache.
  if (cacheModeOf(submit) === 'off' || submit.keep) return null;
  // A scan pinned to a snapshot (every run submitted by a client is) reads the same rows every time.
  if (step.system?.kind === 'scan' && step.system.snapshot !== undefined && step.system.asOf === undefined) {
    return stepCacheKey({ system: step.system, params: {}, inputs: [] });
  }
  if (step.system || step.cache === false || !step.codeKey) return null;
  const inputs: { param: string; columns?: string[]; key: string }[] = [];
  for (const input of step.inputs) {
    const parent = submit.plan.steps.find((s) => s.name === input.step);
    const key = parent ? parentKey(parent, parents[input.step]) : null;
    if (!key) return null;
    inputs.push({ param: input.param, ...(input.columns ? { columns: input.columns } : {}), key });
  }
  return stepCacheKey({
    codeKey: step.codeKey,
    ...(step.packages ? { packages: step.packages } : {}),
    params: submit.params,
    ...(submit.event ? { event: { subject: submit.event.subject, payload: submit.event.payload } } : {}),
    inputs,
  });
}

/** What a child's key needs of its parent's completion. */
export type ParentFacts = Pick<StepFacts, 'cacheKey' | 'scan'>;

/** A parent's key: the one its completion reported, else, for a scan, one from the snapshot it read. */
function parentKey(parent: PlanStep, facts: ParentFacts | undefined): string | null {
  if (!facts) return null;
  if (facts.cacheKey) return facts.cacheKey;
  if (parent.system?.kind === 'scan') {
    const snapshotId = facts.scan?.snapshotId;
    return snapshotId ? stepCacheKey({ system: parent.system, snapshotId, params: {}, inputs: [] }) : null;
  }
  return null;
}

export class CachedOutputs {
  constructor(private readonly options: CachedOutputsOptions) {}

  /**
   * Completes the step from the cache when a live host holds its output: true when it did (or
   * the step had completed already), false when the step must run.
   */
  async reuse(runId: string, step: string, cacheKey: string): Promise<boolean> {
    const { kv, liveHosts, logger, now } = this.options;
    let entry;
    try {
      entry = await readCacheEntry(kv.cache, cacheKey);
    } catch (error) {
      logger.warn(`output cache entry ${cacheKey} is unreadable, computing step ${step} of run ${runId}: ${(error as Error).message}`);
      return false;
    }
    if (!entry) return false;
    if (!(await liveHosts()).some((h) => h.hostId === entry.hostId)) return false;
    const at = now();
    const completion: StepSucceeded = {
      type: 'step.succeeded',
      runId,
      step,
      attempt: 1,
      executorId: entry.executorId,
      output: entry.output,
      transport: 'cache',
      inputCopiedBytes: 0,
      outputCopiedBytes: 0,
      cacheKey,
      startedAt: at,
      at,
    };
    try {
      // Created, not put: a completion already there (a previous leader's) is the fact.
      await kv.steps.create(stepKey(runId, step), encode(stepCompletion, completion));
      return true;
    } catch (error) {
      if ((await kv.steps.get(stepKey(runId, step)).catch(() => null))?.string()) return true;
      logger.warn(`could not record the cached output of step ${step} of run ${runId}, computing it: ${(error as Error).message}`);
      return false;
    }
  }
}
