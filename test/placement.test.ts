import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { startNatsServer } from '../infra/index.ts';
import { Dispatcher, placeStep } from '../orchestrator/placement.ts';
import { ensureTopology, silentLogger, streams, subjects, type HostRecord, type StepReady, type TableDescriptor } from '../schemas/index.ts';
import { tempHome, waitFor } from './helpers.ts';

const host = (hostId: string, running: number, labels: string[] = [], capacity = 2): HostRecord => ({
  hostId,
  executorId: `${hostId}.1.x`,
  flightEndpoint: `grpc+tcp://${hostId}:1`,
  labels,
  capacity,
  running,
  at: 0,
});
const on = (hostId: string, byteSize: number): { descriptor: TableDescriptor } => ({
  descriptor: { kind: 'shm', hostId, segments: [{ id: `${hostId}-0`, byteSize }], byteSize, rows: 1, schema: [] },
});

describe('placement', () => {
  it('sends a step to the host holding most of its input bytes', () => {
    const placed = placeStep({ name: 's' }, [on('a', 10), on('b', 30), on('a', 15)], [host('a', 0), host('b', 0)]);
    assert.deepEqual('hostId' in placed && placed.hostId, 'b');
  });

  it('lets any executor take it when that host is full, or when no input lives on a live host', () => {
    const full = placeStep({ name: 's' }, [on('b', 30)], [host('a', 0), host('b', 2)]);
    assert.equal('hostId' in full && full.hostId, null);
    const gone = placeStep({ name: 's' }, [on('dead', 30)], [host('a', 0)]);
    assert.equal('hostId' in gone && gone.hostId, null);
    const source = placeStep({ name: 's' }, [], [host('a', 0)]);
    assert.equal('hostId' in source && source.hostId, null);
  });

  it('counts the capacity of every executor of a host', () => {
    const placed = placeStep({ name: 's' }, [on('b', 30)], [host('b', 2), host('b', 0)]);
    assert.equal('hostId' in placed && placed.hostId, 'b');
  });

  it('honours a pinned label (a host id is a label too), preferring data then room among those hosts', () => {
    const hosts = [host('a', 0, ['eu']), host('b', 1, ['eu']), host('c', 0, ['us'])];
    assert.equal((placeStep({ name: 's', host: 'eu' }, [on('b', 5)], hosts) as { hostId: string }).hostId, 'b');
    assert.equal((placeStep({ name: 's', host: 'eu' }, [on('c', 5)], hosts) as { hostId: string }).hostId, 'a');
    assert.equal((placeStep({ name: 's', host: 'c' }, [on('a', 5)], hosts) as { hostId: string }).hostId, 'c');
  });

  it('says why when no live host carries the label', () => {
    const placed = placeStep({ name: 'train', host: 'gpu' }, [], [host('a', 0, ['eu'])]);
    assert.ok('error' in placed);
    assert.match(placed.error, /step "train" is pinned to hosts labelled "gpu", and no live executor has that label \(live hosts: a\)/);
  });
});

describe('the dispatcher', () => {
  it('places again a step a resumed run has running on a host that then stops heartbeating', async () => {
    const home = tempHome();
    const server = await startNatsServer({ dir: join(home.dir, 'nats') });
    const nc = await connect({ servers: server.url });
    try {
      const jsm = await jetstreamManager(nc);
      const topology = await ensureTopology(nc, jsm);
      const record = { ...host('h1', 1), executorId: 'h1.1.x', at: Date.now() };
      await topology.hosts.put(record.executorId, JSON.stringify(record));
      const dispatcher = new Dispatcher(jetstream(nc), async () => jsm, topology, silentLogger, Date.now);
      dispatcher.start();
      try {
        await waitFor('the dispatcher to see h1', async () => (await dispatcher.liveHosts()).some((h) => h.hostId === 'h1'));
        const message: StepReady = {
          type: 'step.ready',
          runId: '01KAYZ0000000000000000TEST',
          step: 'child',
          pipeline: 'p',
          codeHash: '0'.repeat(64),
          params: {},
          inputs: [{ param: 'x', step: 'parent', ...on('h1', 100) }],
        };
        dispatcher.remember(message, { name: 'child', inputs: [{ param: 'x', step: 'parent' }] }, 'h1');
        const before = (await jsm.streams.info(streams.work, { subjects_filter: '>' })).state.subjects ?? {};
        assert.equal(before[subjects.stepReady] ?? 0, 0);

        await topology.hosts.delete(record.executorId);
        await waitFor('h1 to be gone', async () => !(await dispatcher.liveHosts()).some((h) => h.hostId === 'h1'));
        await dispatcher.checkHosts();
        const after = (await jsm.streams.info(streams.work, { subjects_filter: '>' })).state.subjects ?? {};
        // Its input lives on no live host any more, so any executor may take it.
        assert.equal(after[subjects.stepReady], 1, JSON.stringify(after));
      } finally {
        dispatcher.stop();
      }
    } finally {
      await nc.close();
      await server.stop();
      home.remove();
    }
  });
});
