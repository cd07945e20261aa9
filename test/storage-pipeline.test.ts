import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { tableFromArrays } from 'apache-arrow';
import { loadPipeline, PlanError } from '../sdk/index.ts';
import { describeTable, listTables, openTableStore, scanTable, vacuumTable, writeTable, type OpenedTableStore } from '../storage/index.ts';
import { fixture, runFile, stepOf, tempHome, withCluster } from './helpers.ts';

describe('stored tables in pipelines', () => {
  const home = tempHome();
  let store: OpenedTableStore;
  before(async () => {
    // Executors and the client read QUIVER_STORAGE; every cluster of this file shares this store.
    process.env.QUIVER_STORAGE = `${home.dir}/storage`;
    store = await openTableStore({ kind: 'local', root: `${home.dir}/storage` });
    await writeTable(store, 'events', tableFromArrays({ v: Int32Array.from([1, 2, 3, 4]), w: Float64Array.from([0.5, 1.5, 2.5, 3.5]) }));
  });
  after(async () => {
    delete process.env.QUIVER_STORAGE;
    await store.close();
    home.remove();
  });

  it('scans with the filter pushed down and commits the output only when the whole run succeeded', async () => {
    await withCluster(async (cluster, dir) => {
      const failed = await runFile(cluster, dir, fixture('storage-materialize.ts'), { params: { fail: 'yes' } });
      assert.equal(failed.view.state, 'failed');
      assert.equal(stepOf(failed.view, 'kept').state, 'succeeded');
      assert.equal(stepOf(failed.view, '__commit').state, 'skipped');
      assert.deepEqual(await listTables(store), ['events'], 'a failed run commits nothing');

      const ok = await runFile(cluster, dir, fixture('storage-materialize.ts'));
      assert.equal(ok.view.state, 'succeeded', JSON.stringify(ok.view.steps.map((s) => [s.name, s.state, s.error?.message])));
      assert.deepEqual([...ok.view.outputs].sort(), ['kept', 'sibling'], 'system steps are not outputs');
      const scanLog = ok.logs.find((l) => l.step === '__scan_events')?.line ?? '';
      assert.match(scanLog, /scanned events at snapshot \w+: 1 column\(s\), 1 of 1 row groups read .* 3 of 4 rows kept, [\d.]+ KB fetched/);
      const scan = stepOf(ok.view, '__scan_events').scan;
      assert.equal(scan?.table, 'events', 'the run view carries what the scan read');
      assert.equal(scan?.rowGroupsRead, 1);
      assert.ok(scan!.bytesFetched > 0 || scan!.cachedChunks > 0, 'fetched, or served by the cache the failed run filled');
      assert.ok(ok.logs.some((l) => l.step === '__commit' && /committed snapshot \w+ of table kept \(append, 3 rows, version 1\)/.test(l.line)));
      assert.deepEqual([...(await scanTable(store, 'kept', { cache: null })).table.getChild('v')!.toArray()], [2, 3, 4]);

      const again = await runFile(cluster, dir, fixture('storage-materialize.ts'));
      assert.equal(again.view.state, 'succeeded');
      const kept = await describeTable(store, 'kept');
      assert.deepEqual(kept.snapshots.map((s) => [s.operation, s.summary.totalRows]), [['append', 3], ['append', 6]]);

      // Files the failed runs staged were never referenced; vacuum removes them and nothing else.
      const failedAgain = await runFile(cluster, dir, fixture('storage-materialize.ts'), { params: { fail: 'yes' } });
      assert.equal(failedAgain.view.state, 'failed');
      const files = await store.objects.list('tables/kept/data/');
      assert.equal(files.length, 4, 'two committed data files and one staged by each failed run');
      assert.deepEqual((await vacuumTable(store, 'kept', { olderThanMs: 60_000 })).removed, [], 'young files are left alone: a run may still commit them');
      const { removed } = await vacuumTable(store, 'kept', { olderThanMs: 0, now: Date.now() + 1 });
      assert.equal(removed.length, 2);
      assert.deepEqual(await store.objects.list('tables/kept/data/'), files.filter((f) => !removed.includes(f)));
      assert.equal((await scanTable(store, 'kept', { cache: null })).table.numRows, 6);
      assert.equal((await scanTable(store, 'kept', { snapshot: kept.snapshots[0]!.snapshotId, cache: null })).table.numRows, 3);
    });
  });

  it('pins the snapshot current at submit, and the scan reads exactly it', async () => {
    await withCluster(async (cluster) => {
      const loaded = await loadPipeline(fixture('storage-materialize.ts'));
      const handle = await cluster.client.run(loaded);
      const before = (await describeTable(store, 'events')).currentSnapshotId;
      await handle.result();
      await handle.release();
      const scan = (await cluster.client.getRun(handle.id))!;
      assert.equal(scan.state, 'succeeded');
      // The submitted plan named the snapshot: the scan read exactly it.
      const record = await cluster.client.topology.steps.get(`${handle.id}.__scan_events`);
      assert.equal((record!.json<{ scan: { snapshotId: string } }>()).scan.snapshotId, before);
    });
  });

  it('refuses a bad source before the run starts, naming the input and listing what exists', async () => {
    await assert.rejects(loadPipeline(fixture('storage-bad-filter.ts')), (error: Error) => {
      assert.ok(error instanceof PlanError);
      assert.match(error.message, /input "data" of step "reader": filter "v >": expected a literal .* at position 3/);
      return true;
    });
    await withCluster(async (cluster) => {
      const loaded = await loadPipeline(fixture('storage-bad-source.ts'));
      await assert.rejects(cluster.client.run(loaded), (error: Error & { code?: string }) => {
        assert.equal(error.code, 'ERR_UNKNOWN_COLUMN');
        assert.match(error.message, /^input "data" of step "reader" \(source\('events'\)\): filter "price > 3" names column\(s\) "price" that table "events" does not have; its columns are: v, w$/);
        return true;
      });
      const keys: string[] = [];
      for await (const key of await cluster.client.topology.runs.keys()) keys.push(key);
      assert.deepEqual(keys, [], 'no run was submitted');
    });
  });
});
