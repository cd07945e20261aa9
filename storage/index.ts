/**
 * Quiver storage: tables as Parquet data files in an object store (a local directory or any
 * S3-compatible server) with Iceberg-shaped snapshot metadata, scans with column and filter
 * pushdown, and a per-host columnar cache. The only module other folders import. See README.md.
 */
export { LocalObjectStore, type ByteRange, type ObjectStore } from './object-store.ts';
export type { S3ObjectStore, S3StoreOptions } from './s3-store.ts';
export { NatsKvCatalog, ObjectStoreCatalog, type Catalog, type CatalogHead, type TableChange, type TableHeads } from './catalog.ts';
export { BranchCatalog, MAIN_BRANCH, Versions, type MergeResult, type RefInfo, type TableDiff } from './branches.ts';
export { checkRefName, KvRefs, ObjectStoreRefs, REF_NAME_PATTERN, type RefHead, type RefKind, type RefStore } from './refs.ts';
export { DEFAULT_EXPIRE_MS, expireSnapshots, vacuumTable, type ExpireOptions, type ExpireResult, type VacuumOptions } from './retention.ts';
export {
  atRef,
  checkTableName,
  commitStaged,
  commitStagedMany,
  currentSnapshot,
  describeTable,
  discardStaged,
  findCommitted,
  listTables,
  loadTable,
  resolveSnapshot,
  stageTable,
  writeTable,
  type CommitResult,
  type SnapshotSelector,
  type StagedCommit,
  type StagedWrite,
  type TableStore,
  type WriteOptions,
} from './tables.ts';
export { executeScan, prepareScan, scanTable, type PreparedScan, type ScanOptions, type ScanResult, type ScanStats } from './scan.ts';
export { ColumnCache, hostCache, type ColumnCacheOptions } from './cache.ts';
export { parseFilter, validateFilter, type Filter } from './filter.ts';
export { readCsv } from './csv.ts';
export { dataFileLayout, decodeParquet, encodeParquet, DEFAULT_ROW_GROUP_ROWS } from './parquet.ts';
export type { ParquetFooter } from './parquet-footer.ts';
export { openTableStore, openTableStoreWithRefs, storageConfigFromEnv, tableStoreFromEnv, TABLES_BUCKET, type OpenedTableStore, type StorageConfig } from './config.ts';
export type { DataFileEntry, Manifest, Snapshot, TableMetadata } from './metadata.ts';
export { CorruptDataFileError, FilterSyntaxError, MergeConflictError, RefNotFoundError, StorageError, TableConflictError, TableNotFoundError, UnknownColumnError } from './errors.ts';
