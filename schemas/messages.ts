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
export const planStep = z.object({
  name,
  inputs: z.array(planInput),
});
/** The logical plan: steps in topological order. The orchestrator only ever sees this, never data. */
export const plan = z.object({
  pipeline: name,
  steps: z.array(planStep).min(1),
});
export type Plan = z.infer<typeof plan>;
export type PlanStep = z.infer<typeof planStep>;

const params = z.record(z.string(), z.string());

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

export const stepSucceeded = z.object({
  type: z.literal('step.succeeded'),
  runId,
  step: name,
  attempt: z.number().int().positive(),
  executorId: z.string().min(1).max(200),
  output: tableDescriptor,
  transport: z.enum(['shm', 'flight', 'cache']).nullable(),
  /** Bytes the platform copied to give the step its inputs. */
  inputCopiedBytes: nonNegativeInt,
  /** Bytes the platform copied to store the step's output. */
  outputCopiedBytes: nonNegativeInt,
  startedAt: timestamp,
  at: timestamp,
});

export const stepFailed = z.object({
  type: z.literal('step.failed'),
  runId,
  step: name,
  attempt: z.number().int().positive(),
  executorId: z.string().min(1).max(200),
  error: stepError,
  startedAt: timestamp.optional(),
  at: timestamp,
});

export type StepStarted = z.infer<typeof stepStarted>;
export type StepSucceeded = z.infer<typeof stepSucceeded>;
export type StepFailed = z.infer<typeof stepFailed>;
export type StepCompletion = StepSucceeded | StepFailed;

/** Everything the orchestrator consumes from the control stream. */
export const controlMessage = z.discriminatedUnion('type', [runSubmit, runCancel, runRelease, stepStarted, stepSucceeded, stepFailed]);
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
export const RUN_STATES = ['running', 'succeeded', 'failed', 'cancelled'] as const;
export type RunState = (typeof RUN_STATES)[number];

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
  transport: z.enum(['shm', 'flight', 'cache']).nullable(),
  copiedBytes: nonNegativeInt.nullable(),
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
  finishedAt: timestamp.nullable(),
  keep: z.boolean(),
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
