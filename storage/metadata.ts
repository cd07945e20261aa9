/**
 * Table metadata, shaped after Apache Iceberg's so a later move to its format is a translation:
 * an immutable metadata file per commit (`metadata/v<N>.json`: schemas, snapshots, the current
 * snapshot), and per snapshot a manifest listing its live data files with per-column statistics
 * (Iceberg's lower/upper bounds, null and value counts, record count, file size). Differences,
 * kept small on purpose: JSON instead of Avro manifests, one manifest per snapshot instead of a
 * manifest list, ULID snapshot ids instead of random longs.
 */
import { z } from 'zod';

const statValue = z.union([z.string(), z.number(), z.boolean()]);

export const columnStatsJson = z.object({
  min: statValue.optional(),
  max: statValue.optional(),
  nullCount: z.number().int().nonnegative().optional(),
});

export const dataFileEntry = z.object({
  /** Object key of the Parquet file, relative to the store root. */
  path: z.string().min(1),
  fileSizeInBytes: z.number().int().nonnegative(),
  recordCount: z.number().int().nonnegative(),
  rowGroups: z.number().int().nonnegative(),
  /** Per column: min, max and null count over the whole file (Iceberg's lower/upper bounds). */
  columnStats: z.record(z.string(), columnStatsJson),
});
export type DataFileEntry = z.infer<typeof dataFileEntry>;

export const manifest = z.object({
  formatVersion: z.literal(1),
  snapshotId: z.string(),
  dataFiles: z.array(dataFileEntry),
});
export type Manifest = z.infer<typeof manifest>;

export const fieldSummary = z.object({ name: z.string(), type: z.string(), nullable: z.boolean() });

export const tableSchema = z.object({
  schemaId: z.number().int().nonnegative(),
  fields: z.array(fieldSummary),
  /** The Arrow schema as a schema-only IPC stream, base64: exact types (dictionaries, units). */
  arrowSchema: z.string(),
});
export type TableSchema = z.infer<typeof tableSchema>;

export const snapshot = z.object({
  snapshotId: z.string(),
  parentSnapshotId: z.string().nullable(),
  sequenceNumber: z.number().int().positive(),
  timestampMs: z.number().int().nonnegative(),
  operation: z.enum(['append', 'overwrite']),
  schemaId: z.number().int().nonnegative(),
  /** Object key of this snapshot's manifest. */
  manifest: z.string(),
  summary: z.object({
    addedFiles: z.number().int().nonnegative(),
    addedRows: z.number().int().nonnegative(),
    totalFiles: z.number().int().nonnegative(),
    totalRows: z.number().int().nonnegative(),
    totalBytes: z.number().int().nonnegative(),
  }),
  /**
   * The cache key of the run's commit step that wrote this snapshot (orchestrator
   * `cacheKeyOf`): a later run whose commit has the same key would write the same rows, so it
   * leaves the table as it is.
   */
  cacheKey: z.string().regex(/^[0-9a-f]{64}$/).optional(),
});
export type Snapshot = z.infer<typeof snapshot>;

export const tableMetadata = z.object({
  formatVersion: z.literal(1),
  tableUuid: z.string(),
  name: z.string(),
  /** Key prefix of the table: `tables/<name>`. */
  location: z.string(),
  /** This file's version: 1 for the table's creation, +1 per commit. */
  version: z.number().int().positive(),
  lastUpdatedMs: z.number().int().nonnegative(),
  schemas: z.array(tableSchema).min(1),
  currentSchemaId: z.number().int().nonnegative(),
  currentSnapshotId: z.string().nullable(),
  /** Oldest first. Every snapshot stays readable (time travel); nothing expires them yet. */
  snapshots: z.array(snapshot),
});
export type TableMetadata = z.infer<typeof tableMetadata>;

/** A table as one catalog commit holds it: which metadata file, and a summary for diffs. */
export const catalogTableEntry = z.object({
  /** Object key of the table's metadata file (immutable, unique name). */
  metadataKey: z.string().min(1),
  version: z.number().int().positive(),
  /** The table's current snapshot in that metadata: what a merge compares. */
  snapshotId: z.string().nullable(),
  rows: z.number().int().nonnegative(),
});
export type CatalogTableEntry = z.infer<typeof catalogTableEntry>;

/**
 * An immutable catalog commit (Nessie-like): the state of every table at once. Stored
 * content-addressed under `catalog/commits/<sha256>.json`; a branch head points at one.
 */
export const catalogCommit = z.object({
  formatVersion: z.literal(1),
  /** Empty for the first commit, two for a merge (target first). */
  parents: z.array(z.string()),
  /** 1 + the largest parent generation: bounds ancestor searches. */
  generation: z.number().int().positive(),
  timestampMs: z.number().int().nonnegative(),
  message: z.string(),
  tables: z.record(z.string(), catalogTableEntry),
});
export type CatalogCommit = z.infer<typeof catalogCommit>;

/** The value behind a branch or tag pointer; `commit: null` records a deletion. */
export const refPointer = z.object({ commit: z.string().nullable() });
