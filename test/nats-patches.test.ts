import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { connect } from '@nats-io/transport-node';
import { startNatsServer } from '../infra/index.ts';
import { natsRequestsPatched, natsWritesCoalesced } from '../schemas/index.ts';

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

test('an answered request builds no error; timeouts and no-responders still reject with their reason', async () => {
  assert.equal(natsRequestsPatched, true, 'the nats.js request patch did not apply: has @nats-io/nats-core changed RequestOne?');
  const server = await startNatsServer({ dir: mkdtempSync(join(tmpdir(), 'quiver-nats-requests-')) });
  // As Quiver connects: with async traces every request builds an error up front, on purpose.
  const nc = await connect({ servers: server.url, noAsyncTraces: true });
  // request.js builds its errors from this module's exports at call time: a counting subclass sees each one.
  const errors = createRequire(import.meta.url)(join(dirname(createRequire(import.meta.url).resolve('@nats-io/nats-core')), 'errors.js')) as { RequestError: new (message?: string, options?: ErrorOptions) => Error };
  const original = errors.RequestError;
  let built = 0;
  errors.RequestError = class extends original {
    constructor(message?: string, options?: ErrorOptions) {
      super(message, options);
      built++;
    }
  };
  try {
    const echo = nc.subscribe('req.echo', { callback: (_e, m) => void m.respond(m.data) });
    await nc.flush();
    for (let i = 0; i < 50; i++) assert.equal((await nc.request('req.echo', String(i), { timeout: 2000 })).string(), String(i));
    assert.equal(built, 0, `50 answered requests built ${built} RequestErrors`);
    echo.unsubscribe();
    // Nobody listens: the request still fails, naming why.
    await assert.rejects(nc.request('req.nobody', 'x', { timeout: 2000 }), (e: Error) => /no responders/i.test(`${e.message} ${String((e as { cause?: Error }).cause?.message)}`));
    // Somebody listens but never answers: a timeout.
    const silent = nc.subscribe('req.silent', { callback: () => undefined });
    await nc.flush();
    await assert.rejects(nc.request('req.silent', 'x', { timeout: 200 }), (e: Error) => /timeout/i.test(`${e.name} ${e.message}`));
    silent.unsubscribe();
  } finally {
    errors.RequestError = original;
    await nc.close();
    await server.stop();
  }
});
