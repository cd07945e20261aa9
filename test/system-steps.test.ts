/**
 * System steps run in step processes whatever the store (issue 11, part 3): scans and stages on
 * S3 with its catalog on NATS, and a transactional run's stage, which commits to the run's branch.
 * The process reaches the catalog through its executor, which moves only the branches the step
 * writes.
 */
import assert from 'node:assert/strict';
import { tableFromArrays } from 'apache-arrow';
import { describe, it } from 'node:test';
import { catalogGate, runBranch } from '../executor/system-steps.ts';
import type { SystemStep } from '../schemas/index.ts';
import type { LocalCluster } from '../sdk/index.ts';
import { atRef, hostCache, openTableStore, scanTable, writeTable, type OpenedTableStore } from '../storage/index.ts';
import { fixture, runFile, stepOf, withCluster, withEnv } from './helpers.ts';
import { storageBackends } from './storage-backends.ts';

const TIMEOUT = { timeout: 180_000 };
const storage = storageBackends('system-steps', 4);

/** A cluster whose executor stores tables on S3 (s3rver) with the catalog in the cluster's NATS; the test's own handle on that store. */
async function onS3Cluster(vars: Record<string, string>, fn: (cluster: LocalCluster, home: string, store: OpenedTableStore) => Promise<void>): Promise<void> {
  const bucket = storage.nextBucket();
  const env = {
    QUIVER_STORAGE: `s3://${bucket}`,
    QUIVER_S3_ENDPOINT: storage.s3.endpoint,
    QUIVER_S3_FORCE_PATH_STYLE: '1',
    AWS_ACCESS_KEY_ID: storage.s3.credentials.accessKeyId,
    AWS_SECRET_ACCESS_KEY: storage.s3.credentials.secretAccessKey,
    ...vars,
  };
  await withEnv(env, () =>
    withCluster(async (cluster, home) => {
      const store = await openTableStore({ kind: 's3', s3: { bucket, endpoint: storage.s3.endpoint, credentials: storage.s3.credentials, forcePathStyle: true }, nc: cluster.client.nc });
      try {
        await fn(cluster, home, store);
      } finally {
        await store.close();
      }
    }),
  );
}

const states = (view: { steps: { name: string; state: string; error?: { message: string } | null }[] }) => JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message]));

describe('system steps on S3 with a NATS catalog', () => {
  it('scan, and stage and merge a transaction, in step processes: the executor reads no table', TIMEOUT, async () => {
    await onS3Cluster({}, async (cluster, home, store) => {
      await writeTable(store, 'events', tableFromArrays({ v: Int32Array.from([1, 2, 3, 4]) }));
      hostCache.clear();
      const scanned = await runFile(cluster, home, fixture('limits-system-scan.ts'), { release: false });
      assert.equal(scanned.view.state, 'succeeded', states(scanned.view));
      assert.deepEqual([...cluster.client.openOutput(stepOf(scanned.view, 'copy').output!).table.getChild('v')!], [1, 2, 3, 4]);
      await cluster.client.release(scanned.view.runId);
      assert.ok(scanned.logs.some((l) => l.step === '__scan_events' && /^scanned events at snapshot/.test(l.line)), 'the scan logged from its process');
      // Scanning fills the column cache of the process that scans: the executor's (this process's) stayed empty.
      assert.equal(hostCache.size, 0, 'the executor scanned in its own process');

      const staged = await runFile(cluster, home, fixture('limits-system-stage.ts'));
      assert.equal(staged.view.state, 'succeeded', states(staged.view));
      assert.ok(staged.logs.some((l) => l.step === '__stage_totals' && l.line.startsWith(`committed 3 rows of totals to the run's branch ${runBranch(staged.view.runId)}`)));
      assert.ok(staged.logs.some((l) => l.step === '__commit' && l.line.startsWith(`merged ${runBranch(staged.view.runId)} into main`)));
      assert.deepEqual([...(await scanTable(store, 'totals', { cache: null })).table.getChild('usd')!], [1, 2, 3]);
    });
  });

  it('bounds them by the step memory limit, and the executor keeps serving', TIMEOUT, async () => {
    // 16 MB of heap holds no scan or stage (the AWS SDK alone takes more): had the executor run
    // them, they would have succeeded; the user steps declare room of their own.
    await onS3Cluster({ QUIVER_STEP_MEMORY_MB: '16' }, async (cluster, home, store) => {
      await writeTable(store, 'events', tableFromArrays({ v: Int32Array.from([1, 2, 3, 4]) }));
      const mainBefore = await store.catalog.versions.resolve('main');
      for (const [file, step] of [
        ['limits-system-scan.ts', '__scan_events'],
        ['limits-system-stage.ts', '__stage_totals'],
      ] as const) {
        const run = await runFile(cluster, home, fixture(file));
        assert.equal(run.view.state, 'failed', states(run.view));
        const error = stepOf(run.view, step).error!;
        assert.equal(error.code, 'ERR_STEP_MEMORY', `${step}: ${error.message}`);
        assert.match(error.message, new RegExp(`^step "${step}" exceeded its 16 MB memory limit`));
      }
      assert.equal(await store.catalog.versions.resolve('main'), mainBefore, 'main did not move');
      // Still serving: a step that fits its limit runs, reading what the failed runs left alone.
      const events = await scanTable(store, 'events', { cache: null });
      assert.equal(events.table.numRows, 4);
      const after = await runFile(cluster, home, fixture('limits-system-after.ts'));
      assert.equal(after.view.state, 'succeeded', states(after.view));
    });
  });
});

describe('the catalog gate', () => {
  const system = (s: SystemStep) => s;
  const ZERO = '0'.repeat(64);

  it('reads any ref, moves only the branches its step writes, and refuses malformed calls', TIMEOUT, async () => {
    await storage.withStore(storage.backends[1]!, async (store) => {
      await writeTable(store, 'events', tableFromArrays({ v: Int32Array.from([1]) }));
      const v = store.catalog.versions;
      await v.createBranch('dev');
      const ready = { runId: '01JTESTRUN0000000000000000', step: '__stage_t' };
      const stageTx = catalogGate(ready, system({ kind: 'stage', table: 't', mode: 'append', transaction: true }), store);
      const scan = catalogGate(ready, system({ kind: 'scan', table: 'events' }), store);
      const commitDev = catalogGate(ready, system({ kind: 'commit', branch: 'dev' }), store);

      const mainHead = await v.refs.read('branch', 'main');
      assert.deepEqual(await scan({ op: 'readRef', kind: 'branch', name: 'main' }), mainHead);
      assert.deepEqual(await scan({ op: 'tableHead', table: 'events' }), null, 'no table from before branches');
      assert.deepEqual(((await scan({ op: 'listRefs', kind: 'branch' })) as { name: string }[]).map((r) => r.name), ['dev', 'main']);

      const refused = (e: Error & { code?: string }) => e.code === 'ERR_CATALOG_REFUSED';
      // A scan moves nothing; a transaction's stage moves its run's branch only; a commit its target.
      await assert.rejects(scan({ op: 'swapRef', kind: 'branch', name: 'main', expected: mainHead, commit: ZERO }), refused);
      await assert.rejects(stageTx({ op: 'swapRef', kind: 'branch', name: 'main', expected: mainHead, commit: ZERO }), refused);
      await assert.rejects(stageTx({ op: 'swapRef', kind: 'branch', name: runBranch('01JOTHERRUN000000000000000'), expected: { commit: null, token: 0 }, commit: mainHead.commit }), refused);
      await assert.rejects(commitDev({ op: 'swapRef', kind: 'tag', name: 'dev', expected: { commit: null, token: 0 }, commit: mainHead.commit }), refused);
      await assert.rejects(stageTx({ op: 'swapRef', kind: 'branch', name: runBranch(ready.runId), expected: { commit: null, token: 0 }, commit: 'not-a-commit' }), refused);
      await assert.rejects(scan({ op: 'drop' } as never), refused);
      await assert.rejects(scan({ op: 'readRef', kind: 'branch', name: '../main' }), (e: Error & { code?: string }) => e.code === 'ERR_REF_BAD_NAME');
      assert.equal(await v.resolve('main'), mainHead.commit, 'main did not move');

      assert.equal(await stageTx({ op: 'swapRef', kind: 'branch', name: runBranch(ready.runId), expected: { commit: null, token: 0 }, commit: mainHead.commit }), true);
      assert.equal(await v.resolve(runBranch(ready.runId)), mainHead.commit);
      const devHead = await v.refs.read('branch', 'dev');
      assert.equal(await commitDev({ op: 'swapRef', kind: 'branch', name: 'dev', expected: devHead, commit: null }), true);
      assert.equal((await v.refs.read('branch', 'dev')).commit, null);
      assert.deepEqual(await scanTable(atRef(store, 'main'), 'events', { cache: null }).then((r) => r.table.numRows), 1);
    });
  });
});
