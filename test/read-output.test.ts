import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { tableToIPC } from 'apache-arrow';
import { loadPipeline, OutputNotFoundError } from '../sdk/index.ts';
import { fixture, withCluster } from './helpers.ts';

describe('reading a run output with the client', () => {
  it('maps it from shared memory on its host and reads it over Flight from elsewhere, the same table', async () => {
    await withCluster(async ({ client }) => {
      const handle = await client.run(await loadPipeline(fixture('slow.ts')), { params: { sleepMs: '0' }, keep: true });
      const view = await handle.result();
      assert.equal(view.state, 'succeeded');

      const local = await client.readOutput(handle.id, 'last');
      assert.equal(local.transport, 'shm');
      assert.deepEqual([...local.table.getChild('v')!.toArray()], [1, 2, 3]);

      // A client whose shared memory is elsewhere is on another host, as far as it can tell.
      const shmRoot = process.env.QUIVER_SHM_ROOT;
      process.env.QUIVER_SHM_ROOT = '/dev/shm/quiver-test-no-such-host';
      try {
        const remote = await client.readOutput(handle.id, 'last');
        assert.equal(remote.transport, 'flight');
        assert.deepEqual(tableToIPC(remote.table), tableToIPC(local.table));
      } finally {
        process.env.QUIVER_SHM_ROOT = shmRoot;
      }

      await assert.rejects(client.readOutput(handle.id, 'nope'), (e: Error) => e instanceof OutputNotFoundError && /its steps: first, slow, last/.test(e.message));
      await handle.release();
    });
  });
});
