import {
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
} from '@aws-sdk/client-s3';
import { StorageError } from './errors.ts';
import { objectNotFound, type ByteRange, type ObjectStore } from './object-store.ts';

/** Options of {@link S3ObjectStore}: any S3-compatible server. */
export interface S3StoreOptions {
  bucket: string;
  /** Keys go under this prefix (no leading or trailing slash). @default '' */
  prefix?: string;
  /** e.g. http://127.0.0.1:9000 for MinIO or s3rver; unset for AWS. */
  endpoint?: string;
  /** @default 'us-east-1' */
  region?: string;
  /** @default the AWS SDK's default chain (AWS_ACCESS_KEY_ID, profiles, ...) */
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Path-style addressing (`endpoint/bucket/key`), which most self-hosted servers need. @default true when an endpoint is set */
  forcePathStyle?: boolean;
  /**
   * The server honours `If-None-Match: *` on PUT (AWS S3 since 2024, MinIO, R2): then commits need
   * no other catalog. Servers that ignore the header (s3rver) would let two writers both "win", so
   * this is opt-in. @default false
   */
  conditionalWrites?: boolean;
}

/** Objects in an S3 bucket through @aws-sdk/client-s3; ranged reads are ranged GETs. */
export class S3ObjectStore implements ObjectStore {
  readonly id: string;
  readonly client: S3Client;
  readonly putIfAbsent?: (key: string, bytes: Uint8Array) => Promise<boolean>;
  private readonly prefix: string;

  constructor(private readonly options: S3StoreOptions) {
    if (!options.bucket) throw new StorageError('ERR_STORAGE_CONFIG', 'the S3 store needs a bucket');
    this.prefix = (options.prefix ?? '').replace(/^\/+|\/+$/g, '');
    // The endpoint is part of the identity: two servers may both have a bucket "quiver", and
    // cache entries and catalog keys of one must never serve the other.
    this.id = `s3://${options.bucket}${this.prefix ? `/${this.prefix}` : ''}${options.endpoint ? ` at ${options.endpoint}` : ''}`;
    this.client = new S3Client({
      region: options.region ?? 'us-east-1',
      ...(options.endpoint ? { endpoint: options.endpoint } : {}),
      ...(options.credentials ? { credentials: options.credentials } : {}),
      forcePathStyle: options.forcePathStyle ?? Boolean(options.endpoint),
    });
    if (options.conditionalWrites) this.putIfAbsent = (key, bytes) => this.conditionalPut(key, bytes);
  }

  describe(key: string): string {
    return `s3://${this.options.bucket}/${this.key(key)}${this.options.endpoint ? ` (at ${this.options.endpoint})` : ''}`;
  }

  private key(key: string): string {
    return this.prefix ? `${this.prefix}/${key}` : key;
  }

  async get(key: string, range?: ByteRange): Promise<Uint8Array> {
    if (range && range.end <= range.start) return new Uint8Array(0);
    try {
      const out = await this.client.send(
        new GetObjectCommand({
          Bucket: this.options.bucket,
          Key: this.key(key),
          ...(range ? { Range: `bytes=${range.start}-${range.end - 1}` } : {}),
        }),
      );
      return await out.Body!.transformToByteArray();
    } catch (error) {
      if (isNotFound(error)) throw objectNotFound(this, key, error);
      // Past the end: a short (empty) read, as from a file, so callers can say "truncated".
      if ((error as S3ServiceException).$metadata?.httpStatusCode === 416) return new Uint8Array(0);
      throw this.wrap('get', key, error);
    }
  }

  async size(key: string): Promise<number | null> {
    try {
      const out = await this.client.send(new HeadObjectCommand({ Bucket: this.options.bucket, Key: this.key(key) }));
      return out.ContentLength ?? 0;
    } catch (error) {
      if (isNotFound(error)) return null;
      throw this.wrap('head', key, error);
    }
  }

  async put(key: string, bytes: Uint8Array): Promise<void> {
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.options.bucket, Key: this.key(key), Body: bytes }));
    } catch (error) {
      throw this.wrap('put', key, error);
    }
  }

  private async conditionalPut(key: string, bytes: Uint8Array): Promise<boolean> {
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.options.bucket, Key: this.key(key), Body: bytes, IfNoneMatch: '*' }));
      return true;
    } catch (error) {
      const status = (error as S3ServiceException).$metadata?.httpStatusCode;
      // 412: the key exists; 409: a concurrent conditional write to it is in flight.
      if (status === 412 || status === 409) return false;
      throw this.wrap('put', key, error);
    }
  }

  async list(prefix: string): Promise<string[]> {
    const keys: string[] = [];
    let token: string | undefined;
    try {
      do {
        const out = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.options.bucket, Prefix: this.key(prefix), ...(token ? { ContinuationToken: token } : {}) }),
        );
        for (const o of out.Contents ?? []) if (o.Key) keys.push(this.prefix ? o.Key.slice(this.prefix.length + 1) : o.Key);
        token = out.IsTruncated ? out.NextContinuationToken : undefined;
      } while (token);
    } catch (error) {
      throw this.wrap('list', prefix, error);
    }
    return keys.sort();
  }

  async delete(keys: readonly string[]): Promise<void> {
    try {
      await Promise.all(keys.map((k) => this.client.send(new DeleteObjectCommand({ Bucket: this.options.bucket, Key: this.key(k) }))));
    } catch (error) {
      throw this.wrap('delete', keys.join(', '), error);
    }
  }

  async close(): Promise<void> {
    this.client.destroy();
  }

  private wrap(what: string, key: string, error: unknown): StorageError {
    return new StorageError('ERR_OBJECT_STORE', `S3 ${what} of ${this.describe(key)} failed: ${(error as Error).message || (error as Error).name}`, { cause: error });
  }
}

function isNotFound(error: unknown): boolean {
  const e = error as S3ServiceException;
  return e?.name === 'NoSuchKey' || e?.name === 'NotFound' || e?.$metadata?.httpStatusCode === 404;
}
