/**
 * The two table-store backends storage tests run against, with the services they need: a local
 * directory, and s3rver with a NATS KV catalog (for S3 servers without conditional writes).
 * Calling {@link storageBackends} at a test file's top level starts s3rver and a nats-server
 * before its tests and stops them, and removes every directory made, after.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before } from 'node:test';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { startNatsServer, startS3Server, type NatsServer, type S3Server } from '../infra/index.ts';
import { openTableStore, type OpenedTableStore } from '../storage/index.ts';

export interface Backend {
  name: string;
  open(): Promise<OpenedTableStore>;
}

export interface StorageServices {
  readonly backends: Backend[];
  readonly s3: S3Server;
  readonly nc: NatsConnection;
  /** Directories removed after the file's tests. */
  readonly dirs: string[];
  /** A bucket no store opened so far uses. */
  nextBucket(): string;
  /** Opens a store of `backend`, hands it to `fn`, and closes it. */
  withStore(backend: Backend, fn: (store: OpenedTableStore) => Promise<void>): Promise<void>;
}

/** `prefix` names temp directories and S3 buckets (`<prefix>0`…): one bucket per S3 store opened, up to `buckets`. */
export function storageBackends(prefix: string, buckets: number): StorageServices {
  let s3: S3Server | undefined;
  let nats: NatsServer | undefined;
  let nc: NatsConnection | undefined;
  let bucketCount = 0;
  const dirs: string[] = [];
  before(async () => {
    s3 = await startS3Server({ buckets: Array.from({ length: buckets }, (_, i) => `${prefix}${i}`) });
    const natsDir = mkdtempSync(join(tmpdir(), `quiver-${prefix}-nats-`));
    dirs.push(natsDir);
    nats = await startNatsServer({ dir: natsDir });
    nc = await connect({ servers: nats.url });
  });
  after(async () => {
    await nc?.close();
    await nats?.stop();
    await s3?.stop();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });
  const started = <T>(value: T | undefined, what: string): T => {
    if (value === undefined) throw new Error(`${what} is not started yet: use it inside a test`);
    return value;
  };
  const services: StorageServices = {
    backends: [
      {
        name: 'local directory',
        open: () => {
          const root = mkdtempSync(join(tmpdir(), `quiver-${prefix}-`));
          dirs.push(root);
          return openTableStore({ kind: 'local', root });
        },
      },
      {
        name: 'S3 (s3rver) with a NATS KV catalog',
        // A bucket per store: tests do not see each other's tables.
        open: () => {
          return openTableStore({ kind: 's3', s3: { bucket: services.nextBucket(), endpoint: services.s3.endpoint, credentials: services.s3.credentials, forcePathStyle: true }, nc: services.nc });
        },
      },
    ],
    get s3() {
      return started(s3, 's3rver');
    },
    get nc() {
      return started(nc, 'the NATS connection');
    },
    dirs,
    nextBucket: () => {
      if (bucketCount >= buckets) throw new Error(`only ${buckets} S3 buckets were made for these tests: raise the count given to storageBackends`);
      return `${prefix}${bucketCount++}`;
    },
    withStore: async (backend, fn) => {
      const store = await backend.open();
      try {
        await fn(store);
      } finally {
        await store.close();
      }
    },
  };
  return services;
}
