/**
 * System steps of the physical plan, run inside the executor rather than in a step process:
 * the executor is long-lived, so scans share the host's column cache, and none of these runs
 * user code. Each writes its output into shared memory like any step, so children read it the
 * same way. See planner/physical-plan.ts for where they come from.
 */
import { Schema, Table, tableFromArrays, tableFromIPC, tableToIPC } from 'apache-arrow';
import type { StepReady, SystemStep, TableDescriptor } from '../schemas/index.ts';
import { readTableFromShm, unmapSegments, writeTableToShm } from '../shm/index.ts';
import type { NatsConnection } from '@nats-io/transport-node';
import {
  commitStaged,
  executeScan,
  findCommitted,
  hostCache,
  prepareScan,
  stageTable,
  tableStoreFromEnv,
  type ColumnCache,
  type OpenedTableStore,
  type StagedWrite,
  type TableStore,
} from '../storage/index.ts';
import type { RunnerReply } from './protocol.ts';

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
}

export interface ScanReport {
  table: string;
  snapshotId: string | null;
  bytesFetched: number;
  rowGroupsRead: number;
  rowGroupsSkipped: number;
  cachedChunks: number;
}

export type SystemReply = RunnerReply & { scan?: ScanReport };

type Input = StepReady['inputs'][number];

/** Runs one system step; never throws: a failure is an error reply, like a step process's. */
export async function runSystemStep(ready: StepReady, system: SystemStep, inputs: readonly Input[], attempt: number, ctx: SystemStepContext): Promise<SystemReply> {
  try {
    const store = await ctx.tables();
    switch (system.kind) {
      case 'scan':
        return await scan(ready, system, attempt, store, ctx);
      case 'stage':
        return await stage(ready, system, inputs, attempt, store, ctx);
      case 'commit':
        return await commit(ready, inputs, attempt, store, ctx);
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

async function scan(ready: StepReady, system: SystemStep & { kind: 'scan' }, attempt: number, store: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const prepared = await prepareScan(store, system.table, {
    ...(system.columns ? { columns: system.columns } : {}),
    ...(system.filter !== undefined ? { filter: system.filter } : {}),
    ...(system.snapshot !== undefined ? { snapshot: system.snapshot } : {}),
    ...(system.asOf !== undefined ? { asOf: system.asOf } : {}),
  });
  const { table, stats } = await executeScan(store, prepared, ctx.cache ?? hostCache);
  ctx.log(
    `scanned ${system.table}${stats.snapshotId ? ` at snapshot ${stats.snapshotId}` : ' (no snapshot yet)'}: ${prepared.columns.length} column(s), ` +
      `${stats.rowGroupsRead} of ${stats.rowGroupsTotal} row groups read (${stats.rowGroupsSkipped} skipped by statistics), ` +
      `${stats.rowsReturned.toLocaleString('en-US')} of ${stats.rowsRead.toLocaleString('en-US')} rows kept, ${formatBytes(stats.bytesFetched)} fetched` +
      (stats.cachedChunks > 0 ? `, ${stats.cachedChunks} column chunk(s) from the cache` : ''),
  );
  return {
    ...output(table, ready, attempt, ctx),
    scan: {
      table: system.table,
      snapshotId: stats.snapshotId,
      bytesFetched: stats.bytesFetched,
      rowGroupsRead: stats.rowGroupsRead,
      rowGroupsSkipped: stats.rowGroupsSkipped,
      cachedChunks: stats.cachedChunks,
    },
  };
}

function withInput<T>(input: Input, ctx: SystemStepContext, fn: (table: Table) => Promise<T>): Promise<T> {
  const opened = readTableFromShm((input.descriptor as TableDescriptor).segments, { dir: ctx.shmDir });
  return fn(opened.table).finally(() => unmapSegments(opened.mappings));
}

/** Writes the parent's output as data files no snapshot refers to; its output says which. */
async function stage(ready: StepReady, system: SystemStep & { kind: 'stage' }, inputs: readonly Input[], attempt: number, store: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const input = inputs.find((i) => i.param === 'data');
  if (!input) throw new Error(`stage step ${ready.step} has no input "data"`);
  const staged = await withInput(input, ctx, (table) => stageTable(store, system.table, table));
  const rows = staged.files.reduce((n, f) => n + f.recordCount, 0);
  ctx.log(`staged ${rows.toLocaleString('en-US')} rows of ${system.table} in ${staged.files.length} data file(s); committed when the run succeeds`);
  return output(
    tableFromArrays({
      table: [system.table],
      mode: [system.mode],
      staged: [JSON.stringify({ files: staged.files, schema: Buffer.from(tableToIPC(new Table(staged.schema), 'stream')).toString('base64') })],
    }),
    ready,
    attempt,
    ctx,
  );
}

/** Commits every staged write of the run as a new snapshot of its table. */
async function commit(ready: StepReady, inputs: readonly Input[], attempt: number, store: TableStore, ctx: SystemStepContext): Promise<SystemReply> {
  const committed: { table: string; snapshotId: string; version: number; rows: number }[] = [];
  for (const input of inputs.filter((i) => i.param.startsWith('staged'))) {
    const { table, mode, staged } = await withInput(input, ctx, async (t) => {
      const row = t.get(0)!;
      return { table: String(row.table), mode: String(row.mode) as 'append' | 'replace', staged: String(row.staged) };
    });
    const parsed = JSON.parse(staged) as { files: StagedWrite['files']; schema: string };
    const schema: Schema = tableFromIPC(Buffer.from(parsed.schema, 'base64')).schema;
    const write: StagedWrite = { table, schema, files: parsed.files };
    // A commit step run again (its executor died after committing) must not commit twice.
    const result = (await findCommitted(store, write)) ?? (await commitStaged(store, write, { mode }));
    ctx.log(`committed snapshot ${result.snapshotId} of table ${table} (${mode}, ${result.rows.toLocaleString('en-US')} rows, version ${result.version})`);
    committed.push({ table, snapshotId: result.snapshotId, version: result.version, rows: result.rows });
  }
  return output(
    tableFromArrays({
      table: committed.map((c) => c.table),
      snapshotId: committed.map((c) => c.snapshotId),
      version: Int32Array.from(committed.map((c) => c.version)),
      rows: Float64Array.from(committed.map((c) => c.rows)),
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
