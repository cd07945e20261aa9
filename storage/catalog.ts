/**
 * The catalog interface tables use ({@link Catalog}, implemented with branches in branches.ts),
 * and the per-table catalog of Quiver before branches, now only read: stores created before
 * branches keep their tables there, and the branch catalog reads them as the starting state of
 * `main` until its first commit. Its two layouts:
 *
 * - {@link ObjectStoreCatalog}: version N of a table's metadata is `tables/<t>/metadata/v<N>.json`
 *   (written with an atomic create-if-absent); the newest is the highest N listed.
 * - {@link NatsKvCatalog}: the pointer `{ version, metadataKey }` is the NATS KV entry
 *   `<store hash>.<table>` (for S3 servers without conditional PUTs).
 *
 * Branch pointers (refs.ts) use the same two primitives for every commit now.
 */
import { createHash } from 'node:crypto';
import type { KV } from '@nats-io/kv';
import { StorageError } from './errors.ts';
import type { Versions } from './branches.ts';
import type { TableMetadata } from './metadata.ts';
import type { ObjectStore } from './object-store.ts';

/** What a catalog knows of a table: its current metadata version and file. */
export interface CatalogHead {
  version: number;
  metadataKey: string;
}

/** The pre-branch per-table catalog; only read now, to migrate its tables onto `main`. */
export interface TableHeads {
  /** The table's current metadata, or null when the table does not exist. */
  head(table: string): Promise<CatalogHead | null>;
  /** Names of the tables that exist, sorted. */
  list(): Promise<string[]>;
}

export const tablePrefix = (table: string) => `tables/${table}`;
const metadataPrefix = (table: string) => `${tablePrefix(table)}/metadata/`;
const VERSION_FILE = /^v(\d+)\.json$/;

export class ObjectStoreCatalog implements TableHeads {
  constructor(private readonly store: ObjectStore) {
    if (!store.putIfAbsent) {
      throw new StorageError(
        'ERR_STORAGE_CONFIG',
        `${store.id} cannot create objects atomically (no conditional PUT): use a NATS KV catalog, or enable conditional writes if the server honours If-None-Match`,
      );
    }
  }

  async head(table: string): Promise<CatalogHead | null> {
    let best: CatalogHead | null = null;
    for (const key of await this.store.list(metadataPrefix(table))) {
      const m = VERSION_FILE.exec(key.slice(metadataPrefix(table).length));
      if (m && (!best || Number(m[1]) > best.version)) best = { version: Number(m[1]), metadataKey: key };
    }
    return best;
  }

  async list(): Promise<string[]> {
    const names = new Set<string>();
    for (const key of await this.store.list('tables/')) {
      const m = /^tables\/([^/]+)\/metadata\/v\d+\.json$/.exec(key);
      if (m) names.add(m[1]!);
    }
    return [...names].sort();
  }
}

export class NatsKvCatalog implements TableHeads {
  /** One bucket serves many stores: keys are `<hash of the store id>.<table>`. */
  private readonly prefix: string;

  constructor(
    private readonly store: ObjectStore,
    private readonly kv: KV,
  ) {
    this.prefix = `${createHash('sha256').update(store.id).digest('hex').slice(0, 16)}.`;
  }

  async head(table: string): Promise<CatalogHead | null> {
    const entry = await this.kv.get(this.prefix + table);
    if (!entry || entry.operation !== 'PUT' || entry.length === 0) return null;
    const pointer = entry.json<{ version: number; metadataKey: string }>();
    return { version: pointer.version, metadataKey: pointer.metadataKey };
  }

  async list(): Promise<string[]> {
    const names: string[] = [];
    // The same bucket holds branch pointers (`<prefix>.refs.…`): a table key has one token more.
    for await (const key of await this.kv.keys(`${this.prefix}*`)) names.push(key.slice(this.prefix.length));
    return names.sort();
  }
}

/** A table's new metadata, committed on top of `base` (null: the table is new). */
export interface TableChange {
  table: string;
  base: CatalogHead | null;
  metadata: TableMetadata;
}

/**
 * The catalog as tables see it: the tables of one ref (a branch, a tag or a catalog commit).
 * `commit` changes several tables of a branch in one atomic catalog commit.
 */
export interface Catalog {
  /** The branch, tag or commit id this view reads (and, for a branch, writes). */
  readonly ref: string;
  /** The table's current metadata on this ref, or null when the table does not exist there. */
  head(table: string): Promise<CatalogHead | null>;
  /**
   * Writes each table's metadata file and moves the branch to one new catalog commit holding
   * all of them, only if every table is still at its `base`. Throws {@link TableConflictError}
   * otherwise; then nothing was committed. Changes to other tables in between are kept (retried).
   */
  commit(changes: readonly TableChange[], message?: string): Promise<CatalogHead[]>;
  /** Names of the tables on this ref, sorted. */
  list(): Promise<string[]>;
  /** The same catalog at another ref. */
  at(ref: string): Catalog;
  /** Branches, tags and merges of the whole store. */
  readonly versions: Versions;
}
