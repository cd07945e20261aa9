/**
 * User options → defaults → checked options, in one path. Invalid values
 * throw at once, naming the option and what was expected.
 */
import { isAbsolute } from 'node:path';
import { ShmArgumentError, ShmTooLargeError } from './errors.ts';
import { MAX_MAPPING_BYTES } from './native.ts';

/** Default cap on the bytes kept in a directory's pool of released segments: 2 GiB. */
export const DEFAULT_POOL_MAX_BYTES = 2 * 1024 ** 3;

/** Default (and largest) segment size: Node's largest ArrayBuffer, 4 GiB on Node 20. */
export const DEFAULT_MAX_SEGMENT_BYTES = MAX_MAPPING_BYTES;

/** Options shared by the segment-level and Arrow-level functions. */
export interface ShmOptions {
  /** Directory holding the segments, one per Quiver cluster, e.g. `/dev/shm/quiver/<clusterId>`. Created on demand. */
  dir: string;
  /**
   * Released segments are kept in `<dir>/pool/` for reuse while the pool holds at most this many bytes;
   * beyond it they are unlinked. 0 disables the pool.
   * @default DEFAULT_POOL_MAX_BYTES (2 GiB)
   */
  poolMaxBytes?: number;
  /**
   * Largest segment written; a table needing more spans several segments.
   * @default DEFAULT_MAX_SEGMENT_BYTES (Node's largest ArrayBuffer, 4 GiB on Node 20)
   */
  maxSegmentBytes?: number;
}

export interface ResolvedShmOptions {
  dir: string;
  poolMaxBytes: number;
  maxSegmentBytes: number;
}

/** Segment ids are file names: this charset only, at most this long. */
const ID_PATTERN = /^[A-Za-z0-9._-]+$/;
const MAX_ID_LENGTH = 255;
/** Name of the pool folder inside a segment directory, so not a valid id. */
export const POOL_DIR_NAME = 'pool';

export function checkDir(dir: unknown, where: string): string {
  if (typeof dir !== 'string' || dir.length === 0) {
    throw new ShmArgumentError(`${where}: dir must be a non-empty path, got ${describe(dir)}`);
  }
  if (!isAbsolute(dir)) {
    throw new ShmArgumentError(`${where}: dir must be an absolute path (e.g. /dev/shm/quiver/<clusterId>), got "${dir}"`);
  }
  return dir;
}

export function checkId(id: unknown, where: string, what = 'segment id'): string {
  if (typeof id !== 'string' || !ID_PATTERN.test(id) || id === '.' || id === '..' || id.length > MAX_ID_LENGTH) {
    throw new ShmArgumentError(
      `${where}: ${what} must be 1-${MAX_ID_LENGTH} characters of [A-Za-z0-9._-] and not "." or "..", got ${describe(id)}`,
    );
  }
  if (id === POOL_DIR_NAME) {
    throw new ShmArgumentError(`${where}: "${POOL_DIR_NAME}" is reserved for the segment pool and cannot be a ${what}`);
  }
  return id;
}

function checkByteCount(value: unknown, where: string, name: string, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    throw new ShmArgumentError(`${where}: ${name} must be an integer >= ${min}, got ${describe(value)}`);
  }
  return value;
}

export function resolveOptions(opts: ShmOptions, where: string): ResolvedShmOptions {
  if (typeof opts !== 'object' || opts === null) {
    throw new ShmArgumentError(`${where}: options must be an object with at least { dir }, got ${describe(opts)}`);
  }
  const dir = checkDir(opts.dir, where);
  const poolMaxBytes =
    opts.poolMaxBytes === undefined ? DEFAULT_POOL_MAX_BYTES : checkByteCount(opts.poolMaxBytes, where, 'poolMaxBytes', 0);
  const maxSegmentBytes =
    opts.maxSegmentBytes === undefined
      ? DEFAULT_MAX_SEGMENT_BYTES
      : checkByteCount(opts.maxSegmentBytes, where, 'maxSegmentBytes', 1);
  if (maxSegmentBytes > MAX_MAPPING_BYTES) {
    throw new ShmTooLargeError(
      `${where}: maxSegmentBytes ${maxSegmentBytes} exceeds the largest ArrayBuffer this Node.js allows (${MAX_MAPPING_BYTES}, buffer.constants.MAX_LENGTH)`,
    );
  }
  return { dir, poolMaxBytes, maxSegmentBytes };
}

export function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (Array.isArray(value)) return 'an array';
  return `a ${typeof value}`;
}
