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
import { closeSync, readdirSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { type Field, RecordBatch, Schema, Table, type Vector } from 'apache-arrow';
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
  /**
   * In a table assembled from several sources (its own new columns and columns passed through
   * from its inputs): the regions with the same `source` hold one IPC table...
   */
  source?: number;
  /** ...of which these columns are taken: [name in that table, name in this one, position in this one]. */
  columns?: [string, string, number][];
}

/** Broker sockets in a segment directory are named like this; they are sockets, so listSegments skips them. */
const BROKER_SOCKET = /^regions\.[0-9]+\.sock$/;

/** Names of the broker sockets in `dir` (killed executors leave theirs behind). */
function brokerSockets(dir: string): string[] {
  try {
    return readdirSync(dir).filter((name) => BROKER_SOCKET.test(name));
  } catch (e) {
    if (errorCode(e) === 'ENOENT') return [];
    throw fromFsError(e, `quiver shm: cannot list ${dir}`);
  }
}

/** True while process `pid` runs (also when it is another user's: EPERM). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return errorCode(e) !== 'ESRCH';
  }
}

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
    for (const socket of brokerSockets(dir)) {
      const pid = Number(socket.split('.')[1]);
      if (pid === process.pid || !processAlive(pid)) unlinkIfPresent(join(dir, socket));
    }
    return new RegionBroker(regionBrokerPath(dir));
  }

  /** Names of the regions held (segment ids), e.g. for gc to find those of dead runs. */
  names(): string[] {
    return this.handle === null ? [] : native.regionBrokerNames(this.handle);
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
        writeStream(plan, memory, id);
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
  // writeStream copies the table's buffers into the anonymous memory: one copy, as into a file.
  // What regions spare is the file's page cache and a second mapping, not this copy.
  return { segments, byteSize, rows: table.numRows, copiedBytes: byteSize, reusedSegments: 0 };
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

/**
 * Maps one region read-only as raw bytes (its IPC stream is the first `ref.byteSize`), like
 * mapSegment does for a file. A region of a table assembled from several sources holds another
 * table's stream, so it is refused: read such a table with readInput.
 */
export function mapRegionStream(ref: RegionRef): ArrayBuffer {
  if (ref.columns !== undefined) {
    throw new ShmArgumentError(
      `mapSegment: region ${ref.id} belongs to a table assembled from several sources (columns passed through by reference); read it with readInput`,
    );
  }
  const fd = native.regionGet(checkSocket(ref.broker, 'mapSegment'), checkId(ref.id, 'mapSegment'));
  try {
    return native.mapRegion(fd);
  } finally {
    closeSync(fd);
  }
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
  for (const socket of brokerSockets(dir)) {
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

/** A table a step read, with the refs it was read from: its columns can be passed on by reference. */
export interface BorrowableInput {
  table: Table;
  segments: readonly SegmentRef[];
}

/** Options of {@link writeOutput}: file segments' options, plus the broker that makes regions possible. */
export interface OutputOptions extends ShmOptions {
  idPrefix: string;
  /** Unix socket of the cluster's region broker; without it, outputs always go to files. */
  broker?: string;
  /**
   * The step's inputs. An output column whose buffers are exactly an input column's (passed
   * through unchanged, by the same Data objects) is not written again when that input lives in
   * regions: the output references the input's regions instead.
   */
  inputs?: readonly BorrowableInput[];
}

/** Region errors after which writing the output as files still works. */
const REGION_FULL = new Set(['ENOMEM', 'ENOSPC']);

/**
 * Writes a step's output the cheapest way available: regions (one copy, into
 * anonymous memory that the module then shares, no file; columns passed
 * through from region inputs are referenced, not rewritten, and not counted
 * in `copiedBytes`) when a broker is given and the module is loaded, else
 * segment files (one copy). `segments` say which kind they are.
 */
export function writeOutput(table: Table, opts: OutputOptions): WriteResult {
  const resolved = resolveOptions(opts, 'writeOutput');
  if (opts.broker !== undefined && regionsAvailable()) {
    try {
      return writeComposed(table, opts.broker, opts.idPrefix, resolved.maxSegmentBytes, opts.inputs ?? []);
    } catch (e) {
      // Over RLIMIT_MEMLOCK (ENOMEM) or the module's cap (ENOSPC), the one-copy path still works.
      if (!REGION_FULL.has(errorCode(e) ?? '')) throw e;
    }
  }
  return writeTable(table, resolved, opts.idPrefix, 'writeOutput');
}

/** Where a column of a region table lives: the regions of one IPC table, and its name there. */
interface ColumnSource {
  refs: RegionRef[];
  name: string;
}

/** Groups a region table's refs by source; a plain table (no `columns`) is one source holding every column as named. */
function sourcesOf(refs: readonly RegionRef[]): { refs: RegionRef[]; columns: [string, string, number][] | null }[] {
  const groups = new Map<number, RegionRef[]>();
  for (const ref of refs) {
    const group = groups.get(ref.source ?? 0) ?? [];
    group.push(ref);
    groups.set(ref.source ?? 0, group);
  }
  return [...groups.values()].map((group) => ({ refs: group, columns: group[0]!.columns ?? null }));
}

/** Output column name -> where it lives, for an input whose refs are all regions; null for a plain table. */
function columnSources(refs: readonly RegionRef[]): Map<string, ColumnSource> | null {
  const map = new Map<string, ColumnSource>();
  for (const source of sourcesOf(refs)) {
    if (source.columns === null) return null;
    for (const [name, out] of source.columns) map.set(out, { refs: source.refs, name });
  }
  return map;
}

function sameData(a: Vector, b: Vector): boolean {
  return a.data.length > 0 && a.data.length === b.data.length && a.data.every((d, i) => d === b.data[i]);
}

/** The input column (and where it lives) that `column` is, by identity of its buffers' Data objects. */
function borrowable(column: Vector, inputs: readonly BorrowableInput[]): ColumnSource | null {
  for (const input of inputs) {
    if (input.segments.length === 0 || !input.segments.every(isRegionRef)) continue;
    const refs = input.segments as RegionRef[];
    for (const [index, field] of input.table.schema.fields.entries()) {
      if (!sameData(input.table.getChildAt(index)!, column)) continue;
      const sources = columnSources(refs);
      if (sources === null) return { refs, name: field.name };
      return sources.get(field.name) ?? null;
    }
  }
  return null;
}

function writeComposed(table: Table, broker: string, idPrefix: string, maxSegmentBytes: number, inputs: readonly BorrowableInput[]): WriteResult {
  checkTable(table, 'writeOutput');
  const fields = table.schema.fields;
  const borrowed = fields.map((_, position) => borrowable(table.getChildAt(position)!, inputs));
  if (borrowed.every((b) => b === null)) {
    return writeTableToRegions(table, { broker, idPrefix, maxSegmentBytes });
  }
  const segments: RegionRef[] = [];
  // Only the columns written here are copied; borrowed ones are referenced where they are.
  let copiedBytes = 0;
  try {
    const own = fields.map((f, position) => [f.name, f.name, position] as [string, string, number]).filter((_, p) => borrowed[p] === null);
    if (own.length > 0) {
      const written = writeTableToRegions(table.selectAt(own.map(([, , position]) => position)), { broker, idPrefix, maxSegmentBytes });
      copiedBytes += written.copiedBytes;
      segments.push(...(written.segments as RegionRef[]).map((ref): RegionRef => ({ ...ref, source: 0, columns: own })));
    }
    // One source per input table borrowed from; its regions get aliases named after this output, so
    // releasing the parent leaves them to this table, and releasing this table drops the aliases.
    const sources = new Map<RegionRef[], [string, string, number][]>();
    borrowed.forEach((b, position) => {
      if (b === null) return;
      const pairs = sources.get(b.refs) ?? [];
      pairs.push([b.name, fields[position]!.name, position]);
      sources.set(b.refs, pairs);
    });
    let source = 1;
    for (const [refs, columns] of sources) {
      for (const [index, ref] of refs.entries()) {
        const id = `${idPrefix}-s${source}-${index}`;
        const fd = native.regionGet(ref.broker, ref.id);
        try {
          native.regionPut(broker, id, fd);
        } finally {
          closeSync(fd);
        }
        segments.push({ kind: 'region', id, byteSize: ref.byteSize, broker, source, columns });
      }
      source += 1;
    }
  } catch (e) {
    releaseRegions(segments);
    throw e;
  }
  const byteSize = segments.reduce((sum, s) => sum + s.byteSize, 0);
  return { segments, byteSize, rows: table.numRows, copiedBytes, reusedSegments: 0 };
}

/** Reads a table whose columns come from several region tables, putting them back in their positions without copying. */
function readComposed(refs: readonly RegionRef[]): ReadResult {
  const columns: { field: Field; vector: Vector }[] = [];
  const mappings: ArrayBuffer[] = [];
  for (const source of sourcesOf(refs)) {
    const read = readTableFromRegions(source.refs);
    mappings.push(...read.mappings);
    for (const [name, out, position] of source.columns ?? []) {
      const index = read.table.schema.fields.findIndex((f) => f.name === name);
      if (index < 0) throw new ShmArgumentError(`readInput: region ${source.refs[0]!.id} has no column "${name}"`);
      columns[position] = { field: read.table.schema.fields[index]!.clone({ name: out }), vector: read.table.getChildAt(index)! };
    }
  }
  if (columns.length === 0 || columns.some((c) => c === undefined)) {
    throw new ShmArgumentError('readInput: the regions\' column positions do not cover the table');
  }
  // Built from vectors, the table cuts their chunks at common row boundaries (slices: views, no copy).
  const aligned = new Table(Object.fromEntries(columns.map((c, position) => [String(position), c.vector])));
  const schema = new Schema(columns.map((c) => c.field));
  return { table: new Table(schema, aligned.batches.map((b) => new RecordBatch(schema, b.data))), mappings };
}

/** Reads what {@link writeOutput} wrote, whichever kind its segments are (all of one kind). */
export function readInput(refs: readonly SegmentRef[], opts: { dir: string }): ReadResult {
  const regions = Array.isArray(refs) ? refs.filter((r) => isRegionRef(r)) : [];
  if (regions.length === 0) return readTable(refs, checkDir(opts?.dir, 'readInput'), 'readInput');
  if (regions.length !== refs.length) throw new ShmArgumentError('readInput: a table is either all regions or all files, got both');
  return regions.some((r) => r.columns !== undefined) ? readComposed(regions) : readTableFromRegions(regions);
}

/** Releases what {@link writeOutput} wrote: files to the pool, regions back to their brokers. */
export function releaseOutput(refs: readonly SegmentRef[], opts: ShmOptions): void {
  const regions = refs.filter((r) => isRegionRef(r));
  releaseRegions(regions);
  releaseSegmentIds(segmentIds(refs.filter((r) => !isRegionRef(r)), 'releaseOutput'), resolveOptions(opts, 'releaseOutput'));
}
