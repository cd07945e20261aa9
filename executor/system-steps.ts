/**
 * System steps of the physical plan: scans of stored tables, stages of materialized outputs, and
 * the commit of those. Each writes its output into shared memory like any step, so children read
 * it the same way. See planner/physical-plan.ts for where they come from.
 *
 * Every system step runs in a step process, under the limits of user steps: a huge scan or stage
 * ends its own process, never the executor. They run in long-lived workers of this module
 * (bundled by build-runner.ts; the default export at the end is what a step process calls), so
 * scans on a host share the worker's column cache. The process opens the store itself with the
 * storage credentials it is handed (AWS_* for S3, nothing else of the executor's environment), and
 * does the whole step there: it resolves the snapshot and reads the data files of a scan, writes
 * the data files of a stage (and a transactional run's commit to its branch), reads the stage
 * steps' descriptors and writes the snapshot and catalog commit of a commit step, merges a
 * transaction's branch.
 *
 * One thing stays in the executor, and only for S3 with its catalog on NATS (no conditional
 * writes): step processes never hold NATS credentials, so the process asks its executor over the
 * step process's IPC channel for the branch pointers (a read, or a compare-and-swap) and the
 * pre-branch table heads: a few hundred bytes each ({@link CatalogCall}). The executor moves only
 * the branches that step writes ({@link catalogGate}). No table data, manifest or metadata file is
 * read or written in the executor.
 */
import { Schema, Table, tableFromArrays, tableFromIPC, tableToIPC } from 'apache-arrow';
import type { StepReady, SystemStep } from '../schemas/index.ts';
import { readInput, unmapSegments, writeTableToShm } from '../shm/index.ts';
import type { NatsConnection } from '@nats-io/transport-node';
import {
  atRef,
  checkRefName,
  checkTableName,
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
  openTableStoreWithRefs,
  storageConfigFromEnv,
  type ColumnCache,
  type OpenedTableStore,
  type RefHead,
  type RefKind,
  type RefStore,
  type ScanStats,
  type StagedWrite,
  type StorageConfig,
  type TableHeads,
  type TableStore,
} from '../storage/index.ts';
import type { CatalogCall, CatalogHandler, RunnerJob, RunnerMessage, RunnerReply, RunnerRequest, ScanReport } from './protocol.ts';

export type { ScanReport } from './protocol.ts';

/** Where system steps run: step processes of the executor (see the module comment). */
export interface SystemStepProcesses {
  /** The bundled form of this module (RunnerBuild.systemCodePath). */
  codePath: string;
  /**
   * Runs a job in a system step process; `env` names the executor's variables it needs (storage
   * credentials); `catalog` answers its catalog calls (a catalog on NATS only).
   */
  run(job: RunnerJob, env: string[], catalog?: CatalogHandler): Promise<RunnerReply>;
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
  /** System steps run there. Absent: in this process. */
  processes?: SystemStepProcesses;
  /** The storage step processes open. @default from the environment (QUIVER_STORAGE, QUIVER_S3_*) */
  storage?: StorageConfig;
}

export type SystemReply = RunnerReply;

type Input = StepReady['inputs'][number];

/** A step process's catalog call the executor will not perform: a branch the step does not write, or a malformed call. */
export class CatalogCallRefusedError extends Error {
  override readonly name = 'CatalogCallRefusedError';
  readonly code = 'ERR_CATALOG_REFUSED';
}

/** Runs one system step; never throws: a failure is an error reply, like a step process's. */
export async function runSystemStep(ready: StepReady, system: SystemStep, inputs: readonly Input[], attempt: number, ctx: SystemStepContext): Promise<SystemReply> {
  try {
    const wanted = inputsOf(ready, system, inputs);
    if (ctx.processes) return await inStepProcess(ready, system, wanted, attempt, ctx, ctx.processes);
    const store = await ctx.tables();
    const work: SystemWork = { runId: ready.runId, step: ready.step, log: ctx.log, cache: ctx.cache ?? hostCache, ...(ready.cacheKey ? { cacheKey: ready.cacheKey } : {}) };
    const done = await withInputs(wanted, ctx, (tables) => perform(work, system, tables, store));
    return { ...output(done.table, ready, attempt, ctx), ...(done.scan ? { scan: done.scan } : {}) };
  } catch (error) {
    const e = error as Error & { code?: unknown };
    return {
      type: 'error',
      error: { name: e.name ?? 'Error', message: e.message ?? String(error), ...(e.stack ? { stack: e.stack } : {}), ...(typeof e.code === 'string' ? { code: e.code } : {}) },
    };
  }
}

/** The inputs a system step reads: a stage its parent's output, a commit its stage steps' descriptors, nothing else. */
function inputsOf(ready: StepReady, system: SystemStep, inputs: readonly Input[]): Input[] {
  if (system.kind === 'stage') {
    const data = inputs.filter((i) => i.param === 'data');
    if (data.length === 0) throw new Error(`stage step ${ready.step} has no input "data"`);
    return data;
  }
  if (system.kind === 'commit' && !system.transaction) return inputs.filter((i) => i.param.startsWith('staged'));
  return [];
}

function output(table: Table, ready: StepReady, attempt: number, ctx: SystemStepContext): RunnerReply & { type: 'result' } {
  return writeStepOutput(table, { dir: ctx.shmDir, idPrefix: `${ready.runId}.${ready.step}.${attempt}`, maxSegmentBytes: ctx.maxSegmentBytes, poolMaxBytes: ctx.poolMaxBytes });
}

/** Writes a table made in the executor's own process into shared memory, as a step's reply. */
export function writeStepOutput(table: Table, where: { dir: string; idPrefix: string; maxSegmentBytes?: number | undefined; poolMaxBytes?: number | undefined }): RunnerReply & { type: 'result' } {
  const written = writeTableToShm(table, {
    dir: where.dir,
    idPrefix: where.idPrefix,
    ...(where.maxSegmentBytes ? { maxSegmentBytes: where.maxSegmentBytes } : {}),
    ...(where.poolMaxBytes !== undefined ? { poolMaxBytes: where.poolMaxBytes } : {}),
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

async function withInputs<T>(inputs: readonly Input[], ctx: SystemStepContext, fn: (tables: Readonly<Record<string, Table>>) => Promise<T>): Promise<T> {
  const tables: Record<string, Table> = {};
  const mappings: ArrayBuffer[] = [];
  try {
    for (const input of inputs) {
      // Whichever kind the parent wrote: segment files, or regions (a step run in a step process).
      const opened = readInput(input.descriptor.segments, { dir: ctx.shmDir });
      mappings.push(...opened.mappings);
      tables[input.param] = opened.table;
    }
    return await fn(tables);
  } finally {
    unmapSegments(mappings);
  }
}

/** What a system step's work needs of its step, in a step process or in this one. */
interface SystemWork {
  runId: string;
  step: string;
  /** The step's cache key: a commit records it in the snapshots it writes (orchestrator/cached-outputs.ts). */
  cacheKey?: string;
  log(line: string): void;
  cache: ColumnCache;
}

/** The whole of one system step: its output table, and for a scan what it read. */
function perform(work: SystemWork, system: SystemStep, inputs: Readonly<Record<string, Table>>, store: TableStore): Promise<{ table: Table; scan?: ScanReport }> {
  switch (system.kind) {
    case 'scan':
      return scan(work, system, store);
    case 'stage':
      return stage(work, system, inputs.data!, store).then((table) => ({ table }));
    case 'commit':
      return (system.transaction ? mergeRunBranch(work, system, store) : commit(work, system, inputs, store)).then((table) => ({ table }));
  }
}

async function scan(work: SystemWork, system: SystemStep & { kind: 'scan' }, mainStore: TableStore): Promise<{ table: Table; scan: ScanReport }> {
  const store = atRef(mainStore, system.ref);
  const prepared = await prepareScan(store, system.table, {
    ...(system.columns ? { columns: system.columns } : {}),
    ...(system.filter !== undefined ? { filter: system.filter } : {}),
    ...(system.snapshot !== undefined ? { snapshot: system.snapshot } : {}),
    ...(system.asOf !== undefined ? { asOf: system.asOf } : {}),
  });
  const { table, stats } = await executeScan(store, prepared, work.cache);
  work.log(scanLine(system, prepared.columns.length, stats));
  return { table, scan: scanReport(system.table, stats) };
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

/**
 * Writes the parent's output as data files no snapshot refers to; its output says which. A
 * transactional run's stage then commits them to the run's branch.
 */
async function stage(work: SystemWork, system: SystemStep & { kind: 'stage' }, data: Table, store: TableStore): Promise<Table> {
  const staged = await stageTable(store, system.table, data);
  const rows = staged.files.reduce((n, f) => n + f.recordCount, 0);
  if (system.transaction) {
    const branch = await commitToRunBranch(work, system, staged, store);
    work.log(`committed ${rows.toLocaleString('en-US')} rows of ${system.table} to the run's branch ${branch}; merged into ${system.branch ?? MAIN_BRANCH} when every step and expectation passes`);
  } else {
    work.log(`staged ${rows.toLocaleString('en-US')} rows of ${system.table} in ${staged.files.length} data file(s); committed when the run succeeds`);
  }
  return stagedTable(system, staged);
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
async function commitToRunBranch(work: SystemWork, system: SystemStep & { kind: 'stage' }, staged: StagedWrite, store: TableStore): Promise<string> {
  const branch = runBranch(work.runId);
  const versions = store.catalog.versions;
  try {
    await versions.createBranch(branch, system.branch ?? MAIN_BRANCH);
  } catch (error) {
    // Another stage step of the run created it first.
    if (!(error instanceof StorageError && error.code === 'ERR_REF_EXISTS')) throw error;
  }
  const message = `run ${work.runId}: materialize ${system.table} (step ${work.step})`;
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
async function mergeRunBranch(work: SystemWork, system: SystemStep & { kind: 'commit' }, store: TableStore): Promise<Table> {
  const branch = runBranch(work.runId);
  const target = system.branch ?? MAIN_BRANCH;
  const versions = store.catalog.versions;
  const head = await versions.refs.read('branch', branch);
  let tables: string[] = [];
  if (head.commit === null) {
    // Never created (nothing materialized) or merged and deleted by an earlier attempt.
    work.log(head.token === 0 ? `nothing to merge: the run wrote no table` : `${branch} was merged into ${target} already`);
  } else {
    const merged = await versions.merge(branch, target, `run ${work.runId}: merge ${branch} into ${target}`);
    tables = merged.tables;
    work.log(
      `merged ${branch} into ${target} (${merged.kind}${merged.appended.length ? `; appended to ${merged.appended.join(', ')} alongside other writers` : ''}): ` +
        `${tables.length ? tables.join(', ') : 'no table'} changed, at catalog commit ${merged.commit.slice(0, 12)}`,
    );
    await versions.deleteBranch(branch);
  }
  return tableFromArrays({ table: tables, branch: tables.map(() => target) });
}

/**
 * Commits every staged write of the run in one catalog commit on the run's branch: readers see
 * all of the run's tables or none.
 */
async function commit(work: SystemWork, system: SystemStep & { kind: 'commit' }, inputs: Readonly<Record<string, Table>>, mainStore: TableStore): Promise<Table> {
  const store = atRef(mainStore, system.branch);
  const writes: { staged: StagedWrite; mode: 'append' | 'replace' }[] = [];
  for (const [param, input] of Object.entries(inputs)) {
    if (!param.startsWith('staged')) continue;
    const row = input.get(0)!;
    const parsed = JSON.parse(String(row.staged)) as { files: StagedWrite['files']; schema: string };
    const schema: Schema = tableFromIPC(Buffer.from(parsed.schema, 'base64')).schema;
    writes.push({ staged: { table: String(row.table), schema, files: parsed.files }, mode: String(row.mode) as 'append' | 'replace' });
  }
  // A commit step run again (its executor died after committing) must not commit twice: the
  // tables were committed together, so finding one of them committed means all were.
  const already = await Promise.all(writes.map((w) => findCommitted(store, w.staged)));
  const results = already.every((r) => r !== null)
    ? (already as NonNullable<(typeof already)[number]>[])
    : await commitStagedMany(store, writes, { message: `run ${work.runId}`, ...(work.cacheKey ? { cacheKey: work.cacheKey } : {}) });
  const where = system.branch ? ` on branch ${system.branch}` : '';
  for (const [i, result] of results.entries()) {
    work.log(`committed snapshot ${result.snapshotId} of table ${result.table}${where} (${writes[i]!.mode}, ${result.rows.toLocaleString('en-US')} rows, version ${result.version})`);
  }
  if (results.length > 1) work.log(`the run's ${results.length} tables were committed in one catalog commit: readers see all or none`);
  return tableFromArrays({
    table: results.map((c) => c.table),
    snapshotId: results.map((c) => c.snapshotId),
    version: Int32Array.from(results.map((c) => c.version)),
    rows: Float64Array.from(results.map((c) => c.rows)),
  });
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
 * What a system step process is handed (`ctx.system`): the store to open, whether its branch
 * pointers are asked of the executor (a catalog on NATS), and the step.
 */
interface SystemJob {
  store: StorageConfig;
  refsViaExecutor: boolean;
  system: SystemStep;
  cacheKey?: string;
}

/** The branches a system step moves: a transactional stage its run's branch, a commit its target (a transaction's: and the run's branch, which it deletes). */
function branchesWritten(runId: string, system: SystemStep): string[] {
  if (system.kind === 'stage') return system.transaction ? [runBranch(runId)] : [];
  if (system.kind === 'commit') return system.transaction ? [system.branch ?? MAIN_BRANCH, runBranch(runId)] : [system.branch ?? MAIN_BRANCH];
  return [];
}

const COMMIT_ID = /^[0-9a-f]{64}$/;
const isRefKind = (kind: unknown): kind is RefKind => kind === 'branch' || kind === 'tag';

/**
 * The executor's side of a system step process's catalog calls ({@link CatalogCall}): it reads
 * any pointer (a scan may read any branch, tag or commit), and moves only the branches the step
 * writes ({@link branchesWritten}). Any step may create `main` where it was never created: the
 * first read of a store from before branches records its tables as main's first commit. What
 * arrives is checked field by field: a process may be in any state.
 */
export function catalogGate(ready: Pick<StepReady, 'runId' | 'step'>, system: SystemStep, store: TableStore): CatalogHandler {
  const versions = store.catalog.versions;
  const writable = new Set(branchesWritten(ready.runId, system));
  const refuse = (why: string) => new CatalogCallRefusedError(`system step ${ready.step} of run ${ready.runId}: ${why}`);
  return async (call: CatalogCall) => {
    if (typeof call !== 'object' || call === null) throw refuse('a catalog call must be an object');
    switch (call.op) {
      case 'readRef':
        if (!isRefKind(call.kind)) throw refuse(`no ref kind ${JSON.stringify(call.kind)}`);
        checkRefName(call.name, call.kind);
        return versions.refs.read(call.kind, call.name);
      case 'listRefs':
        if (!isRefKind(call.kind)) throw refuse(`no ref kind ${JSON.stringify(call.kind)}`);
        return versions.refs.list(call.kind);
      case 'tableHead':
        checkTableName(call.table);
        return (await versions.legacy?.head(call.table)) ?? null;
      case 'listTables':
        return (await versions.legacy?.list()) ?? [];
      case 'swapRef': {
        const { kind, name, expected, commit } = call;
        if (!isRefKind(kind)) throw refuse(`no ref kind ${JSON.stringify(kind)}`);
        checkRefName(name, kind);
        const pointer = typeof expected === 'object' && expected !== null && Number.isSafeInteger(expected.token) && expected.token >= 0;
        if (!pointer || !(expected.commit === null || (typeof expected.commit === 'string' && COMMIT_ID.test(expected.commit)))) throw refuse(`a malformed expected pointer for ${kind} ${name}`);
        if (!(commit === null || (typeof commit === 'string' && COMMIT_ID.test(commit)))) throw refuse(`a malformed commit id for ${kind} ${name}`);
        const mayMove = kind === 'branch' && (writable.has(name) || (name === MAIN_BRANCH && expected.token === 0));
        if (!mayMove) throw refuse(`it may move ${writable.size ? `only branch ${[...writable].join(' and ')}` : 'no branch'}, not ${kind} ${name}`);
        const head: RefHead = { commit: expected.commit, token: expected.token };
        return versions.refs.swap(kind, name, head, commit);
      }
      default:
        throw refuse(`no catalog call ${JSON.stringify((call as { op?: unknown }).op)}`);
    }
  };
}

async function inStepProcess(ready: StepReady, system: SystemStep, inputs: readonly Input[], attempt: number, ctx: SystemStepContext, processes: SystemStepProcesses): Promise<SystemReply> {
  const { nc: _connection, ...config } = (ctx.storage ?? storageConfigFromEnv()) as StorageConfig & { nc?: NatsConnection };
  // A local store, or S3 with conditional writes, the process opens whole; a catalog on NATS it reaches through this executor.
  const refsViaExecutor = config.kind === 's3' && !config.s3.conditionalWrites;
  const job: SystemJob = { store: config, refsViaExecutor, system, ...(ready.cacheKey ? { cacheKey: ready.cacheKey } : {}) };
  const runnerJob: RunnerJob = {
    codePath: processes.codePath,
    runId: ready.runId,
    step: ready.step,
    params: {},
    event: null,
    inputs: inputs.map((i) => ({ param: i.param, descriptor: i.descriptor })),
    shmDir: ctx.shmDir,
    outputIdPrefix: `${ready.runId}.${ready.step}.${attempt}`,
    ...(processes.regionBroker ? { regionBroker: processes.regionBroker } : {}),
    ...(ctx.maxSegmentBytes ? { maxSegmentBytes: ctx.maxSegmentBytes } : {}),
    ...(ctx.poolMaxBytes !== undefined ? { poolMaxBytes: ctx.poolMaxBytes } : {}),
    system: { entry: 'system', payload: job },
  };
  // S3 credentials, from wherever the AWS SDK reads them; nothing else of the executor's environment.
  const env = config.kind === 's3' ? Object.keys(process.env).filter((name) => name.startsWith('AWS_')) : [];
  return processes.run(runnerJob, env, refsViaExecutor ? catalogGate(ready, system, await ctx.tables()) : undefined);
}

// ---- In a system step process -------------------------------------------------------------

let nextCallId = 0;
const pendingCalls = new Map<number, { resolve(value: unknown): void; reject(error: Error): void }>();

function onCatalogReply(message: RunnerRequest): void {
  if (message?.type !== 'catalog-reply') return;
  const pending = pendingCalls.get(message.id);
  if (!pending) return;
  pendingCalls.delete(message.id);
  if (message.ok) pending.resolve(message.result);
  else pending.reject(Object.assign(new Error(message.error.message), { name: message.error.name, ...(message.error.code ? { code: message.error.code } : {}) }));
}

/** Asks the executor (see {@link catalogGate}); its refusal or failure is thrown here. */
function callExecutor<T>(call: CatalogCall): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    if (!process.send || !process.connected) return reject(new Error('the executor is gone'));
    if (nextCallId === 0) process.on('message', onCatalogReply);
    const id = ++nextCallId;
    pendingCalls.set(id, { resolve: resolve as (value: unknown) => void, reject });
    process.send({ type: 'catalog', id, call } satisfies RunnerMessage, undefined, {}, (error) => {
      if (!error) return;
      pendingCalls.delete(id);
      reject(error);
    });
  });
}

/** Branch pointers of a catalog on NATS, through the executor. */
const refsOfExecutor: RefStore = {
  read: (kind, name) => callExecutor<RefHead>({ op: 'readRef', kind, name }),
  swap: (kind, name, expected, commit) => callExecutor<boolean>({ op: 'swapRef', kind, name, expected: { commit: expected.commit, token: expected.token }, commit }),
  list: (kind) => callExecutor<{ name: string; head: RefHead }[]>({ op: 'listRefs', kind }),
};

/** Table heads from before branches, of a catalog on NATS, through the executor. */
const tableHeadsOfExecutor: TableHeads = {
  head: (table) => callExecutor({ op: 'tableHead', table }),
  list: () => callExecutor<string[]>({ op: 'listTables' }),
};

/** Stores a system step process opened, by configuration: kept for its next steps. */
const childStores = new Map<string, Promise<OpenedTableStore>>();
function childStore(config: StorageConfig, refsViaExecutor: boolean): Promise<OpenedTableStore> {
  const key = JSON.stringify([config, refsViaExecutor]);
  let store = childStores.get(key);
  if (!store) {
    store = refsViaExecutor ? openTableStoreWithRefs(config, refsOfExecutor, tableHeadsOfExecutor) : openTableStore(config);
    // A failed open is not kept: the next step tries again.
    store.catch(() => childStores.delete(key));
    childStores.set(key, store);
  }
  return store;
}

/** The context runJob gives a system step (see RunnerJob.system). */
interface SystemCallContext {
  runId: string;
  step: string;
  system: SystemJob;
  log(...args: unknown[]): void;
  reportScan(report: ScanReport): void;
}

/** In a step process: the whole system step (see the module comment). */
async function systemHere(inputs: Readonly<Record<string, Table>>, ctx: SystemCallContext): Promise<Table> {
  const { store, refsViaExecutor, system, cacheKey } = ctx.system;
  const work: SystemWork = { runId: ctx.runId, step: ctx.step, log: (line) => ctx.log(line), cache: hostCache, ...(cacheKey ? { cacheKey } : {}) };
  const done = await perform(work, system, inputs, await childStore(store, refsViaExecutor));
  if (done.scan) ctx.reportScan(done.scan);
  return done.table;
}

/** What a system step process imports: shaped like a pipeline module, with one step. */
export default { steps: { system: { fn: systemHere } } };
