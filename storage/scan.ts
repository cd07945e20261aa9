import { DataType, RecordBatch, Schema, Struct, Table, Vector, makeBuilder, makeData, type Data } from 'apache-arrow';
import { hostCache, type ColumnCache } from './cache.ts';
import { decodeStat, kindsOf, statFromJson, type ColumnKind, type ColumnStats, type ColumnValue } from './columns.ts';
import { UnknownColumnError } from './errors.ts';
import { compileFilter, filterColumns, mayMatch, parseFilter, validateFilter, type Filter, type ValueAt } from './filter.ts';
import type { DataFileEntry, Snapshot } from './metadata.ts';
import { DataFile, type FetchMeter } from './parquet.ts';
import { loadTable, readManifest, resolveSnapshot, schemaOf, type SnapshotSelector, type TableStore } from './tables.ts';

/** Row groups whose chunks are being fetched while an earlier one is decoded. */
const FETCH_AHEAD_ROW_GROUPS = 4;

export interface ScanOptions extends SnapshotSelector {
  /** Columns to return, in this order. @default every column */
  columns?: readonly string[];
  /** A filter such as `usd > 100 AND country IN ('France', 'Spain')`; see filter.ts. */
  filter?: string;
  /** The host's column cache; null reads everything from the store. @default the process-wide cache */
  cache?: ColumnCache | null;
}

/** What a scan did: counted, so pushdown and caching can be checked, not assumed. */
export interface ScanStats {
  snapshotId: string | null;
  /** Bytes received from the object store (footers and column chunks). */
  bytesFetched: number;
  requests: number;
  filesTotal: number;
  /** Data files skipped by the manifest's column statistics: not even opened. */
  filesSkipped: number;
  rowGroupsTotal: number;
  rowGroupsRead: number;
  /** Row groups skipped by their Parquet statistics (in files that were opened or skipped). */
  rowGroupsSkipped: number;
  /** Column chunks served by the cache instead of the store. */
  cachedChunks: number;
  rowsRead: number;
  rowsReturned: number;
}

export interface ScanResult {
  table: Table;
  stats: ScanStats;
}

/** A scan that was checked against the table without reading data: columns and filter are valid. */
export interface PreparedScan {
  table: string;
  snapshot: Snapshot | null;
  columns: string[];
  filter: Filter | null;
  kinds: Map<string, ColumnKind>;
  schema: ReturnType<typeof schemaOf>['schema'];
}

/**
 * Resolves the snapshot and checks the columns and the filter against its schema. Throws
 * TableNotFoundError, UnknownColumnError, FilterSyntaxError or an ERR_FILTER_TYPE StorageError:
 * what a run checks at submit time, before anything runs.
 */
export async function prepareScan(store: TableStore, name: string, options: ScanOptions = {}): Promise<PreparedScan> {
  const { metadata } = await loadTable(store, name);
  const snapshot = resolveSnapshot(metadata, options);
  const { schema } = schemaOf(metadata, snapshot);
  const available = schema.fields.map((f) => f.name);
  const columns = options.columns ? [...options.columns] : available;
  const unknown = columns.filter((c) => !available.includes(c));
  if (unknown.length > 0) throw new UnknownColumnError(name, unknown, available, 'the scan');
  const kinds = kindsOf(schema);
  let filter: Filter | null = null;
  if (options.filter !== undefined && options.filter.trim() !== '') {
    filter = parseFilter(options.filter);
    validateFilter(filter, name, kinds, options.filter);
  }
  return { table: name, snapshot, columns, filter, kinds, schema };
}

/**
 * Reads a table snapshot: only the requested columns (plus those the filter needs), only row
 * groups whose statistics do not exclude the filter, and only the rows that match it. On S3
 * every read is a ranged GET of one column chunk; cached column chunks are not fetched again.
 */
export async function scanTable(store: TableStore, name: string, options: ScanOptions = {}): Promise<ScanResult> {
  const prepared = await prepareScan(store, name, options);
  return executeScan(store, prepared, options.cache === undefined ? hostCache : options.cache);
}

export async function executeScan(store: TableStore, prepared: PreparedScan, cache: ColumnCache | null): Promise<ScanResult> {
  const { snapshot, columns, filter, kinds, schema } = prepared;
  const meter: FetchMeter = { bytes: 0, requests: 0 };
  const stats: ScanStats = {
    snapshotId: snapshot?.snapshotId ?? null,
    bytesFetched: 0,
    requests: 0,
    filesTotal: 0,
    filesSkipped: 0,
    rowGroupsTotal: 0,
    rowGroupsRead: 0,
    rowGroupsSkipped: 0,
    cachedChunks: 0,
    rowsRead: 0,
    rowsReturned: 0,
  };
  const outSchema = new Schema(columns.map((c) => schema.fields.find((f) => f.name === c)!), schema.metadata);
  const needed = filter ? [...new Set([...columns, ...filterColumns(filter)])] : columns;
  const test = filter ? compileFilter(filter, kinds) : null;
  const batches: RecordBatch[] = [];
  const files = snapshot ? (await readManifest(store, snapshot)).dataFiles : [];
  stats.filesTotal = files.length;

  for (const file of files) {
    if (filter && !mayMatch(filter, kinds, fileStats(file, kinds))) {
      stats.filesSkipped++;
      stats.rowGroupsTotal += file.rowGroups;
      stats.rowGroupsSkipped += file.rowGroups;
      continue;
    }
    const fileKey = `${store.objects.id}|${file.path}|${file.fileSizeInBytes}`;
    const cachedTail = cache?.get<Uint8Array>(`${fileKey}|tail`);
    const dataFile = await DataFile.open(store.objects, file.path, file.fileSizeInBytes, meter, cachedTail);
    if (!cachedTail) cache?.set(`${fileKey}|tail`, dataFile.tail);
    const { footer } = dataFile;
    stats.rowGroupsTotal += footer.rowGroups.length;
    // What each row group needs: cached columns are taken now, the rest fetched below.
    const groups: { rg: number; vectors: Map<string, Vector>; missing: string[] }[] = [];
    for (let rg = 0; rg < footer.rowGroups.length; rg++) {
      if (filter && !mayMatch(filter, kinds, (column) => rowGroupStats(dataFile, rg, column, kinds, schema))) {
        stats.rowGroupsSkipped++;
        continue;
      }
      stats.rowGroupsRead++;
      stats.rowsRead += footer.rowGroups[rg]!.numRows;
      const vectors = new Map<string, Vector>();
      const missing: string[] = [];
      for (const column of needed) {
        const hit = cache?.get<Vector>(`${fileKey}|${rg}|${column}`);
        if (hit) {
          vectors.set(column, hit);
          stats.cachedChunks++;
        } else missing.push(column);
      }
      groups.push({ rg, vectors, missing });
    }
    // Fetching runs ahead of decoding by a few row groups: on S3 the requests' latency overlaps
    // the (synchronous) decoding instead of adding to it.
    const fetches: Promise<Map<number, Uint8Array>>[] = [];
    const fetchAt = (k: number) => {
      if (!fetches[k]) {
        const { rg, missing } = groups[k]!;
        fetches[k] = missing.length > 0 ? dataFile.fetchRowGroup(rg, missing, meter) : Promise.resolve(new Map());
        // Awaited in turn below; until then a failure must not count as unhandled.
        fetches[k].catch(() => {});
      }
      return fetches[k];
    };
    for (let k = 0; k < groups.length; k++) {
      for (let ahead = k; ahead < Math.min(groups.length, k + FETCH_AHEAD_ROW_GROUPS); ahead++) void fetchAt(ahead);
      const { rg, vectors, missing } = groups[k]!;
      const chunks = await fetchAt(k);
      if (missing.length > 0) {
        const read = await dataFile.decodeRowGroup(rg, missing, chunks);
        for (const column of missing) {
          const vector = read.getChild(column);
          if (!vector) throw new UnknownColumnError(prepared.table, [column], read.schema.fields.map((f) => f.name), `data file ${file.path}`);
          vectors.set(column, vector);
          cache?.set(`${fileKey}|${rg}|${column}`, vector);
        }
      }
      const groupTable = new Table(Object.fromEntries(needed.map((c) => [c, vectors.get(c)!])));
      for (const batch of groupTable.batches) {
        const kept = test ? keepMatching(batch, test, kinds) : batch;
        if (kept && kept.numRows > 0) batches.push(projectBatch(kept, columns, outSchema));
      }
    }
  }
  const table = batches.length > 0 ? new Table(outSchema, batches) : new Table(outSchema);
  stats.bytesFetched = meter.bytes;
  stats.requests = meter.requests;
  stats.rowsReturned = table.numRows;
  return { table, stats };
}

function fileStats(file: DataFileEntry, kinds: ReadonlyMap<string, ColumnKind>) {
  return (column: string): (ColumnStats & { rows: number }) | undefined => {
    const s = file.columnStats[column];
    const kind = kinds.get(column)!;
    // Nested and other columns: leaf statistics (null items of a list) do not describe rows.
    if (!s || kind === 'other') return undefined;
    const out: ColumnStats & { rows: number } = { rows: file.recordCount };
    const min = statFromJson(s.min, kind);
    const max = statFromJson(s.max, kind);
    if (min !== undefined) out.min = min;
    if (max !== undefined) out.max = max;
    if (s.nullCount !== undefined) out.nullCount = s.nullCount;
    return out;
  };
}

function rowGroupStats(file: DataFile, rg: number, column: string, kinds: ReadonlyMap<string, ColumnKind>, schema: PreparedScan['schema']): (ColumnStats & { rows: number }) | undefined {
  const group = file.footer.rowGroups[rg]!;
  const chunk = group.columns.find((c) => c.column === column);
  const field = schema.fields.find((f) => f.name === column);
  const kind = kinds.get(column)!;
  // As for files: only top-level scalar columns have statistics that describe rows.
  if (!chunk || !field || kind === 'other') return undefined;
  const unit = file.footer.timestampUnits.get(column);
  const out: ColumnStats & { rows: number } = { rows: group.numRows };
  const min = decodeStat(chunk.min, chunk, kind, field.type, unit);
  const max = decodeStat(chunk.max, chunk, kind, field.type, unit);
  if (min !== undefined) out.min = min;
  if (max !== undefined) out.max = max;
  if (chunk.nullCount !== null) out.nullCount = chunk.nullCount;
  return out;
}

/** Reads a column's row values in its filter kind; plain arrays and dictionary codes directly. */
function reader(batch: RecordBatch, name: string, kinds: ReadonlyMap<string, ColumnKind>): ValueAt {
  const vector = batch.getChild(name)!;
  const data = vector.data[0]!;
  const kind = kinds.get(name);
  if (vector.data.length === 1 && data.nullCount === 0) {
    if (kind === 'number' && (DataType.isFloat(data.type) || DataType.isInt(data.type))) {
      const values = data.values as ArrayLike<number>;
      return (i) => values[data.offset + i]!;
    }
    if (DataType.isDictionary(data.type) && data.dictionary) {
      const dictionary = data.dictionary;
      const decoded: (ColumnValue | null)[] = Array.from({ length: dictionary.length }, (_, i) => (dictionary.get(i) ?? null) as ColumnValue | null);
      const codes = data.values as ArrayLike<number>;
      return (i) => decoded[codes[data.offset + i]!] ?? null;
    }
  }
  return (i) => {
    const v = vector.get(i) as ColumnValue | null | undefined;
    return v === undefined ? null : v;
  };
}

function keepMatching(batch: RecordBatch, test: ReturnType<typeof compileFilter>, kinds: ReadonlyMap<string, ColumnKind>): RecordBatch | null {
  const matches = test((name) => reader(batch, name, kinds));
  const rows = batch.numRows;
  const indices = new Int32Array(rows);
  let count = 0;
  for (let i = 0; i < rows; i++) if (matches(i)) indices[count++] = i;
  if (count === rows) return batch;
  if (count === 0) return null;
  const picked = indices.subarray(0, count);
  const children = batch.schema.fields.map((f) => gather(batch.getChild(f.name)!, picked));
  return new RecordBatch(batch.schema, makeData({ type: batch.data.type, length: count, nullCount: 0, children }));
}

/** Copies the rows at `indices` of a column: typed arrays directly, anything else through a builder. */
function gather(vector: Vector, indices: Int32Array): Data {
  const data = vector.data[0]!;
  const fixedWidth = DataType.isInt(data.type) || DataType.isFloat(data.type) || DataType.isDate(data.type) || DataType.isTimestamp(data.type) || DataType.isDictionary(data.type);
  if (vector.data.length === 1 && data.nullCount === 0 && fixedWidth && data.values && !DataType.isDictionary(data.type) === !data.dictionary) {
    const source = data.values as unknown as { constructor: new (n: number) => { [i: number]: number | bigint }; [i: number]: number | bigint };
    const stride = data.stride;
    const out = new source.constructor(indices.length * stride);
    for (let j = 0; j < indices.length; j++) {
      const from = (data.offset + indices[j]!) * stride;
      for (let k = 0; k < stride; k++) out[j * stride + k] = source[from + k]!;
    }
    return makeData({ type: data.type, length: indices.length, nullCount: 0, data: out as never, ...(data.dictionary ? { dictionary: data.dictionary } : {}) } as never);
  }
  const builder = makeBuilder({ type: vector.type, nullValues: [null, undefined] });
  for (const i of indices) builder.append(plain(vector.get(i)));
  return builder.finish().flush();
}

/** A list's value comes back as a Vector, which a builder does not take: make it an array, at every depth. */
function plain(value: unknown): unknown {
  return value instanceof Vector ? Array.from(value as Vector, plain) : value;
}

/** The batch's columns in the scan's order, typed as the table schema says (one schema for every batch). */
function projectBatch(batch: RecordBatch, columns: readonly string[], schema: PreparedScan['schema']): RecordBatch {
  const children = columns.map((c, i) => batch.getChild(c)!.data[0]!.clone(schema.fields[i]!.type));
  return new RecordBatch(schema, makeData({ type: new Struct(schema.fields), length: batch.numRows, nullCount: 0, children }));
}
