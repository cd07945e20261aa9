import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { DuckDBInstance } from '@duckdb/node-api';
import { Bool, Dictionary, Field, Float64, Int32, Int64, List, Schema, Struct, Table, TimestampMillisecond, Utf8, makeBuilder, tableFromArrays, vectorFromArray } from 'apache-arrow';
import {
  ColumnCache,
  CorruptDataFileError,
  dataFileLayout,
  describeTable,
  FilterSyntaxError,
  openTableStore,
  scanTable,
  StorageError,
  TableConflictError,
  TableNotFoundError,
  UnknownColumnError,
  writeTable,
  type OpenedTableStore,
} from '../storage/index.ts';
import { storageBackends } from './storage-backends.ts';

const ROWS = 100_000;
const ROW_GROUP_ROWS = 10_000;

/** Ten float columns c0..c9 and a sorted id; c{k} = id * (k + 1). */
function wideTable(rows = ROWS, offset = 0): Table {
  const columns: Record<string, Float64Array | Int32Array> = { id: Int32Array.from({ length: rows }, (_, i) => i + offset) };
  for (let c = 0; c < 10; c++) columns[`c${c}`] = Float64Array.from({ length: rows }, (_, i) => (i + offset) * (c + 1) + Math.sin(i));
  return tableFromArrays(columns);
}

const COUNTRIES = ['France', 'Spain', 'Japan', 'Brazil', "Côte d'Ivoire"];

/** A table of the types filters and DuckDB care about, with NULLs. */
function mixedTable(rows: number): Table {
  const schema = new Schema([
    new Field('id', new Int32(), false),
    new Field('big', new Int64(), false),
    new Field('usd', new Float64(), true),
    new Field('name', new Utf8(), true),
    new Field('country', new Dictionary(new Utf8(), new Int32()), false),
    new Field('flag', new Bool(), false),
    new Field('at', new TimestampMillisecond(), false),
  ]);
  const start = Date.UTC(2024, 0, 1);
  const values = {
    id: Array.from({ length: rows }, (_, i) => i),
    big: Array.from({ length: rows }, (_, i) => BigInt(i) * 10_000_000_000n),
    usd: Array.from({ length: rows }, (_, i) => (i % 7 === 0 ? null : (i * 37) % 1000 + 0.5)),
    name: Array.from({ length: rows }, (_, i) => (i % 5 === 0 ? null : `n${i % 13}`)),
    country: Array.from({ length: rows }, (_, i) => COUNTRIES[i % COUNTRIES.length]!),
    flag: Array.from({ length: rows }, (_, i) => i % 3 === 0),
    at: Array.from({ length: rows }, (_, i) => start + i * 3_600_000),
  };
  const vectors = schema.fields.map((f) => {
    const builder = makeBuilder({ type: f.type, nullValues: [null] });
    for (const v of values[f.name as keyof typeof values]) builder.append(v as never);
    return builder.finish().toVector();
  });
  return new Table(Object.fromEntries(schema.fields.map((f, i) => [f.name, vectors[i]!])));
}

function rowsOf(table: Table): Record<string, unknown>[] {
  return table.toArray().map((r) => ({ ...(r as { toJSON(): Record<string, unknown> }).toJSON() }));
}

const storage = storageBackends('b', 20);
const { backends, withStore, dirs } = storage;

for (const backend of backends) {
  describe(`stored tables on ${backend.name}`, () => {
    it('reads 2 of 10 columns for at most a quarter of the bytes of a full scan', async () => {
      await withStore(backend, async (store) => {
        const table = wideTable();
        await writeTable(store, 'wide', table, { rowGroupRows: ROW_GROUP_ROWS });
        const full = await scanTable(store, 'wide', { cache: null });
        const two = await scanTable(store, 'wide', { columns: ['c3', 'c7'], cache: null });
        assert.equal(full.table.numRows, ROWS);
        assert.deepEqual(two.table.schema.fields.map((f) => f.name), ['c3', 'c7']);
        assert.deepEqual(two.table.getChild('c7')!.toArray(), table.getChild('c7')!.toArray());
        assert.ok(two.stats.bytesFetched > 0);
        assert.ok(
          two.stats.bytesFetched <= 0.25 * full.stats.bytesFetched,
          `2 columns fetched ${two.stats.bytesFetched} bytes, the full scan ${full.stats.bytesFetched}`,
        );
      });
    });

    it('skips row groups whose statistics exclude the filter, and returns exactly the matching rows', async () => {
      await withStore(backend, async (store) => {
        const table = wideTable();
        await writeTable(store, 'wide', table, { rowGroupRows: ROW_GROUP_ROWS });
        const result = await scanTable(store, 'wide', { columns: ['id', 'c1'], filter: 'id >= 25000 AND id < 27500', cache: null });
        assert.equal(result.stats.rowGroupsTotal, ROWS / ROW_GROUP_ROWS);
        assert.equal(result.stats.rowGroupsRead, 1);
        assert.equal(result.stats.rowGroupsSkipped, ROWS / ROW_GROUP_ROWS - 1);
        assert.deepEqual([...result.table.getChild('id')!.toArray()], Array.from({ length: 2500 }, (_, i) => 25_000 + i));
        const full = await scanTable(store, 'wide', { columns: ['id', 'c1'], cache: null });
        assert.ok(result.stats.bytesFetched < full.stats.bytesFetched / 5, `${result.stats.bytesFetched} vs ${full.stats.bytesFetched}`);
      });
    });

    it('evaluates every operator like SQL does, NULLs included', async () => {
      await withStore(backend, async (store) => {
        const table = mixedTable(5000);
        await writeTable(store, 'mixed', table, { rowGroupRows: 1000 });
        const rows = rowsOf(table);
        const jan2 = Date.UTC(2024, 0, 2);
        const cases: [string, (r: Record<string, unknown>) => boolean][] = [
          ['usd > 900', (r) => r.usd !== null && (r.usd as number) > 900],
          ['usd <= 10.5 OR name = \'n3\'', (r) => (r.usd !== null && (r.usd as number) <= 10.5) || r.name === 'n3'],
          ['NOT (usd < 500)', (r) => r.usd !== null && !((r.usd as number) < 500)],
          ['usd IS NULL', (r) => r.usd === null],
          ['name IS NOT NULL AND name != \'n1\'', (r) => r.name !== null && r.name !== 'n1'],
          ["country IN ('France', 'Côte d''Ivoire')", (r) => r.country === 'France' || r.country === "Côte d'Ivoire"],
          ["country NOT IN ('France', 'Spain') AND flag = TRUE", (r) => !['France', 'Spain'].includes(r.country as string) && r.flag === true],
          ['id BETWEEN 100 AND 199', (r) => (r.id as number) >= 100 && (r.id as number) <= 199],
          ['id NOT BETWEEN 100 AND 4899', (r) => (r.id as number) < 100 || (r.id as number) > 4899],
          ['big >= 40000000000000', (r) => (r.big as bigint) >= 40_000_000_000_000n],
          ["at < TIMESTAMP '2024-01-02 00:00:00'", (r) => (r.at as number) < jan2],
          ["at >= DATE '2024-07-01'", (r) => (r.at as number) >= Date.UTC(2024, 6, 1)],
          ['NOT (usd IS NULL OR id > 10)', (r) => !(r.usd === null || (r.id as number) > 10)],
        ];
        for (const [filter, predicate] of cases) {
          const result = await scanTable(store, 'mixed', { filter, cache: null });
          const expected = rows.filter(predicate);
          assert.equal(result.table.numRows, expected.length, filter);
          assert.deepEqual(rowsOf(result.table), expected, filter);
        }
        const skipped = await scanTable(store, 'mixed', { filter: "at < TIMESTAMP '2024-01-02 00:00:00'", cache: null });
        assert.equal(skipped.stats.rowGroupsRead, 1, 'timestamp statistics prune');
      });
    });

    it('fetches only the extra column when the cache holds the others', async () => {
      await withStore(backend, async (store) => {
        await writeTable(store, 'wide', wideTable(), { rowGroupRows: ROW_GROUP_ROWS });
        const cache = new ColumnCache({ maxBytes: 256 * 1024 ** 2 });
        const first = await scanTable(store, 'wide', { columns: ['c1', 'c2'], cache });
        assert.ok(first.stats.bytesFetched > 0);
        const again = await scanTable(store, 'wide', { columns: ['c1', 'c2'], cache });
        assert.equal(again.stats.bytesFetched, 0, 'a repeated scan is served from the cache');
        const more = await scanTable(store, 'wide', { columns: ['c1', 'c2', 'c5'], cache });
        // Exactly the c5 column chunks of every row group, as the footer lays them out.
        const { dataFiles } = JSON.parse(new TextDecoder().decode(await store.objects.get((await describeTable(store, 'wide')).snapshots.at(-1)!.manifest))) as { dataFiles: { path: string }[] };
        let c5Bytes = 0;
        for (const file of dataFiles) {
          const layout = await dataFileLayout(store.objects, file.path);
          for (const rg of layout.rowGroups) c5Bytes += rg.columns.find((c) => c.column === 'c5')!.length;
        }
        assert.equal(more.stats.bytesFetched, c5Bytes);
        assert.deepEqual([...more.table.getChild('c5')!.toArray()], [...wideTable().getChild('c5')!.toArray()]);
      });
    });

    it('never serves a new snapshot from an older one, and evicts least recently used entries', async () => {
      await withStore(backend, async (store) => {
        const cache = new ColumnCache({ maxBytes: 256 * 1024 ** 2 });
        await writeTable(store, 'wide', wideTable(20_000), { rowGroupRows: ROW_GROUP_ROWS });
        await scanTable(store, 'wide', { columns: ['c1'], cache });
        await writeTable(store, 'wide', wideTable(20_000, 1_000_000), { mode: 'replace', rowGroupRows: ROW_GROUP_ROWS });
        const fresh = await scanTable(store, 'wide', { columns: ['c1'], cache });
        assert.ok(fresh.stats.bytesFetched > 0);
        assert.equal(fresh.stats.cachedChunks, 0);
        assert.equal(fresh.table.getChild('c1')!.get(0), wideTable(1, 1_000_000).getChild('c1')!.get(0));

        const small = new ColumnCache({ maxBytes: 200_000 });
        await scanTable(store, 'wide', { columns: ['c1', 'c2'], cache: small });
        assert.ok(small.bytes <= 200_000, `cache holds ${small.bytes} bytes`);
        assert.ok(small.evictions > 0);
      });
    });

    it('lets exactly one of two concurrent writers commit; the other gets a conflict and nothing of it remains', async () => {
      await withStore(backend, async (store) => {
        await writeTable(store, 'events', wideTable(1000));
        const results = await Promise.allSettled([
          writeTable(store, 'events', wideTable(500, 10_000)),
          writeTable(store, 'events', wideTable(700, 20_000)),
        ]);
        const won = results.filter((r) => r.status === 'fulfilled');
        const lost = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
        assert.equal(won.length, 1);
        assert.equal(lost.length, 1);
        assert.ok(lost[0]!.reason instanceof TableConflictError, String(lost[0]!.reason));
        assert.equal(lost[0]!.reason.code, 'ERR_TABLE_CONFLICT');
        const winnerRows = (won[0] as PromiseFulfilledResult<{ rows: number }>).value.rows;
        const { table } = await scanTable(store, 'events', { columns: ['id'], cache: null });
        assert.equal(table.numRows, 1000 + winnerRows);
        const described = await describeTable(store, 'events');
        assert.equal(described.snapshots.length, 2);
        // The loser's data files were removed: every data file is in the current manifest.
        const manifest = JSON.parse(new TextDecoder().decode(await store.objects.get(described.snapshots.at(-1)!.manifest))) as { dataFiles: { path: string }[] };
        const dataKeys = await store.objects.list('tables/events/data/');
        assert.deepEqual(dataKeys, manifest.dataFiles.map((f) => f.path).sort());
      });
    });

    it('shows readers only complete snapshots while writers commit', async () => {
      await withStore(backend, async (store) => {
        await writeTable(store, 'growing', wideTable(1000), { rowGroupRows: 250 });
        let writing = true;
        const writer = (async () => {
          for (let i = 0; i < 6; i++) await writeTable(store, 'growing', wideTable(1000, (i + 1) * 1000), { rowGroupRows: 250 });
          writing = false;
        })();
        while (writing) {
          const { table } = await scanTable(store, 'growing', { columns: ['id'], cache: null });
          // A snapshot is whole appends of 1000 rows, ids 0.. in order: never a part of one.
          assert.equal(table.numRows % 1000, 0);
          assert.deepEqual([...table.getChild('id')!.toArray()], Array.from({ length: table.numRows }, (_, i) => i));
        }
        await writer;
        assert.equal((await scanTable(store, 'growing', { columns: ['id'], cache: null })).table.numRows, 7000);
      });
    });

    it('reads older snapshots by id and as of a time', async () => {
      await withStore(backend, async (store) => {
        const first = await writeTable(store, 'history', tableFromArrays({ v: Int32Array.from([1, 2, 3]) }));
        await new Promise((r) => setTimeout(r, 5));
        const between = Date.now();
        await new Promise((r) => setTimeout(r, 5));
        await writeTable(store, 'history', tableFromArrays({ v: Int32Array.from([4, 5]) }), { mode: 'append' });
        await writeTable(store, 'history', tableFromArrays({ v: Int32Array.from([9]) }), { mode: 'replace' });
        const values = async (options: object) => [...(await scanTable(store, 'history', { ...options, cache: null })).table.getChild('v')!.toArray()];
        assert.deepEqual(await values({}), [9]);
        assert.deepEqual(await values({ snapshot: first.snapshotId }), [1, 2, 3]);
        assert.deepEqual(await values({ asOf: between }), [1, 2, 3]);
        const described = await describeTable(store, 'history');
        assert.deepEqual(described.snapshots.map((s) => s.summary.totalRows), [3, 5, 1]);
        assert.deepEqual(await values({ snapshot: described.snapshots[1]!.snapshotId }), [1, 2, 3, 4, 5]);
        await assert.rejects(scanTable(store, 'history', { asOf: 0 }), { code: 'ERR_SNAPSHOT_NOT_FOUND' });
        await assert.rejects(scanTable(store, 'history', { snapshot: 'nope' }), /has no snapshot nope; its snapshots are/);
      });
    });

    it('names the data file that is truncated or not Parquet', async () => {
      await withStore(backend, async (store) => {
        await writeTable(store, 'broken', wideTable(5000), { rowGroupRows: 1000 });
        const [path] = await store.objects.list('tables/broken/data/');
        const bytes = await store.objects.get(path!);
        await store.objects.put(path!, bytes.subarray(0, bytes.length >> 1));
        await assert.rejects(scanTable(store, 'broken', { cache: null }), (error: Error) => {
          assert.ok(error instanceof CorruptDataFileError, String(error));
          assert.ok(error.message.includes(path!), error.message);
          return true;
        });
        const garbage = new Uint8Array(bytes.length).fill(7);
        await store.objects.put(path!, garbage);
        await assert.rejects(scanTable(store, 'broken', { cache: null }), (error: Error) => error instanceof CorruptDataFileError && error.message.includes(path!) && /PAR1/.test(error.message));
        // Footer intact, a column chunk overwritten: parquet-wasm's own error, still naming the file.
        const damaged = bytes.slice();
        damaged.fill(0xff, 4, 4000);
        await store.objects.put(path!, damaged);
        await assert.rejects(scanTable(store, 'broken', { cache: null }), (error: Error) => error instanceof CorruptDataFileError && error.message.includes(path!));
      });
    });

    it('says which tables exist when asked for a missing one', async () => {
      await withStore(backend, async (store) => {
        await assert.rejects(scanTable(store, 'nothing'), /table "nothing" does not exist; there are no tables yet/);
        await writeTable(store, 'alpha', tableFromArrays({ v: Int32Array.from([1]) }));
        await writeTable(store, 'beta', tableFromArrays({ v: Int32Array.from([1]) }));
        await assert.rejects(scanTable(store, 'gamma'), (error: Error) => {
          assert.ok(error instanceof TableNotFoundError);
          assert.equal(error.message, 'table "gamma" does not exist; the tables are: alpha, beta');
          return true;
        });
      });
    });
  });
}

describe('filters and columns are checked before reading', () => {
  it('reports syntax errors with the position and what was expected', async () => {
    const store = await backends[0]!.open();
    await writeTable(store, 't', mixedTable(10));
    const bad: [string, RegExp][] = [
      ['usd >', /expected a literal .* at position 5, found the end of the filter/],
      ['usd > 5 AND', /expected a column name at position 11/],
      ['(usd > 5', /expected "\)" at position 8/],
      ["name = 'abc", /expected a closing ' for the string at position 7/],
      ['usd = NULL', /use IS NULL or IS NOT NULL/],
      ["at > DATE '2024-02-30'", /expected a date as 'YYYY-MM-DD' at position 10/],
      ['usd 5', /expected a comparison .* at position 4, found "5"/],
      ['id IN ()', /expected a literal/],
      ['usd > 5 usd', /expected AND, OR or the end of the filter at position 8/],
    ];
    for (const [filter, message] of bad) {
      await assert.rejects(scanTable(store, 't', { filter }), (error: Error) => {
        assert.ok(error instanceof FilterSyntaxError, `${filter}: ${error}`);
        assert.match(error.message, message, filter);
        return true;
      });
    }
    await assert.rejects(scanTable(store, 't', { filter: 'price > 3' }), (error: Error) => {
      assert.ok(error instanceof UnknownColumnError);
      assert.match(error.message, /names column\(s\) "price" that table "t" does not have; its columns are: id, big, usd, name, country, flag, at/);
      return true;
    });
    await assert.rejects(scanTable(store, 't', { columns: ['id', 'nope'] }), /column\(s\) "nope" that table "t" does not have/);
    await assert.rejects(scanTable(store, 't', { filter: "usd > 'cheap'" }), (error: StorageError) => error.code === 'ERR_FILTER_TYPE' && /holds number values, but is compared with the string 'cheap'/.test(error.message));
    await assert.rejects(scanTable(store, 't', { filter: "at > '2024-01-01'" }), /write DATE '2024-01-31'/);
    await store.close();
  });

  it('refuses to trust conditional writes of an S3 server that ignores them', async () => {
    const bucket = storage.nextBucket();
    await assert.rejects(
      openTableStore({ kind: 's3', s3: { bucket, endpoint: storage.s3.endpoint, credentials: storage.s3.credentials, conditionalWrites: true } }),
      (error: StorageError) => error.code === 'ERR_STORAGE_CONFIG' && /ignores If-None-Match on PUT/.test(error.message),
    );
    await assert.rejects(
      openTableStore({ kind: 's3', s3: { bucket, endpoint: storage.s3.endpoint, credentials: storage.s3.credentials } }),
      /needs either a server that honours conditional PUTs .* or a NATS for the table catalog/,
    );
  });

  it('stores and scans nested columns, pruning only by the statistics of scalar ones', async () => {
    const store = await backends[0]!.open();
    const lists = makeBuilder({ type: new List(new Field('item', new Int32(), true)), nullValues: [null] });
    const structs = makeBuilder({ type: new Struct([new Field('a', new Int32(), true), new Field('b', new Utf8(), true)]), nullValues: [null] });
    // Many NULL items, few NULL lists: leaf statistics would call every row NULL.
    for (let i = 0; i < 1000; i++) {
      lists.append((i % 10 === 0 ? null : [null, null, i]) as never);
      structs.append({ a: i, b: `s${i}` } as never);
    }
    const table = new Table({ id: vectorFromArray(Int32Array.from({ length: 1000 }, (_, i) => i)), l: lists.finish().toVector(), s: structs.finish().toVector() });
    await writeTable(store, 'nested', table, { rowGroupRows: 250 });
    const result = await scanTable(store, 'nested', { columns: ['s', 'l'], filter: 'id >= 500 AND l IS NOT NULL', cache: null });
    assert.equal(result.stats.rowGroupsRead, 2);
    assert.equal(result.table.numRows, 450);
    assert.deepEqual(result.table.get(0)!.toJSON().s.toJSON(), { a: 501, b: 's501' });
    assert.deepEqual([...result.table.get(0)!.toJSON().l], [null, null, 501]);
    await store.close();
  });

  it('refuses an append whose columns differ from the table', async () => {
    const store = await backends[0]!.open();
    await writeTable(store, 't', tableFromArrays({ a: Int32Array.from([1]) }));
    await assert.rejects(writeTable(store, 't', tableFromArrays({ b: Int32Array.from([1]) })), { code: 'ERR_TABLE_SCHEMA' });
    await writeTable(store, 't', tableFromArrays({ b: Int32Array.from([1]) }), { mode: 'replace' });
    assert.deepEqual((await describeTable(store, 't')).fields.map((f) => f.name), ['b']);
    await store.close();
  });
});

describe('interop', () => {
  it('DuckDB reads the Parquet files Quiver writes, with identical results', async () => {
    const root = mkdtempSync(join(tmpdir(), 'quiver-storage-duckdb-'));
    dirs.push(root);
    const store = await openTableStore({ kind: 'local', root });
    const table = mixedTable(3000);
    await writeTable(store, 'mixed', table, { rowGroupRows: 1000 });
    const [path] = await store.objects.list('tables/mixed/data/');
    const instance = await DuckDBInstance.create(':memory:');
    const connection = await instance.connect();
    try {
      const reader = await connection.runAndReadAll(
        `SELECT id, big, usd, name, country, flag, epoch_ms("at") AS "at" FROM read_parquet('${join(root, path!)}') ORDER BY id`,
      );
      const duck = reader.getRowObjectsJS();
      const ours = rowsOf((await scanTable(store, 'mixed', { cache: null })).table);
      assert.equal(duck.length, ours.length);
      for (let i = 0; i < ours.length; i++) {
        const d = duck[i]!;
        assert.deepEqual({ ...d, id: Number(d.id), at: Number(d.at) }, ours[i]);
      }
      const filtered = await connection.runAndReadAll(`SELECT count(*) AS n FROM read_parquet('${join(root, path!)}') WHERE usd > 500 AND country IN ('Spain', 'Japan')`);
      const quiver = await scanTable(store, 'mixed', { filter: "usd > 500 AND country IN ('Spain', 'Japan')", cache: null });
      assert.equal(Number(filtered.getRowObjectsJS()[0]!.n), quiver.table.numRows);
    } finally {
      connection.closeSync();
      instance.closeSync();
      await store.close();
    }
  });
});
