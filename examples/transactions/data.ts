/**
 * Seeded synthetic transactions for the example pipeline and the benchmarks:
 * `id`, `usd`, `country`, `eventTime`. Columns are filled straight into typed
 * arrays, so ten million rows take about a second.
 */
import {
  Dictionary,
  Field,
  Float64,
  Int32,
  RecordBatch,
  Schema,
  Struct,
  Table,
  TimestampMillisecond,
  Utf8,
  makeData,
  vectorFromArray,
} from 'apache-arrow';

/** Countries counted as European by the example pipeline. */
export const EUROPEAN_COUNTRIES: readonly string[] = Object.freeze([
  'Austria',
  'France',
  'Germany',
  'Ireland',
  'Italy',
  'Netherlands',
  'Poland',
  'Portugal',
  'Spain',
  'Sweden',
]);

/** Every country a transaction can come from: the European ones and ten others. */
export const COUNTRIES: readonly string[] = Object.freeze([
  ...EUROPEAN_COUNTRIES,
  'Australia',
  'Brazil',
  'Canada',
  'China',
  'India',
  'Japan',
  'Mexico',
  'Nigeria',
  'South Africa',
  'United States',
]);

/** Rows per record batch. */
export const TRANSACTION_BATCH_ROWS = 1_000_000;

const YEAR_START_MS = Date.UTC(2023, 0, 1);
const YEAR_MS = Date.UTC(2024, 0, 1) - YEAR_START_MS;
const TWO_POW_32 = 2 ** 32;

const countryType = new Dictionary(new Utf8(), new Int32());

/** Schema of {@link generateTransactions}'s tables. */
export const TRANSACTIONS_SCHEMA = new Schema([
  new Field('id', new Int32(), false),
  new Field('usd', new Float64(), false),
  new Field('country', countryType, false),
  new Field('eventTime', new TimestampMillisecond(), false),
]);

/** mulberry32: small, fast, good enough for test data, same sequence everywhere. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * `rows` transactions, the same for the same `seed`: `id` 0.. in order,
 * `usd` log-uniform between 1 and 10,000 (cents), `country` one of
 * {@link COUNTRIES} (uniform, dictionary-encoded), `eventTime` uniform over
 * 2023. Record batches of {@link TRANSACTION_BATCH_ROWS} rows.
 */
export function generateTransactions(rows: number, seed = 42): Table {
  if (!Number.isSafeInteger(rows) || rows < 0 || rows > 2 ** 31 - 1) {
    throw new RangeError(`generateTransactions: rows must be an integer from 0 to 2^31-1, got ${rows}`);
  }
  if (!Number.isSafeInteger(seed)) throw new RangeError(`generateTransactions: seed must be an integer, got ${seed}`);
  const random = mulberry32(seed);
  // One dictionary shared by every batch: an IPC stream sends it once.
  const dictionary = vectorFromArray(COUNTRIES as string[], new Utf8());
  const structType = new Struct(TRANSACTIONS_SCHEMA.fields);
  const batches: RecordBatch[] = [];
  for (let start = 0; start < rows; start += TRANSACTION_BATCH_ROWS) {
    const length = Math.min(TRANSACTION_BATCH_ROWS, rows - start);
    const id = new Int32Array(length);
    const usd = new Float64Array(length);
    const country = new Int32Array(length);
    const eventTime = new BigInt64Array(length);
    // Little-endian halves of each int64, to skip a BigInt per row.
    const eventTimeWords = new Uint32Array(eventTime.buffer);
    for (let i = 0; i < length; i++) {
      id[i] = start + i;
      usd[i] = Math.round(10 ** (4 * random()) * 100) / 100;
      country[i] = Math.floor(random() * COUNTRIES.length);
      const ms = YEAR_START_MS + Math.floor(random() * YEAR_MS);
      eventTimeWords[2 * i] = ms >>> 0;
      eventTimeWords[2 * i + 1] = Math.floor(ms / TWO_POW_32);
    }
    const [idField, usdField, countryField, eventTimeField] = TRANSACTIONS_SCHEMA.fields as [Field, Field, Field, Field];
    const data = makeData({
      type: structType,
      length,
      nullCount: 0,
      children: [
        makeData({ type: idField.type as Int32, length, nullCount: 0, data: id }),
        makeData({ type: usdField.type as Float64, length, nullCount: 0, data: usd }),
        makeData({ type: countryField.type as typeof countryType, length, nullCount: 0, data: country, dictionary }),
        makeData({ type: eventTimeField.type as TimestampMillisecond, length, nullCount: 0, data: eventTime }),
      ],
    });
    batches.push(new RecordBatch(TRANSACTIONS_SCHEMA, data));
  }
  return new Table(TRANSACTIONS_SCHEMA, batches);
}
