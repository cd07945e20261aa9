/**
 * Segments are plain files in one directory per cluster; a segment id is its
 * file name. This file creates, lists, releases and removes them.
 */
import { lstatSync, mkdirSync, readdirSync, rmSync, statSync, unlinkSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { ShmArgumentError, ShmUnsafePathError, errorCode, fromFsError } from './errors.ts';
import { native } from './native.ts';
import { type ResolvedShmOptions, checkDir, checkId, POOL_DIR_NAME } from './options.ts';
import { addToPool, claimPooled, drainPoolDir, poolBytes, poolView } from './pool.ts';

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

/**
 * Directories this process created or found and checked: a worker writes a segment per step, and
 * making sure of the directory every time cost a mkdir and a stat (two of the eighteen system
 * calls strace counted per worker step). One removed since is made again when a segment cannot be created in it
 * ({@link acquireSegment}).
 */
const ensuredDirs = new Set<string>();

/** Creates `dir` (and missing parents) mode 0700 when needed, then checks it is safe to use (checkDirSafety). */
export function ensureDir(dir: string): void {
  if (ensuredDirs.has(dir)) return;
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw fromFsError(e, `quiver shm: cannot create segment directory ${dir}`);
  }
  checkDirSafety(dir);
  ensuredDirs.add(dir);
}

/** Directories found safe by this process; a directory only its owner can write to stays so. */
const safeDirs = new Set<string>();

function unsafe(path: string, problem: string, remedy: string): ShmUnsafePathError {
  return new ShmUnsafePathError(`quiver shm: refusing ${path}: it ${problem}, so another user could plant or change segments in it; ${remedy}`, { path });
}

/**
 * Refuses a segment directory another user could have planted or can write into: `dir` must be
 * a real directory (not a symlink) owned by this user and writable by nobody else; each parent
 * must belong to this user or root and be writable by nobody else, unless sticky (as /dev/shm
 * and /tmp are). A directory that does not exist yet passes: nothing can be read from it.
 * @throws ShmUnsafePathError naming the path and what to do.
 */
export function checkDirSafety(dir: string): void {
  // Before getuid: a system call on every segment read and written otherwise.
  if (safeDirs.has(dir)) return;
  const uid = process.getuid?.();
  if (uid === undefined) return;
  let st;
  try {
    st = lstatSync(dir);
  } catch (e) {
    if (errorCode(e) === 'ENOENT') return;
    throw fromFsError(e, `quiver shm: cannot stat segment directory ${dir}`);
  }
  if (st.isSymbolicLink()) throw unsafe(dir, 'is a symbolic link', `remove it (Quiver creates the directory itself, mode 0700)`);
  if (!st.isDirectory()) throw unsafe(dir, 'is not a directory', 'remove it');
  if (st.uid !== uid) {
    throw unsafe(dir, `belongs to uid ${st.uid}, not to this user (uid ${uid})`, `remove it if nobody uses it, or set QUIVER_SHM_ROOT to a folder of your own`);
  }
  if ((st.mode & 0o022) !== 0) throw unsafe(dir, `is writable by ${writers(st.mode)} (mode ${modeText(st.mode)})`, `run chmod 700 ${dir}`);
  for (let parent = dirname(dir); ; parent = dirname(parent)) {
    let p;
    try {
      p = statSync(parent);
    } catch (e) {
      throw fromFsError(e, `quiver shm: cannot stat ${parent}, a parent of segment directory ${dir}`);
    }
    if (p.uid !== uid && p.uid !== 0) {
      throw unsafe(parent, `(a parent of ${dir}) belongs to uid ${p.uid}, neither this user (uid ${uid}) nor root`, 'set QUIVER_SHM_ROOT to a folder of your own');
    }
    if ((p.mode & 0o022) !== 0 && (p.mode & 0o1000) === 0) {
      throw unsafe(parent, `(a parent of ${dir}) is writable by ${writers(p.mode)} and not sticky (mode ${modeText(p.mode)})`, `run chmod go-w ${parent}`);
    }
    if (parent === dirname(parent)) break;
  }
  safeDirs.add(dir);
}

const writers = (mode: number) => ((mode & 0o020) && (mode & 0o002) ? 'group and others' : mode & 0o020 ? 'its group' : 'others');
const modeText = (mode: number) => `0${(mode & 0o7777).toString(8)}`;

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
  try {
    return { path, mapping: native.create(path, byteSize, POPULATE_ON_WRITE), reused: false };
  } catch (e) {
    // The directory went away since this process made sure of it (another process removed it,
    // as an executor does with its cluster's folder): made and checked again, once. Whoever
    // made it meanwhile may not be us, so its safety is checked afresh too.
    if (errorCode(e) !== 'ENOENT' || !ensuredDirs.delete(opts.dir)) throw e;
    safeDirs.delete(opts.dir);
    ensureDir(opts.dir);
    return { path, mapping: native.create(path, byteSize, POPULATE_ON_WRITE), reused: false };
  }
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
    // Not thrown when missing: a run's end releases segments released before, and an error's stack costs more than the stat.
    return statSync(path, { throwIfNoEntry: false })?.size ?? null;
  } catch (e) {
    throw fromFsError(e, `quiver shm: cannot stat segment ${path}`);
  }
}

/**
 * Files the pool keeps at most, whatever their bytes: claims and releases list the pool (at most
 * every 250 ms per process), so a pool of thousands of files would cost more than it saves.
 */
export const POOL_MAX_FILES = 256;

export function releaseSegmentIds(ids: readonly string[], opts: ResolvedShmOptions): void {
  const pool = opts.poolMaxBytes > 0 ? poolView(opts.dir) : [];
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
  for (const known of [safeDirs, ensuredDirs]) for (const d of known) if (d === dir || d.startsWith(`${dir}/`)) known.delete(d);
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
