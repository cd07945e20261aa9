import { join } from 'node:path';
import { Kvm } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { quiverHome } from '../schemas/index.ts';
import { BranchCatalog, Versions } from './branches.ts';
import { NatsKvCatalog, ObjectStoreCatalog, type TableHeads } from './catalog.ts';
import { StorageError } from './errors.ts';
import { LocalObjectStore } from './object-store.ts';
import { ulid } from 'ulid';
import { KvRefs, ObjectStoreRefs, type RefStore } from './refs.ts';
import type { S3ObjectStore, S3StoreOptions } from './s3-store.ts';
import type { TableStore } from './tables.ts';

/** The NATS KV bucket holding branch and tag pointers (and pre-branch table pointers) when the S3 server has no conditional writes. */
export const TABLES_BUCKET = 'quiver-tables';

export type StorageConfig =
  | { kind: 'local'; root: string }
  | {
      kind: 's3';
      s3: S3StoreOptions;
      /** Commits go through this NATS (KV bucket quiver-tables) unless `s3.conditionalWrites`. */
      nc?: NatsConnection;
    };

export interface OpenedTableStore extends TableStore {
  close(): Promise<void>;
}

/** Opens the objects and the catalog a configuration names. */
export async function openTableStore(config: StorageConfig): Promise<OpenedTableStore> {
  if (config.kind === 'local') {
    const objects = new LocalObjectStore(config.root);
    return { objects, catalog: new BranchCatalog(new Versions(objects, new ObjectStoreRefs(objects), new ObjectStoreCatalog(objects))), close: async () => {} };
  }
  // Loaded on first use: the AWS SDK takes ~150 ms to import, and most commands never need it.
  const { S3ObjectStore } = await import('./s3-store.ts');
  const objects = new S3ObjectStore(config.s3);
  if (config.s3.conditionalWrites) {
    await checkConditionalWrites(objects);
    return { objects, catalog: new BranchCatalog(new Versions(objects, new ObjectStoreRefs(objects), new ObjectStoreCatalog(objects))), close: () => objects.close() };
  }
  if (!config.nc) {
    await objects.close();
    throw new StorageError(
      'ERR_STORAGE_CONFIG',
      `committing to ${objects.id} needs either a server that honours conditional PUTs (set QUIVER_S3_CONDITIONAL_WRITES=1) or a NATS for the table catalog (set QUIVER_NATS_URL)`,
    );
  }
  const kv = await new Kvm(config.nc).create(TABLES_BUCKET, { history: 10 });
  return { objects, catalog: new BranchCatalog(new Versions(objects, new KvRefs(objects.id, kv), new NatsKvCatalog(objects, kv))), close: () => objects.close() };
}

/**
 * Opens the objects a configuration names, with the branch pointers and the pre-branch table
 * heads kept elsewhere: a step process, which never reaches NATS, asks its executor for those
 * (executor/system-steps.ts) and reads and writes every object itself.
 */
export async function openTableStoreWithRefs(config: StorageConfig, refs: RefStore, legacy: TableHeads | null): Promise<OpenedTableStore> {
  if (config.kind === 'local') {
    const objects = new LocalObjectStore(config.root);
    return { objects, catalog: new BranchCatalog(new Versions(objects, refs, legacy)), close: async () => {} };
  }
  const { S3ObjectStore } = await import('./s3-store.ts');
  const objects = new S3ObjectStore(config.s3);
  return { objects, catalog: new BranchCatalog(new Versions(objects, refs, legacy)), close: () => objects.close() };
}

/**
 * Proves the server honours `If-None-Match: *` before trusting commits to it: a second
 * conditional PUT of one key must fail. A server that ignores the header would let two writers
 * both commit the same version; refusing to start is the only safe answer.
 */
async function checkConditionalWrites(objects: S3ObjectStore): Promise<void> {
  const probe = `.quiver-probe/${ulid()}`;
  const bytes = new TextEncoder().encode('probe');
  try {
    const first = await objects.putIfAbsent!(probe, bytes);
    const second = await objects.putIfAbsent!(probe, bytes);
    if (!first || second) {
      throw new StorageError(
        'ERR_STORAGE_CONFIG',
        `${objects.id} ignores If-None-Match on PUT, so QUIVER_S3_CONDITIONAL_WRITES=1 would let two writers both commit: unset it, and commits go through the NATS catalog`,
      );
    }
  } catch (error) {
    await objects.close();
    throw error;
  } finally {
    await objects.delete([probe]).catch(() => {});
  }
}

/**
 * The configuration from the environment:
 * - `QUIVER_STORAGE`: `s3://bucket[/prefix]`, or a directory. @default <QUIVER_HOME>/storage
 * - `QUIVER_S3_ENDPOINT`, `QUIVER_S3_REGION` (else AWS_REGION, else us-east-1),
 *   `QUIVER_S3_FORCE_PATH_STYLE` (1/0; default 1 with an endpoint), `QUIVER_S3_CONDITIONAL_WRITES` (1/0)
 * - credentials: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (or any source the AWS SDK reads)
 */
export function storageConfigFromEnv(env: NodeJS.ProcessEnv = process.env, nc?: NatsConnection): StorageConfig {
  const where = env.QUIVER_STORAGE?.trim() || join(quiverHome(), 'storage');
  const s3 = /^s3:\/\/([^/]+)\/?(.*)$/.exec(where);
  if (!s3) return { kind: 'local', root: where.replace(/^file:\/\//, '') };
  const flag = (value: string | undefined) => (value === undefined || value === '' ? undefined : !['0', 'false', 'no'].includes(value.toLowerCase()));
  const forcePathStyle = flag(env.QUIVER_S3_FORCE_PATH_STYLE);
  return {
    kind: 's3',
    s3: {
      bucket: s3[1]!,
      prefix: s3[2] ?? '',
      ...(env.QUIVER_S3_ENDPOINT ? { endpoint: env.QUIVER_S3_ENDPOINT } : {}),
      region: env.QUIVER_S3_REGION || env.AWS_REGION || 'us-east-1',
      ...(forcePathStyle !== undefined ? { forcePathStyle } : {}),
      conditionalWrites: flag(env.QUIVER_S3_CONDITIONAL_WRITES) ?? false,
    },
    ...(nc ? { nc } : {}),
  };
}

export function tableStoreFromEnv(options: { env?: NodeJS.ProcessEnv; nc?: NatsConnection } = {}): Promise<OpenedTableStore> {
  return openTableStore(storageConfigFromEnv(options.env, options.nc));
}
