import { readFileSync } from 'node:fs';
import { basename, extname } from 'node:path';
import { parseArgs } from 'node:util';
import type { NatsConnection } from '@nats-io/transport-node';
import { generateTransactions } from '../examples/transactions/data.ts';
import {
  atRef,
  decodeParquet,
  expireSnapshots,
  describeTable,
  listTables,
  openTableStore,
  readCsv,
  storageConfigFromEnv,
  writeTable,
  vacuumTable,
  type OpenedTableStore,
} from '../storage/index.ts';
import { findCluster, UsageError } from './cluster.ts';
import { formatBytes, textTable } from './format.ts';

export const TABLE_USAGE = `  table list [--ref REF] [--json]
                 List stored tables of a branch or tag (default main): rows,
                 snapshots, last change.
  table show NAME [--ref REF] [--json]
                 A table's schema, snapshots and row counts on a branch or tag.
  table import FILE.parquet|FILE.csv --name NAME [--mode append|replace] [--branch B]
                 Write a file's rows as a new snapshot of a table (created if new), on
                 branch B (default main).
  table expire [NAME...] [--older-than DURATION] [--keep N]
                 Drop snapshots superseded longer ago than DURATION (30m, 12h, 7d;
                 default 7d) from every branch, keeping each table's newest N
                 (default 1) and any snapshot a branch or tag reads.
  table vacuum NAME [--older-than MINUTES]
                 Remove data files no snapshot of any branch or tag refers to (left
                 by failed runs, losing writers, expired snapshots), written more
                 than MINUTES ago (default 60).
  table generate-example [--rows N] [--seed N]
                 Create (replace) the example's \`transactions\` table from generated data.`;

/** The table store the environment names (QUIVER_STORAGE, QUIVER_S3_*); S3 without conditional writes commits through the cluster's NATS. */
export async function openStore(): Promise<OpenedTableStore> {
  const config = storageConfigFromEnv();
  let nc: NatsConnection | undefined;
  if (config.kind === 's3' && !config.s3.conditionalWrites) {
    nc = (await findCluster())?.nc;
    if (nc) config.nc = nc;
  }
  const store = await openTableStore(config);
  return {
    ...store,
    close: async () => {
      await store.close();
      await nc?.close();
    },
  };
}

export async function tableCommand(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'list':
      return listCommand(rest);
    case 'show':
      return showCommand(rest);
    case 'import':
      return importCommand(rest);
    case 'vacuum':
      return vacuumCommand(rest);
    case 'expire':
      return expireCommand(rest);
    case 'generate-example':
      return generateExampleCommand(rest);
    default:
      throw new UsageError(sub ? `unknown table command "${sub}"` : 'table takes a command: list, show, import, expire, vacuum or generate-example');
  }
}

/** Opens the table store the environment names, hands it to `fn`, and closes it. */
export async function withStore<T>(fn: (store: OpenedTableStore) => Promise<T>): Promise<T> {
  const store = await openStore();
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

const when = (ms: number) => new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');

async function listCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean', default: false }, ref: { type: 'string' } } });
  return withStore(async (opened) => {
    const store = atRef(opened, values.ref);
    const tables = await Promise.all((await listTables(store)).map((name) => describeTable(store, name)));
    if (values.json) {
      process.stdout.write(JSON.stringify(tables.map((t) => ({ name: t.name, rows: t.rows, bytes: t.bytes, snapshots: t.snapshots.length, currentSnapshotId: t.currentSnapshotId }))) + '\n');
      return 0;
    }
    if (tables.length === 0) {
      console.log(`no tables in ${store.objects.id} (create one with \`quiver table import\` or \`quiver table generate-example\`)`);
      return 0;
    }
    console.log(
      textTable(
        ['table', 'rows', 'size', 'snapshots', 'last change'],
        tables.map((t) => [t.name, t.rows.toLocaleString('en-US'), formatBytes(t.bytes), String(t.snapshots.length), t.snapshots.length ? when(t.snapshots.at(-1)!.timestampMs) : '-']),
      ),
    );
    return 0;
  });
}

async function showCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { json: { type: 'boolean', default: false }, ref: { type: 'string' } } });
  if (positionals.length !== 1) throw new UsageError('table show takes one table name');
  return withStore(async (store) => {
    const t = await describeTable(atRef(store, values.ref), positionals[0]!);
    if (values.json) {
      process.stdout.write(JSON.stringify(t) + '\n');
      return 0;
    }
    console.log(`table ${t.name}${values.ref ? ` on ${values.ref}` : ''}: ${t.rows.toLocaleString('en-US')} rows in ${t.files} file(s), ${formatBytes(t.bytes)}, at ${t.location}\n`);
    console.log(textTable(['column', 'type', 'nullable'], t.fields.map((f) => [f.name, f.type, f.nullable ? 'yes' : 'no'])));
    console.log('');
    console.log(
      textTable(
        ['snapshot', 'time', 'operation', 'added rows', 'rows', 'files', 'state'],
        t.snapshots.map((s) => [
          s.snapshotId,
          when(s.timestampMs),
          s.operation,
          s.summary.addedRows.toLocaleString('en-US'),
          s.summary.totalRows.toLocaleString('en-US'),
          String(s.summary.totalFiles),
          s.snapshotId === t.currentSnapshotId ? 'current' : '',
        ]),
      ),
    );
    return 0;
  });
}

async function importCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { name: { type: 'string' }, mode: { type: 'string', default: 'append' }, branch: { type: 'string' } },
  });
  if (positionals.length !== 1) throw new UsageError('table import takes one file (.parquet or .csv)');
  if (!values.name) throw new UsageError('table import needs --name: the table to write');
  if (values.mode !== 'append' && values.mode !== 'replace') throw new UsageError(`--mode takes append or replace, got "${values.mode}"`);
  const file = positionals[0]!;
  const extension = extname(file).toLowerCase();
  if (extension !== '.parquet' && extension !== '.csv') throw new UsageError(`cannot import ${basename(file)}: give a .parquet or a .csv file`);
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (error) {
    throw new UsageError(`cannot read ${file}: ${(error as Error).message}`);
  }
  const table = extension === '.csv' ? readCsv(bytes.toString('utf8'), file) : await decodeParquet(bytes, file);
  const mode = values.mode;
  return withStore(async (store) => {
    const result = await writeTable(atRef(store, values.branch), values.name!, table, { mode });
    const verb = result.version === 1 ? 'created table' : mode === 'append' ? 'appended to table' : 'replaced the rows of table';
    console.log(`${verb} ${result.table}: ${result.rows.toLocaleString('en-US')} rows, snapshot ${result.snapshotId} (version ${result.version})`);
    return 0;
  });
}

async function vacuumCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { 'older-than': { type: 'string', default: '60' } } });
  if (positionals.length !== 1) throw new UsageError('table vacuum takes one table name');
  const minutes = Number(values['older-than']);
  if (!Number.isFinite(minutes) || minutes < 0) throw new UsageError(`--older-than takes minutes (a number ≥ 0), got "${values['older-than']}"`);
  return withStore(async (store) => {
    const { removed, bytes } = await vacuumTable(store, positionals[0]!, { olderThanMs: minutes * 60_000 });
    console.log(`removed ${removed.length} unreferenced file(s) of table ${positionals[0]}, ${formatBytes(bytes)}`);
    return 0;
  });
}

/** `30m`, `12h`, `7d`, `90s`, `500ms`; a bare number is days. */
export function parseDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(text.trim());
  if (!m) throw new UsageError(`--older-than takes a duration like 30m, 12h or 7d, got "${text}"`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[(m[2] ?? 'd') as 'd'];
  return Number(m[1]) * unit;
}

async function expireCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { 'older-than': { type: 'string', default: '7d' }, keep: { type: 'string', default: '1' } } });
  const olderThanMs = parseDuration(values['older-than']);
  const keep = Number(values.keep);
  if (!Number.isSafeInteger(keep) || keep < 1) throw new UsageError(`--keep takes a whole number ≥ 1, got "${values.keep}"`);
  return withStore(async (store) => {
    const { expired } = await expireSnapshots(store, { olderThanMs, keep, ...(positionals.length ? { tables: positionals } : {}) });
    if (expired.length === 0) console.log('no snapshot to expire');
    for (const e of expired) console.log(`expired ${e.snapshots.length} snapshot(s) of ${e.table} on ${e.branch}`);
    if (expired.length) console.log('their files go with `quiver table vacuum NAME`');
    return 0;
  });
}

async function generateExampleCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { rows: { type: 'string', default: '1000000' }, seed: { type: 'string', default: '42' } } });
  const rows = Number(values.rows);
  const seed = Number(values.seed);
  if (!Number.isSafeInteger(rows) || rows < 0) throw new UsageError(`--rows takes a whole number, got "${values.rows}"`);
  if (!Number.isSafeInteger(seed)) throw new UsageError(`--seed takes a whole number, got "${values.seed}"`);
  return withStore(async (store) => {
    const result = await writeTable(store, 'transactions', generateTransactions(rows, seed), { mode: 'replace' });
    console.log(`wrote ${result.rows.toLocaleString('en-US')} generated rows to table transactions in ${store.objects.id}: snapshot ${result.snapshotId}`);
    return 0;
  });
}
