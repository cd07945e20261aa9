/**
 * The orchestrator's side of the output cache: a step about to be sent whose cache key a host
 * holds an output for is not sent at all. Its completion is written as if it had run, pointing
 * at the cached output (transport `cache`), and the run goes on from that fact like from any
 * other. Keys are computed here from the plan and the parents' completions (planner
 * `stepCacheKey`); the executors keep the outputs (executor/output-cache.ts).
 *
 * Materialized tables are "cached" in storage itself: the commit step records its cache key in
 * every snapshot it writes (Snapshot.cacheKey), and the client pins each stage step to its
 * table's current snapshot and that key when it submits (stage `current`). When the run's
 * commit would have the key every one of its tables' current snapshots were written with, the
 * tables hold this run's output already: the stages and the commit complete without running,
 * writing nothing, and the commit reports the snapshots that hold the tables. A table another
 * writer moved on since has another key (or none): then they run.
 */
import type { KV } from '@nats-io/kv';
import { stepCacheKey } from '../planner/index.ts';
import {
  encode,
  readCacheEntry,
  stepCompletion,
  stepKey,
  type CacheMode,
  type CommittedSnapshot,
  type Logger,
  type PlanStep,
  type RunSubmit,
  type StepSucceeded,
  type SystemStep,
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
/** Whether a run reuses or fills the output cache at all. A kept output must outlive any eviction: runs that keep theirs neither reuse nor fill it. */
export function usesOutputCache(submit: Pick<RunSubmit, 'cache' | 'keep'>): boolean {
  return cacheModeOf(submit) !== 'off' && !submit.keep;
}

export function cacheKeyOf(
  submit: Pick<RunSubmit, 'cache' | 'keep' | 'plan' | 'params' | 'event'>,
  step: PlanStep,
  parents: Readonly<Record<string, ParentFacts | undefined>>,
): string | null {
  if (!usesOutputCache(submit)) return null;
  // A scan pinned to a snapshot (every run submitted by a client is) reads the same rows every time.
  if (step.system?.kind === 'scan' && step.system.snapshot !== undefined && step.system.asOf === undefined) {
    return stepCacheKey({ system: step.system, params: {}, inputs: [] });
  }
  if (step.system?.kind === 'stage' || step.system?.kind === 'commit') return materializationKey(submit.plan, step, parents);
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

/**
 * The key of a stage or commit step: what the table will hold. A stage's builds on the step it
 * stores; the commit's on its stages only (the leaves it waits for change no table). Appends and
 * transactional runs have none: writing the same rows again adds them again, and a transaction
 * writes a branch of its own.
 */
function materializationKey(plan: RunSubmit['plan'], step: PlanStep, parents: Readonly<Record<string, ParentFacts | undefined>>): string | null {
  const system = step.system;
  if (!system || (system.kind !== 'stage' && system.kind !== 'commit') || system.transaction) return null;
  if (system.kind === 'stage' && system.mode !== 'replace') return null;
  const read = system.kind === 'stage' ? step.inputs : step.inputs.filter((i) => plan.steps.find((s) => s.name === i.step)?.system?.kind === 'stage');
  const inputs: { param: string; key: string }[] = [];
  for (const input of read) {
    const parent = plan.steps.find((s) => s.name === input.step);
    const key = parent ? parentKey(parent, parents[input.step]) : null;
    if (!key) return null;
    inputs.push({ param: input.param, key });
  }
  // The pin says what storage held when the run was submitted, not what the run writes.
  const { current: _pinned, ...what } = system as typeof system & { current?: unknown };
  return stepCacheKey({ system: what, params: {}, inputs });
}

/**
 * Every step's key as the orchestrator will compute it, before anything ran: each parent's key
 * stands for its completion. Null where a key depends on what the run finds (below a scan not
 * pinned to a snapshot) or there is none.
 */
export function plannedCacheKeys(submit: Pick<RunSubmit, 'cache' | 'keep' | 'plan' | 'params' | 'event'>): Record<string, string | null> {
  const facts: Record<string, ParentFacts | undefined> = {};
  const keys: Record<string, string | null> = {};
  for (const step of submit.plan.steps) {
    const key = cacheKeyOf(submit, step, facts);
    keys[step.name] = key;
    facts[step.name] = { cacheKey: key };
  }
  return keys;
}

/**
 * The snapshots that hold this run's tables already, or null when the run must stage and commit
 * them: its commit would have the key each table's current snapshot (pinned at submission) was
 * written with. All or nothing: the commit writes every table of the run in one catalog commit.
 */
export function unchangedTables(submit: Pick<RunSubmit, 'cache' | 'keep' | 'plan' | 'params' | 'event' | 'recompute'>): CommittedSnapshot[] | null {
  const commit = submit.plan.steps.find((s) => s.system?.kind === 'commit');
  const stages = submit.plan.steps.filter((s) => s.system?.kind === 'stage');
  if (!commit || stages.length === 0 || [commit, ...stages].some((s) => submit.recompute?.includes(s.name))) return null;
  const key = plannedCacheKeys(submit)[commit.name];
  if (!key) return null;
  const tables: CommittedSnapshot[] = [];
  for (const stage of stages) {
    const system = stage.system as SystemStep & { kind: 'stage' };
    if (system.current?.cacheKey !== key) return null;
    tables.push({ table: system.table, snapshotId: system.current.snapshotId });
  }
  return tables;
}

/** Whether the executor keeps the step's output in its cache: stages and commits keep theirs in storage. */
export function cacheWriteOf(submit: Pick<RunSubmit, 'cache'>, step: PlanStep): boolean {
  return cacheModeOf(submit) === 'readwrite' && step.system?.kind !== 'stage' && step.system?.kind !== 'commit';
}

/** Whether an executor may reuse a persisted output instead of running the step: not one a rerun computes again. */
export function cacheReadOf(submit: Pick<RunSubmit, 'cache' | 'recompute'>, step: PlanStep): boolean {
  return cacheModeOf(submit) !== 'off' && step.system?.kind !== 'stage' && step.system?.kind !== 'commit' && !submit.recompute?.includes(step.name);
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
   * Completes the step from the cache when a live host holds its output, or, for a stage or
   * commit, when storage holds the run's tables already: true when it did (or the step had
   * completed already), false when the step must run.
   */
  async reuse(submit: RunSubmit, planStep: PlanStep, cacheKey: string): Promise<boolean> {
    const { runId } = submit;
    const step = planStep.name;
    if (planStep.system?.kind === 'stage' || planStep.system?.kind === 'commit') return this.leaveTables(submit, planStep, cacheKey);
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
    return this.record(completion);
  }

  /** A stage or commit whose tables hold the run's output already: completed with nothing written. */
  private async leaveTables(submit: RunSubmit, planStep: PlanStep, cacheKey: string): Promise<boolean> {
    const tables = unchangedTables(submit);
    if (!tables) return false;
    const at = this.options.now();
    return this.record({
      type: 'step.succeeded',
      runId: submit.runId,
      step: planStep.name,
      attempt: 1,
      executorId: 'orchestrator',
      // Nothing in shared memory: the commit, the stages' only reader, does not run either.
      output: { kind: 'shm', hostId: 'storage', segments: [], byteSize: 0, rows: 0, schema: [] },
      transport: 'cache',
      inputCopiedBytes: 0,
      outputCopiedBytes: 0,
      cacheKey,
      ...(planStep.system?.kind === 'commit' ? { committed: tables } : {}),
      startedAt: at,
      at,
    });
  }

  private async record(completion: StepSucceeded): Promise<boolean> {
    const { kv, logger } = this.options;
    const { runId, step } = completion;
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
