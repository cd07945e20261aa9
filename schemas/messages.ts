import { z } from 'zod';

/**
 * Every message that crosses a process boundary in Quiver. Each receiver parses with these
 * schemas; nothing is trusted because it arrived on a Quiver subject.
 */

/** Step and pipeline names: identifiers, so they are safe in subjects, KV keys and file names. */
export const NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;
const name = z.string().regex(NAME_PATTERN, 'must be an identifier: a letter or _, then letters, digits or _ (at most 64)');
/** Run ids are ULIDs (26 Crockford base32 characters). */
export const runId = z.string().regex(/^[0-9A-HJKMNP-TV-Z]{26}$/, 'must be a ULID');
const hostId = z.string().regex(/^[A-Za-z0-9._-]{1,128}$/, 'must be letters, digits, . _ or -');
const codeHash = z.string().regex(/^[0-9a-f]{64}$/, 'must be a sha256 hex digest');
const timestamp = z.number().int().nonnegative();
const nonNegativeInt = z.number().int().nonnegative();

export const fieldSchema = z.object({ name: z.string(), type: z.string(), nullable: z.boolean() });
export type FieldSummary = z.infer<typeof fieldSchema>;

export const segmentRef = z.object({
  id: z.string().regex(/^[A-Za-z0-9._-]{1,200}$/),
  byteSize: nonNegativeInt,
  /** Absent or 'file': a file in the cluster's shm directory. 'region': pages pinned by the quiver module (kmod/), reached through `broker`. */
  kind: z.enum(['file', 'region']).optional(),
  /** For a region: the absolute path of the unix socket of the broker holding its fd. */
  broker: z.string().min(1).max(1024).optional(),
  /** For a table assembled from several region tables (columns passed through by reference): which one this region belongs to... */
  source: nonNegativeInt.optional(),
  /** ...and the columns taken from it: [name there, name here, position here]. */
  columns: z.array(z.tuple([z.string(), z.string(), nonNegativeInt])).optional(),
});

/** Where a table lives: only this travels between processes, never the data. */
export const tableDescriptor = z.object({
  kind: z.literal('shm'),
  hostId,
  segments: z.array(segmentRef),
  byteSize: nonNegativeInt,
  rows: nonNegativeInt,
  schema: z.array(fieldSchema),
});
export type TableDescriptor = z.infer<typeof tableDescriptor>;

export const planInput = z.object({
  /** The name the step function receives the table under. */
  param: name,
  /** The parent step producing the table. */
  step: name,
  columns: z.array(z.string()).min(1).optional(),
});
/**
 * A system step of the physical plan, run by the executor itself rather than user code: `scan`
 * reads a stored table (column and filter pushdown) into shared memory; `stage` writes its
 * input as Parquet data files no snapshot refers to yet; `commit` commits the staged files as
 * new snapshots once every other step has succeeded.
 */
export const systemStep = z.discriminatedUnion('kind', [
  z.object({
    kind: z.literal('scan'),
    table: name,
    columns: z.array(z.string()).min(1).optional(),
    filter: z.string().max(4000).optional(),
    snapshot: z.string().max(64).optional(),
    asOf: timestamp.optional(),
    /** The branch, tag or catalog commit to read. @default 'main' */
    ref: z.string().max(300).optional(),
  }),
  z.object({
    kind: z.literal('stage'),
    table: name,
    mode: z.enum(['append', 'replace']),
    /** The branch the run writes. @default 'main' */
    branch: z.string().max(300).optional(),
    /** Commit the table to the run's branch `run/<runId>` now (merged by the commit step). */
    transaction: z.boolean().optional(),
    /**
     * The table's current snapshot on `branch` when the run was submitted, and the cache key of
     * the commit step that wrote it: when this run's commit has that key, the table holds this
     * run's output already, and the stage and commit are not run. Not part of any cache key.
     */
    current: z.object({ snapshotId: z.string().min(1).max(64), cacheKey: z.string().regex(/^[0-9a-f]{64}$/) }).optional(),
  }),
  z.object({
    kind: z.literal('commit'),
    /** The branch the run writes: every staged table in one catalog commit. @default 'main' */
    branch: z.string().max(300).optional(),
    /** Merge the run's branch `run/<runId>` into `branch` instead, then delete it. */
    transaction: z.boolean().optional(),
  }),
]);
export type SystemStep = z.infer<typeof systemStep>;

/**
 * How a user step runs: `process` in a fresh step process of its own; `worker` in a long-lived
 * step process of its pipeline version that runs that version's steps one after another.
 */
export const ISOLATION_LEVELS = ['process', 'worker'] as const;
export type Isolation = (typeof ISOLATION_LEVELS)[number];
export const isolation = z.enum(ISOLATION_LEVELS);

/**
 * How a run uses the output cache: `readwrite` reuses cached outputs and caches what it computes,
 * `read` only reuses, `off` computes everything and caches nothing.
 */
export const CACHE_MODES = ['readwrite', 'read', 'off'] as const;
export const cacheMode = z.enum(CACHE_MODES);
export type CacheMode = z.infer<typeof cacheMode>;
/** A step's cache key (planner `stepCacheKey`): sha256, hex. */
export const cacheKey = z.string().regex(/^[0-9a-f]{64}$/);

/** Bounds of limits a pipeline may declare (docs/limits.md): checked by the planner and on the wire. */
export const STEP_LIMIT_BOUNDS = { timeoutMs: { min: 100, max: 7 * 24 * 3600 * 1000 }, memoryMb: { min: 32, max: 1024 * 1024 } } as const;
/** A user step's declared time and memory limits; what is absent takes the executor's defaults. */
export const stepLimits = z.object({
  timeoutMs: z.number().int().min(STEP_LIMIT_BOUNDS.timeoutMs.min).max(STEP_LIMIT_BOUNDS.timeoutMs.max).optional(),
  memoryMb: z.number().int().min(STEP_LIMIT_BOUNDS.memoryMb.min).max(STEP_LIMIT_BOUNDS.memoryMb.max).optional(),
});
export type StepLimits = z.infer<typeof stepLimits>;
/** Environment variable names, as a step declares them (`env: ['API_KEY']`). */
export const ENV_NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;
/** The executor's environment variables a user step is given (its declared secrets): names only, never values. */
export const stepEnv = z.array(z.string().regex(ENV_NAME_PATTERN, 'must be an environment variable name')).max(64);

/** npm package names (npm's rules: lowercase, optionally scoped, at most 214 characters). */
export const PACKAGE_NAME_PATTERN = /^(?:@[a-z0-9][a-z0-9._~-]*\/)?[a-z0-9][a-z0-9._~-]*$/;
/** Exact versions a step's environment is installed with: package name → version. */
export const stepPackages = z
  .record(z.string().max(214).regex(PACKAGE_NAME_PATTERN, 'must be an npm package name'), z.string().max(256).regex(/^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.+-]*)?$/, 'must be an exact version'))
  .refine((p) => Object.keys(p).length <= 256, 'at most 256 packages');
export type StepPackages = z.infer<typeof stepPackages>;

export const planStep = z.object({
  name,
  /** User steps only; absent means `process`. */
  isolation: isolation.optional(),
  inputs: z.array(planInput),
  system: systemStep.optional(),
  /** Run only on a host with this label (a host's id is one of its labels). */
  host: z.string().regex(/^[A-Za-z0-9._-]{1,128}$/, 'must be letters, digits, . _ or -').optional(),
  /** User steps only: declared time and memory limits (the step's, else the pipeline's). */
  limits: stepLimits.optional(),
  /** User steps only: environment variables (secrets) the step is given, the pipeline's and its own. */
  env: stepEnv.optional(),
  /** User steps only: what identifies this step's own code in the bundle (planner `stepCodeKeys`), for its cache key. */
  codeKey: z.string().regex(/^[0-9a-f]{64}$/).optional(),
  /** `step(..., { cache: false })`: never reused, never cached (clocks, randomness, side effects); nor are its descendants. */
  cache: z.literal(false).optional(),
  /**
   * User steps only: the exact npm packages of the step's environment (name → version): every
   * package its pipeline declares, its own declared versions winning (docs/packages.md).
   */
  packages: stepPackages.optional(),
});
/** The logical plan: steps in topological order. The orchestrator only ever sees this, never data. */
export const plan = z.object({
  pipeline: name,
  steps: z.array(planStep).min(1),
  /** `pipeline(..., { cache: true })`: runs of the deployed pipeline use the output cache (readwrite). */
  cache: z.boolean().optional(),
});
export type Plan = z.infer<typeof plan>;
export type PlanStep = z.infer<typeof planStep>;

const params = z.record(z.string(), z.string());

/** An event subject as users publish it: dot-separated tokens, no wildcards. */
export const EVENT_SUBJECT_PATTERN = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;
export const eventSubject = z
  .string()
  .max(200)
  .regex(EVENT_SUBJECT_PATTERN, 'must be dot-separated tokens of letters, digits, _ or - (e.g. orders.uploaded)');
/** What a trigger listens to: a subject with NATS wildcards (`*` one token, `>` the rest). */
export const eventPattern = z
  .string()
  .max(200)
  .regex(/^([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?$|^>$/, 'must be a subject whose tokens may be * or a final > (e.g. orders.*)');

/** An event as a run receives it (`ctx.event`). */
export const runEvent = z.object({
  subject: eventSubject,
  id: z.string().min(1).max(200),
  payload: z.unknown(),
  publishedAt: timestamp,
});
export type RunEventPayload = z.infer<typeof runEvent>;

/** What started a run. */
export const runTrigger = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('user'), by: z.string().max(200) }),
  z.object({ kind: z.literal('event'), subject: eventSubject, eventId: z.string().min(1).max(200), sequence: nonNegativeInt }),
  z.object({ kind: z.literal('schedule'), tick: timestamp }),
]);
export type RunTrigger = z.infer<typeof runTrigger>;

export const CATCH_UP_POLICIES = ['none', 'latest', 'all'] as const;
export const OVERLAP_POLICIES = ['skip', 'queue', 'allow'] as const;
export const scheduleSpec = z.object({
  cron: z.string().min(1).max(200),
  timezone: z.string().min(1).max(100),
  catchUp: z.enum(CATCH_UP_POLICIES),
  overlap: z.enum(OVERLAP_POLICIES),
});
export type ScheduleSpec = z.infer<typeof scheduleSpec>;

export const eventTrigger = z.object({
  subject: eventPattern,
  /** JSON Schema (2020-12) the payload must satisfy, or null for any JSON. */
  schema: z.record(z.string(), z.unknown()).nullable(),
});
export type EventTrigger = z.infer<typeof eventTrigger>;

/** How a run waits for others before it starts. */
export const admission = z.object({
  /** At most this many runs of the pipeline at once; the rest wait in order. */
  maxConcurrentRuns: z.number().int().positive().nullable(),
  /** For scheduled runs: what to do while the previous scheduled run still goes. */
  overlap: z.enum(OVERLAP_POLICIES).nullable(),
});
export type Admission = z.infer<typeof admission>;

export const runSubmit = z.object({
  type: z.literal('run.submit'),
  runId,
  plan,
  codeHash,
  params,
  /** Keep the run's outputs after their result has been read. */
  keep: z.boolean(),
  submittedAt: timestamp,
  submittedBy: z.string().max(200),
  /** What started the run. @default a user: `submittedBy` */
  trigger: runTrigger.optional(),
  /** The deployed version this run belongs to (runs of deployed pipelines only). */
  version: z.number().int().positive().optional(),
  event: runEvent.optional(),
  admission: admission.optional(),
  /** How the run uses the output cache. @default 'off' */
  cache: cacheMode.optional(),
  /** Steps computed again whatever the cache holds (a rerun from a step: it and the steps after it). */
  recompute: z.array(name).optional(),
});
export type RunSubmit = z.infer<typeof runSubmit>;

export const runCancel = z.object({ type: z.literal('run.cancel'), runId, reason: z.string().max(2000) });
export const runRelease = z.object({ type: z.literal('run.release'), runId });

export const stepError = z.object({
  name: z.string(),
  message: z.string(),
  stack: z.string().optional(),
  code: z.string().optional(),
});
export type StepError = z.infer<typeof stepError>;

export const stepStarted = z.object({
  type: z.literal('step.started'),
  runId,
  step: name,
  attempt: z.number().int().positive(),
  executorId: z.string().min(1).max(200),
  hostId,
  at: timestamp,
});

export const scanFacts = z.object({
  table: name,
  snapshotId: z.string().nullable(),
  bytesFetched: nonNegativeInt,
  rowGroupsRead: nonNegativeInt,
  rowGroupsSkipped: nonNegativeInt,
  cachedChunks: nonNegativeInt,
});
export type ScanFacts = z.infer<typeof scanFacts>;

/** A stored table's snapshot a run's commit left it at. */
export const committedSnapshot = z.object({ table: name, snapshotId: z.string().min(1).max(64) });
export type CommittedSnapshot = z.infer<typeof committedSnapshot>;

export const stepSucceeded = z.object({
  type: z.literal('step.succeeded'),
  runId,
  step: name,
  attempt: z.number().int().positive(),
  executorId: z.string().min(1).max(200),
  output: tableDescriptor,
  /** How the step got its inputs: segment files, regions of the quiver module, fetched over Flight, or a cache. */
  transport: z.enum(['shm', 'region', 'flight', 'cache']).nullable(),
  /** Bytes the platform copied to give the step its inputs. */
  inputCopiedBytes: nonNegativeInt,
  /** Bytes the platform copied to store the step's output. */
  outputCopiedBytes: nonNegativeInt,
  /** Bytes of inputs this step fetched from other hosts over Arrow Flight (also in inputCopiedBytes). */
  fetchedBytes: nonNegativeInt.optional(),
  /** A scan step's reading of its table: which snapshot, what it fetched and what it skipped. */
  scan: scanFacts.optional(),
  /** How the user's code ran; absent for system steps, which the executor runs itself. */
  isolation: isolation.optional(),
  /** When the step function was called (epoch ms, on the wall clock as startedAt and at): where a user's latency ends. */
  codeStartedAt: z.number().nonnegative().optional(),
  /** The step's cache key; with transport `cache`, the output is a cached one and nothing ran. */
  cacheKey: cacheKey.optional(),
  /** Milliseconds spent building or fetching the step's package environment (steps with packages). */
  envMs: z.number().nonnegative().optional(),
  /** A commit step left unchanged (transport `cache`): the snapshots that hold the run's tables, written earlier from the same inputs. */
  committed: z.array(committedSnapshot).optional(),
  startedAt: timestamp,
  at: timestamp,
});

export const stepFailed = z.object({
  type: z.literal('step.failed'),
  runId,
  step: name,
  attempt: z.number().int().positive(),
  executorId: z.string().min(1).max(200),
  /** The host of the executor that failed it; absent when no executor ran it (it could not be placed). */
  hostId: hostId.optional(),
  error: stepError,
  isolation: isolation.optional(),
  codeStartedAt: z.number().nonnegative().optional(),
  /** Milliseconds spent building or fetching the step's package environment (steps with packages). */
  envMs: z.number().nonnegative().optional(),
  startedAt: timestamp.optional(),
  at: timestamp,
});

export type StepStarted = z.infer<typeof stepStarted>;
export type StepSucceeded = z.infer<typeof stepSucceeded>;
export type StepFailed = z.infer<typeof stepFailed>;
export type StepCompletion = StepSucceeded | StepFailed;

/** What clients ask of the orchestrator, on the control stream. */
export const controlMessage = z.discriminatedUnion('type', [runSubmit, runCancel, runRelease]);
export type ControlMessage = z.infer<typeof controlMessage>;

/** A ready step, as executors claim it from the work queue. */
export const stepReady = z.object({
  type: z.literal('step.ready'),
  runId,
  step: name,
  pipeline: name,
  codeHash,
  params,
  inputs: z.array(planInput.extend({ descriptor: tableDescriptor })),
  /** The event that started the run, for `ctx.event`. */
  event: runEvent.optional(),
  /** Set for a system step: what the executor does instead of running user code. */
  system: systemStep.optional(),
  /** For a user step: how it runs. @default 'process' */
  isolation: isolation.optional(),
  /** For a user step: its declared limits; absent ones take the executor's defaults. */
  limits: stepLimits.optional(),
  /** For a user step: the executor's environment variables it is given (names). */
  env: stepEnv.optional(),
  /** For a user step: the exact packages of the environment it runs in (its plan step's). */
  packages: stepPackages.optional(),
  /** The step's cache key, when its output can be cached: reported back with its completion. */
  cacheKey: cacheKey.optional(),
  /** Keep the output in the host's output cache under `cacheKey` (runs with cache `readwrite`). */
  cacheWrite: z.boolean().optional(),
  /**
   * The executor may read the output under `cacheKey` back from the persisted tier instead of
   * running the step (not for a step a rerun computes again, nor for stages and commits).
   */
  cacheRead: z.boolean().optional(),
  /**
   * The steps that follow this one in its chain (planner `chainAfter`), in order, each reading
   * the output of the one before it: the executor runs them after this one, claiming and
   * recording each, and acks this message when the last is recorded. Only for runs that do not
   * use the output cache.
   */
  then: z.array(z.object({ step: name, inputs: z.array(planInput) })).min(1).optional(),
});
export type StepReady = z.infer<typeof stepReady>;

export const logLine = z.object({
  runId,
  step: name,
  stream: z.enum(['stdout', 'stderr']),
  line: z.string(),
  at: timestamp,
});
export type LogLine = z.infer<typeof logLine>;

export const STEP_STATES = ['waiting', 'ready', 'running', 'succeeded', 'failed', 'skipped', 'cancelled'] as const;
export type StepState = (typeof STEP_STATES)[number];
export const RUN_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'] as const;
export type RunState = (typeof RUN_STATES)[number];
/** A run in one of these states will not change any more. */
export const FINISHED_RUN_STATES: readonly RunState[] = ['succeeded', 'failed', 'cancelled'];
export const isFinished = (state: RunState) => FINISHED_RUN_STATES.includes(state);

export const stepView = z.object({
  name,
  state: z.enum(STEP_STATES),
  attempt: nonNegativeInt,
  executorId: z.string().nullable(),
  hostId: z.string().nullable(),
  startedAt: timestamp.nullable(),
  finishedAt: timestamp.nullable(),
  rows: nonNegativeInt.nullable(),
  bytes: nonNegativeInt.nullable(),
  transport: z.enum(['shm', 'region', 'flight', 'cache']).nullable(),
  copiedBytes: nonNegativeInt.nullable(),
  /** What a scan step read from storage. */
  scan: scanFacts.nullable().default(null),
  /** How the user's code ran (null for system steps and steps that never ran). */
  isolation: isolation.nullable().default(null),
  /** When the step function was called (epoch ms): claimed at startedAt, user code from here. */
  codeStartedAt: z.number().nonnegative().nullable().default(null),
  /** The step's cache key, when it had one; its transport is `cache` when its output was reused. */
  cacheKey: cacheKey.nullable().default(null),
  /** Milliseconds the step spent getting its package environment (built, fetched or found), for steps with packages. */
  envMs: z.number().nonnegative().optional(),
  /** A commit step left unchanged (transport `cache`): the snapshots holding the run's tables. */
  committed: z.array(committedSnapshot).optional(),
  output: tableDescriptor.nullable(),
  error: stepError.nullable(),
});
export type StepView = z.infer<typeof stepView>;

/** What clients see of a run: derived from the orchestrator's machine, published on every transition. */
export const runView = z.object({
  runId,
  pipeline: name,
  state: z.enum(RUN_STATES),
  submittedAt: timestamp,
  /** When the run left the queue and its first steps became ready. */
  startedAt: timestamp.nullable().default(null),
  finishedAt: timestamp.nullable(),
  keep: z.boolean(),
  trigger: runTrigger.default({ kind: 'user', by: 'unknown' }),
  version: z.number().int().positive().nullable().default(null),
  outputsReleased: z.boolean(),
  /** Steps whose outputs are the run's result: the leaves of the DAG. */
  outputs: z.array(name),
  steps: z.array(stepView),
});
export type RunView = z.infer<typeof runView>;

export const segmentRelease = z.object({
  type: z.literal('segments.release'),
  hostId,
  segments: z.array(z.string()),
});

export const runKill = z.object({ type: z.literal('run.kill'), runId });

/**
 * A client's question after a deploy or undeploy (subjects.deploymentsSeen), and the leader's
 * answer, with the revision of `quiver-pipelines` its triggers reflect.
 */
export const deploymentsSeen = z.object({ type: z.literal('deployments.seen'), revision: z.number().int().nonnegative().optional() });

/** A pipeline as deployed: the current version sits under its name in the `quiver-pipelines` bucket. */
export const deployment = z.object({
  name,
  version: z.number().int().positive(),
  codeHash,
  plan,
  events: z.array(eventTrigger),
  schedule: scheduleSpec.nullable(),
  maxConcurrentRuns: z.number().int().positive().nullable(),
  deployedAt: timestamp,
  deployedBy: z.string().max(200),
});
export type Deployment = z.infer<typeof deployment>;

/** An event that started nothing, kept on the dead-letter stream with the reason. */
export const deadEvent = z.object({
  subject: z.string(),
  eventId: z.string(),
  pipeline: name.nullable(),
  reason: z.string(),
  /** The payload as received (text, possibly not JSON). */
  payload: z.string(),
  at: timestamp,
});
export type DeadEvent = z.infer<typeof deadEvent>;

/** An executor as it announces itself in the `quiver-hosts` bucket, refreshed by heartbeats. */
export const hostRecord = z.object({
  hostId,
  executorId: z.string().min(1).max(200),
  /** Its Arrow Flight server, e.g. `grpc+tcp://10.0.0.7:41234`. */
  flightEndpoint: z.string().min(1).max(300),
  /** Its DoGet-only bulk port (same tickets, the sender copies nothing), when it has one. */
  bulkEndpoint: z.string().min(1).max(300).optional(),
  labels: z.array(z.string().max(128)),
  /** Steps it runs at once, and how many it runs now. */
  capacity: nonNegativeInt,
  running: nonNegativeInt,
  at: timestamp,
});
export type HostRecord = z.infer<typeof hostRecord>;
