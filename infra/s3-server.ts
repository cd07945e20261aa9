import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QuiverInfraError } from './errors.ts';

/** Options for {@link startS3Server}. */
export interface S3ServerOptions {
  /** Buckets created at start. @default ['quiver'] */
  buckets?: string[];
  /** Where objects are kept; a fresh temp directory (removed on stop) when unset. */
  dir?: string;
}

/** An S3-protocol server (s3rver) on a free loopback port, for tests and benchmarks. */
export interface S3Server {
  readonly endpoint: string;
  readonly port: number;
  /** Any key and secret work; these are what s3rver documents. */
  readonly credentials: { accessKeyId: string; secretAccessKey: string };
  stop(): Promise<void>;
}

interface S3rverInstance {
  run(): Promise<{ port: number }>;
  close(): Promise<void>;
}

/**
 * Starts s3rver (a devDependency, loaded only here) in this process on port 0, so the OS picks a
 * free port, with its own directory.
 */
export async function startS3Server(options: S3ServerOptions = {}): Promise<S3Server> {
  let S3rver: new (options: Record<string, unknown>) => S3rverInstance;
  try {
    // A variable specifier: s3rver ships no types, and only tests and benchmarks load it.
    const specifier = 's3rver';
    S3rver = ((await import(specifier)) as { default: typeof S3rver }).default;
  } catch (error) {
    throw new QuiverInfraError('ERR_S3_SERVER_START', 's3rver is not installed (it is a devDependency: run npm install without --omit=dev)', { cause: error });
  }
  const ownDir = options.dir === undefined;
  const dir = options.dir ?? mkdtempSync(join(tmpdir(), 'quiver-s3-'));
  const server = new S3rver({
    port: 0,
    address: '127.0.0.1',
    silent: true,
    directory: dir,
    configureBuckets: (options.buckets ?? ['quiver']).map((name) => ({ name, configs: [] })),
  });
  let port: number;
  try {
    ({ port } = await server.run());
  } catch (error) {
    if (ownDir) rmSync(dir, { recursive: true, force: true });
    throw new QuiverInfraError('ERR_S3_SERVER_START', `s3rver did not start: ${(error as Error).message}`, { cause: error });
  }
  return {
    endpoint: `http://127.0.0.1:${port}`,
    port,
    credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' },
    stop: async () => {
      await server.close();
      if (ownDir) rmSync(dir, { recursive: true, force: true });
    },
  };
}
