import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { tableFromArrays } from 'apache-arrow';
import { startNatsServer, startS3Server, type NatsServer, type S3Server } from '../infra/index.ts';
import { encodeParquet, openTableStore, scanTable } from '../storage/index.ts';
import { runCli } from './helpers.ts';

describe('quiver table', () => {
  let dir: string;
  let env: Record<string, string>;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'quiver-table-cli-'));
    // Its own home too: a `quiver up` cluster of this checkout must not be found.
    env = { QUIVER_STORAGE: join(dir, 'storage'), QUIVER_HOME: join(dir, 'home') };
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('imports CSV and Parquet files, lists tables and shows schema, snapshots and row counts', async () => {
    const csv = join(dir, 'people.csv');
    writeFileSync(csv, 'id,score,name,joined,active\n1,2.5,"Smith, Ann",2024-01-01,true\n2,,"say ""hi""",2024-01-02 10:00:00,false\n3,7,Bo,2024-03-01T00:00:00Z,TRUE\n');
    const imported = await runCli(['table', 'import', csv, '--name', 'people'], { env });
    assert.equal(imported.code, 0, imported.stderr);
    assert.match(imported.stdout, /created table people: 3 rows, snapshot [0-9A-Z]{26} \(version 1\)/);

    const parquet = join(dir, 'more.parquet');
    writeFileSync(parquet, await encodeParquet(tableFromArrays({ id: Int32Array.from([4, 5]), score: Float64Array.from([1, 2]) })));
    const other = await runCli(['table', 'import', parquet, '--name', 'scores'], { env });
    assert.equal(other.code, 0, other.stderr);
    const again = await runCli(['table', 'import', parquet, '--name', 'scores', '--mode', 'append'], { env });
    assert.match(again.stdout, /appended to table scores: 2 rows/);

    const list = await runCli(['table', 'list', '--json'], { env });
    assert.equal(list.code, 0, list.stderr);
    const tables = JSON.parse(list.stdout) as { name: string; rows: number; snapshots: number }[];
    assert.deepEqual(tables.map((t) => [t.name, t.rows, t.snapshots]), [['people', 3, 1], ['scores', 4, 2]]);

    const show = await runCli(['table', 'show', 'people'], { env });
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, /table people: 3 rows in 1 file/);
    for (const line of [/id\s+Int32/, /score\s+Float64/, /name\s+Utf8/, /joined\s+Timestamp<MILLISECOND>/, /active\s+Bool/, /append\s+3\s+3\s+1\s+current/]) assert.match(show.stdout, line);

    const store = await openTableStore({ kind: 'local', root: env.QUIVER_STORAGE! });
    const { table } = await scanTable(store, 'people', { cache: null });
    assert.deepEqual(table.toArray().map((r) => r.toJSON()), [
      { id: 1, score: 2.5, name: 'Smith, Ann', joined: Date.UTC(2024, 0, 1), active: true },
      { id: 2, score: null, name: 'say "hi"', joined: Date.UTC(2024, 0, 2, 10), active: false },
      { id: 3, score: 7, name: 'Bo', joined: Date.UTC(2024, 2, 1), active: true },
    ]);
    await store.close();
  });

  it('creates the example transactions table', async () => {
    const made = await runCli(['table', 'generate-example', '--rows', '5000', '--seed', '3'], { env });
    assert.equal(made.code, 0, made.stderr);
    const show = await runCli(['table', 'show', 'transactions', '--json'], { env });
    const described = JSON.parse(show.stdout) as { rows: number; fields: { name: string }[] };
    assert.equal(described.rows, 5000);
    assert.deepEqual(described.fields.map((f) => f.name), ['id', 'usd', 'country', 'eventTime']);
  });

  it('says what is wrong: a missing table, a corrupt file, a bad mode', async () => {
    const missing = await runCli(['table', 'show', 'nope'], { env });
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /quiver: table "nope" does not exist; the tables are: /);
    const bad = join(dir, 'bad.parquet');
    writeFileSync(bad, 'not parquet at all');
    const corrupt = await runCli(['table', 'import', bad, '--name', 'x'], { env });
    assert.equal(corrupt.code, 2);
    assert.match(corrupt.stderr, /data file .*bad\.parquet is not valid Parquet: it does not end with the Parquet magic/);
    const mode = await runCli(['table', 'import', bad, '--name', 'x', '--mode', 'upsert'], { env });
    assert.equal(mode.code, 2);
    assert.match(mode.stderr, /--mode takes append or replace/);
  });

  describe('on S3', () => {
    let s3: S3Server;
    let nats: NatsServer;
    before(async () => {
      s3 = await startS3Server();
      nats = await startNatsServer({ dir: mkdtempSync(join(tmpdir(), 'quiver-table-cli-nats-')) });
    });
    after(async () => {
      await nats?.stop();
      await s3?.stop();
    });

    it('reads the S3 settings from the environment and commits through the NATS catalog', async () => {
      const s3env = {
        QUIVER_STORAGE: 's3://quiver/warehouse',
        QUIVER_S3_ENDPOINT: s3.endpoint,
        AWS_ACCESS_KEY_ID: s3.credentials.accessKeyId,
        AWS_SECRET_ACCESS_KEY: s3.credentials.secretAccessKey,
        QUIVER_NATS_URL: nats.url,
        QUIVER_HOME: join(dir, 'home'),
      };
      const made = await runCli(['table', 'generate-example', '--rows', '2000'], { env: s3env });
      assert.equal(made.code, 0, made.stderr);
      assert.match(made.stdout, /in s3:\/\/quiver\/warehouse/);
      const list = await runCli(['table', 'list', '--json'], { env: s3env });
      assert.deepEqual(JSON.parse(list.stdout).map((t: { name: string; rows: number }) => [t.name, t.rows]), [['transactions', 2000]]);
      const noCatalog = await runCli(['table', 'list'], { env: { ...s3env, QUIVER_NATS_URL: '' } });
      assert.equal(noCatalog.code, 2);
      assert.match(noCatalog.stderr, /needs either a server that honours conditional PUTs \(set QUIVER_S3_CONDITIONAL_WRITES=1\) or a NATS/);
    });
  });
});
