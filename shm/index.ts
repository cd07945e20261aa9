/**
 * Quiver shared memory: Arrow tables handed between processes through POSIX
 * shared memory without copying. The only module other folders import.
 *
 * A table is written once into one or more segments (files under a cluster
 * directory such as `/dev/shm/quiver/<clusterId>`), each a complete Arrow IPC
 * stream; a reader in any process maps them read-only and gets a Table whose
 * columns are views of the mappings. See ARCHITECTURE.md.
 */
import { constants as osConstants } from 'node:os';
import type { Table } from 'apache-arrow';
import { type ReadResult, type WriteResult, isViewOf as isViewOfImpl, readTable, unmapAll, writeTable } from './arrow.ts';
import { ShmArgumentError, ShmCorruptSegmentError } from './errors.ts';
import { native } from './native.ts';
import { type ShmOptions, checkDir, checkId, describe, resolveOptions } from './options.ts';
import { listPool, poolBytes } from './pool.ts';
import { isRegionRef, mapRegionStream } from './region.ts';
import {
  type SegmentInfo,
  type SegmentRef,
  acquireSegment,
  checkDirSafety,
  drainPool as drainPoolImpl,
  ensureDir,
  listSegmentFiles,
  releaseSegmentIds,
  removeSegmentDir,
  segmentIds,
  segmentPath,
  unlinkIfPresent,
} from './segments.ts';

export type { ReadResult, WriteResult } from './arrow.ts';
export {
  ShmAddonError,
  ShmArgumentError,
  ShmUnsafePathError,
  ShmCorruptSegmentError,
  ShmError,
  ShmNoSpaceError,
  ShmSegmentExistsError,
  ShmSegmentNotFoundError,
  ShmSystemError,
  ShmTooLargeError,
} from './errors.ts';
export { DEFAULT_MAX_SEGMENT_BYTES, DEFAULT_POOL_MAX_BYTES, type ShmOptions } from './options.ts';
export type { SegmentInfo, SegmentRef } from './segments.ts';
export {
  type BorrowableInput,
  type OutputOptions,
  RegionBroker,
  type RegionRef,
  type RegionWriteOptions,
  isRegionRef,
  processAlive,
  readInput,
  readTableFromRegions,
  regionBrokerPath,
  regionsAvailable,
  releaseOutput,
  releaseRegionIds,
  releaseRegions,
  writeOutput,
  writeTableToRegions,
} from './region.ts';

/** Options of {@link writeTableToShm}. */
export interface WriteTableOptions extends ShmOptions {
  /** Segments are named `${idPrefix}-0`, `${idPrefix}-1`, ...; characters [A-Za-z0-9._-]. */
  idPrefix: string;
}

/** Options of {@link readTableFromShm}. */
export interface ReadTableOptions {
  /** Directory the segments were written to. */
  dir: string;
}

/**
 * Writes `table` into new segments `${idPrefix}-<n>`, each a complete Arrow
 * IPC stream of at most `maxSegmentBytes`, reusing pooled files when it can.
 * Exactly one copy: column buffers straight into the mapped segment. On
 * failure, the segments this call made are removed.
 * @throws ShmSegmentExistsError if a segment with one of these ids exists.
 * @throws ShmTooLargeError if a single row cannot fit in `maxSegmentBytes`.
 * @throws ShmNoSpaceError if the shared-memory filesystem is full.
 */
export function writeTableToShm(table: Table, opts: WriteTableOptions): WriteResult {
  const resolved = resolveOptions(opts, 'writeTableToShm');
  return writeTable(table, resolved, opts.idPrefix, 'writeTableToShm');
}

/**
 * Maps `segments` read-only and opens them as one Table without copying.
 * The table is valid while the segments exist and are not reused: release
 * them only when every reader is done. Writing into its buffers kills the
 * process with SIGSEGV.
 * @throws ShmSegmentNotFoundError if a segment does not exist.
 * @throws ShmCorruptSegmentError if a segment is not the stream its ref describes.
 */
export function readTableFromShm(
  segments: readonly SegmentRef[],
  opts: ReadTableOptions,
): ReadResult {
  const dir = checkDir(opts?.dir, 'readTableFromShm');
  return readTable(segments, dir, 'readTableFromShm');
}

/**
 * True when every non-empty buffer of every column of `table` (values,
 * offsets, validity, type ids, children, dictionaries) is a view into one of
 * `mappings`, i.e. nothing was copied.
 */
export function isViewOf(table: Table, mappings: readonly ArrayBuffer[]): boolean {
  return isViewOfImpl(table, mappings);
}

/**
 * Unmaps mappings from {@link readTableFromShm} now instead of at garbage
 * collection. Tables over them must not be used afterwards: their buffers
 * become empty (detached), which never crashes but reads as missing data.
 */
export function unmapSegments(mappings: readonly ArrayBuffer[]): void {
  if (!Array.isArray(mappings)) throw new ShmArgumentError(`unmapSegments: mappings must be an array, got ${describe(mappings)}`);
  unmapAll(mappings);
}

/**
 * Releases segments: each moves to the pool while the pool stays within
 * `poolMaxBytes`, else is unlinked. Missing segments are skipped, so
 * releasing twice is harmless.
 */
export function releaseSegments(segments: readonly (string | SegmentRef)[], opts: ShmOptions): void {
  const resolved = resolveOptions(opts, 'releaseSegments');
  releaseSegmentIds(segmentIds(segments, 'releaseSegments'), resolved);
}

/**
 * Maps one segment read-only as raw bytes (its IPC stream is the first `ref.byteSize`), for a
 * sender that streams the messages as they are. Unmap it with {@link unmapSegments}.
 */
export function mapSegment(ref: SegmentRef, opts: ReadTableOptions): ArrayBuffer {
  if (isRegionRef(ref)) return mapRegionStream(ref);
  const dir = checkDir(opts?.dir, 'mapSegment');
  const [id] = segmentIds([ref], 'mapSegment');
  checkDirSafety(dir);
  const mapping = native.openReadOnly(segmentPath(dir, id!));
  if (mapping.byteLength < ref.byteSize) {
    native.unmap(mapping);
    throw new ShmCorruptSegmentError(`mapSegment: segment ${id} holds ${mapping.byteLength} bytes, its reference says ${ref.byteSize}`, { path: segmentPath(dir, id!) });
  }
  return mapping;
}

/**
 * Maps segment `id` read-write with `byteSize` bytes, for a receiver that writes an IPC stream
 * into it itself (e.g. off the network): a pooled file when one fits, else a new file. With
 * `grow`, an existing segment is remapped larger instead (the file grows; its bytes stay).
 * Unmap it with {@link unmapSegments}; remove a partial one with {@link removeSegments}.
 * @throws ShmSegmentExistsError if `id` exists and `grow` is not set.
 */
export function mapWritableSegment(id: string, byteSize: number, opts: ShmOptions & { grow?: boolean }): ArrayBuffer {
  const resolved = resolveOptions(opts, 'mapWritableSegment');
  checkId(id, 'mapWritableSegment');
  if (opts.grow) return native.openWritable(segmentPath(resolved.dir, id), byteSize, true);
  ensureDir(resolved.dir);
  return acquireSegment(resolved, id, byteSize).mapping;
}

/** Renames a segment, failing with ShmSegmentExistsError when `to` exists: publishes a segment written under a temporary id. */
export function renameSegment(from: string, to: string, opts: Pick<ShmOptions, 'dir'>): void {
  const dir = checkDir(opts?.dir, 'renameSegment');
  native.renameNoReplace(segmentPath(dir, checkId(from, 'renameSegment')), segmentPath(dir, checkId(to, 'renameSegment')));
}

/** Unlinks segments at once (no pool): for partial segments nobody may read. Missing ones are skipped. */
export function removeSegments(ids: readonly string[], opts: Pick<ShmOptions, 'dir'>): void {
  const dir = checkDir(opts?.dir, 'removeSegments');
  for (const id of segmentIds(ids, 'removeSegments')) unlinkIfPresent(segmentPath(dir, id));
}

/** Segment files in `dir` (the pool excluded), sorted by id; empty if `dir` does not exist. */
export function listSegments(dir: string): SegmentInfo[] {
  return listSegmentFiles(dir);
}

/** Files and bytes waiting in the pool of `dir`. */
export function poolUsage(dir: string): { segments: number; byteSize: number } {
  const files = listPool(checkDir(dir, 'poolUsage'));
  return { segments: files.length, byteSize: poolBytes(files) };
}

/** Unlinks every pooled segment of `opts.dir`. */
export function drainPool(opts: Pick<ShmOptions, 'dir'>): void {
  drainPoolImpl(opts?.dir);
}

/** Removes the cluster directory: every segment and the pool. Missing is fine. */
export function removeDir(dir: string): void {
  removeSegmentDir(dir);
}

/** Options of {@link setParentDeathSignal}. */
export interface ParentDeathOptions {
  /**
   * Pid the parent had when it spawned us (e.g. passed in an environment
   * variable). If our parent is already someone else, it died before the
   * signal was armed, and the signal is sent to ourselves at once.
   */
  expectedParentPid?: number;
}

/**
 * Asks the kernel to send `signal` to this process when its parent dies
 * (prctl PR_SET_PDEATHSIG), so a step process dies with its executor.
 * Linux delivers it when the parent *thread* that spawned us exits: spawn
 * step processes from the executor's main thread. `0` disarms it.
 */
export function setParentDeathSignal(signal: NodeJS.Signals | number, options: ParentDeathOptions = {}): void {
  const number = typeof signal === 'string' ? (osConstants.signals as Record<string, number>)[signal] : signal;
  if (number === undefined) {
    throw new ShmArgumentError(`setParentDeathSignal: unknown signal ${describe(signal)}; use a name like 'SIGKILL' or a number`);
  }
  native.setParentDeathSignal(number);
  const expected = options.expectedParentPid;
  if (expected !== undefined && number !== 0 && native.parentPid() !== expected) {
    process.kill(process.pid, number);
  }
}

/** getppid(): pid of the parent process (1 or a subreaper once the parent died). */
export function parentPid(): number {
  return native.parentPid();
}

/** Where a forked child's stdout, stderr and IPC channel connect, and the line each says first. */
export interface ForkStreams {
  /** A unix socket the parent's executor listens on. */
  socketPath: string;
  /** What the stdout, stderr and IPC connections say first, in that order: one line each. */
  hellos: readonly [string, string, string];
  /** This process's IPC channel fd (process.channel.fd), replaced in the child. */
  ipcFd: number;
}

/**
 * Forks this process (a step zygote, see executor/step-zygote.ts). The child leads its own process
 * group, dies with this process, has its stdout, stderr and IPC channel connected to
 * `streams.socketPath` instead of ours, runs under RLIMIT_AS `addressSpaceBytes` (0: none) and has
 * its event loop re-armed. Returns the child's pid here and 0 in the child. Only for a process
 * started with V8's --single-threaded: the child has none of its parent's other threads.
 */
export function forkChild(streams: ForkStreams, addressSpaceBytes: number): number {
  for (const hello of streams.hellos) {
    if (hello.includes('\n')) throw new ShmArgumentError(`forkChild: a hello is one line without its newline, got ${describe(hello)}`);
  }
  return native.forkChild(streams.socketPath, streams.hellos.map((h) => `${h}\n`) as unknown as readonly [string, string, string], streams.ipcFd, addressSpaceBytes);
}

/** How a forked child ended (exit code or signal number), or null while it runs. */
export function reapChild(pid: number): { code: number | null; signal: number | null } | null {
  return native.reapChild(pid);
}

/** Ends this process at once with `code` (_exit): what a forked child must use instead of Node's exit. */
export function exitNow(code: number): never {
  return native.exitNow(code);
}
