import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { streams } from '../schemas/index.ts';
import { loadPipeline, type QuiverClient } from '../sdk/index.ts';
import { fixture, withCluster } from './helpers.ts';

/** Ready messages published to the work queue so far (acked ones are gone from it, their sequence numbers are not). */
async function readyMessagesSent(client: QuiverClient): Promise<number> {
  return (await (await jetstreamManager(client.nc)).streams.info(streams.work)).state.last_seq;
}

const marksOf = (file: string) => readFileSync(file, 'utf8').split('\n').filter(Boolean);

describe('chains of steps', () => {
  it('sends a chain as one ready message, and runs and records each of its steps once', async () => {
    await withCluster(async ({ client }, home) => {
      // first → slow → last: each the only child of the one before.
      const loaded = await loadPipeline(fixture('slow.ts'));
      const marks = join(home, 'chain.marks');
      const before = await readyMessagesSent(client);
      const handle = await client.run(loaded, { params: { sleepMs: '0', marks } });
      const view = await handle.result();
      await handle.release();
      assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
      assert.equal((await readyMessagesSent(client)) - before, 1, 'one ready message for the chain');
      assert.deepEqual(marksOf(marks), ['first', 'slow', 'last']);
      for (const step of view.steps) {
        assert.equal(step.attempt, 1, step.name);
        assert.equal(step.executorId, view.steps[0]!.executorId, `${step.name} ran where its chain began`);
        assert.equal(step.rows, 3, step.name);
      }

      // A run that uses the output cache sends each step alone: keys are built from the parents' completions.
      const cached = await client.run(loaded, { params: { sleepMs: '0', marks: join(home, 'cached.marks') }, cache: 'readwrite' });
      const beforeCached = before + 1;
      assert.equal((await cached.result()).state, 'succeeded');
      await cached.release();
      assert.equal((await readyMessagesSent(client)) - beforeCached, 3, 'one ready message per step');
    });
  });

  it('stops a chain at a failing step: the run fails with its error and the steps after it are skipped', async () => {
    await withCluster(async ({ client }) => {
      // broken → after_broken is a chain; source has two children, so each goes alone.
      const handle = await client.run(await loadPipeline(fixture('failing.ts')));
      const view = await handle.result();
      await handle.release();
      const state = Object.fromEntries(view.steps.map((s) => [s.name, s.state]));
      assert.deepEqual(state, { source: 'succeeded', broken: 'failed', after_broken: 'skipped', sibling: 'succeeded' });
      assert.equal(view.state, 'failed');
      assert.match(view.steps.find((s) => s.name === 'broken')!.error!.message, /the sensor file is corrupt at line 42/);
    });
  });
});
