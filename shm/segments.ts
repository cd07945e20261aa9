/**
 * Segments are plain files in one directory per cluster; a segment id is its
 * file name. This file creates, lists, releases and removes them.
 */
import { lstatSync, mkdirSync, readdirSync, rmSync, statSync, unlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ShmArgumentError, errorCode, fromFsError } from './errors.ts';
import { native } from './native.ts';
import { type ResolvedShmOptions, checkDir, checkId, POOL_DIR_NAME } from './options.ts';
import { addToPool, claimPooled, drainPoolDir, listPool, poolBytes } from './pool.ts';

/** A segment holding one Arrow IPC stream. */
export interface SegmentRef {
  /** File name of the segment inside its directory. */
  id: string;
  /** Length of the IPC stream at the start of the file (the file may be longer when reused from the pool). */
  byteSize: number;
}

/** A segment file as found on disk. */
export interface SegmentInfo {
  id: string;
  /** File size (st_size). */
  byteSize: number;
  /** Memory the file really holds (st_blocks * 512). */
  allocatedBytes: number;
}

/** A segment mapped read-write for its writer. */
export interface WritableSegment {
  path: string;
  mapping: ArrayBuffer;
  /** True when the file came from the pool rather than being created. */
  reused: boolean;
}

export function segmentPath(dir: string, id: string): string {
  return join(dir, id);
}

export function ensureDir(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw fromFsError(e, `quiver shm: cannot create segment directory ${dir}`);
  }
}

/** Writes always touch every byte, so pages are populated at map time (cheaper than faulting one by one). */
const POPULATE_ON_WRITE = true;

/** Maps `id` read-write with `byteSize` bytes, from the pool when it has a fitting file. */
export function acquireSegment(opts: ResolvedShmOptions, id: string, byteSize: number): WritableSegment {
  const path = segmentPath(opts.dir, id);
  if (opts.poolMaxBytes > 0 && claimPooled(opts.dir, path, byteSize)) {
    try {
      return { path, mapping: native.openWritable(path, byteSize, POPULATE_ON_WRITE), reused: true };
    } catch (e) {
      unlinkIfPresent(path);
      throw e;
    }
  }
  return { path, mapping: native.create(path, byteSize, POPULATE_ON_WRITE), reused: false };
}

export function unlinkIfPresent(path: string): void {
  try {
    unlinkSync(path);
  } catch (e) {
    if (errorCode(e) !== 'ENOENT') throw fromFsError(e, `quiver shm: cannot remove segment ${path}`);
  }
}

/** st_size of `path`, or null when it does not exist. */
function fileSize(path: string): number | null {
  try {
    return statSync(path).size;
  } catch (e) {
    if (errorCode(e) === 'ENOENT') return null;
    throw fromFsError(e, `quiver shm: cannot stat segment ${path}`);
  }
}

/**
 * Files the pool keeps at most, whatever their bytes: every claim and release lists the pool, so
 * after a burst of small outputs a pool of thousands of files would cost more than it saves.
 */
export const POOL_MAX_FILES = 256;

export function releaseSegmentIds(ids: readonly string[], opts: ResolvedShmOptions): void {
  const pool = opts.poolMaxBytes > 0 ? listPool(opts.dir) : [];
  let pooled = poolBytes(pool);
  let files = pool.length;
  for (const id of ids) {
    const path = segmentPath(opts.dir, id);
    const size = fileSize(path);
    if (size === null) continue;
    if (opts.poolMaxBytes > 0 && size > 0 && pooled + size <= opts.poolMaxBytes && files < POOL_MAX_FILES) {
      if (addToPool(opts.dir, path, size)) {
        pooled += size;
        files++;
      }
    } else {
      unlinkIfPresent(path);
    }
  }
}

export function listSegmentFiles(dir: string): SegmentInfo[] {
  checkDir(dir, 'listSegments');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (e) {
    if (errorCode(e) === 'ENOENT') return [];
    throw fromFsError(e, `quiver shm: cannot list segment directory ${dir}`);
  }
  const segments: SegmentInfo[] = [];
  for (const id of names.sort()) {
    if (id === POOL_DIR_NAME) continue;
    let st;
    try {
      st = lstatSync(join(dir, id));
    } catch (e) {
      // Released by another process between readdir and lstat.
      if (errorCode(e) === 'ENOENT') continue;
      throw fromFsError(e, `quiver shm: cannot stat segment ${join(dir, id)}`);
    }
    if (!st.isFile()) continue;
    segments.push({ id, byteSize: st.size, allocatedBytes: st.blocks * 512 });
  }
  return segments;
}

export function drainPool(dir: string): void {
  drainPoolDir(checkDir(dir, 'drainPool'));
}

export function removeSegmentDir(dir: string): void {
  checkDir(dir, 'removeDir');
  if (resolve(dir) === '/') throw new ShmArgumentError('removeDir: refusing to remove "/"');
  try {
    rmSync(dir, { recursive: true, force: true });
  } catch (e) {
    throw fromFsError(e, `quiver shm: cannot remove segment directory ${dir}`);
  }
}

/** Accepts ids or refs, checks each id. */
export function segmentIds(segments: readonly (string | SegmentRef)[], where: string): string[] {
  if (!Array.isArray(segments)) {
    throw new ShmArgumentError(`${where}: segments must be an array of ids or SegmentRefs`);
  }
  return segments.map((s) => checkId(typeof s === 'string' ? s : (s as SegmentRef | null)?.id, where));
}
