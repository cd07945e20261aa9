import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { connect } from '@nats-io/transport-node';
import { startNatsServer } from '../infra/index.ts';
import { natsWritesCoalesced } from '../schemas/index.ts';

const writeSyscalls = () => Number(/syscw:\s*(\d+)/.exec(readFileSync('/proc/self/io', 'utf8'))![1]);

test('messages sent from separate microtasks of one turn leave in one write, in order', async () => {
  assert.equal(natsWritesCoalesced, true, 'the nats.js write patch did not apply: has @nats-io/nats-core changed sendCommand?');
  const server = await startNatsServer({ dir: mkdtempSync(join(tmpdir(), 'quiver-nats-writes-')) });
  const nc = await connect({ servers: server.url });
  try {
    const received: number[] = [];
    const sub = nc.subscribe('order.check', { callback: (_e, m) => void received.push(Number(m.string())) });
    await nc.flush();
    const COUNT = 200;
    const before = writeSyscalls();
    // Each publish in its own microtask: nats.js alone would write each of them separately.
    for (let i = 0; i < COUNT; i++) {
      await Promise.resolve();
      nc.publish('order.check', String(i));
    }
    await nc.flush();
    const writes = writeSyscalls() - before;
    assert.ok(writes < COUNT / 10, `${COUNT} publishes took ${writes} writes`);
    // A request and its reply still flow through the same buffer.
    const echo = nc.subscribe('order.echo', { callback: (_e, m) => void m.respond(m.data) });
    assert.equal((await nc.request('order.echo', 'ping', { timeout: 2000 })).string(), 'ping');
    echo.unsubscribe();
    await nc.flush();
    assert.deepEqual(received, Array.from({ length: COUNT }, (_, i) => i));
    sub.unsubscribe();
  } finally {
    await nc.close();
    await server.stop();
  }
});
