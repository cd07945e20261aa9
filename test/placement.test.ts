import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { placeStep } from '../orchestrator/placement.ts';
import type { HostRecord, TableDescriptor } from '../schemas/index.ts';

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
