/**
 * Arrow tables in and out of segments.
 *
 * Writing: the table's record batches are grouped so that each group, as a
 * complete Arrow IPC stream (schema, dictionaries, batches, end-of-stream),
 * fits in one segment. Sizes come from a sizing pass: a
 * RecordBatchStreamWriter run into a sink that adds up chunk lengths and keeps
 * the chunks (the encoded metadata, and views of the column buffers). Each
 * planned stream's chunks are then copied straight into the mapped segment:
 * the one copy, with the metadata encoded once.
 *
 * Reading: each segment is mapped read-only and parsed in place. The IPC
 * reader hands out subarrays of its input, and every message body is 8-byte
 * aligned within the stream, so on a page-aligned mapping each column buffer
 * is a correctly aligned typed-array view of the mapping: nothing is copied.
 */
import {
  AsyncByteQueue,
  type Data,
  RecordBatch,
  RecordBatchReader,
  RecordBatchStreamWriter,
  type Schema,
  Table,
  util,
} from 'apache-arrow';
import { ShmArgumentError, ShmCorruptSegmentError, ShmError, ShmTooLargeError } from './errors.ts';
import { native } from './native.ts';
import { type ResolvedShmOptions, checkId, describe } from './options.ts';
import { type SegmentRef, acquireSegment, checkDirSafety, ensureDir, segmentPath, unlinkIfPresent } from './segments.ts';

/** Continuation marker (0xFFFFFFFF) and a zero length: the end-of-stream a stream writer appends on close. */
const EOS = new Uint8Array(Int32Array.of(-1, 0).buffer);
const EOS_BYTES = EOS.byteLength;

/**
 * Byte sink for RecordBatchStreamWriter (accepted through `writer.reset(sink)`,
 * which keeps any AsyncByteQueue as is): counts the chunks and keeps them in
 * order. The writer makes each metadata and padding chunk afresh and hands
 * column buffers as views, never reusing one: a kept chunk stays as it was
 * written, and copying the chunks later writes the same stream.
 */
class SegmentSink extends AsyncByteQueue<Uint8Array> {
  position = 0;
  /** Set when the writer closes the sink, which it also does on its own when a batch's schema differs. */
  ended = false;
  readonly chunks: Uint8Array[] = [];

  override write(chunk: ArrayBufferView): void {
    const bytes =
      chunk instanceof Uint8Array ? chunk : new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.chunks.push(bytes);
    this.position += bytes.byteLength;
  }

  override close(): void {
    this.ended = true;
  }

  override abort(): void {
    this.ended = true;
  }
}

/** A stream writer bound to a sink, with the schema message already written. */
function startStream(schema: Schema): { writer: RecordBatchStreamWriter; sink: SegmentSink } {
  const sink = new SegmentSink();
  const writer = new RecordBatchStreamWriter();
  writer.reset(sink, schema);
  return { writer, sink };
}

function writeBatch(writer: RecordBatchStreamWriter, sink: SegmentSink, batch: RecordBatch, where: string): void {
  writer.write(batch);
  if (sink.ended) {
    throw new ShmArgumentError(`${where}: a record batch's schema differs from the table's schema; a table must have one schema`);
  }
}

/** Batches written together as one IPC stream, and that stream's exact size. */
export interface SegmentPlan {
  batches: RecordBatch[];
  byteSize: number;
  /** The stream's bytes but its end-of-stream, as the sizing pass encoded them. */
  chunks: Uint8Array[];
}

/**
 * Greedy grouping of batches into streams of at most `maxSegmentBytes`. A
 * batch that does not fit in a stream of its own is split in half by rows,
 * recursively, down to single rows.
 */
export function planSegments(table: Table, maxSegmentBytes: number, where: string): SegmentPlan[] {
  const schema = table.schema;
  const plans: SegmentPlan[] = [];
  const pending = table.batches.filter((b) => b.numRows > 0);
  let stream = startStream(schema);
  if (stream.sink.position + EOS_BYTES > maxSegmentBytes) {
    throw new ShmTooLargeError(
      `${where}: the schema alone needs ${stream.sink.position + EOS_BYTES} bytes, over maxSegmentBytes ${maxSegmentBytes}`,
    );
  }
  let current: RecordBatch[] = [];
  while (pending.length > 0) {
    const batch = pending.shift() as RecordBatch;
    const before = stream.sink.position;
    const chunksBefore = stream.sink.chunks.length;
    writeBatch(stream.writer, stream.sink, batch, where);
    if (stream.sink.position + EOS_BYTES <= maxSegmentBytes) {
      current.push(batch);
      continue;
    }
    if (current.length > 0) {
      // Close this stream without the batch; measure it again in a fresh one, where dictionaries are re-sent.
      plans.push({ batches: current, byteSize: before + EOS_BYTES, chunks: stream.sink.chunks.slice(0, chunksBefore) });
      current = [];
      pending.unshift(batch);
    } else if (batch.numRows > 1) {
      const half = Math.floor(batch.numRows / 2);
      pending.unshift(batch.slice(0, half), batch.slice(half));
    } else {
      throw new ShmTooLargeError(
        `${where}: a single row needs a ${stream.sink.position + EOS_BYTES}-byte stream (with its schema and dictionaries), over maxSegmentBytes ${maxSegmentBytes}`,
      );
    }
    stream = startStream(schema);
  }
  // An empty table still gets one segment, carrying its schema.
  if (current.length > 0 || plans.length === 0) {
    plans.push({ batches: current, byteSize: stream.sink.position + EOS_BYTES, chunks: stream.sink.chunks });
  }
  return plans;
}

/** Result of {@link writeTable}. */
export interface WriteResult {
  /** Segments in order; pass them to readTableFromShm as they are. */
  segments: SegmentRef[];
  /** Sum of the segments' byteSize. */
  byteSize: number;
  rows: number;
  /** Bytes copied into shared memory (the one copy: equals byteSize). */
  copiedBytes: number;
  /** How many segments reused a pooled file instead of a fresh one. */
  reusedSegments: number;
}

/** Writes one planned stream at the start of `mapping`, which must hold at least `plan.byteSize` bytes. */
export function writeStream(plan: SegmentPlan, mapping: ArrayBuffer, path: string): void {
  const target = new Uint8Array(mapping, 0, plan.byteSize);
  let position = 0;
  for (const chunk of [...plan.chunks, EOS]) {
    if (position + chunk.byteLength > plan.byteSize) break;
    target.set(chunk, position);
    position += chunk.byteLength;
  }
  if (position !== plan.byteSize) {
    throw new ShmError(`quiver shm: internal error: segment ${path} got ${position} bytes, planned ${plan.byteSize}`, {
      code: 'ERR_SHM_INTERNAL',
      path,
    });
  }
}

export function checkTable(table: unknown, where: string): Table {
  if (!(table instanceof Table)) {
    throw new ShmArgumentError(`${where}: table must be an apache-arrow Table (from this process's apache-arrow module)`);
  }
  return table;
}

export function writeTable(table: Table, opts: ResolvedShmOptions, idPrefix: string, where: string): WriteResult {
  checkTable(table, where);
  if (typeof idPrefix !== 'string' || idPrefix.length === 0) {
    throw new ShmArgumentError(`${where}: idPrefix must be a non-empty string of [A-Za-z0-9._-], got ${describe(idPrefix)}`);
  }
  checkId(`${idPrefix}-0`, where, 'idPrefix + "-<n>"');
  const plans = planSegments(table, opts.maxSegmentBytes, where);
  ensureDir(opts.dir);
  const segments: SegmentRef[] = [];
  const written: string[] = [];
  let reusedSegments = 0;
  try {
    plans.forEach((plan, index) => {
      const id = `${idPrefix}-${index}`;
      const segment = acquireSegment(opts, id, plan.byteSize);
      written.push(segment.path);
      if (segment.reused) reusedSegments += 1;
      try {
        writeStream(plan, segment.mapping, segment.path);
      } finally {
        native.unmap(segment.mapping);
      }
      segments.push({ id, byteSize: plan.byteSize });
    });
  } catch (e) {
    for (const path of written) unlinkIfPresent(path);
    throw e;
  }
  const byteSize = segments.reduce((sum, s) => sum + s.byteSize, 0);
  return { segments, byteSize, rows: table.numRows, copiedBytes: byteSize, reusedSegments };
}

/** Result of {@link readTable}. */
export interface ReadResult {
  /** Columns are views into `mappings`; valid as long as the segments are not released. */
  table: Table;
  /** One read-only mapping per segment, in order. */
  mappings: ArrayBuffer[];
}

function checkRef(ref: unknown, where: string): SegmentRef {
  const r = ref as Partial<SegmentRef> | null;
  if (typeof r !== 'object' || r === null || !Number.isSafeInteger(r.byteSize) || (r.byteSize as number) < EOS_BYTES) {
    throw new ShmArgumentError(`${where}: each segment must be { id, byteSize } as returned by writeTableToShm`);
  }
  return { id: checkId(r.id, where), byteSize: r.byteSize as number };
}

export function readTable(refs: readonly SegmentRef[], dir: string, where: string): ReadResult {
  checkDirSafety(dir);
  return readStreams(refs, where, (ref) => {
    const path = segmentPath(dir, ref.id);
    return { path, mapping: native.openReadOnly(path) };
  });
}

/** Opens each ref with `open` (a read-only mapping whose first `byteSize` bytes are its stream) and reads them as one table. */
export function readStreams(
  refs: readonly SegmentRef[],
  where: string,
  open: (ref: SegmentRef) => { path: string; mapping: ArrayBuffer },
): ReadResult {
  if (!Array.isArray(refs) || refs.length === 0) {
    throw new ShmArgumentError(`${where}: segments must be a non-empty array of SegmentRefs (as returned by writeTableToShm)`);
  }
  const checked = refs.map((r) => checkRef(r, where));
  const mappings: ArrayBuffer[] = [];
  const batches: RecordBatch[] = [];
  let schema: Schema | null = null;
  try {
    for (const [index, ref] of checked.entries()) {
      // The opener gets the ref as given: it may carry more than { id, byteSize } (a region's broker).
      const { path, mapping } = open(refs[index] as SegmentRef);
      mappings.push(mapping);
      if (mapping.byteLength < ref.byteSize) {
        throw new ShmCorruptSegmentError(
          `${where}: segment ${path} holds ${mapping.byteLength} bytes, its reference says ${ref.byteSize}; was it released and reused?`,
          { path },
        );
      }
      const stream = parseStream(new Uint8Array(mapping, 0, ref.byteSize), path, where);
      if (schema === null) {
        schema = stream.schema;
      } else if (!util.compareSchemas(schema, stream.schema)) {
        throw new ShmCorruptSegmentError(`${where}: segment ${path} has a different schema from the first segment`, {
          path,
        });
      }
      batches.push(...stream.batches);
    }
  } catch (e) {
    unmapAll(mappings);
    throw e;
  }
  return { table: new Table(schema as Schema, batches), mappings };
}

function parseStream(bytes: Uint8Array, path: string, where: string): { schema: Schema; batches: RecordBatch[] } {
  try {
    const reader = RecordBatchReader.from(bytes);
    reader.open();
    if (!reader.isStream()) throw new Error('not an Arrow IPC stream');
    const batches = reader.readAll();
    return { schema: reader.schema, batches };
  } catch (cause) {
    throw new ShmCorruptSegmentError(
      `${where}: segment ${path} is not a readable Arrow IPC stream: ${(cause as Error).message ?? String(cause)}`,
      { path, cause },
    );
  }
}

export function unmapAll(mappings: readonly ArrayBuffer[]): void {
  for (const mapping of mappings) native.unmap(mapping);
}

/**
 * True when every non-empty buffer of every column (values, offsets,
 * validity, type ids, variadic buffers, children, dictionaries) is a view
 * into one of `mappings`.
 */
export function isViewOf(table: Table, mappings: readonly ArrayBuffer[]): boolean {
  const owners = new Set<ArrayBufferLike>(mappings);
  const seen = new Set<Data>();
  const inMapping = (buffer: ArrayBufferView | undefined | null): boolean =>
    buffer === undefined || buffer === null || buffer.byteLength === 0 || owners.has(buffer.buffer);
  const visit = (data: Data): boolean => {
    if (seen.has(data)) return true;
    seen.add(data);
    const buffers: (ArrayBufferView | undefined)[] = [
      data.values as ArrayBufferView | undefined,
      data.valueOffsets as ArrayBufferView | undefined,
      data.nullBitmap,
      data.typeIds as ArrayBufferView | undefined,
      ...(data.variadicBuffers ?? []),
    ];
    return (
      buffers.every(inMapping) &&
      data.children.every(visit) &&
      (data.dictionary === undefined || data.dictionary.data.every(visit))
    );
  };
  for (let i = 0; i < table.numCols; i++) {
    const column = table.getChildAt(i);
    if (column !== null && !column.data.every(visit)) return false;
  }
  return true;
}
