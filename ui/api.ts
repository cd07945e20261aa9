/**
 * The UI's JSON API: each route reads the cluster once through the client, or answers from the
 * hub's memory. Outputs and tables are previewed as plain JSON rows, with their schema.
 */
import { jetstream } from '@nats-io/jetstream';
import type { Table } from 'apache-arrow';
import { ulid } from 'ulid';
import { nextTick, schemaViolation, subjectMatches } from '../planner/index.ts';
import { encodeChecked, readRunRecord, runSubmit, subjects, type Deployment, type RunSubmit } from '../schemas/index.ts';
import { OutputNotFoundError, rerunOf, type QuiverClient } from '../sdk/index.ts';
import { describeTable, listTables, scanTable, TableNotFoundError, type OpenedTableStore } from '../storage/index.ts';
import { HttpError } from './errors.ts';
import type { LiveHub } from './hub.ts';
import type { ResolvedUiOptions } from './options.ts';

export interface ApiContext {
  client: QuiverClient;
  hub: LiveHub;
  options: ResolvedUiOptions;
  tableStore: () => Promise<OpenedTableStore>;
  /** Runs this server started: their outputs are released a while after they end. */
  startedHere: Set<string>;
}

/** JSON-safe rows: 64-bit integers as strings (JSON numbers would round them), dates as ISO text. */
export function previewRows(table: Table, limit: number): { schema: { name: string; type: string; nullable: boolean }[]; rows: unknown[][]; numRows: number } {
  const schema = table.schema.fields.map((f) => ({ name: f.name, type: String(f.type), nullable: f.nullable }));
  const rows: unknown[][] = [];
  const n = Math.min(limit, table.numRows);
  const columns = table.schema.fields.map((_, i) => table.getChildAt(i));
  for (let r = 0; r < n; r++) rows.push(columns.map((c) => jsonValue(c?.get(r))));
  return { schema, rows, numRows: table.numRows };
}

function jsonValue(v: unknown): unknown {
  if (v === null || v === undefined) return null;
  if (typeof v === 'bigint') return v.toString();
  if (v instanceof Date) return v.toISOString();
  if (typeof v === 'number' || typeof v === 'string' || typeof v === 'boolean') return v;
  if (ArrayBuffer.isView(v)) return Array.from(v as unknown as ArrayLike<number>, (x) => jsonValue(x));
  if (typeof (v as { toJSON?: unknown }).toJSON === 'function') return JSON.parse(JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x)));
  return String(v);
}

export async function getRun(ctx: ApiContext, runId: string) {
  const record = await readRunRecord(ctx.client.topology.runs, runId).catch(() => null);
  const view = record ? await ctx.client.getRun(runId) : null;
  if (!record || !view) throw new HttpError(404, `no run ${runId}: it may have been removed, or the id is wrong`);
  return {
    view,
    plan: record.submit.plan,
    params: record.submit.params,
    event: record.submit.event ?? null,
    logs: await logsOf(ctx, runId),
  };
}

/** Lines the hub heard since it started, else those the logs stream kept (the last ones, as many as the hub keeps per run). */
async function logsOf(ctx: ApiContext, runId: string) {
  const heard = ctx.hub.logsOf(runId);
  if (heard.length > 0) return heard;
  const kept = [];
  for await (const line of ctx.client.logs(runId)) kept.push(line);
  return kept.slice(-ctx.options.logLinesPerRun);
}

export async function previewOutput(ctx: ApiContext, runId: string, step: string) {
  try {
    const { table, transport } = await ctx.client.readOutput(runId, step);
    return { ...previewRows(table, ctx.options.previewRows), transport };
  } catch (error) {
    if (error instanceof OutputNotFoundError) throw new HttpError(404, error.message);
    throw error;
  }
}

export async function cancelRun(ctx: ApiContext, runId: string) {
  const record = await readRunRecord(ctx.client.topology.runs, runId).catch(() => null);
  if (!record) throw new HttpError(404, `no run ${runId}`);
  if (record.state !== 'running' && record.state !== 'queued') throw new HttpError(409, `run ${runId} is ${record.state}: only a queued or running run can be cancelled`);
  await ctx.client.cancel(runId, 'cancelled from the web UI');
  return { runId, cancelling: true };
}

/**
 * Submits the run again exactly as it was: the same plan (with the same pinned table snapshots),
 * code hash, deployed version, params and event. Only what started it differs: this UI. With
 * `from`, a rerun from that step (see `QuiverClient.rerun`).
 */
export async function rerunRun(ctx: ApiContext, runId: string, from: string | null = null) {
  const record = await readRunRecord(ctx.client.topology.runs, runId).catch(() => null);
  if (!record) throw new HttpError(404, `no run ${runId}`);
  const old = record.submit;
  if (from !== null && !old.plan.steps.some((s) => s.name === from)) throw new HttpError(404, `run ${runId} has no step ${from}`);
  if (!(await ctx.client.topology.code.info(old.codeHash))) throw new HttpError(409, `the code of run ${runId} is no longer stored: run the pipeline file again instead`);
  const newId = ulid();
  // A plain rerun computes everything again; one from a step takes the steps before it from the cache.
  const submit: RunSubmit = {
    type: 'run.submit',
    runId: newId,
    submittedAt: Date.now(),
    ...rerunOf(old, runId, { by: 'web UI', ...(from !== null ? { from } : { cache: 'off' }) }),
  };
  ctx.startedHere.add(newId);
  await jetstream(ctx.client.nc).publish(subjects.runSubmit, encodeChecked(runSubmit, submit), { msgID: `${newId}.submit` });
  return { runId: newId };
}

export async function listPipelines(ctx: ApiContext) {
  const deployed = await ctx.client.listDeployments();
  const now = Date.now();
  return Promise.all(
    deployed.map(async (d) => ({
      name: d.name,
      version: d.version,
      versions: await versionsOf(ctx, d.name),
      deployedAt: d.deployedAt,
      deployedBy: d.deployedBy,
      steps: d.plan.steps.length,
      events: d.events,
      schedule: d.schedule,
      nextFire: d.schedule ? nextTick(d.schedule, now) : null,
      maxConcurrentRuns: d.maxConcurrentRuns,
    })),
  );
}

async function versionsOf(ctx: ApiContext, name: string): Promise<{ version: number; deployedAt: number; codeHash: string }[]> {
  const versions = new Map<number, { version: number; deployedAt: number; codeHash: string }>();
  for await (const key of await ctx.client.topology.pipelines.keys(`${name}.*`)) {
    const entry = await ctx.client.topology.pipelines.get(key).catch(() => null);
    if (entry?.operation !== 'PUT') continue;
    const d = entry.json<Deployment>();
    versions.set(d.version, { version: d.version, deployedAt: d.deployedAt, codeHash: d.codeHash });
  }
  return [...versions.values()].sort((a, b) => b.version - a.version);
}

/** Checks a test event against the deployed trigger it would start, as the orchestrator will. */
export async function checkEvent(ctx: ApiContext, name: string, body: unknown): Promise<{ ok: boolean; problem: string | null; subject: string; payload: unknown }> {
  const { subject, payload } = eventBody(body);
  const deployment = await ctx.client.getDeployment(name);
  if (!deployment) throw new HttpError(404, `pipeline ${name} is not deployed`);
  const trigger = deployment.events.find((e) => subjectMatches(e.subject, subject));
  if (!trigger) {
    const patterns = deployment.events.map((e) => e.subject);
    return { ok: false, subject, payload, problem: patterns.length ? `${subject} matches none of ${name}'s triggers: ${patterns.join(', ')}` : `${name} has no event trigger` };
  }
  const problem = trigger.schema ? schemaViolation(trigger.schema, payload) : null;
  return { ok: problem === null, problem, subject, payload };
}

export async function publishEvent(ctx: ApiContext, name: string, body: unknown) {
  const checked = await checkEvent(ctx, name, body);
  if (!checked.ok) throw new HttpError(422, checked.problem ?? 'the event does not fit the trigger');
  const id = typeof (body as { id?: unknown }).id === 'string' && (body as { id: string }).id ? (body as { id: string }).id : undefined;
  return ctx.client.publish(checked.subject, checked.payload, id ? { id } : {});
}

function eventBody(body: unknown): { subject: string; payload: unknown } {
  const b = body as { subject?: unknown; payload?: unknown } | null;
  if (!b || typeof b.subject !== 'string' || !('payload' in b)) throw new HttpError(400, 'send { "subject": "orders.uploaded", "payload": {...} }');
  return { subject: b.subject, payload: b.payload };
}

export async function listTablesApi(ctx: ApiContext) {
  const store = await ctx.tableStore();
  const tables = await Promise.all((await listTables(store)).map((n) => describeTable(store, n)));
  return tables.map((t) => ({ name: t.name, rows: t.rows, bytes: t.bytes, snapshots: t.snapshots.length, lastChange: t.snapshots.at(-1)?.timestampMs ?? null }));
}

export async function showTable(ctx: ApiContext, name: string) {
  const store = await ctx.tableStore();
  try {
    const table = await describeTable(store, name);
    // Where the table exists, and at which snapshot: every branch and tag (one catalog commit read each).
    const refs = [];
    for (const ref of await store.catalog.versions.list()) {
      const entry = (await store.catalog.versions.tablesAt(ref.name))[name];
      if (entry) refs.push({ name: ref.name, kind: ref.kind, snapshotId: entry.snapshotId, rows: entry.rows });
    }
    return { ...table, refs };
  } catch (error) {
    if (error instanceof TableNotFoundError) throw new HttpError(404, error.message);
    throw error;
  }
}

export async function previewTable(ctx: ApiContext, name: string, snapshot: string | null) {
  const store = await ctx.tableStore();
  try {
    // The store has no row limit: the scan reads the snapshot whole (through the column cache) and only the first rows are sent.
    const { table } = await scanTable(store, name, snapshot ? { snapshot } : {});
    return { ...previewRows(table, ctx.options.previewRows), snapshotId: snapshot };
  } catch (error) {
    if (error instanceof TableNotFoundError) throw new HttpError(404, error.message);
    throw error;
  }
}
