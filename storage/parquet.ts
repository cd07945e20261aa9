import { Table, tableFromIPC, tableToIPC } from 'apache-arrow';
import { CorruptDataFileError } from './errors.ts';
import type { ObjectStore } from './object-store.ts';
import { FooterError, compactRowGroupFile, footerLengthFromTrailer, parseFooter, type ParquetFooter } from './parquet-footer.ts';

/** Rows per Parquet row group: the unit of pruning and of caching. @default 131072 */
export const DEFAULT_ROW_GROUP_ROWS = 131_072;
/** parquet-wasm, loaded on first use: commands that never touch Parquet do not pay ~80 ms for it. */
let parquetWasm: Promise<typeof import('parquet-wasm')> | null = null;
const loadParquetWasm = () => (parquetWasm ??= import('parquet-wasm'));

/** The tail read first when opening a file; small footers (most) need no second request. */
const TAIL_BYTES = 64 * 1024;

/**
 * Encodes a table as Parquet: snappy, chunk-level statistics (min, max, null count per column
 * and row group), row groups of `rowGroupRows`. The Arrow schema travels in the file's metadata,
 * so dictionaries and timestamp units read back as written.
 */
export async function encodeParquet(table: Table, rowGroupRows = DEFAULT_ROW_GROUP_ROWS): Promise<Uint8Array> {
  const { Compression, EnabledStatistics, Table: WasmTable, WriterPropertiesBuilder, writeParquet } = await loadParquetWasm();
  const props = new WriterPropertiesBuilder()
    .setCompression(Compression.SNAPPY)
    .setMaxRowGroupSize(rowGroupRows)
    .setStatisticsEnabled(EnabledStatistics.Chunk)
    .setCreatedBy('quiver')
    .build();
  return writeParquet(WasmTable.fromIPCStream(tableToIPC(table, 'stream')), props);
}

/** Reads a whole Parquet file held in memory (imports). */
export async function decodeParquet(bytes: Uint8Array, name: string): Promise<Table> {
  try {
    footerLengthFromTrailer(bytes.subarray(Math.max(0, bytes.length - 8)), bytes.length);
    // Our bounded reader first: a crafted footer is refused here rather than handed to the wasm decoder.
    parseFooter(bytes);
  } catch (error) {
    throw new CorruptDataFileError(name, (error as Error).message, { cause: error });
  }
  const { readParquet } = await loadParquetWasm();
  try {
    return tableFromIPC(readParquet(bytes, { batchSize: 1_048_576 }).intoIPCStream());
  } catch (error) {
    throw new CorruptDataFileError(name, (error as Error).message, { cause: error });
  }
}

/** Counts every byte fetched from the store on behalf of one scan. */
export interface FetchMeter {
  bytes: number;
  requests: number;
}

/**
 * A data file opened for ranged reads: its footer parsed (byte ranges and statistics of every
 * column chunk). The tail (footer) is read once and kept in `tail`, so reopening the file for
 * another scan costs no request.
 */
export class DataFile {
  private constructor(
    readonly store: ObjectStore,
    readonly key: string,
    readonly size: number,
    readonly tail: Uint8Array,
    readonly footer: ParquetFooter,
  ) {}

  /** Reads the tail and parses the footer. Throws {@link CorruptDataFileError} naming the file. */
  static async open(store: ObjectStore, key: string, size: number, meter: FetchMeter, cachedTail?: Uint8Array): Promise<DataFile> {
    const where = store.describe(key);
    let tail = cachedTail;
    try {
      if (!tail) {
        const start = Math.max(0, size - TAIL_BYTES);
        tail = await fetch(store, key, start, size, meter);
        if (tail.length !== size - start) throw new FooterError(`the file is ${start + tail.length} bytes, but the manifest says ${size} (truncated?)`);
        const footerLength = footerLengthFromTrailer(tail, size);
        if (footerLength > tail.length) tail = await fetch(store, key, size - footerLength - 4, size, meter);
      }
      return new DataFile(store, key, size, tail, parseFooter(tail));
    } catch (error) {
      if (error instanceof FooterError) throw new CorruptDataFileError(where, error.message, { cause: error });
      throw error;
    }
  }

  /**
   * Fetches the chunks of some columns of one row group: one ranged read per column chunk, all
   * at once, each counted in `meter`. Separate from decoding so a scan can fetch the next row
   * groups while it decodes this one.
   */
  async fetchRowGroup(rowGroup: number, columns: readonly string[], meter: FetchMeter): Promise<Map<number, Uint8Array>> {
    const where = this.store.describe(this.key);
    const group = this.footer.rowGroups[rowGroup];
    if (!group) throw new CorruptDataFileError(where, `it has no row group ${rowGroup}`);
    const keep = new Set(columns);
    const chunks = new Map<number, Uint8Array>();
    await Promise.all(
      group.columns.map(async (chunk, index) => {
        if (!keep.has(chunk.column)) return;
        const { start, length } = chunk;
        if (start < 4 || start + length > this.size - this.footer.footerLength) {
          throw new CorruptDataFileError(where, `column chunk ${index} of row group ${rowGroup} lies outside the data (bytes ${start}-${start + length})`);
        }
        const bytes = await fetch(this.store, this.key, start, start + length, meter);
        if (bytes.length !== length) throw new CorruptDataFileError(where, `bytes ${start}-${start + length} are past its end (truncated?)`);
        chunks.set(index, bytes);
      }),
    );
    return chunks;
  }

  /**
   * Decodes fetched chunks of one row group into an Arrow table, through a compact Parquet file
   * holding only them (see compactRowGroupFile). Throws {@link CorruptDataFileError} naming the
   * file when the bytes do not decode.
   */
  async decodeRowGroup(rowGroup: number, columns: readonly string[], chunks: ReadonlyMap<number, Uint8Array>): Promise<Table> {
    const keep = new Set(columns);
    const { readParquet } = await loadParquetWasm();
    try {
      const file = compactRowGroupFile(this.footer, rowGroup, keep, chunks, (schema) => projectArrowSchema(schema, keep));
      const wasm = readParquet(file, { batchSize: Math.max(1, this.footer.rowGroups[rowGroup]!.numRows) });
      return tableFromIPC(wasm.intoIPCStream());
    } catch (error) {
      throw new CorruptDataFileError(this.store.describe(this.key), `row group ${rowGroup} does not decode: ${(error as Error).message ?? String(error)}`, { cause: error });
    }
  }
}

const EOS = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);

/**
 * The `ARROW:schema` footer entry (base64 of an IPC schema message) narrowed to some columns,
 * so the compact file's Arrow schema matches its Parquet schema.
 */
function projectArrowSchema(base64: string, keep: ReadonlySet<string>): string {
  const message = Buffer.from(base64, 'base64');
  const stream = new Uint8Array(message.length + EOS.length);
  stream.set(message);
  stream.set(EOS, message.length);
  const schema = tableFromIPC(stream).schema;
  const projected = schema.select(schema.fields.filter((f) => keep.has(f.name)).map((f) => f.name));
  const bytes = tableToIPC(new Table(projected), 'stream');
  // Only the schema message: drop the end-of-stream marker.
  return Buffer.from(bytes.subarray(0, bytes.length - EOS.length)).toString('base64');
}

async function fetch(store: ObjectStore, key: string, start: number, end: number, meter: FetchMeter): Promise<Uint8Array> {
  const bytes = await store.get(key, { start, end });
  meter.bytes += bytes.length;
  meter.requests++;
  return bytes;
}

/** Row groups and column chunk byte ranges of a stored data file, read from its footer (for `table show` and tests). */
export async function dataFileLayout(store: ObjectStore, key: string): Promise<ParquetFooter> {
  const size = await store.size(key);
  if (size === null) throw new CorruptDataFileError(store.describe(key), 'it does not exist');
  return (await DataFile.open(store, key, size, { bytes: 0, requests: 0 })).footer;
}
