import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { listSegments } from '../shm/index.ts';
import { EUROPEAN_COUNTRIES, generateTransactions } from '../examples/transactions/data.ts';
import { openTableStore, scanTable, writeTable } from '../storage/index.ts';
import { fixture, repoRoot, runFile, stepOf, waitFor, withCluster } from './helpers.ts';

/** usd_by_country computed in plain code, straight from the generator. */
function expectedTotals(rows: number, seed: number): Map<string, { usd: number; count: number }> {
  const table = generateTransactions(rows, seed);
  const european = new Set<string>(EUROPEAN_COUNTRIES);
  const totals = new Map<string, { usd: number; count: number }>();
  for (let i = 0; i < table.numRows; i++) {
    const row = table.get(i)!;
    const country = String(row.country);
    if (!european.has(country)) continue;
    const t = totals.get(country) ?? { usd: 0, count: 0 };
    t.usd += Number(row.usd);
    t.count++;
    totals.set(country, t);
  }
  return totals;
}

describe('a pipeline end to end on one host', () => {
  it('computes the example the same as plain code does, and frees every segment once the result is read', async () => {
    await withCluster(async (cluster, home) => {
      const rows = 200_000;
      // The example reads the stored table `transactions` and materializes usd_by_country.
      process.env.QUIVER_STORAGE = `${home}/storage`;
      const store = await openTableStore({ kind: 'local', root: `${home}/storage` });
      await writeTable(store, 'transactions', generateTransactions(rows, 7));
      const run = await runFile(cluster, home, `${repoRoot}/examples/transactions/pipeline.ts`, { release: false });
      delete process.env.QUIVER_STORAGE;
      assert.equal(run.view.state, 'succeeded', JSON.stringify(run.view.steps.map((s) => [s.name, s.state, s.error])));
      assert.deepEqual(
        run.view.steps.map((s) => [s.name, s.state]),
        [
          ['__scan_transactions', 'succeeded'],
          ['euro_selection', 'succeeded'],
          ['usd_by_country', 'succeeded'],
          ['__stage_usd_by_country', 'succeeded'],
          ['__commit', 'succeeded'],
        ],
      );
      assert.equal(stepOf(run.view, '__scan_transactions').rows, rows);
      assert.ok(
        run.logs.some((l) => l.step === '__scan_transactions' && /scanned transactions at snapshot \w+: 3 column\(s\)/.test(l.line)),
        'the scan step reported what it read',
      );

      const output = stepOf(run.view, 'usd_by_country').output!;
      const { table } = cluster.client.openOutput(output);
      const expected = expectedTotals(rows, 7);
      assert.equal(table.numRows, expected.size);
      for (let i = 0; i < table.numRows; i++) {
        const row = table.get(i)!;
        const want = expected.get(String(row.country));
        assert.ok(want, `unexpected country ${row.country}`);
        assert.equal(Number(row.transactions), want.count);
        assert.ok(Math.abs(Number(row.usd) - want.usd) < 1e-6 * Math.max(1, want.usd), `usd of ${row.country}`);
      }
      // The output was committed as a snapshot of the table usd_by_country.
      const stored = (await scanTable(store, 'usd_by_country', { cache: null })).table;
      assert.deepEqual(stored.toArray().map((r) => r.toJSON()), table.toArray().map((r) => r.toJSON()));
      await store.close();
      // Intermediate segments go as soon as their children finished; the output waits for release.
      const outputIds = output.segments.map((s) => s.id).join(',');
      await waitFor('only the output to be left in shared memory', () => listSegments(cluster.executor.shmDir).map((s) => s.id).join(',') === outputIds);
      await cluster.client.release(run.view.runId);
      await waitFor('the output segments to be released', () => listSegments(cluster.executor.shmDir).length === 0);
    });
  });

  it('hands a parent to its child without copying: buffer identity checked inside the child', async () => {
    await withCluster(async (cluster, home) => {
      const { view } = await runFile(cluster, home, fixture('zero-copy.ts'), { release: false });
      assert.equal(view.state, 'succeeded');
      const child = stepOf(view, 'child');
      const { table } = cluster.client.openOutput(child.output!);
      const row = table.get(0)!;
      assert.equal(row.zeroCopy, true);
      assert.equal(row.projectedZeroCopy, true);
      assert.equal(row.projectedColumns, 'x');
      assert.equal(row.rows, 100_000);
      assert.equal(row.sum, (99_999 * 100_000) / 2);
      // The only copy the platform made for the child is writing its output.
      assert.equal(child.copiedBytes, child.bytes);
      assert.equal(child.transport, 'shm');
      await cluster.client.release(view.runId);
    });
  });

  it('holds a 100 MB parent once while three children read it', async () => {
    await withCluster(
      async (cluster, home) => {
        let peak = 0;
        let sampling = true;
        const sampler = (async () => {
          while (sampling) {
            const alive = listSegments(cluster.executor.shmDir).reduce((sum, s) => sum + s.allocatedBytes, 0);
            peak = Math.max(peak, alive);
            await new Promise((r) => setTimeout(r, 20));
          }
        })();
        const { view, logs } = await runFile(cluster, home, fixture('fanout-100mb.ts'), { params: { holdMs: '1500' } });
        sampling = false;
        await sampler;
        assert.equal(view.state, 'succeeded');
        const parentBytes = stepOf(view, 'big').bytes!;
        assert.ok(parentBytes >= 100_000_000, `parent is ${parentBytes} bytes`);
        for (const name of ['first', 'second', 'third']) {
          assert.ok(logs.some((l) => l.step === name && /mapped 12500000 rows/.test(l.line)), `${name} ran while the parent was mapped`);
        }
        assert.ok(peak >= parentBytes, `the sampler saw the parent alive (peak ${peak})`);
        // Three children, one copy of the parent: a copy per child would be 4x.
        assert.ok(peak < parentBytes * 1.1, `segment bytes alive peaked at ${peak} for a ${parentBytes}-byte parent`);
      },
      { executor: { concurrency: 3 } },
    );
  });

  it('fails a throwing step with its message and stack, skips its descendants and finishes the rest', async () => {
    await withCluster(async (cluster, home) => {
      const { view, logs } = await runFile(cluster, home, fixture('failing.ts'));
      assert.equal(view.state, 'failed');
      const broken = stepOf(view, 'broken');
      assert.equal(broken.state, 'failed');
      assert.equal(broken.error?.message, 'the sensor file is corrupt at line 42');
      // Source-mapped: the stack names the user's own file and line, not the bundle.
      assert.match(broken.error?.stack ?? '', /at explode \(.*test\/fixtures\/failing\.ts:6:\d+\)/);
      assert.equal(stepOf(view, 'after_broken').state, 'skipped');
      assert.equal(stepOf(view, 'sibling').state, 'succeeded');
      assert.ok(logs.some((l) => l.step === 'broken' && l.line === 'about to fail on 3 rows'));
    });
  });

  it('fails a step that returns something other than a table, saying what it returned', async () => {
    await withCluster(async (cluster, home) => {
      const { view } = await runFile(cluster, home, fixture('not-a-table.ts'));
      assert.equal(view.state, 'failed');
      const step = stepOf(view, 'numbers');
      assert.equal(step.error?.code, 'ERR_STEP_RESULT');
      assert.match(step.error?.message ?? '', /returned an array of length 3; a step must return an Arrow Table/);
    });
  });
});
