import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { tableFromArrays } from 'apache-arrow';
import { isCachedSegment, OutputCache } from '../executor/index.ts';
import { startNatsServer } from '../infra/index.ts';
import { ensureTopology, readCacheEntry, silentLogger, type RunView } from '../schemas/index.ts';
import { currentSnapshot, describeTable, openTableStore, scanTable, writeTable } from '../storage/index.ts';
import { listSegments, releaseSegments, writeTableToShm } from '../shm/index.ts';
import { loadPipeline, type LocalCluster } from '../sdk/index.ts';
import { repoRoot, runCli, stepOf, TEST_SHM_ROOT, waitFor, withCluster } from './helpers.ts';

const dir = mkdtempSync(join(tmpdir(), 'quiver-output-cache-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A line of step code that marks that the step ran. */
const mark = (step: string) => `appendFileSync(ctx.params.marks!, '${step}\\n');`;

/** Writes `<name>.ts`: pipeline `name` with `steps` (object-literal entries), importing what they use. */
function writePipeline(name: string, steps: string): string {
  const file = join(dir, `${name}.ts`);
  writeFileSync(
    file,
    `import { appendFileSync } from 'node:fs';
import { tableFromArrays } from 'apache-arrow';
import { pipeline, source, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('${name}', {
${steps}
});
`,
  );
  return file;
}

/**
 * a → b → c, and a → d → e where d opts out of the cache. Every step marks that its code ran.
 * `leaf` is c's body: changing it changes c's code only.
 */
function pipelineFile(leaf = 't'): string {
  return writePipeline(
    'cached',
    `  a: step((_i, ctx) => { ${mark('a')} return tableFromArrays({ v: Int32Array.from({ length: 1000 }, (_, i) => i) }); }),
  b: step({ t: 'a' }, ({ t }, ctx) => { ${mark('b')} return t.slice(0, 500); }),
  c: step({ t: 'b' }, ({ t }, ctx) => { ${mark('c')} return ${leaf}; }),
  d: step({ t: 'a' }, ({ t }, ctx) => { ${mark('d')} return t.slice(0, 10); }, { cache: false }),
  e: step({ t: 'd' }, ({ t }, ctx) => { ${mark('e')} return t; }),`,
  );
}

/** Reruns `runId` of pipelineFile() from b: b and what follows it compute, a is reused. */
async function rerunFromB(cluster: LocalCluster, runId: string, marks: string): Promise<void> {
  writeFileSync(marks, '');
  const rerun = await cluster.client.rerun(runId, { from: 'b' });
  const rerunView = await rerun.result();
  await rerun.release();
  assert.equal(rerunView.state, 'succeeded');
  assert.deepEqual(readFileSync(marks, 'utf8').split('\n').filter(Boolean).sort(), ['b', 'c', 'd', 'e']);
  assert.deepEqual(cachedSteps(rerunView), ['a']);
}

async function run(cluster: LocalCluster, file: string, marks: string, cache: 'readwrite' | 'read' | 'off'): Promise<{ view: RunView; ran: string[]; firstC: unknown }> {
  writeFileSync(marks, '');
  const handle = await cluster.client.run(await loadPipeline(file), { params: { marks }, cache });
  const view = await handle.result();
  assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
  const { table } = await cluster.client.readOutput(view.runId, 'c');
  const firstC = table.getChildAt(0)?.get(0);
  await handle.release();
  return { view, ran: readFileSync(marks, 'utf8').split('\n').filter(Boolean).sort(), firstC };
}

const cachedSteps = (view: RunView) => view.steps.filter((s) => s.transport === 'cache').map((s) => s.name).sort();

test('an unchanged rerun reuses every cacheable output; a changed leaf recomputes only itself; cache: false always runs', async () => {
  await withCluster(async (cluster) => {
    const marks = join(dir, 'marks');
    const first = await run(cluster, pipelineFile(), marks, 'readwrite');
    assert.deepEqual(first.ran, ['a', 'b', 'c', 'd', 'e']);
    assert.deepEqual(cachedSteps(first.view), []);
    for (const name of ['a', 'b', 'c']) assert.match(stepOf(first.view, name).cacheKey ?? '', /^[0-9a-f]{64}$/, `step ${name} has a cache key`);
    // d opted out; e reads d, so it has no key either.
    assert.equal(stepOf(first.view, 'd').cacheKey, null);
    assert.equal(stepOf(first.view, 'e').cacheKey, null);

    const second = await run(cluster, pipelineFile(), marks, 'readwrite');
    assert.deepEqual(second.ran, ['d', 'e'], 'only the steps that opt out ran again');
    assert.deepEqual(cachedSteps(second.view), ['a', 'b', 'c']);
    assert.equal(second.firstC, first.firstC, 'the reused output reads as the computed one');
    for (const name of ['a', 'b', 'c']) assert.equal(stepOf(second.view, name).cacheKey, stepOf(first.view, name).cacheKey);

    // A dry run says what the cache would give, and runs nothing.
    writeFileSync(marks, '');
    const dry = await cluster.client.dryRun(await loadPipeline(pipelineFile()), { params: { marks }, cache: 'readwrite' });
    assert.deepEqual(dry.steps.filter((s) => s.cached).map((s) => s.step.name).sort(), ['a', 'b', 'c']);
    assert.deepEqual(Object.fromEntries(dry.steps.map((s) => [s.step.name, s.cacheKey])), Object.fromEntries(second.view.steps.map((s) => [s.name, s.cacheKey])));
    assert.equal(readFileSync(marks, 'utf8'), '', 'a dry run runs nothing');

    const edited = await run(cluster, pipelineFile('t.slice(1)'), marks, 'readwrite');
    assert.deepEqual(edited.ran, ['c', 'd', 'e'], 'the edited leaf ran, its unchanged parents did not');
    assert.deepEqual(cachedSteps(edited.view), ['a', 'b']);
    assert.notEqual(stepOf(edited.view, 'c').cacheKey, stepOf(first.view, 'c').cacheKey);
    assert.equal(edited.firstC, 1);

    // A rerun from b computes b and what follows it; a comes from the cache.
    await rerunFromB(cluster, first.view.runId, marks);
    await assert.rejects(cluster.client.rerun(first.view.runId, { from: 'nope' }), /has no step "nope"; its steps are a, b, d, c, e/);

    const off = await run(cluster, pipelineFile(), marks, 'off');
    assert.deepEqual(off.ran, ['a', 'b', 'c', 'd', 'e'], 'cache off computes everything');
    assert.deepEqual(cachedSteps(off.view), []);

    // Other params are another key: computed, and only read (not cached) with 'read'.
    const otherMarks = join(dir, 'marks-other');
    const read = await run(cluster, pipelineFile(), otherMarks, 'read');
    assert.deepEqual(read.ran, ['a', 'b', 'c', 'd', 'e']);
    const again = await run(cluster, pipelineFile(), otherMarks, 'read');
    assert.deepEqual(again.ran, ['a', 'b', 'c', 'd', 'e'], "a 'read' run cached nothing");

    // Cached outputs outlive their runs, and are the only segments left once every run released its outputs.
    const shmDir = cluster.executor.shmDir;
    // Releases travel on their own: wait for the last run's to land.
    const left = await waitFor('only cached segments left', () => {
      const ids = listSegments(shmDir).map((s) => s.id);
      return ids.every((id) => isCachedSegment(shmDir, id)) && ids;
    }, 10_000).catch(() => listSegments(shmDir).map((s) => s.id));
    assert.ok(left.length > 0 && left.every((id) => isCachedSegment(shmDir, id)), `segments left: ${left.join(', ')}`);
    await cluster.executor.stop();
    assert.deepEqual(listSegments(shmDir), [], 'a stopped executor leaves no cached segment');
  });
});

/**
 * A stored table `numbers` → scaled (materialized as table `scaled`) and count (a leaf kept as an
 * output only). `factor` is scaled's multiplier: changing it changes scaled's code only.
 */
function materializingFile(factor = 2, counted = 't.numRows'): string {
  return writePipeline(
    'materializing',
    `  scaled: step({ t: source('numbers') }, ({ t }, ctx) => { ${mark('scaled')} return tableFromArrays({ v: Float64Array.from(t.getChild('v')!.toArray() as Float64Array, (x) => x * ${factor}) }); }, { materialize: true }),
  count: step({ t: 'scaled' }, ({ t }, ctx) => { ${mark('count')} return tableFromArrays({ n: [${counted}] }); }),`,
  );
}

test('an unchanged rerun of a materializing pipeline computes nothing and commits no snapshot; a changed step or a moved table recomputes its stage and commit', async () => {
  const storage = join(dir, 'storage');
  process.env.QUIVER_STORAGE = storage;
  try {
    await withCluster(async (cluster) => {
      const store = await openTableStore({ kind: 'local', root: storage });
      await writeTable(store, 'numbers', tableFromArrays({ v: Float64Array.from({ length: 100 }, (_, i) => i) }));
      const marks = join(dir, 'marks-materializing');
      const go = async (file: string) => {
        writeFileSync(marks, '');
        const handle = await cluster.client.run(await loadPipeline(file), { params: { marks }, cache: 'readwrite' });
        const view = await handle.result();
        await handle.release();
        assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
        return { view, ran: readFileSync(marks, 'utf8').split('\n').filter(Boolean).sort(), computed: view.steps.filter((s) => s.transport !== 'cache').map((s) => s.name).sort() };
      };
      const snapshots = async () => (await describeTable(store, 'scaled')).snapshots.map((s) => s.snapshotId);

      const first = await go(materializingFile());
      assert.deepEqual(first.computed, ['__commit', '__scan_numbers', '__stage_scaled', 'count', 'scaled']);
      const written = await snapshots();
      assert.equal(written.length, 1);
      const commitKey = stepOf(first.view, '__commit').cacheKey;
      assert.match(commitKey ?? '', /^[0-9a-f]{64}$/, 'the commit has a cache key');
      assert.equal((await currentSnapshot(store, 'scaled'))?.cacheKey, commitKey, 'the snapshot records the key of the commit that wrote it');

      const dry = await cluster.client.dryRun(await loadPipeline(materializingFile()), { params: { marks }, cache: 'readwrite' });
      assert.deepEqual(dry.steps.filter((s) => !s.cached).map((s) => s.step.name), [], 'a dry run says everything would be reused');

      const unchanged = await go(materializingFile());
      assert.deepEqual(unchanged.computed, [], 'an unchanged rerun computes no step');
      assert.deepEqual(unchanged.ran, []);
      assert.deepEqual(await snapshots(), written, 'and commits no snapshot');
      assert.deepEqual(stepOf(unchanged.view, '__commit').committed, [{ table: 'scaled', snapshotId: written[0] }], 'the run points at the snapshot that holds its table');
      assert.equal(stepOf(unchanged.view, '__commit').cacheKey, commitKey);

      // A leaf no table is written from: it alone runs; the table holds what it held.
      const leafEdited = await go(materializingFile(2, 't.numRows + 1'));
      assert.deepEqual(leafEdited.computed, ['count']);
      assert.deepEqual(await snapshots(), written);

      const edited = await go(materializingFile(3));
      assert.deepEqual(edited.computed, ['__commit', '__stage_scaled', 'count', 'scaled'], 'the changed step, what reads it, and its stage and commit');
      assert.deepEqual(edited.ran, ['count', 'scaled']);
      const afterEdit = await snapshots();
      assert.equal(afterEdit.length, 2, 'the changed output is committed');
      assert.equal(Number((await scanTable(store, 'scaled')).table.getChild('v')!.get(1)), 3);

      // Another writer moves the table on: the same run again must write it again.
      await writeTable(store, 'scaled', tableFromArrays({ v: Float64Array.from([42]) }), { mode: 'replace' });
      const moved = await go(materializingFile(3));
      assert.deepEqual(moved.computed, ['__commit', '__stage_scaled'], 'the table moved on since: staged and committed again, the steps come from the cache');
      assert.equal((await snapshots()).length, 4);
      assert.equal(Number((await scanTable(store, 'scaled')).table.getChild('v')!.get(1)), 3);

      // A rerun from a step writes its tables again.
      const rerun = await cluster.client.rerun(moved.view.runId, { from: 'scaled' });
      const rerunView = await rerun.result();
      await rerun.release();
      assert.equal(rerunView.state, 'succeeded');
      assert.deepEqual(rerunView.steps.filter((s) => s.transport !== 'cache').map((s) => s.name).sort(), ['__commit', '__stage_scaled', 'count', 'scaled']);
      await store.close();
    });
  } finally {
    delete process.env.QUIVER_STORAGE;
  }
});

test('quiver run --json and the terminal show a materialized table left as it is as cached', async () => {
  const home = join(dir, 'cli-home');
  const storage = join(home, 'storage');
  const store = await openTableStore({ kind: 'local', root: storage });
  await writeTable(store, 'numbers', tableFromArrays({ v: Float64Array.from({ length: 10 }, (_, i) => i) }));
  const env = { QUIVER_HOME: home, QUIVER_STORAGE: storage };
  const marks = join(dir, 'marks-cli');
  writeFileSync(marks, '');
  type Json = { steps: { name: string; cached: boolean; cacheKey: string | null; committed?: { table: string; snapshotId: string }[] }[] };
  const first = await runCli(['run', materializingFile(), '--json', '--params', `marks=${marks}`], { env });
  assert.equal(first.code, 0, first.stderr);
  assert.deepEqual((JSON.parse(first.stdout) as Json).steps.filter((s) => s.cached), []);
  // The embedded default starts with an empty cache each time: the steps run again, the table is already right.
  const second = await runCli(['run', materializingFile(), '--json', '--params', `marks=${marks}`], { env });
  assert.equal(second.code, 0, second.stderr);
  const steps = (JSON.parse(second.stdout) as Json).steps;
  assert.deepEqual(steps.filter((s) => s.cached).map((s) => s.name), ['__stage_scaled', '__commit']);
  const snapshot = (await describeTable(store, 'scaled')).snapshots;
  assert.equal(snapshot.length, 1, 'no second snapshot');
  assert.deepEqual(steps.find((s) => s.name === '__commit')!.committed, [{ table: 'scaled', snapshotId: snapshot[0]!.snapshotId }]);
  assert.match(second.stderr, /__commit\s+● succeeded {2}cached: scaled is at snapshot \w+ already, nothing committed/);
  await store.close();
});

test('the persisted tier keeps outputs shared memory does not hold, in the table store', async () => {
  const storage = join(dir, 'storage-persisted');
  process.env.QUIVER_STORAGE = storage;
  try {
    // No room in shared memory: every reuse has to come from storage.
    await withCluster(
      async (cluster) => {
        const marks = join(dir, 'marks-persisted');
        const first = await run(cluster, pipelineFile(), marks, 'readwrite');
        assert.deepEqual(first.ran, ['a', 'b', 'c', 'd', 'e']);
        const persisted = (name: string) => join(storage, 'cache', 'outputs', `${stepOf(first.view, name).cacheKey}.arrow`);
        // Written off the steps' path: wait for them.
        await waitFor('the persisted outputs', () => ['a', 'b', 'c'].every((name) => existsSync(persisted(name))), 10_000);
        assert.equal(await readCacheEntry(cluster.client.topology.cache, stepOf(first.view, 'c').cacheKey!), null, 'shared memory keeps none of them');

        const second = await run(cluster, pipelineFile(), marks, 'readwrite');
        assert.deepEqual(second.ran, ['d', 'e'], 'the outputs came back from storage');
        assert.deepEqual(cachedSteps(second.view), ['a', 'b', 'c']);
        assert.equal(second.firstC, first.firstC, 'and read as the computed ones');

        // A rerun from a step computes it again, whatever storage holds.
        await rerunFromB(cluster, first.view.runId, marks);
      },
      { executor: { outputCache: { persist: true, maxBytes: 0 } } },
    );
  } finally {
    delete process.env.QUIVER_STORAGE;
  }
});

test('eviction drops the least recently used outputs over the cap, never one a step maps', async () => {
  const natsDir = mkdtempSync(join(tmpdir(), 'quiver-cache-nats-'));
  const server = await startNatsServer({ dir: natsDir });
  const nc = await connect({ servers: server.url });
  const shmDir = join(TEST_SHM_ROOT, `cache-eviction-${process.pid}`);
  try {
    const topology = await ensureTopology(nc, await jetstreamManager(nc));
    const removed: string[] = [];
    const output = (name: string) => {
      const written = writeTableToShm(tableFromArrays({ v: Float64Array.from({ length: 1000 }, (_, i) => i) }), { dir: shmDir, idPrefix: `${name}.` });
      return { kind: 'shm' as const, hostId: 'h1', segments: written.segments, byteSize: written.byteSize, rows: written.rows, schema: [] };
    };
    const outputs = { a: output('a'), b: output('b'), c: output('c'), d: output('d') };
    // Room for two of them.
    const cache = new OutputCache(
      { kv: topology.cache, shmDir, hostId: 'h1', executorId: 'h1.exec', release: (ids) => (removed.push(...ids), releaseSegments(ids, { dir: shmDir, poolMaxBytes: 0 })), logger: silentLogger },
      { maxBytes: 2 * outputs.a.byteSize, evictionGraceMs: 0 },
    );
    const key = (c: string) => c.repeat(64);
    const from = { runId: '01JB0000000000000000000000', step: 'x' };
    await cache.store(key('a'), outputs.a, from);
    await cache.store(key('b'), outputs.b, from);
    assert.equal(cache.size, 2);
    // a is the oldest, but a running step maps it.
    const mappedA = outputs.a.segments.map((s) => s.id);
    cache.pin(mappedA);
    await cache.store(key('c'), outputs.c, from);
    assert.ok(await readCacheEntry(topology.cache, key('a')), 'the pinned output stays');
    assert.equal(await readCacheEntry(topology.cache, key('b')), null, 'the least recently used unpinned one went');
    assert.ok(await readCacheEntry(topology.cache, key('c')));
    assert.deepEqual(removed, outputs.b.segments.map((s) => s.id));
    assert.ok(!existsSync(join(shmDir, outputs.b.segments[0]!.id)), "b's segment is gone");
    assert.ok(isCachedSegment(shmDir, outputs.a.segments[0]!.id));
    cache.unpin(mappedA);
    await cache.store(key('d'), outputs.d, from);
    assert.equal(await readCacheEntry(topology.cache, key('a')), null, 'unpinned, a is the least recently used');
    assert.ok(await readCacheEntry(topology.cache, key('c')));
    assert.ok(await readCacheEntry(topology.cache, key('d')));
    await cache.stop();
    assert.equal(await readCacheEntry(topology.cache, key('d')), null, 'a stopped cache leaves no entry');
    assert.deepEqual(listSegments(shmDir), [], 'and no segment');
  } finally {
    await nc.close();
    await server.stop();
    rmSync(shmDir, { recursive: true, force: true });
    rmSync(natsDir, { recursive: true, force: true });
  }
});
