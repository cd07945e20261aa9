/**
 * The catalog decides which metadata file is a table's current one: the commit point. Two
 * implementations, one primitive each:
 *
 * - {@link ObjectStoreCatalog}: the metadata file of version N is `tables/<t>/metadata/v<N>.json`,
 *   written with an atomic create-if-absent. Of two writers that both read version N, exactly one
 *   creates v<N+1>; the other finds it exists and gets a TableConflictError. The newest version
 *   is the highest N listed. Used for the local directory (link(2) fails with EEXIST) and for S3
 *   servers that honour `If-None-Match: *` on PUT.
 * - {@link NatsKvCatalog}: for S3 servers that ignore conditional PUTs (s3rver, older MinIO) the
 *   pointer lives in a NATS KV bucket and moves by compare-and-swap on the entry's revision
 *   (create for version 1, update at the revision read for later ones). The metadata file is
 *   written first under a unique name, so a losing writer leaves at most an unreferenced file.
 */
import { createHash } from 'node:crypto';
import type { KV } from '@nats-io/kv';
import { ulid } from 'ulid';
import { StorageError, TableConflictError } from './errors.ts';
import type { ObjectStore } from './object-store.ts';

/** What a catalog knows of a table: its current metadata version and file. */
export interface CatalogHead {
  version: number;
  metadataKey: string;
  /** Catalog-specific proof of what was read (a KV revision), handed back on commit. */
  revision?: number;
}

export interface Catalog {
  /** The table's current metadata, or null when the table does not exist. */
  head(table: string): Promise<CatalogHead | null>;
  /**
   * Makes `metadata` version `(base?.version ?? 0) + 1` of the table, only if `base` is still the
   * current head. Throws {@link TableConflictError} otherwise; then nothing was committed.
   */
  commit(table: string, base: CatalogHead | null, metadata: Uint8Array): Promise<CatalogHead>;
  /** Names of the tables that exist, sorted. */
  list(): Promise<string[]>;
}

export const tablePrefix = (table: string) => `tables/${table}`;
const metadataPrefix = (table: string) => `${tablePrefix(table)}/metadata/`;
const VERSION_FILE = /^v(\d+)\.json$/;

export class ObjectStoreCatalog implements Catalog {
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

  async commit(table: string, base: CatalogHead | null, metadata: Uint8Array): Promise<CatalogHead> {
    const version = (base?.version ?? 0) + 1;
    const metadataKey = `${metadataPrefix(table)}v${version}.json`;
    if (!(await this.store.putIfAbsent!(metadataKey, metadata))) throw new TableConflictError(table, version - 1);
    return { version, metadataKey };
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

export class NatsKvCatalog implements Catalog {
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
    return { version: pointer.version, metadataKey: pointer.metadataKey, revision: entry.revision };
  }

  async commit(table: string, base: CatalogHead | null, metadata: Uint8Array): Promise<CatalogHead> {
    const version = (base?.version ?? 0) + 1;
    const metadataKey = `${metadataPrefix(table)}v${version}-${ulid()}.json`;
    await this.store.put(metadataKey, metadata);
    const pointer = JSON.stringify({ version, metadataKey });
    try {
      const key = this.prefix + table;
      const revision = base ? await this.kv.update(key, pointer, base.revision!) : await this.kv.create(key, pointer);
      return { version, metadataKey, revision };
    } catch (error) {
      await this.store.delete([metadataKey]);
      // Only "someone else moved the pointer" is a conflict; anything else is trouble to report.
      const now = await this.head(table);
      if ((now?.revision ?? 0) !== (base?.revision ?? 0)) throw new TableConflictError(table, version - 1);
      throw new StorageError('ERR_OBJECT_STORE', `could not commit version ${version} of table "${table}" to the NATS KV catalog: ${(error as Error).message}`, { cause: error });
    }
  }

  async list(): Promise<string[]> {
    const names: string[] = [];
    for await (const key of await this.kv.keys(`${this.prefix}>`)) names.push(key.slice(this.prefix.length));
    return names.sort();
  }
}
