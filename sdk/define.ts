import { tableFromArrays, type Table } from 'apache-arrow';

/** The event that started a run, as `ctx.event` shows it. */
export interface TriggerEvent {
  readonly subject: string;
  readonly id: string;
  /** The published JSON, parsed. */
  readonly payload: unknown;
  readonly publishedAt: number;
}

/** What a step function receives besides its input tables. */
export interface StepContext {
  readonly runId: string;
  /** This step's name. */
  readonly step: string;
  /** `--params key=value` of the run, as strings. */
  readonly params: Readonly<Record<string, string>>;
  /** The event that started the run, or null when a user or a schedule did. */
  readonly event: TriggerEvent | null;
  /** Logs a line to the user's terminal, live (same as console.log inside a step). */
  log(...args: unknown[]): void;
  /**
   * True when every buffer of `table` is a view into shared memory that Quiver mapped for this
   * step: the table reached the step without being copied.
   */
  isZeroCopy(table: Table): boolean;
}

/** A step: a function from named input tables to one table. */
export type StepFunction<I extends string = string> = (
  inputs: Readonly<Record<I, Table>>,
  context: StepContext,
) => Table | Promise<Table>;

/** An input of a step: a parent step's output, optionally narrowed to some columns. */
export interface InputRef {
  readonly step: string;
  /** Only these columns are handed to the step (a projection; nothing is copied). */
  readonly columns?: readonly string[];
}

/**
 * An input read from a stored table (see {@link source}): a system step of the run scans it,
 * reading only these columns and the row groups the filter may match.
 */
export interface SourceRef {
  readonly kind: 'quiver.source';
  readonly table: string;
  readonly columns?: readonly string[];
  readonly filter?: string;
  readonly snapshot?: string;
  /** Epoch milliseconds. */
  readonly asOf?: number;
  /** The branch, tag or catalog commit to read. @default the run's branch (`main`) */
  readonly ref?: string;
}

export interface StepOptions {
  /** Free text shown in `quiver run` output and plans. */
  readonly description?: string;
  /**
   * `false`: never reuse or cache this step's output, nor its descendants' (it reads a clock,
   * randomness or the outside world, or has side effects). Otherwise, in runs that use the cache,
   * an output is reused when the step's own code, the run's parameters and event payload, and its
   * inputs (their parents' keys, the snapshots scanned) are all unchanged. @default true
   */
  readonly cache?: boolean;
  /**
   * Store the step's output as a snapshot of the table named like the step, once the whole run
   * has succeeded (a failed run commits nothing). `true` replaces the table's rows; `{ mode:
   * 'append' }` adds to them.
   */
  readonly materialize?: boolean | { readonly mode?: 'replace' | 'append' };
  /**
   * Run this step only on a host carrying this label (`quiver executor --labels gpu,eu` or `QUIVER_HOST_LABELS`; a
   * host's id is always one of its labels). Without it the step goes where its inputs are.
   */
  readonly host?: string;
  /**
   * `'process'`: a fresh process for this step (nothing survives from other steps). `'worker'`:
   * a long-lived step process of this pipeline version runs it, one step after another, for any
   * run: module globals (caches, clients), `globalThis` and changed built-ins survive between
   * calls; inputs (unmapped when the step returns), `ctx`, `process.env` and the working
   * directory (both put back after each call) do not. A step that exits the process or leaves an
   * uncaught error fails and its worker is replaced; one that blocks the event loop longer than
   * the executor's `workerHangMs` (30 s) is killed. Overrides the pipeline's `isolation`.
   * See docs/architecture.md, "Isolation levels". @default the pipeline's, else 'process'
   */
  readonly isolation?: 'process' | 'worker';
  /**
   * Wall-clock time the step may take in its process, from the moment it gets the step to its
   * answer; past it the step's whole process tree is killed and the step fails with
   * "step X timed out after 30 s". See docs/limits.md. @default the pipeline's, else the executor's (15 min)
   */
  readonly timeoutMs?: number;
  /**
   * Memory the step may use, in MB: its JavaScript heap exactly (V8), its whole address space
   * loosely (RLIMIT_AS). Past it the step fails with "step X exceeded its 512 MB memory limit".
   * See docs/limits.md. @default the pipeline's, else the executor's (1024)
   */
  readonly memoryMb?: number;
  /**
   * Names of the executor's environment variables this step is given (API keys, tokens), on top
   * of the pipeline's `env`. A step sees no other variable of the executor's environment but a
   * minimal allowlist (PATH, HOME, LANG, TZ...). They are in `process.env` while the step
   * function runs, not while its module is imported. A name missing on the executor fails the
   * step, naming it. @default none
   */
  readonly env?: readonly string[];
  /**
   * npm packages this step imports, name → semver range (`{ 'date-fns': '^3.6.0' }`), on top of
   * its pipeline's `packages` (its own range wins for a package both declare). Ranges are resolved
   * to exact versions when the pipeline is loaded (the lock stored with a deployment), the bundle
   * leaves them out, and the step runs in an environment installed once per host for that exact
   * set and shared through the cluster. An unknown package or a range no release matches fails
   * planning. See docs/packages.md. @default none
   */
  readonly packages?: Readonly<Record<string, string>>;
}

/** A step as declared in a pipeline file. The name is its key in the pipeline. */
export interface StepDefinition {
  readonly kind: 'quiver.step';
  readonly inputs: Readonly<Record<string, InputRef | SourceRef>>;
  readonly fn: StepFunction;
  readonly options: StepOptions;
}

/** Starts a run for each event published on a matching subject. */
export interface EventTriggerOptions {
  /** A subject, or a pattern with NATS wildcards: `orders.*` (one token), `orders.>` (the rest). */
  readonly event: string;
  /**
   * What the payload must look like: a JSON Schema (2020-12) object, or a zod schema. An event
   * that fails it starts nothing and goes to the dead-letter stream with the reason.
   */
  readonly schema?: object;
}

/** Starts runs at cron times. */
export interface ScheduleOptions {
  /** Five fields (minute first) or six (seconds first), as croner reads them. */
  readonly cron: string;
  /** IANA time zone the cron times are in. @default 'UTC' */
  readonly timezone?: string;
  /**
   * Ticks missed while no orchestrator ran: run none of them, only the latest, or all.
   * @default 'latest'
   */
  readonly catchUp?: 'none' | 'latest' | 'all';
  /**
   * A tick while the previous scheduled run still goes: skip it, queue it after that run, or
   * start it alongside. @default 'skip'
   */
  readonly overlap?: 'skip' | 'queue' | 'allow';
}

export interface PipelineOptions {
  readonly description?: string;
  /** Event triggers, used once the pipeline is deployed (`quiver deploy`). */
  readonly on?: EventTriggerOptions | readonly EventTriggerOptions[];
  readonly schedule?: ScheduleOptions;
  /** At most this many runs at once; later runs queue and start in order. @default no limit */
  readonly maxConcurrentRuns?: number;
  /** How its steps run unless a step says otherwise (see {@link StepOptions.isolation}). @default 'process' */
  readonly isolation?: 'process' | 'worker';
  /** Time limit of each of its steps unless a step says otherwise (see {@link StepOptions.timeoutMs}). @default the executor's (15 min) */
  readonly timeoutMs?: number;
  /** Memory limit of each of its steps unless a step says otherwise (see {@link StepOptions.memoryMb}). @default the executor's (1024) */
  readonly memoryMb?: number;
  /** Environment variables every one of its steps is given (see {@link StepOptions.env}). @default none */
  readonly env?: readonly string[];
  /**
   * Runs of the deployed pipeline (events, schedules, by name) reuse cached step outputs and
   * cache what they compute (see {@link StepOptions.cache}). Runs from `quiver run FILE` use the
   * cache unless told `--cache off`, whatever this says. @default false
   */
  readonly cache?: boolean;
  /**
   * npm packages every one of its steps can import, name → semver range (see
   * {@link StepOptions.packages}, whose ranges win). @default none
   */
  readonly packages?: Readonly<Record<string, string>>;
}

/** Where a pipeline's runs read and write tables (docs/branches.md); merged into {@link PipelineOptions}. */
export interface PipelineBranchOptions {
  /** The branch its runs read sources from and write tables to. @default 'main' */
  readonly branch?: string;
  /**
   * Each run writes its tables to its own branch `run/<runId>`, merged into `branch` atomically
   * only when every step and {@link expect expectation} passed; a failed run leaves `branch`
   * untouched and `run/<runId>` there to inspect. @default false
   */
  readonly transaction?: boolean;
}

export interface PipelineDefinition {
  readonly kind: 'quiver.pipeline';
  readonly name: string;
  readonly steps: Readonly<Record<string, StepDefinition>>;
  readonly options: PipelineOptions;
}

/**
 * Declares the input of a step: the output of the step named `step`.
 * @example input('transactions', { columns: ['id', 'usd', 'country'] })
 */
export function input(step: string, options: { columns?: readonly string[] } = {}): InputRef {
  return options.columns ? { step, columns: [...options.columns] } : { step };
}

/**
 * Declares an input read from the stored table `table`: only `columns` (default all), only rows
 * matching `filter` (SQL-like: `usd > 100 AND country IN ('France', 'Spain')`, with `=`, `!=`,
 * `<`, `<=`, `>`, `>=`, BETWEEN, IN, IS [NOT] NULL, AND, OR, NOT, and `DATE '2024-01-31'` or
 * `TIMESTAMP '2024-01-31 12:00:00'` literals). By default the snapshot current when the run is
 * submitted; `snapshot` or `asOf` read an older one (time travel). Columns and filter are checked
 * against the table before the run starts.
 * @example source('transactions', { columns: ['id', 'usd', 'country'], filter: "usd >= 10" })
 */
export function source(
  table: string,
  options: { columns?: readonly string[]; filter?: string; snapshot?: string; asOf?: number | string | Date; ref?: string } = {},
): SourceRef {
  const asOf = options.asOf === undefined ? undefined : options.asOf instanceof Date ? options.asOf.getTime() : typeof options.asOf === 'string' ? Date.parse(options.asOf) : options.asOf;
  return {
    kind: 'quiver.source',
    table,
    ...(options.columns ? { columns: [...options.columns] } : {}),
    ...(options.filter !== undefined ? { filter: options.filter } : {}),
    ...(options.snapshot !== undefined ? { snapshot: options.snapshot } : {}),
    ...(asOf !== undefined ? { asOf } : {}),
    ...(options.ref !== undefined ? { ref: options.ref } : {}),
  };
}

/**
 * Declares a step. Its inputs map the names the function receives to parent steps; a plain
 * string names a parent step and takes all its columns. The DAG follows from these inputs.
 *
 * @example
 * step(() => tableFromArrays({ x: [1, 2, 3] }))
 * step({ data: 'transactions' }, ({ data }) => data)
 * step({ data: 'transactions' }, ({ data }) => data, { host: 'eu' }) // only on hosts labelled eu
 * step({ data: 'transactions' }, ({ data }) => data, { packages: { 'is-number': '^7.0.0' } }) // imports is-number
 */
export function step(fn: StepFunction<never>, options?: StepOptions): StepDefinition;
export function step<I extends string>(
  inputs: Readonly<Record<I, string | InputRef | SourceRef>>,
  fn: StepFunction<I>,
  options?: StepOptions,
): StepDefinition;
export function step(a: unknown, b?: unknown, c?: unknown): StepDefinition {
  const [rawInputs, fn, options] = typeof a === 'function' ? [{}, a, b] : [a, b, c];
  const inputs: Record<string, InputRef | SourceRef> = {};
  if (rawInputs !== null && typeof rawInputs === 'object') {
    for (const [param, ref] of Object.entries(rawInputs as Record<string, unknown>)) {
      // Kept as given when malformed: the planner reports it with the step's name.
      inputs[param] = typeof ref === 'string' ? { step: ref } : (ref as InputRef | SourceRef);
    }
  }
  return { kind: 'quiver.step', inputs, fn: fn as StepFunction, options: (options ?? {}) as StepOptions };
}

/**
 * Declares a pipeline: its steps, each under the name of the table it produces, and how it is
 * started once deployed. Export it as the default export of the pipeline file.
 *
 * @example
 * pipeline('orders', { totals: step(...) }, { on: { event: 'orders.uploaded' }, maxConcurrentRuns: 4 })
 */
export function pipeline(name: string, steps: Record<string, StepDefinition>, options: PipelineOptions & PipelineBranchOptions = {}): PipelineDefinition {
  return { kind: 'quiver.pipeline', name, steps, options };
}

/** What an expectation's function returns: `true`/`false`, or a result with a message and counts. */
export interface ExpectationResult {
  readonly pass: boolean;
  /** Shown in `quiver run` and in the run's error when it fails. */
  readonly message?: string;
  /** Numbers worth showing, e.g. `{ rows: 1000, nullIds: 3 }`. */
  readonly counts?: Readonly<Record<string, number>>;
}

export type ExpectationFunction<I extends string = string> = (
  inputs: Readonly<Record<I, Table>>,
  context: StepContext,
) => boolean | ExpectationResult | Promise<boolean | ExpectationResult>;

/** An expectation that did not hold: fails its step, so the run fails and nothing is merged. */
export class ExpectationFailedError extends Error {
  override readonly name = 'ExpectationFailedError';
  readonly code = 'ERR_EXPECTATION_FAILED';
  constructor(
    readonly expectation: string,
    readonly result: ExpectationResult,
  ) {
    super(`expectation ${expectation} failed${result.message ? `: ${result.message}` : ''}${formatCounts(result.counts)}`);
  }
}

function formatCounts(counts: ExpectationResult['counts']): string {
  const entries = Object.entries(counts ?? {});
  return entries.length ? ` (${entries.map(([k, v]) => `${k} ${v.toLocaleString('en-US')}`).join(', ')})` : '';
}

/**
 * Declares a check, a step of the DAG like any other (its inputs arrive zero-copy): it returns
 * pass or fail, with a message and counts. A failure fails the run, so with `transaction: true`
 * nothing the run wrote is merged (write-audit-publish). Put it in the pipeline's steps; its
 * output is a one-row table (expectation, pass, message, counts as JSON).
 *
 * @example
 * checked: expect('no_negative_totals', { totals: 'totals' }, ({ totals }) => {
 *   const bad = [...totals.getChild('usd')!].filter((v) => v < 0).length;
 *   return { pass: bad === 0, message: `${bad} negative totals`, counts: { rows: totals.numRows, bad } };
 * })
 */
export function expect<I extends string>(name: string, inputs: Readonly<Record<I, string | InputRef | SourceRef>>, fn: ExpectationFunction<I>): StepDefinition {
  const check: StepFunction<I> = async (tables, ctx) => {
    const raw = await fn(tables, ctx);
    const result: ExpectationResult = typeof raw === 'boolean' ? { pass: raw } : raw;
    if (typeof result?.pass !== 'boolean') throw new TypeError(`expectation ${name} must return true, false or { pass, message?, counts? }; got ${JSON.stringify(raw)}`);
    if (!result.pass) throw new ExpectationFailedError(name, result);
    ctx.log(`expectation ${name} passed${result.message ? `: ${result.message}` : ''}${formatCounts(result.counts)}`);
    return tableFromArrays({ expectation: [name], pass: [true], message: [result.message ?? ''], counts: [JSON.stringify(result.counts ?? {})] });
  };
  return step(inputs, check, { description: `expectation ${name}` });
}
