import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadPipeline } from '../sdk/index.ts';
import { fixture, waitFor, withCluster } from './helpers.ts';

test('step logs are kept: read after the run, and followed while it goes', async () => {
  await withCluster(async (cluster) => {
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await cluster.client.run(loaded, { params: { sleepMs: '1500' } });
    // Following from the start: the line comes while the run goes, and the stream ends with the run.
    const followed: string[] = [];
    const following = (async () => {
      for await (const line of cluster.client.logs(handle.id, { follow: true })) followed.push(`${line.step}: ${line.line}`);
    })();
    await waitFor('the slow step to log', () => followed.length > 0, 20_000);
    const view = await handle.result();
    assert.equal(view.state, 'succeeded');
    await following;
    assert.deepEqual(followed, ['slow: slow step started']);

    // Read again once the run is over: the stream kept it.
    const kept: string[] = [];
    for await (const line of cluster.client.logs(handle.id)) kept.push(`${line.step}: ${line.line}`);
    assert.deepEqual(kept, followed);
    await handle.release();

    // Another run's logs are not this one's.
    const other: string[] = [];
    for await (const line of cluster.client.logs('01JB0000000000000000000000')) other.push(line.line);
    assert.deepEqual(other, []);
  });
});
