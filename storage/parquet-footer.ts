/**
 * Reads a Parquet footer (FileMetaData, Thrift compact protocol) into what scans need and
 * parquet-wasm does not expose: each column chunk's byte range and its statistics. Only fields
 * Quiver uses are interpreted; the rest are skipped by type.
 */

const MAGIC = 0x31524150; // "PAR1", little-endian

/** Physical types (parquet.thrift `Type`). */
export const PhysicalType = { BOOLEAN: 0, INT32: 1, INT64: 2, INT96: 3, FLOAT: 4, DOUBLE: 5, BYTE_ARRAY: 6, FIXED_LEN_BYTE_ARRAY: 7 } as const;

export interface ColumnChunkInfo {
  /** Top-level column name (first element of path_in_schema). */
  column: string;
  physicalType: number;
  /** Where the chunk's pages start (dictionary page first when there is one) and how many bytes they take. */
  start: number;
  length: number;
  numValues: number;
  /** Raw plain-encoded min and max (Statistics.min_value/max_value), null when absent. */
  min: Uint8Array | null;
  max: Uint8Array | null;
  nullCount: number | null;
}

export interface RowGroupInfo {
  numRows: number;
  columns: ColumnChunkInfo[];
}

export interface ParquetFooter {
  numRows: number;
  rowGroups: RowGroupInfo[];
  /** Timestamp unit of each INT64 timestamp column, from the schema's logical or converted type. */
  timestampUnits: Map<string, 'ms' | 'us' | 'ns'>;
  /** Bytes of the footer (metadata + length + magic). */
  footerLength: number;
  /** The decoded FileMetaData, kept to write footers of compacted files. */
  raw: ThriftStruct;
}

/** Malformed bytes; the caller names the file. */
export class FooterError extends Error {}

/** The footer's length (metadata plus the 8-byte trailer), read from the file's last 8 bytes. */
export function footerLengthFromTrailer(trailer: Uint8Array, fileSize: number): number {
  if (fileSize < 12) throw new FooterError(`${fileSize} bytes is too short for a Parquet file (at least 12)`);
  const view = new DataView(trailer.buffer, trailer.byteOffset, trailer.byteLength);
  if (trailer.byteLength < 8 || view.getUint32(trailer.byteLength - 4, true) !== MAGIC) {
    throw new FooterError('it does not end with the Parquet magic "PAR1" (truncated or not Parquet)');
  }
  const metadataLength = view.getUint32(trailer.byteLength - 8, true);
  if (metadataLength + 8 + 4 > fileSize) throw new FooterError(`its footer claims ${metadataLength} bytes, more than the file holds (${fileSize})`);
  return metadataLength + 8;
}

/** Parses the footer; `tail` must hold at least the last `footerLength` bytes of the file. */
export function parseFooter(tail: Uint8Array): ParquetFooter {
  const footerLength = footerLengthFromTrailer(tail, Number.MAX_SAFE_INTEGER);
  if (footerLength > tail.byteLength) throw new FooterError(`its footer claims ${footerLength - 8} bytes, more than the ${tail.byteLength} bytes read`);
  const metadata = tail.subarray(tail.byteLength - footerLength, tail.byteLength - 8);
  let root: ThriftStruct;
  try {
    root = new CompactReader(metadata).readStruct();
  } catch (error) {
    throw new FooterError(`its footer does not decode: ${(error as Error).message}`);
  }
  try {
    return interpret(root, footerLength);
  } catch (error) {
    // A footer that decodes as Thrift but not as FileMetaData (a field of the wrong type, a missing one).
    if (error instanceof FooterError) throw error;
    throw new FooterError(`its footer is not a valid FileMetaData: ${(error as Error).message}`);
  }
}

/** Converted types (parquet.thrift `ConvertedType`) of unsigned integers: UINT_8, UINT_16, UINT_32, UINT_64. */
const UNSIGNED_CONVERTED_TYPES = new Set([11, 12, 13, 14]);

function interpret(root: ThriftStruct, footerLength: number): ParquetFooter {
  const schema = (root.get(2) as ThriftStruct[] | undefined) ?? [];
  const timestampUnits = new Map<string, 'ms' | 'us' | 'ns'>();
  const unsignedColumns = new Set<string>();
  // schema[0] is the root; top-level leaves follow (nested columns are not pruned, so depth is ignored).
  for (const element of schema.slice(1)) {
    const name = decodeString(element.get(4) as Uint8Array);
    const logical = element.get(10) as ThriftStruct | undefined;
    const timestamp = logical?.get(8) as ThriftStruct | undefined;
    const unit = timestamp?.get(2) as ThriftStruct | undefined;
    if (unit) timestampUnits.set(name, unit.has(1) ? 'ms' : unit.has(2) ? 'us' : 'ns');
    else if (element.get(6) === 9) timestampUnits.set(name, 'ms');
    else if (element.get(6) === 10) timestampUnits.set(name, 'us');
    // LogicalType INTEGER (field 10) with isSigned (field 2) false, or a UINT_* converted type.
    const integer = logical?.get(10) as ThriftStruct | undefined;
    if (integer?.get(2) === false || UNSIGNED_CONVERTED_TYPES.has(element.get(6) as number)) unsignedColumns.add(name);
  }
  const rowGroups = ((root.get(4) as ThriftStruct[] | undefined) ?? []).map((rg): RowGroupInfo => {
    const columns = ((rg.get(1) as ThriftStruct[] | undefined) ?? []).map((chunk): ColumnChunkInfo => {
      const meta = chunk.get(3) as ThriftStruct | undefined;
      if (!meta) throw new FooterError('a column chunk has no metadata');
      const path = (meta.get(3) as Uint8Array[]).map(decodeString);
      const dataPage = toNumber(meta.get(9));
      const dictionaryPage = meta.has(11) ? toNumber(meta.get(11)) : 0;
      const stats = meta.get(12) as ThriftStruct | undefined;
      const physicalType = meta.get(1) as number;
      // min_value/max_value order correctly for every type; the deprecated min/max were written in
      // signed order, so they are right only for signed numbers (not bytes, not unsigned integers).
      const legacyOk = physicalType !== PhysicalType.BYTE_ARRAY && physicalType !== PhysicalType.FIXED_LEN_BYTE_ARRAY && !unsignedColumns.has(path[0]!);
      return {
        column: path[0]!,
        physicalType,
        start: dictionaryPage > 0 && dictionaryPage < dataPage ? dictionaryPage : dataPage,
        length: toNumber(meta.get(7)),
        numValues: toNumber(meta.get(5)),
        min: (stats?.get(6) as Uint8Array | undefined) ?? (legacyOk ? (stats?.get(2) as Uint8Array | undefined) : undefined) ?? null,
        max: (stats?.get(5) as Uint8Array | undefined) ?? (legacyOk ? (stats?.get(1) as Uint8Array | undefined) : undefined) ?? null,
        nullCount: stats?.has(3) ? toNumber(stats.get(3)) : null,
      };
    });
    return { numRows: toNumber(rg.get(3)), columns };
  });
  return { numRows: toNumber(root.get(3)), rowGroups, timestampUnits, footerLength, raw: root };
}

/**
 * Thrift structs nest this deep at most: FileMetaData's deepest path (a logical type inside a
 * schema element inside the list) is a handful of levels, so more is a crafted footer.
 */
export const MAX_THRIFT_DEPTH = 32;

type ThriftValue = boolean | number | bigint | Uint8Array | ThriftList | ThriftStruct | ThriftMap;
/** Lists and maps remember their element types, so a footer can be written back as it was read. */
type ThriftList = ThriftValue[] & { elementType: number };
type ThriftMap = Map<ThriftValue, ThriftValue> & { keyType: number; valueType: number };

/** A struct's fields by id, each with its wire type. */
class ThriftStruct {
  readonly fields = new Map<number, { type: number; value: ThriftValue }>();
  get(id: number): ThriftValue | undefined {
    return this.fields.get(id)?.value;
  }
  has(id: number): boolean {
    return this.fields.has(id);
  }
  set(id: number, type: number, value: ThriftValue): this {
    this.fields.set(id, { type, value });
    return this;
  }
  delete(id: number): this {
    this.fields.delete(id);
    return this;
  }
  clone(): ThriftStruct {
    const copy = new ThriftStruct();
    for (const [id, f] of this.fields) copy.fields.set(id, { ...f });
    return copy;
  }
}

const decoder = new TextDecoder();
const decodeString = (bytes: Uint8Array) => decoder.decode(bytes);

function toNumber(value: ThriftValue | undefined): number {
  if (typeof value === 'bigint') return Number(value);
  if (typeof value === 'number') return value;
  throw new FooterError(`expected an integer, got ${value === undefined ? 'nothing' : typeof value}`);
}

/** Element types a list, set or map may hold (compact protocol): bool(1/2) through struct(12). */
function checkElementType(type: number, at: number): void {
  if (type < 1 || type > 12) throw new FooterError(`unknown Thrift element type ${type} at byte ${at}`);
}

/**
 * The Thrift compact protocol, enough to read any struct (unknown fields are skipped by type).
 * Nothing in the bytes is trusted: every count and length is checked against the bytes left
 * and nesting is bounded, so a crafted footer fails at once instead of looping or allocating.
 */
class CompactReader {
  private pos = 0;
  private depth = 0;
  constructor(private readonly bytes: Uint8Array) {}

  private get remaining(): number {
    return this.bytes.length - this.pos;
  }

  /**
   * A container's element count, checked against the bytes left: every element takes at least
   * one byte (booleans too, inside containers), so a count above that cannot be honest and is
   * refused before anything is allocated or looped over.
   */
  private count(size: bigint, bytesPerElement: number, what: string): number {
    if (size < 0n || size * BigInt(bytesPerElement) > BigInt(this.remaining)) {
      throw new FooterError(`a ${what} at byte ${this.pos} claims ${size} elements, but only ${this.remaining} bytes follow`);
    }
    return Number(size);
  }

  /** A boolean element of a list, set or map: one byte, 1 true and 2 (or 0) false. */
  private containerBool(): boolean {
    const b = this.byte();
    if (b !== 0 && b !== 1 && b !== 2) throw new FooterError(`a boolean at byte ${this.pos - 1} is ${b}, not 0, 1 or 2`);
    return b === 1;
  }

  private element(type: number): ThriftValue {
    return type === 1 || type === 2 ? this.containerBool() : this.value(type);
  }

  private byte(): number {
    if (this.pos >= this.bytes.length) throw new FooterError('unexpected end of the footer');
    return this.bytes[this.pos++]!;
  }

  private varint(): bigint {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      const b = this.byte();
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return result;
      shift += 7n;
      if (shift > 70n) throw new FooterError('varint too long');
    }
  }

  private zigzag(): bigint {
    const n = this.varint();
    return (n >> 1n) ^ -(n & 1n);
  }

  private int(): number {
    return Number(this.zigzag());
  }

  private value(type: number): ThriftValue {
    switch (type) {
      case 1:
        return true;
      case 2:
        return false;
      case 3:
        return (this.byte() << 24) >> 24;
      case 4:
      case 5:
        return this.int();
      case 6: {
        const v = this.zigzag();
        return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
      }
      case 7: {
        if (this.pos + 8 > this.bytes.length) throw new FooterError('unexpected end of the footer');
        const v = new DataView(this.bytes.buffer, this.bytes.byteOffset + this.pos, 8).getFloat64(0, true);
        this.pos += 8;
        return v;
      }
      case 8: {
        const declared = this.varint();
        if (declared > BigInt(this.remaining)) throw new FooterError(`a binary field at byte ${this.pos} claims ${declared} bytes, but only ${this.remaining} follow`);
        const length = Number(declared);
        const v = this.bytes.subarray(this.pos, this.pos + length);
        this.pos += length;
        return v;
      }
      case 9:
      case 10: {
        const header = this.byte();
        const size = this.count(header >> 4 === 15 ? this.varint() : BigInt(header >> 4), 1, 'list');
        const elementType = header & 0x0f;
        checkElementType(elementType, this.pos);
        const out = Object.assign([] as ThriftValue[], { elementType });
        this.enter();
        for (let i = 0; i < size; i++) out.push(this.element(elementType));
        this.depth--;
        return out;
      }
      case 11: {
        const declared = this.varint();
        const map = Object.assign(new Map<ThriftValue, ThriftValue>(), { keyType: 0, valueType: 0 });
        if (declared === 0n) return map;
        const types = this.byte();
        // A key and a value per entry: at least two bytes each.
        const size = this.count(declared, 2, 'map');
        map.keyType = types >> 4;
        map.valueType = types & 0x0f;
        checkElementType(map.keyType, this.pos);
        checkElementType(map.valueType, this.pos);
        this.enter();
        for (let i = 0; i < size; i++) map.set(this.element(map.keyType), this.element(map.valueType));
        this.depth--;
        return map;
      }
      case 12:
        return this.readStruct();
      default:
        throw new FooterError(`unknown Thrift type ${type} at byte ${this.pos}`);
    }
  }

  private enter(): void {
    if (++this.depth > MAX_THRIFT_DEPTH) throw new FooterError(`Thrift values nest more than ${MAX_THRIFT_DEPTH} deep at byte ${this.pos}`);
  }

  readStruct(): ThriftStruct {
    const fields = new ThriftStruct();
    let last = 0;
    this.enter();
    for (;;) {
      const header = this.byte();
      if (header === 0) {
        this.depth--;
        return fields;
      }
      const delta = header >> 4;
      const id = delta === 0 ? this.int() : last + delta;
      last = id;
      const type = header & 0x0f;
      fields.set(id, type, this.value(type));
    }
  }
}

/**
 * A small, valid Parquet file holding one row group and only the top-level columns in `keep`:
 * their chunks (given by index in the row group) copied after the magic, and a footer that is
 * the original with the other columns removed from the schema and the row group, offsets
 * rewritten and page indexes dropped. `arrowSchema` rewrites the embedded Arrow schema to match.
 * parquet-wasm decodes it synchronously (its synchronous reader has no column projection, hence
 * the removal): a scan decodes exactly the chunks it fetched, and a damaged one is an ordinary
 * error, not a wasm panic.
 */
export function compactRowGroupFile(
  footer: ParquetFooter,
  rowGroup: number,
  keep: ReadonlySet<string>,
  chunks: ReadonlyMap<number, Uint8Array>,
  arrowSchema: (base64: string) => string,
): Uint8Array {
  const rg = (footer.raw.get(4) as ThriftList)[rowGroup] as ThriftStruct | undefined;
  if (!rg) throw new FooterError(`there is no row group ${rowGroup}`);
  const info = footer.rowGroups[rowGroup]!;
  const columns = rg.get(1) as ThriftList;

  // The schema is a depth-first list: keep the root and the subtrees of kept top-level fields.
  const schema = footer.raw.get(2) as ThriftList;
  const root = (schema[0] as ThriftStruct).clone();
  const keptSchema: ThriftValue[] = [root];
  let at = 1;
  let keptFields = 0;
  const subtree = (): number => {
    const element = schema[at++] as ThriftStruct;
    let size = 1;
    for (let c = 0; c < (element.has(5) ? toNumber(element.get(5)) : 0); c++) size += subtree();
    return size;
  };
  while (at < schema.length) {
    const first = at;
    const name = decodeString((schema[first] as ThriftStruct).get(4) as Uint8Array);
    subtree();
    if (keep.has(name)) {
      keptSchema.push(...schema.slice(first, at));
      keptFields++;
    }
  }
  root.set(5, 5, keptFields);

  let offset = 4;
  const parts: Uint8Array[] = [new Uint8Array([0x50, 0x41, 0x52, 0x31])];
  const keptColumns: ThriftValue[] = [];
  columns.forEach((value, i) => {
    const { column, start, length } = info.columns[i]!;
    if (!keep.has(column)) return;
    const bytes = chunks.get(i);
    if (!bytes || bytes.length !== length) throw new FooterError(`column chunk ${i} of row group ${rowGroup} is ${bytes?.length ?? 0} bytes, its footer says ${length}`);
    const chunk = (value as ThriftStruct).clone();
    const meta = (chunk.get(3) as ThriftStruct).clone();
    for (const id of [4, 5, 6, 7]) chunk.delete(id);
    for (const id of [10, 14, 15]) meta.delete(id);
    const dataPage = toNumber(meta.get(9));
    meta.set(9, 6, offset + (dataPage - start));
    const dictionary = meta.has(11) ? toNumber(meta.get(11)) : 0;
    if (dictionary > 0 && dictionary < dataPage) meta.set(11, 6, offset + (dictionary - start));
    else meta.delete(11);
    parts.push(bytes);
    offset += length;
    keptColumns.push(chunk.set(2, 6, offset).set(3, 12, meta));
  });
  const newRowGroup = rg
    .clone()
    .set(1, 9, Object.assign(keptColumns, { elementType: 12 }))
    .set(6, 6, offset - 4)
    .delete(5)
    .delete(7)
    .delete(4);
  const metadataRoot = footer.raw
    .clone()
    .set(2, 9, Object.assign(keptSchema, { elementType: 12 }))
    .set(3, 6, info.numRows)
    .set(4, 9, Object.assign([newRowGroup] as ThriftValue[], { elementType: 12 }))
    .delete(7);
  const keyValues = footer.raw.get(5) as ThriftList | undefined;
  if (keyValues) {
    const rewritten = keyValues.map((kv) => {
      const entry = kv as ThriftStruct;
      if (decodeString(entry.get(1) as Uint8Array) !== 'ARROW:schema' || !entry.has(2)) return entry;
      return entry.clone().set(2, 8, new TextEncoder().encode(arrowSchema(decodeString(entry.get(2) as Uint8Array))));
    });
    metadataRoot.set(5, 9, Object.assign(rewritten, { elementType: 12 }));
  }
  const metadata = new CompactWriter().struct(metadataRoot).finish();
  const trailer = new Uint8Array(8);
  new DataView(trailer.buffer).setUint32(0, metadata.length, true);
  trailer.set([0x50, 0x41, 0x52, 0x31], 4);
  parts.push(metadata, trailer);
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

class CompactWriter {
  private buffer = new Uint8Array(4096);
  private length = 0;

  private ensure(extra: number): void {
    if (this.length + extra <= this.buffer.length) return;
    const bigger = new Uint8Array(Math.max(this.buffer.length * 2, this.length + extra));
    bigger.set(this.buffer.subarray(0, this.length));
    this.buffer = bigger;
  }

  private byte(b: number): void {
    this.ensure(1);
    this.buffer[this.length++] = b & 0xff;
  }

  private varint(value: bigint): void {
    let v = value;
    while (v >= 0x80n) {
      this.byte(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    this.byte(Number(v));
  }

  private zigzag(value: number | bigint): void {
    const n = BigInt(value);
    this.varint(n >= 0n ? n << 1n : ((-n) << 1n) - 1n);
  }

  private bytes(b: Uint8Array): void {
    this.varint(BigInt(b.length));
    this.ensure(b.length);
    this.buffer.set(b, this.length);
    this.length += b.length;
  }

  private value(type: number, value: ThriftValue): void {
    switch (type) {
      case 1:
      case 2:
        return this.byte(value ? 1 : 2);
      case 3:
        return this.byte(value as number);
      case 4:
      case 5:
      case 6:
        return this.zigzag(value as number | bigint);
      case 7: {
        this.ensure(8);
        new DataView(this.buffer.buffer, this.length, 8).setFloat64(0, value as number, true);
        this.length += 8;
        return;
      }
      case 8:
        return this.bytes(value as Uint8Array);
      case 9:
      case 10: {
        const list = value as ThriftList;
        if (list.length < 15) this.byte((list.length << 4) | list.elementType);
        else {
          this.byte(0xf0 | list.elementType);
          this.varint(BigInt(list.length));
        }
        for (const item of list) this.value(list.elementType, item);
        return;
      }
      case 11: {
        const map = value as ThriftMap;
        this.varint(BigInt(map.size));
        if (map.size === 0) return;
        this.byte((map.keyType << 4) | map.valueType);
        for (const [k, v] of map) {
          this.value(map.keyType, k);
          this.value(map.valueType, v);
        }
        return;
      }
      case 12:
        this.struct(value as ThriftStruct);
        return;
      default:
        throw new FooterError(`cannot write Thrift type ${type}`);
    }
  }

  struct(s: ThriftStruct): this {
    let last = 0;
    for (const id of [...s.fields.keys()].sort((a, b) => a - b)) {
      const { type: wireType, value } = s.fields.get(id)!;
      const type = wireType === 1 || wireType === 2 ? (value ? 1 : 2) : wireType;
      const delta = id - last;
      if (delta > 0 && delta <= 15) this.byte((delta << 4) | type);
      else {
        this.byte(type);
        this.zigzag(id);
      }
      last = id;
      if (type !== 1 && type !== 2) this.value(type, value);
    }
    this.byte(0);
    return this;
  }

  finish(): Uint8Array {
    return this.buffer.slice(0, this.length);
  }
}
