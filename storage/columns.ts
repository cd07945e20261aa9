import { DataType, type Field, type Int, type Schema } from 'apache-arrow';
import { compareValues } from './filter.ts';
import { PhysicalType, type ColumnChunkInfo } from './parquet-footer.ts';

/**
 * How filters see a column: values of one JS type that compare with < and ===.
 * Dates and timestamps are epoch milliseconds (what apache-arrow's `get` returns for them).
 */
export type ColumnKind = 'number' | 'bigint' | 'string' | 'boolean' | 'temporal' | 'other';
export type ColumnValue = number | bigint | string | boolean;

export function columnKind(type: DataType): ColumnKind {
  if (DataType.isDictionary(type)) return columnKind(type.dictionary);
  if (DataType.isInt(type)) return (type as Int).bitWidth === 64 ? 'bigint' : 'number';
  if (DataType.isFloat(type)) return 'number';
  if (DataType.isUtf8(type) || DataType.isLargeUtf8(type)) return 'string';
  if (DataType.isBool(type)) return 'boolean';
  if (DataType.isDate(type) || DataType.isTimestamp(type)) return 'temporal';
  return 'other';
}

export function kindsOf(schema: Schema): Map<string, ColumnKind> {
  return new Map(schema.fields.map((f: Field) => [f.name, columnKind(f.type)]));
}

/** Min, max and null count of a column over some rows (a row group, a data file). */
export interface ColumnStats {
  min?: ColumnValue;
  max?: ColumnValue;
  nullCount?: number;
}

const MS_PER_DAY = 86_400_000;

/** Decodes a plain-encoded Parquet statistic into the column's filter kind; undefined when unusable. */
export function decodeStat(bytes: Uint8Array | null, chunk: ColumnChunkInfo, kind: ColumnKind, type: DataType, unit: 'ms' | 'us' | 'ns' | undefined): ColumnValue | undefined {
  if (!bytes) return undefined;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const unsigned = DataType.isInt(type) && !(type as Int).isSigned;
  switch (chunk.physicalType) {
    case PhysicalType.BOOLEAN:
      return kind === 'boolean' && bytes.length >= 1 ? bytes[0] !== 0 : undefined;
    case PhysicalType.INT32: {
      if (bytes.length < 4) return undefined;
      const v = unsigned ? view.getUint32(0, true) : view.getInt32(0, true);
      if (kind === 'temporal') return DataType.isDate(type) ? v * MS_PER_DAY : undefined;
      return kind === 'number' ? v : undefined;
    }
    case PhysicalType.INT64: {
      if (bytes.length < 8) return undefined;
      const v = unsigned ? view.getBigUint64(0, true) : view.getBigInt64(0, true);
      if (kind === 'bigint') return v;
      if (kind === 'number') return Number(v);
      if (kind === 'temporal') {
        const divisor = unit === 'us' ? 1_000 : unit === 'ns' ? 1_000_000 : 1;
        return Number(v) / divisor;
      }
      return undefined;
    }
    case PhysicalType.FLOAT:
    case PhysicalType.DOUBLE: {
      const v = chunk.physicalType === PhysicalType.FLOAT ? (bytes.length >= 4 ? view.getFloat32(0, true) : NaN) : bytes.length >= 8 ? view.getFloat64(0, true) : NaN;
      return kind === 'number' && !Number.isNaN(v) ? v : undefined;
    }
    case PhysicalType.BYTE_ARRAY:
      return kind === 'string' ? new TextDecoder().decode(bytes) : undefined;
    default:
      return undefined;
  }
}

/** Stats as stored in JSON manifests: bigints become strings. */
export function statToJson(value: ColumnValue | undefined): string | number | boolean | undefined {
  return typeof value === 'bigint' ? value.toString() : value;
}

export function statFromJson(value: unknown, kind: ColumnKind): ColumnValue | undefined {
  if (value === undefined || value === null) return undefined;
  if (kind === 'bigint') return typeof value === 'string' || typeof value === 'number' ? BigInt(value) : undefined;
  return value as ColumnValue;
}

/** Merges stats of two parts of one column; an unknown bound on either side makes it unknown. */
export function mergeStats(a: ColumnStats | null, b: ColumnStats): ColumnStats {
  if (!a) return { ...b };
  const out: ColumnStats = {};
  // In the order statistics are written in (byte order for strings), as filters compare them.
  if (a.min !== undefined && b.min !== undefined) out.min = compareValues(b.min, a.min) < 0 ? b.min : a.min;
  if (a.max !== undefined && b.max !== undefined) out.max = compareValues(b.max, a.max) > 0 ? b.max : a.max;
  if (a.nullCount !== undefined && b.nullCount !== undefined) out.nullCount = a.nullCount + b.nullCount;
  return out;
}
