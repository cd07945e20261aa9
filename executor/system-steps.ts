/**
 * System steps of the physical plan: scans of stored tables, stages of materialized outputs, and
 * the commit of those. Each writes its output into shared memory like any step, so children read
 * it the same way. See planner/physical-plan.ts for where they come from.
 *
 * Scans and stages read or write whole tables, so they run in step processes, under the limits
 * of user steps: a huge scan ends its own process, never the executor. They run in long-lived
 * workers of this module (bundled by build-runner.ts; the default export at the end is what a
 * step process calls), so scans on a host share the worker's column cache. The executor
 * resolves the snapshot (the catalog may live on NATS, which step processes never reach) and
 * hands the worker the plan of the scan; the worker reads the object store only.
 *
 * Still in the executor: the commit (catalog writes, a few rows read); a transactional run's
 * stage (it commits to the run's branch); and scans and stages on S3 with its catalog on NATS
 * (no conditional writes), where a step process could not open the store without NATS.
 */
import { Schema, Table, tableFromArrays, tableFromIPC, tableToIPC } from 'apache-arrow';
import type { StepReady, SystemStep } from '../schemas/index.ts';
import { readInput, unmapSegments, writeTableToShm } from '../shm/index.ts';
import type { NatsConnection } from '@nats-io/transport-node';
import {
  atRef,
  commitStagedMany,
  executeScan,
  findCommitted,
  MAIN_BRANCH,
  StorageError,
  hostCache,
  prepareScan,
  discardStaged,
  stageTable,
  tableStoreFromEnv,
  openTableStore,
  parseFilter,
  storageConfigFromEnv,
  type ColumnCache,
  type OpenedTableStore,
  type PreparedScan,
  type ScanStats,
  type StagedWrite,
  type StorageConfig,
  type TableStore,
} from '../storage/index.ts';
import type { RunnerJob, RunnerReply, ScanReport } from './protocol.ts';

export type { ScanReport } from './protocol.ts';

/** Where scans and stages run: step processes of the executor (see the module comment). */
export interface SystemStepProcesses {
  /** The bundled form of this module (RunnerBuild.systemCodePath). */
  codePath: string;
  /** Runs a job in a system step process; `env` names the executor's variables it needs (storage credentials). */
  run(job: RunnerJob, env: string[]): Promise<RunnerReply>;
  /** As for user steps: outputs go to regions when the executor has a broker. */
  regionBroker?: string;
}

export interface SystemStepContext {
  shmDir: string;
  maxSegmentBytes?: number;
  poolMaxBytes?: number;
  /** The table store this executor reads and writes (opened once, from the environment). */
  tables(): Promise<TableStore>;
  /** A line for the run's log, shown live in the user's terminal. */
  log(line: string): void;
  /** @default the process-wide column cache */
  cache?: ColumnCache;
  /** Scans and stages run there. Absent: in this process. */
  processes?: SystemStepProcesses;
  /** The storage step processes open. @default from the environment (QUIVER_STORAGE, QUIVER_S3_*) */
  storage?: StorageConfig;
}

export type SystemReply = RunnerReply;

type Input = StepReady['inputs'][number];

/** Runs one system step; never throws: a failure is an error reply, like a step process's. */
export async function runSystemStep(ready: StepReady, system: SystemStep, inputs: readonly Input[], attempt: number, ctx: SystemStepContext): Promise<SystemReply> {
  try {
    const store = await ctx.tables();
    const config = ctx.storage ?? storageConfigFromEnv();
    // Without NATS a step process opens a local store, or S3 with conditional writes.
    const reachable = config.kind === 'local' || config.s3.conditionalWrites;
    if (ctx.processes && reachable && (system.kind === 'scan' || (system.kind === 'stage' && !system.transaction))) {
      return await inStepProcess(ready, system, inputs, attempt, store, config, ctx, ctx.processes);
    }
    switch (system.kind) {
      case 'scan':
        return await scan(ready, system, attempt, store, ctx);
      case 'stage':
        return await stage(ready, system, inputs, attempt, store, ctx);
      case 'commit':
        return system.transaction ? await mergeRunBranch(ready, system, attempt, store, ctx) : await commit(ready, system, inputs, attempt, store, ctx);
    }
  } catch (error) {
    const e = error as Error & { code?: unknown };
    return {
      type: 'error',
      error: { name: e.name ?? 'Error', message: e.message ?? String(error), ...(e.stack ? { stack: e.stack } : {}), ...(typeof e.code === 'string' ? { code: e.code } : {}) },
    };
  }
}

function output(table: Table, ready: StepReady, attempt: number, ctx: SystemStepContext): RunnerReply & { type: 'result' } {
  const written = writeTableToShm(table, {
    dir: ctx.shmDir,
    idPrefix: `${ready.runId}.${ready.step}.${attempt}`,
    ...(ctx.maxSegmentBytes ? { maxSegmentBytes: ctx.maxSegmentBytes } : {}),
    ...(ctx.poolMaxBytes !== undefined ? { poolMaxBytes: ctx.poolMaxBytes } : {}),
  });
  return {
    type: 'result',
    segments: written.segments,
    byteSize: written.byteSize,
    rows: written.rows,
    schema: table.schema.fields.map((f) => ({ name: f.name, type: String(f.type), nullable: f.nullable })),
    inputCopiedBytes: 0,
    outputCopiedBytes: written.copiedBytes,
  };
}

async function scan(ready: StepReady, system: SystemStep & { kind: 'scan' }, attempt: number, mainStore: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const store = atRef(mainStore, system.ref);
  const prepared = await prepareScan(store, system.table, {
    ...(system.columns ? { columns: system.columns } : {}),
    ...(system.filter !== undefined ? { filter: system.filter } : {}),
    ...(system.snapshot !== undefined ? { snapshot: system.snapshot } : {}),
    ...(system.asOf !== undefined ? { asOf: system.asOf } : {}),
  });
  const { table, stats } = await executeScan(store, prepared, ctx.cache ?? hostCache);
  ctx.log(scanLine(system, prepared.columns.length, stats));
  return { ...output(table, ready, attempt, ctx), scan: scanReport(system.table, stats) };
}

function scanLine(system: SystemStep & { kind: 'scan' }, columns: number, stats: ScanStats): string {
  return (
    `scanned ${system.table}${system.ref ? ` on ${system.ref}` : ''}${stats.snapshotId ? ` at snapshot ${stats.snapshotId}` : ' (no snapshot yet)'}: ${columns} column(s), ` +
    `${stats.rowGroupsRead} of ${stats.rowGroupsTotal} row groups read (${stats.rowGroupsSkipped} skipped by statistics), ` +
    `${stats.rowsReturned.toLocaleString('en-US')} of ${stats.rowsRead.toLocaleString('en-US')} rows kept, ${formatBytes(stats.bytesFetched)} fetched` +
    (stats.cachedChunks > 0 ? `, ${stats.cachedChunks} column chunk(s) from the cache` : '')
  );
}

function scanReport(table: string, stats: ScanStats): ScanReport {
  return {
    table,
    snapshotId: stats.snapshotId,
    bytesFetched: stats.bytesFetched,
    rowGroupsRead: stats.rowGroupsRead,
    rowGroupsSkipped: stats.rowGroupsSkipped,
    cachedChunks: stats.cachedChunks,
  };
}

function withInput<T>(input: Input, ctx: SystemStepContext, fn: (table: Table) => Promise<T>): Promise<T> {
  // Whichever kind the parent wrote: segment files, or regions (a stage run in a step process).
  const opened = readInput(input.descriptor.segments, { dir: ctx.shmDir });
  return fn(opened.table).finally(() => unmapSegments(opened.mappings));
}

/** Writes the parent's output as data files no snapshot refers to; its output says which. */
async function stage(ready: StepReady, system: SystemStep & { kind: 'stage' }, inputs: readonly Input[], attempt: number, store: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const input = inputs.find((i) => i.param === 'data');
  if (!input) throw new Error(`stage step ${ready.step} has no input "data"`);
  const staged = await withInput(input, ctx, (table) => stageTable(store, system.table, table));
  const rows = staged.files.reduce((n, f) => n + f.recordCount, 0);
  if (system.transaction) {
    const branch = await commitToRunBranch(ready, system, staged, store);
    ctx.log(`committed ${rows.toLocaleString('en-US')} rows of ${system.table} to the run's branch ${branch}; merged into ${system.branch ?? MAIN_BRANCH} when every step and expectation passes`);
  } else {
    ctx.log(`staged ${rows.toLocaleString('en-US')} rows of ${system.table} in ${staged.files.length} data file(s); committed when the run succeeds`);
  }
  return output(stagedTable(system, staged), ready, attempt, ctx);
}

/** What a stage step outputs: one row the commit step reads. */
function stagedTable(system: SystemStep & { kind: 'stage' }, staged: StagedWrite): Table {
  return tableFromArrays({
    table: [system.table],
    mode: [system.mode],
    staged: [JSON.stringify({ files: staged.files, schema: schemaToBase64(staged.schema) })],
  });
}

function schemaToBase64(schema: Schema): string {
  return Buffer.from(tableToIPC(new Table(schema), 'stream')).toString('base64');
}

/** The temporary branch a transactional run writes its tables to. */
export const runBranch = (runId: string) => `run/${runId}`;

/**
 * Transactional runs: commits one staged table to the run's branch `run/<runId>` (created from
 * the target branch by the first stage step), so a failed run leaves it there to inspect. A
 * stage step run again after its commit finds that commit and does not commit twice.
 */
async function commitToRunBranch(ready: StepReady, system: SystemStep & { kind: 'stage' }, staged: StagedWrite, store: TableStore): Promise<string> {
  const branch = runBranch(ready.runId);
  const versions = store.catalog.versions;
  try {
    await versions.createBranch(branch, system.branch ?? MAIN_BRANCH);
  } catch (error) {
    // Another stage step of the run created it first.
    if (!(error instanceof StorageError && error.code === 'ERR_REF_EXISTS')) throw error;
  }
  const message = `run ${ready.runId}: materialize ${system.table} (step ${ready.step})`;
  const head = await versions.resolve(branch);
  for (let id = head, depth = 0; id && depth < 64; depth++) {
    const c = await versions.loadCommit(id);
    if (c.message === message) {
      await discardStaged(store, staged);
      return branch;
    }
    id = c.parents[0] ?? null;
  }
  await commitStagedMany(atRef(store, branch), [{ staged, mode: system.mode }], { message });
  return branch;
}

/** Transactional runs: every step and expectation passed, so the run's branch is merged into the target, atomically. */
async function mergeRunBranch(ready: StepReady, system: SystemStep & { kind: 'commit' }, attempt: number, store: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const branch = runBranch(ready.runId);
  const target = system.branch ?? MAIN_BRANCH;
  const versions = store.catalog.versions;
  const head = await versions.refs.read('branch', branch);
  let tables: string[] = [];
  if (head.commit === null) {
    // Never created (nothing materialized) or merged and deleted by an earlier attempt.
    ctx.log(head.token === 0 ? `nothing to merge: the run wrote no table` : `${branch} was merged into ${target} already`);
  } else {
    const merged = await versions.merge(branch, target, `run ${ready.runId}: merge ${branch} into ${target}`);
    tables = merged.tables;
    ctx.log(
      `merged ${branch} into ${target} (${merged.kind}${merged.appended.length ? `; appended to ${merged.appended.join(', ')} alongside other writers` : ''}): ` +
        `${tables.length ? tables.join(', ') : 'no table'} changed, at catalog commit ${merged.commit.slice(0, 12)}`,
    );
    await versions.deleteBranch(branch);
  }
  return output(tableFromArrays({ table: tables, branch: tables.map(() => target) }), ready, attempt, ctx);
}

/**
 * Commits every staged write of the run in one catalog commit on the run's branch: readers see
 * all of the run's tables or none.
 */
async function commit(ready: StepReady, system: SystemStep & { kind: 'commit' }, inputs: readonly Input[], attempt: number, mainStore: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const store = atRef(mainStore, system.branch);
  const writes: { staged: StagedWrite; mode: 'append' | 'replace' }[] = [];
  for (const input of inputs.filter((i) => i.param.startsWith('staged'))) {
    const { table, mode, staged } = await withInput(input, ctx, async (t) => {
      const row = t.get(0)!;
      return { table: String(row.table), mode: String(row.mode) as 'append' | 'replace', staged: String(row.staged) };
    });
    const parsed = JSON.parse(staged) as { files: StagedWrite['files']; schema: string };
    const schema: Schema = tableFromIPC(Buffer.from(parsed.schema, 'base64')).schema;
    writes.push({ staged: { table, schema, files: parsed.files }, mode });
  }
  // A commit step run again (its executor died after committing) must not commit twice: the
  // tables were committed together, so finding one of them committed means all were.
  const already = await Promise.all(writes.map((w) => findCommitted(store, w.staged)));
  const results = already.every((r) => r !== null) ? (already as NonNullable<(typeof already)[number]>[]) : await commitStagedMany(store, writes, { message: `run ${ready.runId}` });
  const where = system.branch ? ` on branch ${system.branch}` : '';
  for (const [i, result] of results.entries()) {
    ctx.log(`committed snapshot ${result.snapshotId} of table ${result.table}${where} (${writes[i]!.mode}, ${result.rows.toLocaleString('en-US')} rows, version ${result.version})`);
  }
  if (results.length > 1) ctx.log(`the run's ${results.length} tables were committed in one catalog commit: readers see all or none`);
  return output(
    tableFromArrays({
      table: results.map((c) => c.table),
      snapshotId: results.map((c) => c.snapshotId),
      version: Int32Array.from(results.map((c) => c.version)),
      rows: Float64Array.from(results.map((c) => c.rows)),
    }),
    ready,
    attempt,
    ctx,
  );
}

function formatBytes(bytes: number): string {
  return bytes < 1e6 ? `${(bytes / 1e3).toFixed(1)} KB` : `${(bytes / 1e6).toFixed(1)} MB`;
}

const openStores = new WeakMap<object, Promise<OpenedTableStore>>();

/**
 * The table store of an executor, opened on first use from the environment (QUIVER_STORAGE,
 * QUIVER_S3_*), with the executor's NATS as the catalog where S3 needs one.
 */
export function executorTableStore(nc: NatsConnection): Promise<OpenedTableStore> {
  let store = openStores.get(nc);
  if (!store) {
    store = tableStoreFromEnv({ nc });
    // A failed open is not kept: the next system step tries again (the configuration may be fixed).
    store.catch(() => openStores.delete(nc));
    openStores.set(nc, store);
  }
  return store;
}

/** Closes the store {@link executorTableStore} opened for this connection, if any. */
export async function closeExecutorTableStore(nc: NatsConnection): Promise<void> {
  const store = openStores.get(nc);
  openStores.delete(nc);
  await (await store?.catch(() => null))?.close();
}

/**
 * What a system step process is handed (`ctx.system`): the store to open, and for a scan the plan
 * the executor made (the snapshot resolved, the columns and filter checked).
 */
type SystemJob =
  | { kind: 'scan'; store: StorageConfig; system: SystemStep & { kind: 'scan' }; plan: ScanPlan }
  | { kind: 'stage'; store: StorageConfig; system: SystemStep & { kind: 'stage' } };

/** A {@link PreparedScan} as JSON: the filter as its text (parsed again), the schema as Arrow IPC. */
interface ScanPlan {
  table: string;
  snapshot: PreparedScan['snapshot'];
  columns: string[];
  kinds: [string, unknown][];
  schema: string;
}

async function inStepProcess(
  ready: StepReady,
  system: SystemStep & { kind: 'scan' | 'stage' },
  inputs: readonly Input[],
  attempt: number,
  store: TableStore,
  config: StorageConfig,
  ctx: SystemStepContext,
  processes: SystemStepProcesses,
): Promise<SystemReply> {
  let job: SystemJob;
  if (system.kind === 'scan') {
    const prepared = await prepareScan(atRef(store, system.ref), system.table, {
      ...(system.columns ? { columns: system.columns } : {}),
      ...(system.filter !== undefined ? { filter: system.filter } : {}),
      ...(system.snapshot !== undefined ? { snapshot: system.snapshot } : {}),
      ...(system.asOf !== undefined ? { asOf: system.asOf } : {}),
    });
    const plan: ScanPlan = { table: prepared.table, snapshot: prepared.snapshot, columns: prepared.columns, kinds: [...prepared.kinds], schema: schemaToBase64(prepared.schema) };
    job = { kind: 'scan', store: config, system, plan };
  } else {
    job = { kind: 'stage', store: config, system };
  }
  const data = system.kind === 'stage' ? inputs.filter((i) => i.param === 'data') : [];
  if (system.kind === 'stage' && data.length === 0) throw new Error(`stage step ${ready.step} has no input "data"`);
  const runnerJob: RunnerJob = {
    codePath: processes.codePath,
    runId: ready.runId,
    step: ready.step,
    params: {},
    event: null,
    inputs: data.map((i) => ({ param: i.param, descriptor: i.descriptor })),
    shmDir: ctx.shmDir,
    outputIdPrefix: `${ready.runId}.${ready.step}.${attempt}`,
    ...(processes.regionBroker ? { regionBroker: processes.regionBroker } : {}),
    ...(ctx.maxSegmentBytes ? { maxSegmentBytes: ctx.maxSegmentBytes } : {}),
    ...(ctx.poolMaxBytes !== undefined ? { poolMaxBytes: ctx.poolMaxBytes } : {}),
    system: { entry: system.kind, payload: job },
  };
  // S3 credentials, from wherever the AWS SDK reads them; nothing else of the executor's environment.
  const env = config.kind === 's3' ? Object.keys(process.env).filter((name) => name.startsWith('AWS_')) : [];
  return processes.run(runnerJob, env);
}

/** Stores a system step process opened, by configuration: kept for its next steps. */
const childStores = new Map<string, Promise<OpenedTableStore>>();
function childStore(config: StorageConfig): Promise<OpenedTableStore> {
  const key = JSON.stringify(config);
  let store = childStores.get(key);
  if (!store) {
    store = openTableStore(config);
    // A failed open is not kept: the next step tries again.
    store.catch(() => childStores.delete(key));
    childStores.set(key, store);
  }
  return store;
}

/** The context runJob gives a system step (see RunnerJob.system). */
interface SystemCallContext {
  system: SystemJob;
  log(...args: unknown[]): void;
  reportScan(report: ScanReport): void;
}

/** In a step process: reads what the executor's plan says, from the object store only. */
async function scanHere(_inputs: unknown, ctx: SystemCallContext): Promise<Table> {
  const job = ctx.system as SystemJob & { kind: 'scan' };
  const { plan, system } = job;
  const prepared: PreparedScan = {
    table: plan.table,
    snapshot: plan.snapshot,
    columns: plan.columns,
    filter: system.filter !== undefined && system.filter.trim() !== '' ? parseFilter(system.filter) : null,
    kinds: new Map(plan.kinds) as PreparedScan['kinds'],
    schema: tableFromIPC(Buffer.from(plan.schema, 'base64')).schema,
  };
  const { table, stats } = await executeScan(await childStore(job.store), prepared, hostCache);
  ctx.log(scanLine(system, plan.columns.length, stats));
  ctx.reportScan(scanReport(system.table, stats));
  return table;
}

/** In a step process: writes the input as data files no snapshot refers to yet. */
async function stageHere(inputs: Readonly<Record<string, Table>>, ctx: SystemCallContext): Promise<Table> {
  const job = ctx.system as SystemJob & { kind: 'stage' };
  const staged = await stageTable(await childStore(job.store), job.system.table, inputs.data!);
  const rows = staged.files.reduce((n, f) => n + f.recordCount, 0);
  ctx.log(`staged ${rows.toLocaleString('en-US')} rows of ${job.system.table} in ${staged.files.length} data file(s); committed when the run succeeds`);
  return stagedTable(job.system, staged);
}

/** What a system step process imports: shaped like a pipeline module, one "step" per kind. */
export default { steps: { scan: { fn: scanHere }, stage: { fn: stageHere } } };
