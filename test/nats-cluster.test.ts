import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import { Executor } from '../executor/index.ts';
import { startNatsCluster } from '../infra/index.ts';
import { Orchestrator } from '../orchestrator/index.ts';
import { buckets, connectForever, silentLogger, streams } from '../schemas/index.ts';
import { removeDir } from '../shm/index.ts';
import { loadPipeline, QuiverClient } from '../sdk/index.ts';
import { fixture, waitFor } from './helpers.ts';

test('on a 3-node cluster (R3), a run survives killing the node that leads its streams, with no step run twice', { timeout: 180_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-nats-cluster-'));
  const cluster = await startNatsCluster({ dir: join(dir, 'nats'), auth: 'nkey' });
  const connections: NatsConnection[] = [];
  // Every node's url: a connection whose node dies goes on through another.
  const open = async () => {
    const nc = await connectForever(cluster.urls, { auth: cluster.connectionOptions });
    connections.push(nc);
    return nc;
  };
  let orchestrator: Orchestrator | null = null;
  let executor: Executor | null = null;
  try {
    orchestrator = await Orchestrator.start(await open(), { logger: silentLogger });
    const clusterSecret = randomBytes(32).toString('hex');
    executor = await Executor.start(await open(), { clusterSecret, flight: { host: '127.0.0.1', advertiseHost: '127.0.0.1' }, logger: silentLogger });
    const client = await QuiverClient.connect({ nc: await open(), clusterSecret });
    const jsm = await jetstreamManager(client.nc);

    // Three servers: every stream and bucket Quiver made has three replicas.
    for (const name of [streams.control, streams.work, streams.events, streams.dead, `KV_${buckets.runs}`, `KV_${buckets.steps}`, `KV_${buckets.claims}`, `OBJ_${buckets.code}`]) {
      assert.equal((await jsm.streams.info(name)).config.num_replicas, 3, `${name} replicas`);
    }

    const marks = join(dir, 'marks');
    const handle = await client.run(await loadPipeline(fixture('slow.ts')), { params: { marks, sleepMs: '4000' } });
    await waitFor('the slow step to run', () => existsSync(marks) && readFileSync(marks, 'utf8').includes('slow'), 60_000);
    // The node leading the step completions: the orchestrator reads every fact from it.
    const leader = (await jsm.streams.info(`KV_${buckets.steps}`)).cluster!.leader!;
    await cluster.node(leader).kill();

    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    assert.deepEqual(readFileSync(marks, 'utf8').split('\n').filter(Boolean).sort(), ['first', 'last', 'slow'], 'each step ran once');
    await handle.release();

    // Back, the node catches up: every replica of the completions is current again.
    await cluster.node(leader).restart();
    await waitFor(
      'the restarted node to catch up',
      async () => {
        const info = await jsm.streams.info(`KV_${buckets.steps}`).catch(() => null);
        const peers = info?.cluster?.replicas ?? [];
        return peers.length === 2 && peers.every((p) => p.current && !p.offline);
      },
      60_000,
    );
  } finally {
    await executor?.stop();
    await orchestrator?.stop();
    if (executor) removeDir(executor.shmDir);
    await Promise.all(connections.map((c) => c.close().catch(() => {})));
    await cluster.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
