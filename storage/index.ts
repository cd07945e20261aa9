/**
 * Quiver storage: tables as Parquet data files in an object store (a local directory or any
 * S3-compatible server) with Iceberg-shaped snapshot metadata, scans with column and filter
 * pushdown, and a per-host columnar cache. The only module other folders import. See README.md.
 */
export { LocalObjectStore, type ByteRange, type ObjectStore } from './object-store.ts';
export type { S3ObjectStore, S3StoreOptions } from './s3-store.ts';
export { NatsKvCatalog, ObjectStoreCatalog, type Catalog, type CatalogHead } from './catalog.ts';
export {
  checkTableName,
  commitStaged,
  describeTable,
  discardStaged,
  findCommitted,
  listTables,
  loadTable,
  resolveSnapshot,
  stageTable,
  vacuumTable,
  writeTable,
  type CommitResult,
  type SnapshotSelector,
  type StagedWrite,
  type TableStore,
  type VacuumOptions,
  type WriteOptions,
} from './tables.ts';
export { executeScan, prepareScan, scanTable, type PreparedScan, type ScanOptions, type ScanResult, type ScanStats } from './scan.ts';
export { ColumnCache, hostCache, type ColumnCacheOptions } from './cache.ts';
export { parseFilter, validateFilter, type Filter } from './filter.ts';
export { readCsv } from './csv.ts';
export { dataFileLayout, decodeParquet, encodeParquet, DEFAULT_ROW_GROUP_ROWS } from './parquet.ts';
export type { ParquetFooter } from './parquet-footer.ts';
export { openTableStore, storageConfigFromEnv, tableStoreFromEnv, TABLES_BUCKET, type OpenedTableStore, type StorageConfig } from './config.ts';
export type { DataFileEntry, Manifest, Snapshot, TableMetadata } from './metadata.ts';
export { CorruptDataFileError, FilterSyntaxError, StorageError, TableConflictError, TableNotFoundError, UnknownColumnError } from './errors.ts';
