import assert from 'node:assert/strict';
import { linkSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { DuckDBInstance } from '@duckdb/node-api';
import { tableFromArrays } from 'apache-arrow';
import { planOnBranch, planPipeline } from '../planner/index.ts';
import { loadPipeline, PlanError, pipeline, source, step } from '../sdk/index.ts';
import {
  atRef,
  commitStagedMany,
  describeTable,
  expireSnapshots,
  listTables,
  MergeConflictError,
  openTableStore,
  RefNotFoundError,
  scanTable,
  stageTable,
  TableConflictError,
  vacuumTable,
  writeTable,
  type OpenedTableStore,
  type TableStore,
} from '../storage/index.ts';
import { storageBackends } from './storage-backends.ts';
import { fixture, runCli, stepOf, waitFor, withCluster } from './helpers.ts';

const ids = (from: number, n: number) => tableFromArrays({ id: Int32Array.from({ length: n }, (_, i) => from + i) });

async function idsOf(store: TableStore, table: string): Promise<number[]> {
  const { table: t } = await scanTable(store, table, { cache: null });
  return [...(t.getChild('id')!.toArray() as Int32Array)].sort((a, b) => a - b);
}

const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

const storage = storageBackends('br', 12);
const { backends, withStore, dirs } = storage;

/** Every object of the store with its bytes: to prove something changed nothing. */
async function objectsUnder(store: TableStore, prefix: string): Promise<Map<string, string>> {
  const all = new Map<string, string>();
  for (const key of await store.objects.list(prefix)) all.set(key, Buffer.from(await store.objects.get(key)).toString('base64'));
  return all;
}

for (const backend of backends) {
  describe(`branches on ${backend.name}`, () => {
    it('isolates a branch: writes on dev change nothing on main, and creating it copies no data', async () => {
      await withStore(backend, async (store) => {
        await writeTable(store, 'events', ids(0, 100));
        const before = (await store.objects.list('')).length;
        await store.catalog.versions.createBranch('dev');
        // One pointer file locally; with the KV catalog the pointer is a KV entry and no object.
        assert.ok((await store.objects.list('')).length - before <= 1, 'a branch is one pointer, whatever the tables hold');
        const dev = atRef(store, 'dev');
        await writeTable(dev, 'events', ids(100, 50));
        await writeTable(dev, 'fresh', ids(0, 3));
        assert.deepEqual(await idsOf(store, 'events'), range(0, 100));
        assert.deepEqual(await listTables(store), ['events']);
        assert.deepEqual(await idsOf(dev, 'events'), range(0, 150));
        assert.deepEqual(await listTables(dev), ['events', 'fresh']);
        const diff = await store.catalog.versions.diff('main', 'dev');
        assert.deepEqual(diff.map((d) => [d.table, d.a?.rows ?? null, d.b?.rows ?? null]), [['events', 100, 150], ['fresh', null, 3]]);
        await assert.rejects(writeTable(atRef(store, 'nope'), 'events', ids(0, 1)), RefNotFoundError);
        // A tag is an immutable view.
        await store.catalog.versions.createTag('v1', 'dev');
        await writeTable(dev, 'events', ids(150, 1));
        assert.equal((await idsOf(atRef(store, 'v1'), 'events')).length, 150);
        await assert.rejects(writeTable(atRef(store, 'v1'), 'events', ids(0, 1)), /tag or a commit/);
      });
    });

    it('commits several tables at once: a reader at one commit never sees one new and the other old', async () => {
      await withStore(backend, async (store) => {
        await writeTable(store, 'a', ids(0, 1));
        await writeTable(store, 'b', ids(0, 1));
        let writing = true;
        const writer = (async () => {
          for (let i = 1; i <= 6; i++) {
            const [sa, sb] = [await stageTable(store, 'a', ids(i, 1)), await stageTable(store, 'b', ids(i, 1))];
            await commitStagedMany(store, [
              { staged: sa, mode: 'append' },
              { staged: sb, mode: 'append' },
            ]);
          }
          writing = false;
        })();
        let reads = 0;
        while (writing || reads === 0) {
          const commit = await store.catalog.versions.resolve('main');
          const at = atRef(store, commit!);
          assert.deepEqual(await idsOf(at, 'a'), await idsOf(at, 'b'));
          reads++;
        }
        await writer;
        assert.deepEqual(await idsOf(store, 'a'), range(0, 7));
        // A staged write of a table that changed since its base is a conflict for all of them.
        const base = await store.catalog.head('a');
        await writeTable(store, 'a', ids(100, 1));
        const [sa, sb] = [await stageTable(store, 'a', ids(200, 1)), await stageTable(store, 'b', ids(200, 1))];
        await assert.rejects(
          commitStagedMany(store, [
            { staged: sa, mode: 'append', base },
            { staged: sb, mode: 'append' },
          ]),
          TableConflictError,
        );
        assert.deepEqual(await idsOf(store, 'b'), range(0, 7), 'b is unchanged too');
      });
    });

    it('merges: fast-forward, different tables, both appends, and a conflict that leaves the target unchanged', async () => {
      await withStore(backend, async (store) => {
        const v = store.catalog.versions;
        await writeTable(store, 'sales', ids(0, 10));
        await writeTable(store, 'users', ids(0, 5));
        // Fast-forward: main did not move since dev left it.
        await v.createBranch('dev');
        await writeTable(atRef(store, 'dev'), 'sales', ids(10, 5));
        const ff = await v.merge('dev', 'main');
        assert.equal(ff.kind, 'fast-forward');
        assert.equal(ff.commit, await v.resolve('dev'));
        assert.deepEqual(await idsOf(store, 'sales'), range(0, 15));
        // Different tables on each side.
        await v.createBranch('left');
        await writeTable(atRef(store, 'left'), 'users', ids(5, 5));
        await writeTable(store, 'sales', ids(15, 5));
        const different = await v.merge('left', 'main');
        assert.equal(different.kind, 'merge');
        assert.deepEqual(different.tables, ['users']);
        assert.deepEqual(await idsOf(store, 'users'), range(0, 10));
        assert.deepEqual(await idsOf(store, 'sales'), range(0, 20));
        // Both only appended to one table: both appends land.
        await v.createBranch('side');
        await writeTable(atRef(store, 'side'), 'sales', ids(100, 3));
        await writeTable(atRef(store, 'side'), 'sales', ids(103, 2));
        await writeTable(store, 'sales', ids(20, 4));
        const both = await v.merge('side', 'main');
        assert.deepEqual(both.appended, ['sales']);
        assert.deepEqual(await idsOf(store, 'sales'), [...range(0, 24), ...range(100, 5)]);
        assert.equal((await describeTable(store, 'sales')).snapshots.at(-1)!.operation, 'append');
        // A replace on one side and an append on the other: a conflict, and main does not move.
        await v.createBranch('rewrite');
        await writeTable(atRef(store, 'rewrite'), 'sales', ids(0, 1), { mode: 'replace' });
        await writeTable(atRef(store, 'rewrite'), 'users', ids(50, 1), { mode: 'replace' });
        await writeTable(store, 'sales', ids(24, 1));
        await writeTable(store, 'users', ids(10, 1));
        const mainBefore = await objectsUnder(store, 'refs/');
        const headBefore = await v.resolve('main');
        const error = await v.merge('rewrite', 'main').then(
          () => null,
          (e: unknown) => e,
        );
        assert.ok(error instanceof MergeConflictError, String(error));
        assert.equal(error.code, 'ERR_MERGE_CONFLICT');
        assert.deepEqual(error.tables, ['sales', 'users']);
        assert.match(error.message, /sales, users/);
        assert.equal(await v.resolve('main'), headBefore);
        assert.deepEqual(await objectsUnder(store, 'refs/'), mainBefore);
        // Merging what main already has changes nothing.
        assert.equal((await v.merge('left', 'main')).kind, 'up-to-date');
      });
    });

    it('lands every row exactly once when 20 branches append to one table at once and merge', async () => {
      await withStore(backend, async (store) => {
        const v = store.catalog.versions;
        await writeTable(store, 'events', ids(0, 10));
        const N = 20;
        await Promise.all(
          Array.from({ length: N }, async (_, i) => {
            const branch = `run/r${i}`;
            await v.createBranch(branch);
            await writeTable(atRef(store, branch), 'events', ids(1000 * (i + 1), 7));
            await v.merge(branch, 'main');
            await v.deleteBranch(branch);
          }),
        );
        const expected = [...range(0, 10), ...Array.from({ length: N }, (_, i) => range(1000 * (i + 1), 7)).flat()].sort((a, b) => a - b);
        assert.deepEqual(await idsOf(store, 'events'), expected);
        assert.deepEqual((await v.list()).map((r) => r.name), ['main']);
      });
    });

    it('expire and vacuum never remove a file a branch or a tag reads', async () => {
      await withStore(backend, async (store) => {
        const v = store.catalog.versions;
        await writeTable(store, 't', ids(0, 5));
        await v.createTag('first');
        await writeTable(store, 't', ids(100, 5), { mode: 'replace' });
        await v.createBranch('dev');
        await writeTable(store, 't', ids(200, 5), { mode: 'replace' });
        await writeTable(store, 't', ids(300, 5), { mode: 'replace' });
        const before = await store.objects.list('tables/t/data/');
        assert.equal(before.length, 4);
        // By default a snapshot must have been superseded for 7 days: a run pinned to one now still finds it.
        assert.deepEqual((await expireSnapshots(store)).expired, []);
        const later = Date.now() + 3_600_000;
        const { expired } = await expireSnapshots(store, { olderThanMs: 0, keep: 1, now: later });
        // main's current (300) stays; the tag's (0) and dev's (100) are current on a ref; 200 goes.
        assert.deepEqual(expired.map((e) => [e.branch, e.table, e.snapshots.length]), [['main', 't', 1]]);
        assert.equal((await describeTable(store, 't')).snapshots.length, 3);
        const { removed } = await vacuumTable(store, 't', { olderThanMs: 0, now: later });
        // Only the replaced 200 file is read by nobody: tag `first` still holds 0, dev holds 100.
        assert.equal(removed.length, 2, `removed ${removed.join(', ')}`);
        assert.deepEqual(await idsOf(store, 't'), range(300, 5));
        assert.deepEqual(await idsOf(atRef(store, 'dev'), 't'), range(100, 5));
        assert.deepEqual(await idsOf(atRef(store, 'first'), 't'), range(0, 5));
        // Once the tag and branch are gone, their files go too.
        await v.deleteTag('first');
        await v.deleteBranch('dev');
        await expireSnapshots(store, { olderThanMs: 0, now: later });
        await vacuumTable(store, 't', { olderThanMs: 0, now: later });
        assert.equal((await store.objects.list('tables/t/data/')).length, 1);
        assert.deepEqual(await idsOf(store, 't'), range(300, 5));
      });
    });
  });
}

describe('branches, local only', () => {
  it('DuckDB reads a branch table files and gets the same rows', async () => {
    const root = mkdtempSync(join(tmpdir(), 'quiver-branches-duckdb-'));
    dirs.push(root);
    const store = await openTableStore({ kind: 'local', root });
    try {
      await writeTable(store, 'events', ids(0, 1000));
      await store.catalog.versions.createBranch('dev');
      const dev = atRef(store, 'dev');
      await writeTable(dev, 'events', ids(5000, 500));
      const { snapshots } = await describeTable(dev, 'events');
      const manifest = JSON.parse(new TextDecoder().decode(await store.objects.get(snapshots.at(-1)!.manifest))) as { dataFiles: { path: string }[] };
      const files = manifest.dataFiles.map((f) => `'${join(root, f.path)}'`);
      const instance = await DuckDBInstance.create(':memory:');
      const connection = await instance.connect();
      try {
        const reader = await connection.runAndReadAll(`SELECT id FROM read_parquet([${files.join(', ')}]) ORDER BY id`);
        const duck = reader.getRowObjects().map((r) => Number(r.id));
        assert.deepEqual(duck, await idsOf(dev, 'events'));
        assert.equal(duck.length, 1500);
      } finally {
        connection.closeSync();
        instance.closeSync();
      }
    } finally {
      await store.close();
    }
  });

  it('shows tables of a store from before branches on main, and keeps them at the first write', async () => {
    const root = mkdtempSync(join(tmpdir(), 'quiver-branches-legacy-'));
    dirs.push(root);
    // Make a pre-branch store: table metadata as v1.json, no catalog commits, no refs.
    const setup = await openTableStore({ kind: 'local', root });
    await writeTable(setup, 'old', ids(0, 4));
    const head = await setup.catalog.head('old');
    await setup.close();
    linkSync(join(root, head!.metadataKey), join(root, 'tables/old/metadata/v1.json'));
    rmSync(join(root, 'refs'), { recursive: true });
    rmSync(join(root, 'catalog'), { recursive: true });
    const store = await openTableStore({ kind: 'local', root });
    try {
      assert.deepEqual(await listTables(store), ['old']);
      assert.deepEqual(await idsOf(store, 'old'), range(0, 4));
      assert.deepEqual((await store.catalog.versions.list()).map((r) => r.name), ['main']);
      await store.catalog.versions.createBranch('dev');
      await writeTable(store, 'old', ids(4, 1));
      assert.deepEqual(await idsOf(store, 'old'), range(0, 5));
      assert.deepEqual(await idsOf(atRef(store, 'dev'), 'old'), range(0, 4));
      assert.ok(readdirSync(join(root, 'refs/branches/main')).length >= 1);
    } finally {
      await store.close();
    }
  });
});

type Cluster = Parameters<Parameters<typeof withCluster>[0]>[0];

/**
 * Pipelines on each backend. Executors open the store from the environment; with S3 (no
 * conditional writes) the catalog lives in the cluster's own NATS, so the test opens the store
 * with the cluster's connection, and each test has a bucket and a cluster of its own.
 */
const pipelineBackends: { name: string; env(): Record<string, string>; open(cluster: Cluster, env: Record<string, string>): Promise<OpenedTableStore> }[] = [
  {
    name: 'local directory',
    env: () => {
      const root = mkdtempSync(join(tmpdir(), 'quiver-branches-runs-'));
      dirs.push(root);
      return { QUIVER_STORAGE: root };
    },
    open: (_cluster, env) => openTableStore({ kind: 'local', root: env.QUIVER_STORAGE! }),
  },
  {
    name: 'S3 (s3rver)',
    env: () => ({
      QUIVER_STORAGE: `s3://${storage.nextBucket()}`,
      QUIVER_S3_ENDPOINT: storage.s3.endpoint,
      QUIVER_S3_FORCE_PATH_STYLE: '1',
      AWS_ACCESS_KEY_ID: storage.s3.credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: storage.s3.credentials.secretAccessKey,
    }),
    open: (cluster, env) =>
      openTableStore({ kind: 's3', s3: { bucket: env.QUIVER_STORAGE!.slice(5), endpoint: storage.s3.endpoint, credentials: storage.s3.credentials, forcePathStyle: true }, nc: cluster.client.nc }),
  },
];

async function run(cluster: Cluster, file: string, options: { params?: Record<string, string>; branch?: string; transaction?: boolean } = {}) {
  const handle = await cluster.client.run(await loadPipeline(fixture(file)), options);
  const logs: { step: string; line: string }[] = [];
  for await (const e of handle.events()) if (e.type === 'log') logs.push({ step: e.log.step, line: e.log.line });
  const view = await handle.result();
  await handle.release();
  return { view, logs, runId: handle.id };
}

const states = (view: { steps: { name: string; state: string; error?: { message: string } | null }[] }) => JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message]));

for (const backend of pipelineBackends) {
  describe(`branches in pipelines on ${backend.name}`, () => {
    async function onCluster(fn: (cluster: Cluster, store: OpenedTableStore) => Promise<void>): Promise<void> {
      const env = backend.env();
      const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
      Object.assign(process.env, env);
      try {
        await withCluster(async (cluster) => {
          const store = await backend.open(cluster, env);
          try {
            await fn(cluster, store);
          } finally {
            await store.close();
          }
        });
      } finally {
        for (const [k, v] of Object.entries(saved)) {
          if (v === undefined) delete process.env[k];
          else process.env[k] = v;
        }
      }
    }

    it('runs on a branch: reads the branch and writes it, and main changes nothing', async () => {
      await onCluster(async (cluster, store) => {
        const v = store.catalog.versions;
        await writeTable(store, 'events', ids(0, 3));
        await v.createBranch('dev');
        await writeTable(atRef(store, 'dev'), 'events', ids(10, 2));
        const mainRefs = await objectsUnder(store, 'refs/branches/main/');
        const onDev = await run(cluster, 'branches-copy.ts', { branch: 'dev' });
        assert.equal(onDev.view.state, 'succeeded', states(onDev.view));
        assert.deepEqual(await idsOf(atRef(store, 'dev'), 'copy'), [0, 1, 2, 10, 11]);
        assert.deepEqual(await objectsUnder(store, 'refs/branches/main/'), mainRefs, 'main did not move');
        assert.deepEqual(await listTables(store), ['events']);
      });
    });

    it('publishes the tables of a run all or none, in one catalog commit', async () => {
      await onCluster(async (cluster, store) => {
        const v = store.catalog.versions;
        // Two materialized tables, the second of which cannot take the rows: neither is published.
        await writeTable(store, 'second', tableFromArrays({ other: ['x'] }), { mode: 'replace' });
        const beforeBoth = await v.resolve('main');
        const failed = await run(cluster, 'branches-two-tables.ts', { params: { n: '1' } });
        assert.equal(failed.view.state, 'failed');
        assert.match(stepOf(failed.view, '__commit').error?.message ?? '', /cannot append to table "second"/, states(failed.view));
        assert.equal(await v.resolve('main'), beforeBoth);
        assert.ok(!(await listTables(store)).includes('first'), 'first was not published alone');
        await writeTable(store, 'second', ids(0, 0), { mode: 'replace' });
        const both = await run(cluster, 'branches-two-tables.ts', { params: { n: '7' } });
        assert.equal(both.view.state, 'succeeded');
        const at = atRef(store, (await v.resolve('main'))!);
        assert.deepEqual([await idsOf(at, 'first'), await idsOf(at, 'second')], [[7], [7]]);
        assert.ok(both.logs.some((l) => /2 tables were committed in one catalog commit/.test(l.line)));
      });
    });

    it('gates a transaction on its expectations: a failure leaves main byte-identical, a pass merges', async () => {
      await onCluster(async (cluster, store) => {
        const v = store.catalog.versions;
        // A transaction whose expectation fails: main stays byte-identical, the run's branch stays.
        await writeTable(store, 'totals', tableFromArrays({ usd: Float64Array.from([0]) }));
        const mainBefore = await objectsUnder(store, 'refs/branches/main/');
        const headBefore = await v.resolve('main');
        const bad = await run(cluster, 'branches-audited.ts', { params: { bad: 'yes' } });
        assert.equal(bad.view.state, 'failed');
        const check = stepOf(bad.view, 'no_negative');
        assert.equal(check.error?.name, 'ExpectationFailedError');
        assert.match(check.error?.message ?? '', /expectation no_negative failed: 2 negative total\(s\) \(rows 3, bad 2\)/);
        assert.deepEqual(await objectsUnder(store, 'refs/branches/main/'), mainBefore);
        assert.equal(await v.resolve('main'), headBefore);
        assert.deepEqual([...(await scanTable(store, 'totals', { cache: null })).table.getChild('usd')!.toArray()], [0]);
        // Whatever the stage step committed before the run failed is on run/<id>, not on main.
        const runRef = `run/${bad.runId}`;
        const left = await v.resolve(runRef).catch(() => null);
        if (left) assert.ok((await scanTable(atRef(store, runRef), 'totals', { cache: null })).table.numRows >= 1);

        // It passes: the run's branch is merged into main and deleted.
        const good = await run(cluster, 'branches-audited.ts');
        assert.equal(good.view.state, 'succeeded', states(good.view));
        assert.ok(good.logs.some((l) => l.step === 'no_negative' && /expectation no_negative passed: 0 negative total\(s\) \(rows 3, bad 0\)/.test(l.line)));
        assert.ok(good.logs.some((l) => l.step === '__commit' && new RegExp(`merged run/${good.runId} into main`).test(l.line)));
        assert.deepEqual([...(await scanTable(store, 'totals', { cache: null })).table.getChild('usd')!.toArray()], [0, 1, 2, 3]);
        await assert.rejects(v.resolve(`run/${good.runId}`), RefNotFoundError);
      });
    });

    it('merges concurrent event runs of a transactional pipeline: every passing event lands exactly once', async () => {
      await onCluster(async (cluster, store) => {
        const N = 20;
        await cluster.client.deploy(await loadPipeline(fixture('branches-events.ts')));
        await Promise.all([...Array.from({ length: N }, (_, i) => cluster.client.publish('ingest.rows', { n: i + 1 })), cluster.client.publish('ingest.rows', { n: -1 })]);
        const runs = await waitFor(
          `${N + 1} event runs to end`,
          async () => {
            const views = await cluster.client.listRuns({ pipeline: 'ingest' });
            return views.length === N + 1 && views.every((r) => ['succeeded', 'failed', 'cancelled'].includes(r.state)) ? views : null;
          },
          180_000,
        );
        const failed = runs.filter((r) => r.state !== 'succeeded');
        assert.equal(failed.length, 1, states({ steps: failed.flatMap((r) => r.steps) }));
        assert.equal(stepOf(failed[0]!, 'ids_not_negative').error?.name, 'ExpectationFailedError');
        const expected = Array.from({ length: N }, (_, i) => [(i + 1) * 10, (i + 1) * 10 + 1]).flat().sort((a, b) => a - b);
        assert.deepEqual(await idsOf(store, 'ingested'), expected);
        // Merged run branches are gone; the failed run's stays for inspection.
        const left = (await store.catalog.versions.list()).filter((r) => r.name.startsWith('run/')).map((r) => r.name);
        assert.ok(left.every((name) => name === `run/${failed[0]!.runId}`), left.join(', '));
      });
    });
  });
}

describe('branches in plans', () => {
  it('puts sources and materialized tables on the run\'s branch, and rejects bad refs', async () => {
    const plan = (await loadPipeline(fixture('branches-copy.ts'))).plan;
    const onDev = planOnBranch(plan, { branch: 'dev', transaction: true });
    const systems = onDev.steps.flatMap((s) => (s.system ? [s.system] : []));
    assert.deepEqual(
      systems.map((s) => [s.kind, 'ref' in s ? s.ref : undefined, 'branch' in s ? s.branch : undefined, 'transaction' in s ? s.transaction : undefined]),
      [
        ['scan', 'dev', undefined, undefined],
        ['stage', undefined, 'dev', true],
        ['commit', undefined, 'dev', true],
      ],
    );
    assert.deepEqual(planOnBranch(plan, {}), plan);
    assert.throws(() => planOnBranch(plan, { branch: 'no spaces' }), PlanError);
    const pinned = planPipeline(pipeline('p', { s: step({ t: source('t', { ref: 'v1' }) }, ({ t }) => t) }, { branch: 'dev' }));
    const scan = pinned.steps.find((s) => s.system?.kind === 'scan')?.system as { ref?: string } | undefined;
    assert.equal(scan?.ref, 'v1', 'a source naming its ref keeps it');
    assert.throws(() => planPipeline(pipeline('p', { s: step({ t: source('t', { ref: '../x' }) }, ({ t }) => t) })), /the ref of input "t" of step "s" must be a branch or tag name/);
  });
});

describe('branches from the CLI', () => {
  it('drives branches, tags, merges and expiry from the CLI', async () => {
    const root = mkdtempSync(join(tmpdir(), 'quiver-branches-cli-'));
    dirs.push(root);
    const env = { QUIVER_STORAGE: root, QUIVER_NATS_URL: '' };
    const cli = await openTableStore({ kind: 'local', root: env.QUIVER_STORAGE });
    try {
      await writeTable(cli, 'sales', ids(0, 4));
      const create = await runCli(['branch', 'create', 'dev'], { env });
      assert.equal(create.code, 0, create.stderr);
      await writeTable(atRef(cli, 'dev'), 'sales', ids(4, 2));
      const show = await runCli(['table', 'show', 'sales', '--ref', 'dev', '--json'], { env });
      assert.equal(JSON.parse(show.stdout).rows, 6);
      const diff = await runCli(['branch', 'diff', 'main', 'dev'], { env });
      assert.match(diff.stdout, /sales\s+4\s+6\s+\+2 rows/);
      const tag = await runCli(['tag', 'create', 'before', '--at', 'main'], { env });
      assert.equal(tag.code, 0, tag.stderr);
      const merge = await runCli(['branch', 'merge', 'dev', '--into', 'main'], { env });
      assert.match(merge.stdout, /merged dev into main \(fast-forward\): sales changed/);
      const list = await runCli(['branch', 'list', '--json'], { env });
      assert.deepEqual((JSON.parse(list.stdout) as { name: string; kind: string }[]).map((r) => [r.name, r.kind]), [['dev', 'branch'], ['main', 'branch'], ['before', 'tag']]);
      const missing = await runCli(['branch', 'merge', 'nope'], { env });
      assert.notEqual(missing.code, 0);
      assert.match(missing.stderr, /no branch, tag or catalog commit "nope"/);
      const expire = await runCli(['table', 'expire', '--older-than', '0s'], { env });
      assert.equal(expire.code, 0, expire.stderr);
      assert.equal((await idsOf(atRef(cli, 'before'), 'sales')).length, 4);
      // A failed transactional run says where its tables are and how to drop them.
      const home = mkdtempSync(join(tmpdir(), 'quiver-branches-cli-home-'));
      dirs.push(home);
      const failed = await runCli(['run', fixture('branches-audited.ts'), '--params', 'bad=yes', '--branch', 'dev'], { env: { ...env, QUIVER_HOME: home } });
      assert.equal(failed.code, 1, failed.stderr);
      assert.match(failed.stdout, /expectations:\n {2}✗ no_negative failed: 2 negative total\(s\) \(rows 3, bad 2\)/);
      const runId = /run (\w{26}):/.exec(failed.stdout)?.[1];
      assert.ok(runId, failed.stdout);
      assert.match(failed.stdout, new RegExp(`dev is unchanged\\. .* on branch run/${runId}:`));
      assert.match(failed.stdout, new RegExp(`quiver branch delete run/${runId}`));
      assert.equal((await listTables(atRef(cli, 'dev'))).includes('totals'), false);
    } finally {
      await cli.close();
    }
  });
});
