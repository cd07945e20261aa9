import { Bool, Float64, Int32, Int64, TimestampMillisecond, Utf8, makeBuilder, Table, type DataType } from 'apache-arrow';
import { StorageError } from './errors.ts';

const INTEGER = /^[-+]?\d+$/;
const TIMESTAMP = /^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?(?:Z|[+-]\d{2}:?\d{2})?$/;

/** Splits CSV text (RFC 4180: quotes, doubled quotes, newlines inside quotes, CRLF) into rows. */
function parseRows(text: string, name: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  let line = 1;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') {
          field += '"';
          i++;
        } else quoted = false;
      } else {
        if (c === '\n') line++;
        field += c;
      }
    } else if (c === '"' && field === '') quoted = true;
    else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      row.push(field);
      rows.push(row);
      row = [];
      field = '';
      line++;
    } else field += c;
  }
  if (quoted) throw new StorageError('ERR_TABLE_SCHEMA', `${name}: a quoted field is not closed (line ${line})`);
  if (field !== '' || row.length > 0) {
    row.push(field);
    rows.push(row);
  }
  return rows.filter((r) => !(r.length === 1 && r[0] === ''));
}

/** The narrowest type every non-empty value of a column fits: int32, int64, float64, bool, timestamp, else utf8. */
function inferType(values: readonly string[]): DataType {
  const present = values.filter((v) => v !== '');
  if (present.length === 0) return new Utf8();
  if (present.every((v) => INTEGER.test(v))) {
    return present.every((v) => Math.abs(Number(v)) <= 2 ** 31 - 1) ? new Int32() : new Int64();
  }
  if (present.every((v) => v.trim() !== '' && Number.isFinite(Number(v)))) return new Float64();
  if (present.every((v) => /^(true|false)$/i.test(v))) return new Bool();
  if (present.every((v) => TIMESTAMP.test(v) && !Number.isNaN(Date.parse(v.replace(' ', 'T'))))) return new TimestampMillisecond();
  return new Utf8();
}

function convert(value: string, type: DataType): unknown {
  if (value === '') return null;
  if (type instanceof Int32 || type instanceof Float64) return Number(value);
  if (type instanceof Int64) return BigInt(value);
  if (type instanceof Bool) return value.toLowerCase() === 'true';
  if (type instanceof TimestampMillisecond) return Date.parse(/[zZ]|[+-]\d{2}:?\d{2}$/.test(value.slice(10)) ? value.replace(' ', 'T') : `${value.replace(' ', 'T')}${value.length === 10 ? 'T00:00:00' : ''}Z`);
  return value;
}

/**
 * Reads CSV with a header row into an Arrow table, inferring each column's type from its
 * values; empty fields are NULL. Timestamps without an offset are taken as UTC.
 */
export function readCsv(text: string, name: string): Table {
  const rows = parseRows(text.replace(/^\uFEFF/, ''), name);
  const header = rows.shift();
  if (!header || header.every((h) => h.trim() === '')) throw new StorageError('ERR_TABLE_SCHEMA', `${name} has no header row`);
  const names = header.map((h) => h.trim());
  const duplicate = names.find((n, i) => names.indexOf(n) !== i);
  if (duplicate !== undefined) throw new StorageError('ERR_TABLE_SCHEMA', `${name}: column "${duplicate}" appears twice in the header`);
  rows.forEach((r, i) => {
    if (r.length !== names.length) {
      throw new StorageError('ERR_TABLE_SCHEMA', `${name}: row ${i + 2} has ${r.length} fields, the header has ${names.length}`);
    }
  });
  const columns = names.map((column, c) => {
    const values = rows.map((r) => r[c]!);
    const type = inferType(values);
    const builder = makeBuilder({ type, nullValues: [null] });
    for (const v of values) builder.append(convert(v, type) as never);
    return [column, builder.finish().toVector()] as const;
  });
  return new Table(Object.fromEntries(columns));
}
