/** Every storage failure carries a stable `code`; callers branch on it, people read the message. */
export class StorageError extends Error {
  override readonly name: string = 'StorageError';
  constructor(
    readonly code:
      | 'ERR_STORAGE_CONFIG'
      | 'ERR_OBJECT_NOT_FOUND'
      | 'ERR_OBJECT_STORE'
      | 'ERR_TABLE_NOT_FOUND'
      | 'ERR_TABLE_CONFLICT'
      | 'ERR_TABLE_BAD_NAME'
      | 'ERR_TABLE_SCHEMA'
      | 'ERR_SNAPSHOT_NOT_FOUND'
      | 'ERR_CORRUPT_DATA_FILE'
      | 'ERR_CORRUPT_METADATA'
      | 'ERR_FILTER_SYNTAX'
      | 'ERR_FILTER_TYPE'
      | 'ERR_UNKNOWN_COLUMN'
      | 'ERR_REF_NOT_FOUND'
      | 'ERR_REF_EXISTS'
      | 'ERR_REF_BAD_NAME'
      | 'ERR_REF_CONFLICT'
      | 'ERR_MERGE_CONFLICT',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A table that does not exist; the message lists those that do. */
export class TableNotFoundError extends StorageError {
  override readonly name = 'TableNotFoundError';
  constructor(
    readonly table: string,
    readonly existing: readonly string[],
  ) {
    super('ERR_TABLE_NOT_FOUND', `table "${table}" does not exist; ${existing.length ? `the tables are: ${existing.join(', ')}` : `there are no tables yet (create one with \`quiver table import FILE --name ${table}\`)`}`);
  }
}

/** Another writer committed a snapshot of the table first: nothing of this write was committed. */
export class TableConflictError extends StorageError {
  override readonly name = 'TableConflictError';
  constructor(
    readonly table: string,
    readonly baseVersion: number,
  ) {
    super(
      'ERR_TABLE_CONFLICT',
      `table "${table}" changed while writing: another writer committed version ${baseVersion + 1} first. Nothing of this write was committed; read the table again and retry`,
    );
  }
}

/** A data file that is not readable Parquet (truncated, overwritten, not Parquet at all). */
export class CorruptDataFileError extends StorageError {
  override readonly name = 'CorruptDataFileError';
  constructor(
    readonly file: string,
    reason: string,
    options?: { cause?: unknown },
  ) {
    super('ERR_CORRUPT_DATA_FILE', `data file ${file} is not valid Parquet: ${reason}`, options);
  }
}

/** A filter that does not parse; `position` is the 0-based offset in the filter text. */
export class FilterSyntaxError extends StorageError {
  override readonly name = 'FilterSyntaxError';
  constructor(
    readonly filter: string,
    readonly position: number,
    readonly expected: string,
    found: string,
  ) {
    super('ERR_FILTER_SYNTAX', `filter ${JSON.stringify(filter)}: expected ${expected} at position ${position}, found ${found}\n  ${filter}\n  ${' '.repeat(position)}^`);
  }
}

/** A column name the table does not have; the message lists those it has. */
export class UnknownColumnError extends StorageError {
  override readonly name = 'UnknownColumnError';
  constructor(
    readonly table: string,
    readonly columns: readonly string[],
    readonly available: readonly string[],
    where: string,
  ) {
    super('ERR_UNKNOWN_COLUMN', `${where} names column(s) ${columns.map((c) => `"${c}"`).join(', ')} that table "${table}" does not have; its columns are: ${available.join(', ')}`);
  }
}

/** A branch, tag or catalog commit that does not exist; the message lists the refs that do. */
export class RefNotFoundError extends StorageError {
  override readonly name = 'RefNotFoundError';
  constructor(
    readonly ref: string,
    readonly existing: readonly string[],
  ) {
    super('ERR_REF_NOT_FOUND', `no branch, tag or catalog commit "${ref}"; ${existing.length ? `the refs are: ${existing.join(', ')}` : 'there are no refs yet'} (create a branch with \`quiver branch create NAME\`)`);
  }
}

/**
 * Two branches changed the same table since they diverged, other than both only appending:
 * the merge committed nothing and the target branch is unchanged.
 */
export class MergeConflictError extends StorageError {
  override readonly name = 'MergeConflictError';
  constructor(
    readonly source: string,
    readonly target: string,
    readonly tables: readonly string[],
  ) {
    super(
      'ERR_MERGE_CONFLICT',
      `cannot merge ${source} into ${target}: both changed table(s) ${tables.join(', ')} since they diverged (not both appends only). ${target} is unchanged; ` +
        `merge by hand (e.g. rewrite the table on ${source} from ${target}'s rows) or drop one side's change`,
    );
  }
}
