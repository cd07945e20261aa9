import { randomUUID } from 'node:crypto';
import { Schema, Table, tableFromIPC, tableToIPC } from 'apache-arrow';
import { ulid } from 'ulid';
import { NAME_PATTERN } from '../schemas/index.ts';
import { tablePrefix, type Catalog, type CatalogHead, type TableChange } from './catalog.ts';
import { columnKind, decodeStat, mergeStats, statToJson, type ColumnStats } from './columns.ts';
import { StorageError, TableNotFoundError } from './errors.ts';
import { manifest as manifestSchema, tableMetadata, type DataFileEntry, type Manifest, type Snapshot, type TableMetadata, type TableSchema } from './metadata.ts';
import type { ObjectStore } from './object-store.ts';
import { DEFAULT_ROW_GROUP_ROWS, encodeParquet } from './parquet.ts';
import { parseFooter } from './parquet-footer.ts';

/** Where tables live: objects (data files, manifests, metadata) plus the catalog that commits. */
export interface TableStore {
  readonly objects: ObjectStore;
  readonly catalog: Catalog;
}

/** Which snapshot to read. Neither: the current one. */
export interface SnapshotSelector {
  /** A snapshot id from `describeTable(...).snapshots`. */
  snapshot?: string;
  /** The snapshot that was current at this time (epoch ms, or a Date). */
  asOf?: number | Date;
}

export interface WriteOptions {
  /** replace: the new snapshot holds only these rows; append: these rows are added. @default 'append' */
  mode?: 'append' | 'replace';
  /** @default 131072 */
  rowGroupRows?: number;
  /** Larger tables are split into several data files. @default 4194304 */
  maxRowsPerFile?: number;
}

/** Data files written but not yet part of any snapshot: invisible until {@link commitStaged}. */
export interface StagedWrite {
  table: string;
  schema: Schema;
  files: DataFileEntry[];
}

export interface CommitResult {
  table: string;
  version: number;
  snapshotId: string;
  rows: number;
  files: number;
}

const DEFAULT_MAX_ROWS_PER_FILE = 4 * 1024 * 1024;

export function checkTableName(name: string): void {
  if (typeof name !== 'string' || !NAME_PATTERN.test(name)) {
    throw new StorageError('ERR_TABLE_BAD_NAME', `table name ${JSON.stringify(name)} must be an identifier: a letter or _, then letters, digits or _ (at most 64)`);
  }
}

/**
 * The same store reading (and, for a branch, writing) at `ref`: a branch, a tag or a catalog
 * commit id. Every function taking a TableStore then works on that ref.
 * @default the store's own ref is `main`
 */
export function atRef<S extends TableStore>(store: S, ref: string | undefined): S {
  return ref === undefined || ref === store.catalog.ref ? store : { ...store, catalog: store.catalog.at(ref) };
}

export function listTables(store: TableStore): Promise<string[]> {
  return store.catalog.list();
}

/** The table's current metadata. Throws {@link TableNotFoundError} listing the tables that exist. */
export async function loadTable(store: TableStore, name: string): Promise<{ head: CatalogHead; metadata: TableMetadata }> {
  checkTableName(name);
  const head = await store.catalog.head(name);
  if (!head) throw new TableNotFoundError(name, await store.catalog.list());
  return { head, metadata: await readJson(store.objects, head.metadataKey, tableMetadata) };
}

/** The snapshot a selector names; null for a table that has none yet. */
export function resolveSnapshot(metadata: TableMetadata, selector: SnapshotSelector = {}): Snapshot | null {
  if (selector.snapshot !== undefined && selector.asOf !== undefined) {
    throw new StorageError('ERR_SNAPSHOT_NOT_FOUND', 'give either snapshot or asOf, not both');
  }
  if (selector.snapshot !== undefined) {
    const found = metadata.snapshots.find((s) => s.snapshotId === selector.snapshot);
    if (!found) {
      throw new StorageError(
        'ERR_SNAPSHOT_NOT_FOUND',
        `table "${metadata.name}" has no snapshot ${selector.snapshot}; its snapshots are: ${metadata.snapshots.map((s) => s.snapshotId).join(', ') || 'none'}`,
      );
    }
    return found;
  }
  if (selector.asOf !== undefined) {
    const at = selector.asOf instanceof Date ? selector.asOf.getTime() : selector.asOf;
    const found = metadata.snapshots.filter((s) => s.timestampMs <= at).pop();
    if (!found) {
      const first = metadata.snapshots[0];
      throw new StorageError(
        'ERR_SNAPSHOT_NOT_FOUND',
        `table "${metadata.name}" had no snapshot as of ${new Date(at).toISOString()}${first ? `; its first is from ${new Date(first.timestampMs).toISOString()}` : ''}`,
      );
    }
    return found;
  }
  return metadata.snapshots.find((s) => s.snapshotId === metadata.currentSnapshotId) ?? null;
}

export function schemaOf(metadata: TableMetadata, snapshot: Snapshot | null): { schema: Schema; entry: TableSchema } {
  const schemaId = snapshot?.schemaId ?? metadata.currentSchemaId;
  const entry = metadata.schemas.find((s) => s.schemaId === schemaId);
  if (!entry) throw new StorageError('ERR_CORRUPT_METADATA', `table "${metadata.name}" has no schema ${schemaId}`);
  return { schema: tableFromIPC(Buffer.from(entry.arrowSchema, 'base64')).schema, entry };
}

export async function readManifest(store: TableStore, snapshot: Snapshot): Promise<Manifest> {
  return readJson(store.objects, snapshot.manifest, manifestSchema);
}

/** Writes `table` as a new snapshot: stage the data files, then commit. */
export async function writeTable(store: TableStore, name: string, table: Table, options: WriteOptions = {}): Promise<CommitResult> {
  checkTableName(name);
  // The base is read before writing: a commit by anyone else in between is a conflict.
  const base = await store.catalog.head(name);
  const staged = await stageTable(store, name, table, options);
  return commitStaged(store, staged, { mode: options.mode ?? 'append', base });
}

/**
 * Writes `table` as Parquet data files under `tables/<name>/data/`, each under a fresh unique
 * name: no snapshot refers to them yet, so readers cannot see them. Returns what a commit needs.
 */
export async function stageTable(store: TableStore, name: string, table: Table, options: WriteOptions = {}): Promise<StagedWrite> {
  checkTableName(name);
  const rowGroupRows = options.rowGroupRows ?? DEFAULT_ROW_GROUP_ROWS;
  const maxRows = options.maxRowsPerFile ?? DEFAULT_MAX_ROWS_PER_FILE;
  const files: DataFileEntry[] = [];
  try {
    for (let start = 0; start < table.numRows; start += maxRows) {
      const part = table.slice(start, Math.min(table.numRows, start + maxRows));
      const bytes = await encodeParquet(part, rowGroupRows);
      const path = `${tablePrefix(name)}/data/${ulid()}.parquet`;
      await store.objects.put(path, bytes);
      files.push(dataFileEntry(path, bytes, table.schema));
    }
  } catch (error) {
    await discardStaged(store, { table: name, schema: table.schema, files });
    throw error;
  }
  return { table: name, schema: table.schema, files };
}

/** Removes staged data files that will never be committed. */
export async function discardStaged(store: TableStore, staged: StagedWrite): Promise<void> {
  await store.objects.delete(staged.files.map((f) => f.path));
}

/**
 * Commits staged data files as a new snapshot, on top of `base` (default: the head now). Throws
 * TableConflictError when another commit got there first; then the staged files are removed and
 * the table is unchanged.
 */
export async function commitStaged(
  store: TableStore,
  staged: StagedWrite,
  options: { mode: 'append' | 'replace'; base?: CatalogHead | null; now?: number },
): Promise<CommitResult> {
  const [result] = await commitStagedMany(store, [{ staged, mode: options.mode, ...(options.base !== undefined ? { base: options.base } : {}) }], options.now !== undefined ? { now: options.now } : {});
  return result!;
}

/** One table's part of {@link commitStagedMany}. */
export interface StagedCommit {
  staged: StagedWrite;
  mode: 'append' | 'replace';
  /** The table's head the write builds on. @default its head when the commit starts */
  base?: CatalogHead | null;
}

/**
 * Commits staged writes of several tables as one catalog commit on the store's branch: readers
 * see all of them or none. Throws TableConflictError when another commit changed one of these
 * tables first; then every staged file is removed and no table changed.
 */
export async function commitStagedMany(
  store: TableStore,
  writes: readonly StagedCommit[],
  options: {
    now?: number;
    message?: string;
    /** The cache key of the run step committing, kept in every snapshot written (Snapshot.cacheKey). */
    cacheKey?: string;
  } = {},
): Promise<CommitResult[]> {
  const names = writes.map((w) => w.staged.table);
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  if (twice) throw new StorageError('ERR_TABLE_CONFLICT', `one commit cannot write table "${twice}" twice: materialize it from one step`);
  const manifests: string[] = [];
  try {
    const changes: TableChange[] = [];
    const results: CommitResult[] = [];
    for (const write of writes) {
      const { staged, mode } = write;
      const base = write.base === undefined ? await store.catalog.head(staged.table) : write.base;
      const previous = base ? await readTableMetadata(store.objects, base.metadataKey) : null;
      const fields = staged.schema.fields.map((f) => ({ name: f.name, type: String(f.type), nullable: f.nullable }));
      const arrowSchema = () => Buffer.from(tableToIPC(new Table(staged.schema), 'stream')).toString('base64');
      const built = await buildSnapshot(store.objects, staged.table, previous, { fields, arrowSchema, files: staged.files, ...(options.cacheKey ? { cacheKey: options.cacheKey } : {}) }, mode, options.now ?? Date.now());
      manifests.push(built.manifestKey);
      changes.push({ table: staged.table, base, metadata: built.metadata });
      results.push({ table: staged.table, version: built.metadata.version, snapshotId: built.metadata.currentSnapshotId!, rows: staged.files.reduce((n, f) => n + f.recordCount, 0), files: staged.files.length });
    }
    await store.catalog.commit(changes, options.message ?? `write ${names.join(', ')}`);
    return results;
  } catch (error) {
    await store.objects.delete(manifests);
    for (const write of writes) await discardStaged(store, write.staged);
    throw error;
  }
}

/**
 * The metadata of `previous` plus one snapshot holding `files` (added to the current ones for an
 * append): writes the snapshot's manifest and returns the metadata, not yet committed.
 */
export async function buildSnapshot(
  objects: ObjectStore,
  name: string,
  previous: TableMetadata | null,
  add: { fields: TableSchema['fields']; arrowSchema: () => string; files: readonly DataFileEntry[]; cacheKey?: string },
  mode: 'append' | 'replace',
  now: number,
): Promise<{ metadata: TableMetadata; manifestKey: string }> {
  const previousSnapshot = previous ? resolveSnapshot(previous) : null;
  const { fields } = add;
  let schemas = previous?.schemas ?? [];
  let schemaId = schemas.find((s) => sameFields(s.fields, fields))?.schemaId;
  if (mode === 'append' && previous && previousSnapshot && schemaId !== previous.currentSchemaId) {
    const current = previous.schemas.find((s) => s.schemaId === previous.currentSchemaId)!;
    throw new StorageError(
      'ERR_TABLE_SCHEMA',
      `cannot append to table "${name}": its columns are ${describeFields(current.fields)}, the new rows have ${describeFields(fields)}. Use mode 'replace' to change the schema`,
    );
  }
  if (schemaId === undefined) {
    schemaId = schemas.length === 0 ? 0 : Math.max(...schemas.map((s) => s.schemaId)) + 1;
    schemas = [...schemas, { schemaId, fields, arrowSchema: add.arrowSchema() }];
  }
  const kept = mode === 'append' && previousSnapshot ? (await readJson(objects, previousSnapshot.manifest, manifestSchema)).dataFiles : [];
  const dataFiles = [...kept, ...add.files];
  const snapshotId = ulid();
  const manifestKey = `${tablePrefix(name)}/metadata/snap-${snapshotId}.manifest.json`;
  const manifest: Manifest = { formatVersion: 1, snapshotId, dataFiles };
  await objects.put(manifestKey, encodeJson(manifest));
  const snapshot: Snapshot = {
    snapshotId,
    parentSnapshotId: previousSnapshot?.snapshotId ?? null,
    sequenceNumber: (previous?.snapshots.at(-1)?.sequenceNumber ?? 0) + 1,
    // Snapshots stay in time order even when clocks of two writers disagree.
    timestampMs: Math.max(now, (previous?.snapshots.at(-1)?.timestampMs ?? 0) + 1),
    operation: mode === 'append' ? 'append' : 'overwrite',
    schemaId,
    manifest: manifestKey,
    summary: {
      addedFiles: add.files.length,
      addedRows: add.files.reduce((n, f) => n + f.recordCount, 0),
      totalFiles: dataFiles.length,
      totalRows: dataFiles.reduce((n, f) => n + f.recordCount, 0),
      totalBytes: dataFiles.reduce((n, f) => n + f.fileSizeInBytes, 0),
    },
    ...(add.cacheKey ? { cacheKey: add.cacheKey } : {}),
  };
  const metadata: TableMetadata = {
    formatVersion: 1,
    tableUuid: previous?.tableUuid ?? randomUUID(),
    name,
    location: tablePrefix(name),
    version: (previous?.version ?? 0) + 1,
    lastUpdatedMs: snapshot.timestampMs,
    schemas,
    currentSchemaId: schemaId,
    currentSnapshotId: snapshotId,
    snapshots: [...(previous?.snapshots ?? []), snapshot],
  };
  return { metadata, manifestKey };
}

/** A table metadata file, checked. */
export function readTableMetadata(objects: ObjectStore, key: string): Promise<TableMetadata> {
  return readJson(objects, key, tableMetadata);
}

/**
 * The commit that already made `staged` part of the table's current snapshot, or null. Data
 * file names are unique, so finding the first staged file there is proof.
 */
export async function findCommitted(store: TableStore, staged: StagedWrite): Promise<CommitResult | null> {
  const first = staged.files[0];
  const head = await store.catalog.head(staged.table);
  if (!first || !head) return null;
  const metadata = await readJson(store.objects, head.metadataKey, tableMetadata);
  const current = resolveSnapshot(metadata);
  if (!current || !(await readManifest(store, current)).dataFiles.some((f) => f.path === first.path)) return null;
  return { table: staged.table, version: head.version, snapshotId: current.snapshotId, rows: staged.files.reduce((n, f) => n + f.recordCount, 0), files: staged.files.length };
}

/** The table's current snapshot on the store's ref; null when there is no such table or it has no snapshot yet. */
export async function currentSnapshot(store: TableStore, name: string): Promise<Snapshot | null> {
  checkTableName(name);
  const head = await store.catalog.head(name);
  if (!head) return null;
  return resolveSnapshot(await readJson(store.objects, head.metadataKey, tableMetadata));
}

/** What `quiver table show` prints: schema, snapshots, row counts. */
export async function describeTable(store: TableStore, name: string) {
  const { metadata, head } = await loadTable(store, name);
  const current = resolveSnapshot(metadata);
  const { entry } = schemaOf(metadata, current);
  return {
    name,
    version: head.version,
    location: store.objects.describe(metadata.location),
    fields: entry.fields,
    currentSnapshotId: metadata.currentSnapshotId,
    rows: current?.summary.totalRows ?? 0,
    files: current?.summary.totalFiles ?? 0,
    bytes: current?.summary.totalBytes ?? 0,
    snapshots: metadata.snapshots,
  };
}

function dataFileEntry(path: string, bytes: Uint8Array, schema: Schema): DataFileEntry {
  const footer = parseFooter(bytes);
  const columnStats: DataFileEntry['columnStats'] = {};
  for (const field of schema.fields) {
    const kind = columnKind(field.type);
    // A nested column's chunks are its leaves: their statistics do not describe its rows.
    if (kind === 'other') continue;
    let merged: ColumnStats | null = null;
    for (const rg of footer.rowGroups) {
      const chunk = rg.columns.find((c) => c.column === field.name);
      if (!chunk) continue;
      const unit = footer.timestampUnits.get(field.name);
      const part: ColumnStats = {};
      const min = decodeStat(chunk.min, chunk, kind, field.type, unit);
      const max = decodeStat(chunk.max, chunk, kind, field.type, unit);
      if (min !== undefined) part.min = min;
      if (max !== undefined) part.max = max;
      if (chunk.nullCount !== null) part.nullCount = chunk.nullCount;
      merged = mergeStats(merged, part);
    }
    if (!merged) continue;
    columnStats[field.name] = {
      ...(merged.min !== undefined ? { min: statToJson(merged.min)! } : {}),
      ...(merged.max !== undefined ? { max: statToJson(merged.max)! } : {}),
      ...(merged.nullCount !== undefined ? { nullCount: merged.nullCount } : {}),
    };
  }
  return { path, fileSizeInBytes: bytes.length, recordCount: footer.numRows, rowGroups: footer.rowGroups.length, columnStats };
}

function sameFields(a: readonly { name: string; type: string; nullable: boolean }[], b: readonly { name: string; type: string; nullable: boolean }[]): boolean {
  return a.length === b.length && a.every((f, i) => f.name === b[i]!.name && f.type === b[i]!.type);
}

function describeFields(fields: readonly { name: string; type: string }[]): string {
  return fields.map((f) => `${f.name} ${f.type}`).join(', ');
}

const encodeJson = (value: unknown) => new TextEncoder().encode(JSON.stringify(value, null, 1));

async function readJson<T>(objects: ObjectStore, key: string, schema: { parse(v: unknown): T }): Promise<T> {
  const bytes = await objects.get(key);
  try {
    return schema.parse(JSON.parse(new TextDecoder().decode(bytes)));
  } catch (error) {
    throw new StorageError('ERR_CORRUPT_METADATA', `${objects.describe(key)} is not valid table metadata: ${(error as Error).message}`, { cause: error });
  }
}
