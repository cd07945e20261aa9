/**
 * Regions: tables handed over through the quiver kernel module (kmod/)
 * instead of files in /dev/shm. The writer encodes each stream into
 * page-aligned private anonymous memory, the module pins those very pages
 * and returns a read-only fd for them, and readers map that fd: nothing is
 * copied into shared memory. See ARCHITECTURE.md, "Regions".
 *
 * A region is reachable only through an fd, so a broker (a thread in a
 * long-lived process, e.g. the executor) keeps one fd per region under a
 * name and hands out duplicates over a unix socket. The region lives until
 * the broker drops it and every reader has unmapped it.
 */
import { closeSync } from 'node:fs';
import { readdirSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import type { Table } from 'apache-arrow';
import { type ReadResult, type WriteResult, checkTable, planSegments, readStreams, readTable, writeStream, writeTable } from './arrow.ts';
import { ShmArgumentError, errorCode, fromFsError } from './errors.ts';
import { type RegionBrokerHandle, native } from './native.ts';
import { DEFAULT_MAX_SEGMENT_BYTES, type ShmOptions, checkDir, checkId, describe, resolveOptions } from './options.ts';
import { type SegmentRef, ensureDir, releaseSegmentIds, segmentIds, unlinkIfPresent } from './segments.ts';

/** A stream held in a region: `id` is its name in the broker listening on `broker`. Segment refs without `kind` name files. */
export interface RegionRef extends SegmentRef {
  kind: 'region';
  /** Absolute path of the broker's unix socket (regions, like segment files, are local to one host). */
  broker: string;
}

/** Broker sockets in a segment directory are named like this; they are sockets, so listSegments skips them. */
const BROKER_SOCKET = /^regions\.[0-9]+\.sock$/;

/** Where the broker of process `pid` listens in segment directory `dir`. */
export function regionBrokerPath(dir: string, pid: number = process.pid): string {
  return join(checkDir(dir, 'regionBrokerPath'), `regions.${pid}.sock`);
}

/** Options of {@link writeTableToRegions}. */
export interface RegionWriteOptions {
  /** Unix socket of the broker that will hold the regions. */
  broker: string;
  /** Regions are named `${idPrefix}-0`, `${idPrefix}-1`, ...; characters [A-Za-z0-9._-]. */
  idPrefix: string;
  /** Largest stream per region. @default DEFAULT_MAX_SEGMENT_BYTES */
  maxSegmentBytes?: number;
}

/**
 * True when the module is loaded and usable by this process (/dev/quiver
 * opens) and QUIVER_REGIONS is not `off`.
 */
export function regionsAvailable(): boolean {
  return process.env.QUIVER_REGIONS !== 'off' && native.regionAvailable();
}

function checkSocket(path: unknown, where: string): string {
  if (typeof path !== 'string' || !isAbsolute(path)) {
    throw new ShmArgumentError(`${where}: broker must be the absolute path of a unix socket, got ${describe(path)}`);
  }
  return path;
}

/** A running region broker: holds region fds under names and serves them on `socketPath`. */
export class RegionBroker {
  private handle: RegionBrokerHandle | null;

  constructor(readonly socketPath: string) {
    this.handle = native.regionBrokerStart(checkSocket(socketPath, 'RegionBroker'));
  }

  /** Regions held. */
  get size(): number {
    return this.handle === null ? 0 : native.regionBrokerCount(this.handle);
  }

  /** Starts the broker of this process in segment directory `dir` (created if needed), replacing a stale socket of a dead process with our pid. */
  static inDir(dir: string): RegionBroker {
    ensureDir(dir);
    const path = regionBrokerPath(dir);
    unlinkIfPresent(path);
    return new RegionBroker(path);
  }

  /** Closes every fd held (regions then go once their readers unmap) and removes the socket. */
  stop(): void {
    if (this.handle !== null) native.regionBrokerStop(this.handle);
    this.handle = null;
  }
}

/**
 * Writes `table` as one or more Arrow IPC streams straight into private
 * anonymous memory, de-anonymizes each into a region and gives it to the
 * broker. The writer's own mappings are dropped: the pinned pages stay.
 * @throws ShmSystemError with code ENOENT/ENODEV if the module is not loaded, ENOSPC over its cap, ENOMEM over RLIMIT_MEMLOCK.
 */
export function writeTableToRegions(table: Table, opts: RegionWriteOptions): WriteResult & { segments: RegionRef[] } {
  const where = 'writeTableToRegions';
  checkTable(table, where);
  const broker = checkSocket(opts?.broker, where);
  checkId(`${opts.idPrefix}-0`, where, 'idPrefix + "-<n>"');
  const plans = planSegments(table, opts.maxSegmentBytes ?? DEFAULT_MAX_SEGMENT_BYTES, where);
  const segments: RegionRef[] = [];
  try {
    plans.forEach((plan, index) => {
      const id = `${opts.idPrefix}-${index}`;
      const memory = native.allocAnonymous(plan.byteSize);
      try {
        writeStream(table.schema, plan, memory, id, where);
        const { fd } = native.shareRegion(memory);
        try {
          native.regionPut(broker, id, fd);
        } finally {
          closeSync(fd);
        }
      } finally {
        native.unmap(memory);
      }
      segments.push({ kind: 'region', id, byteSize: plan.byteSize, broker });
    });
  } catch (e) {
    releaseRegions(segments);
    throw e;
  }
  const byteSize = segments.reduce((sum, s) => sum + s.byteSize, 0);
  return { segments, byteSize, rows: table.numRows, copiedBytes: 0, reusedSegments: 0 };
}

/** Maps regions read-only through their brokers and opens them as one Table without copying. */
export function readTableFromRegions(refs: readonly RegionRef[]): ReadResult {
  return readStreams(refs, 'readTableFromRegions', (ref) => {
    const broker = checkSocket((ref as Partial<RegionRef>).broker, 'readTableFromRegions');
    const fd = native.regionGet(broker, ref.id);
    try {
      return { path: `region ${ref.id}`, mapping: native.mapRegion(fd) };
    } finally {
      closeSync(fd);
    }
  });
}

/** Each region's broker closes its fd for it (the pages go once no reader maps them); unknown ones are skipped. */
export function releaseRegions(refs: readonly RegionRef[]): void {
  for (const ref of refs) {
    native.regionDrop(checkSocket(ref?.broker, 'releaseRegions'), checkId(ref.id, 'releaseRegions'));
  }
}

/**
 * Drops regions known only by id (as in a release message) from every broker
 * in `dir`; a broker whose process died is skipped (its regions went with it).
 */
export function releaseRegionIds(ids: readonly string[], opts: { dir: string }): void {
  const dir = checkDir(opts?.dir, 'releaseRegionIds');
  let sockets: string[];
  try {
    sockets = readdirSync(dir).filter((name) => BROKER_SOCKET.test(name));
  } catch (e) {
    if (errorCode(e) === 'ENOENT') return;
    throw fromFsError(e, `quiver shm: cannot list ${dir}`);
  }
  for (const socket of sockets) {
    for (const id of ids) {
      try {
        native.regionDrop(join(dir, socket), checkId(id, 'releaseRegionIds'));
      } catch (e) {
        if (errorCode(e) === 'ECONNREFUSED' || errorCode(e) === 'ENOENT') break;
        throw e;
      }
    }
  }
}

/** True for a ref that names a region rather than a file. */
export function isRegionRef(ref: SegmentRef): ref is RegionRef {
  return (ref as Partial<RegionRef>).kind === 'region';
}

/** Options of {@link writeOutput}: file segments' options, plus the broker that makes regions possible. */
export interface OutputOptions extends ShmOptions {
  idPrefix: string;
  /** Unix socket of the cluster's region broker; without it, outputs always go to files. */
  broker?: string;
}

/** Region errors after which writing the output as files still works. */
const REGION_FULL = new Set(['ENOMEM', 'ENOSPC']);

/**
 * Writes a step's output the cheapest way available: regions (no copy into
 * shared memory, `copiedBytes` 0) when a broker is given and the module is
 * loaded, else segment files (one copy). `segments` say which kind they are.
 */
export function writeOutput(table: Table, opts: OutputOptions): WriteResult {
  const resolved = resolveOptions(opts, 'writeOutput');
  if (opts.broker !== undefined && regionsAvailable()) {
    try {
      return writeTableToRegions(table, { broker: opts.broker, idPrefix: opts.idPrefix, maxSegmentBytes: resolved.maxSegmentBytes });
    } catch (e) {
      // Over RLIMIT_MEMLOCK (ENOMEM) or the module's cap (ENOSPC), the one-copy path still works.
      if (!REGION_FULL.has(errorCode(e) ?? '')) throw e;
    }
  }
  return writeTable(table, resolved, opts.idPrefix, 'writeOutput');
}


/** Reads what {@link writeOutput} wrote, whichever kind its segments are (all of one kind). */
export function readInput(refs: readonly SegmentRef[], opts: { dir: string }): ReadResult {
  const regions = Array.isArray(refs) ? refs.filter((r) => isRegionRef(r)) : [];
  if (regions.length === 0) return readTable(refs, checkDir(opts?.dir, 'readInput'), 'readInput');
  if (regions.length !== refs.length) throw new ShmArgumentError('readInput: a table is either all regions or all files, got both');
  return readTableFromRegions(regions);
}

/** Releases what {@link writeOutput} wrote: files to the pool, regions back to their brokers. */
export function releaseOutput(refs: readonly SegmentRef[], opts: ShmOptions): void {
  const regions = refs.filter((r) => isRegionRef(r));
  releaseRegions(regions);
  releaseSegmentIds(segmentIds(refs.filter((r) => !isRegionRef(r)), 'releaseOutput'), resolveOptions(opts, 'releaseOutput'));
}
