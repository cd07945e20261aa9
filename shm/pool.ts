/**
 * Pool of released segments in `<dir>/pool/`, shared by every process using
 * `<dir>` with no coordinator. Faulting in fresh tmpfs pages is the dominant
 * cost of writing a segment, so released files are kept and rewritten.
 *
 * A pooled file is named `<byteSize>.<random>`. Claiming one is a rename
 * without replace (renameat2 RENAME_NOREPLACE) to the new segment's path:
 * exactly one process can win it, losers get ENOENT and try the next. The cap
 * is soft: releases racing each other may overshoot it by one segment each.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { ShmSegmentExistsError, errorCode, fromFsError } from './errors.ts';
import { native } from './native.ts';
import { POOL_DIR_NAME } from './options.ts';

const POOLED_NAME = /^(\d+)\.[0-9a-f]+$/;

/** A file waiting in the pool. */
export interface PooledFile {
  name: string;
  byteSize: number;
}

export function poolDir(dir: string): string {
  return join(dir, POOL_DIR_NAME);
}

export function listPool(dir: string): PooledFile[] {
  let names: string[];
  try {
    names = readdirSync(poolDir(dir));
  } catch (e) {
    if (errorCode(e) === 'ENOENT') return [];
    throw fromFsError(e, `quiver shm: cannot list the segment pool ${poolDir(dir)}`);
  }
  const files: PooledFile[] = [];
  for (const name of names) {
    const match = POOLED_NAME.exec(name);
    if (match?.[1] !== undefined) files.push({ name, byteSize: Number(match[1]) });
  }
  return files;
}

/**
 * How old this process's view of a pool may be before a release lists it again. Listing costs a
 * readdir of up to POOL_MAX_FILES names, and an executor releases after every run: a view kept
 * for a moment, updated by this process's own claims and releases, makes that once per moment.
 * Other processes' changes are seen at the next listing; the cap was soft already.
 */
const POOL_VIEW_MAX_AGE_MS = 250;

interface PoolView {
  files: PooledFile[];
  listedAt: number;
}
const views = new Map<string, PoolView>();

/** The pool as this process last saw it, listed again when older than POOL_VIEW_MAX_AGE_MS (or when `fresh`). */
export function poolView(dir: string, fresh = false): PooledFile[] {
  const now = performance.now();
  const known = views.get(dir);
  if (!fresh && known && now - known.listedAt < POOL_VIEW_MAX_AGE_MS) return known.files;
  const files = listPool(dir);
  views.set(dir, { files, listedAt: now });
  return files;
}

function forgetPooled(dir: string, name: string): void {
  const view = views.get(dir);
  if (view) view.files = view.files.filter((f) => f.name !== name);
}

/** Bytes held by the pool right now. */
export function poolBytes(files: readonly PooledFile[]): number {
  return files.reduce((sum, f) => sum + f.byteSize, 0);
}

/**
 * Moves a pooled file of at least `byteSize` and at most twice that (the
 * smallest that fits) to `target`. Returns false when none could be claimed.
 * @throws ShmSegmentExistsError when `target` already exists.
 */
export function claimPooled(dir: string, target: string, byteSize: number): boolean {
  // First from this process's view; when nothing there fits (or all of it was taken), listed afresh.
  for (const fresh of [false, true]) {
    if (tryClaim(dir, target, byteSize, poolView(dir, fresh))) return true;
  }
  return false;
}

function tryClaim(dir: string, target: string, byteSize: number, pool: readonly PooledFile[]): boolean {
  const candidates = pool.filter((f) => f.byteSize >= byteSize && f.byteSize <= 2 * byteSize).sort((a, b) => a.byteSize - b.byteSize);
  for (const file of spreadOut(candidates)) {
    forgetPooled(dir, file.name);
    try {
      native.renameNoReplace(join(poolDir(dir), file.name), target);
      return true;
    } catch (e) {
      // Another process claimed this one first.
      if (errorCode(e) === 'ENOENT') continue;
      if (e instanceof ShmSegmentExistsError) {
        throw new ShmSegmentExistsError(
          `quiver shm: segment ${target} already exists; choose another id (or idPrefix), or release the existing segment first`,
          { path: target, cause: e },
        );
      }
      throw e;
    }
  }
  return false;
}

/**
 * The candidates with those of the smallest size rotated by this process's pid. Processes that
 * listed the same pool (two workers after the executor pooled a run's segments) would otherwise
 * all try the same file first, and every loser pays a failed rename and the error it throws.
 */
function spreadOut(candidates: readonly PooledFile[]): readonly PooledFile[] {
  const smallest = candidates[0]?.byteSize;
  let same = 0;
  while (same < candidates.length && candidates[same]!.byteSize === smallest) same++;
  if (same < 2) return candidates;
  const start = process.pid % same;
  return [...candidates.slice(start, same), ...candidates.slice(0, start), ...candidates.slice(same)];
}

/**
 * Pool directories this process has created or found: an executor pools a segment or more per
 * step, and creating the directory each time cost a mkdir and a stat. One removed since (its
 * segment directory emptied) is made again when a rename into it finds it missing.
 */
const madePools = new Set<string>();

function makePool(pool: string): void {
  try {
    mkdirSync(pool, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw fromFsError(e, `quiver shm: cannot create the segment pool ${pool}`);
  }
  madePools.add(pool);
}

/**
 * A name no other file in any pool gets: random per process, the pid (a forked process shares
 * its parent's random part, not its pid) and a count. Random bytes per name cost a call into the
 * CSPRNG for every segment an executor pools.
 */
let poolNamePrefix: string | null = null;
let pooledCount = 0;
function uniqueSuffix(): string {
  // Drawn at first use, not at load: a startup snapshot would otherwise fix it at build time.
  poolNamePrefix ??= randomBytes(6).toString('hex');
  return `${poolNamePrefix}${process.pid.toString(16).padStart(8, '0')}${(++pooledCount).toString(16)}`;
}

/** Moves the segment at `path` (of `byteSize` bytes) into the pool. False if it was already gone. */
export function addToPool(dir: string, path: string, byteSize: number): boolean {
  const pool = poolDir(dir);
  if (!madePools.has(pool)) makePool(pool);
  for (;;) {
    const name = `${byteSize}.${uniqueSuffix()}`;
    try {
      native.renameNoReplace(path, join(pool, name));
      views.get(dir)?.files.push({ name, byteSize });
      return true;
    } catch (e) {
      const code = errorCode(e);
      if (code === 'ENOENT') {
        // The segment was gone already, or the pool was: only the pool is worth another try.
        if (existsSync(pool)) return false;
        makePool(pool);
        continue;
      }
      // A random name collided; draw another.
      if (code === 'EEXIST') continue;
      throw e;
    }
  }
}

/** Unlinks every pooled file. */
export function drainPoolDir(dir: string): void {
  views.delete(dir);
  for (const file of listPool(dir)) {
    const path = join(poolDir(dir), file.name);
    try {
      unlinkSync(path);
    } catch (e) {
      // Claimed or drained by another process meanwhile.
      if (errorCode(e) === 'ENOENT') continue;
      throw fromFsError(e, `quiver shm: cannot remove pooled segment ${path}`);
    }
  }
}
