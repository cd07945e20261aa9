import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect, headers, type NatsConnection } from '@nats-io/transport-node';
import { ulid } from 'ulid';
import { loadPipeline, type QuiverClient } from '../sdk/index.ts';
import { buckets, consumers, ensureHostConsumer, streams, subjects, type DeadEvent, type Logger } from '../schemas/index.ts';
import { fixture, runFile, waitFor, withCluster } from './helpers.ts';

/** A logger that keeps every line, to find the reason a refused message was logged with. */
function capturingLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return { lines, info: (m) => lines.push(`info ${m}`), warn: (m) => lines.push(`warn ${m}`), error: (m) => lines.push(`error ${m}`) };
}

const GARBAGE: (string | Uint8Array)[] = [new Uint8Array([0, 0xff, 0xfe, 0x7b, 0x22]), '{"type":"run.submit","runId":"nope"}', '', '[1,2,3]', 'null'];

async function deadLettersOn(client: QuiverClient, subject: string): Promise<DeadEvent[]> {
  return (await client.deadEvents({ limit: 10_000 })).filter((d) => d.subject === subject);
}

async function eventRunSucceeds(client: QuiverClient, eventId: string): Promise<void> {
  await client.publish('orders.uploaded', { count: 4 }, { id: eventId });
  const run = await waitFor(`the run of event ${eventId} to finish`, async () =>
    (await client.listRuns({ pipeline: 'orders' })).find((r) => r.trigger.kind === 'event' && r.trigger.eventId === eventId && ['succeeded', 'failed'].includes(r.state)),
  );
  assert.equal(run.state, 'succeeded');
}

describe('garbage on every Quiver subject', () => {
  it('never wedges the leader or the executor: each message is dead-lettered or refused with a logged reason', async () => {
    const logger = capturingLogger();
    await withCluster(
      async (cluster, home) => {
        const { client } = cluster;
        await client.deploy(await loadPipeline(fixture('orders.ts')));
        await eventRunSucceeds(client, 'before-garbage');
        const nc: NatsConnection = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
        try {
          const hostId = cluster.executor.hostId;
          const fakeRun = ulid();
          const deadSubjects = [
            subjects.runSubmit,
            subjects.runCancel,
            subjects.runRelease,
            subjects.stepReady,
            subjects.stepReadyOnHost(hostId),
          ];
          const loggedSubjects = [subjects.stepStarted, subjects.segmentRelease(hostId), subjects.runKill];
          const unheard = [subjects.log(fakeRun), subjects.status(fakeRun), subjects.deadEvent];
          for (const subject of [...deadSubjects, subjects.event('nobody.listens'), ...loggedSubjects, ...unheard]) for (const body of GARBAGE) nc.publish(subject, body);
          // A bucket keeps one message per key: one key per piece of garbage. An empty one is how
          // KV deletes a key, nothing to refuse.
          const completionGarbage = GARBAGE.filter((g) => g.length > 0).map((body, i) => ({ subject: subjects.stepCompletion(fakeRun, `step_${i}`), body }));
          for (const { subject, body } of completionGarbage) nc.publish(subject, body);
          // Events that match a trigger but start nothing: not JSON, and an id no run can carry.
          nc.publish(subjects.event('orders.uploaded'), 'not json {');
          const longId = headers();
          longId.set('Nats-Msg-Id', 'x'.repeat(300));
          nc.publish(subjects.event('orders.uploaded'), '{"count": 1}', { headers: longId });
          await nc.flush();

          // An event too large for the events stream is refused to its publisher...
          await assert.rejects(client.publish('orders.uploaded', { count: 1, pad: 'x'.repeat(nc.info!.max_payload + 1) }), /size|payload/i);
          // ...and one the stream takes but whose run record NATS cannot hold is dead-lettered.
          // The event just fits NATS's payload limit (its JSON and headers take ~100 bytes more than the pad).
          const maxPayload = nc.info!.max_payload;
          await client.publish('orders.uploaded', { count: 1, pad: 'x'.repeat(maxPayload - 150) }, { id: 'too-large' });

          for (const subject of deadSubjects) {
            const letters = await waitFor(`dead letters for ${subject}`, async () => {
              const found = await deadLettersOn(client, subject);
              return found.length >= GARBAGE.length ? found : null;
            });
            for (const letter of letters) assert.ok(letter.reason.length > 0, `a dead letter for ${subject} has no reason`);
          }
          for (const { subject } of completionGarbage) {
            const [letter] = await waitFor(`a dead letter for ${subject}`, async () => ((await deadLettersOn(client, subject)).length > 0 ? deadLettersOn(client, subject) : null));
            assert.match(letter!.reason, /rejected a message on/);
          }
          // Dead events are listed by the event's own subject, without the stream's prefix.
          const unmatched = await waitFor('dead letters of nobody.listens', async () => {
            const found = await deadLettersOn(client, 'nobody.listens');
            return found.length >= GARBAGE.length ? found : null;
          });
          for (const letter of unmatched) assert.match(letter.reason, /no deployed pipeline has a trigger matching "nobody\.listens"/);
          const forOrders = await waitFor('the dead letters of orders.uploaded', async () => {
            const found = (await client.deadEvents({ limit: 10_000 })).filter((d) => d.subject === 'orders.uploaded');
            return found.length >= 3 ? found : null;
          });
          assert.ok(forOrders.some((d) => /the payload is not JSON/.test(d.reason)));
          assert.ok(forOrders.some((d) => /the event id is 300 characters long/.test(d.reason)));
          const tooLarge = forOrders.find((d) => d.eventId === 'too-large');
          assert.ok(tooLarge, 'the event whose run record is too large was not dead-lettered');
          assert.equal(tooLarge.pipeline, 'orders');
          assert.match(tooLarge.reason, /larger than NATS takes/);
          // Every message settled: none waits for an ack that never comes (to be delivered again).
          const jsm = await jetstreamManager(nc);
          for (const [stream, consumer] of [
            [streams.control, consumers.orchestrator],
            [streams.events, consumers.triggers],
            [`KV_${buckets.steps}`, consumers.facts],
            [streams.work, consumers.executors],
            [streams.work, consumers.executorsOnHost(hostId)],
          ] as const) {
            await waitFor(`${consumer} on ${stream} to have settled every message`, async () => {
              const info = await jsm.consumers.info(stream, consumer);
              return info.num_ack_pending === 0 && info.num_pending === 0;
            });
          }
          // Refused once: a refused message is not delivered again.
          const refusals = logger.lines.filter((l) => l.startsWith('warn refused '));
          assert.equal(new Set(refusals).size, refusals.length, `a message was refused more than once:\n${refusals.join('\n')}`);
          for (const subject of loggedSubjects) {
            await waitFor(`a logged reason for the garbage on ${subject}`, () => logger.lines.some((l) => l.includes(`rejected a message on ${subject}`)));
          }

          // Still working: the leader leads, runs from events and from files succeed.
          assert.ok(cluster.orchestrator.isLeader);
          await eventRunSucceeds(client, 'after-garbage');
          const { view } = await runFile(cluster, home, fixture('zero-copy.ts'));
          assert.equal(view.state, 'succeeded');
        } finally {
          await nc.close();
        }
      },
      { logger, topology: { eventMaxMessageBytes: 8 * 1024 * 1024 } },
    );
  });

  it('dead-letters a message that keeps failing after max_deliver deliveries, and goes on', async () => {
    const logger = capturingLogger();
    await withCluster(
      async (cluster) => {
        const { client } = cluster;
        // A run record that cannot be read: releasing its outputs fails on every delivery.
        const runId = ulid();
        await client.topology.runs.put(runId, '{"not": "a run record"}');
        const nc = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
        try {
          await jetstream(nc).publish(subjects.runRelease, JSON.stringify({ type: 'run.release', runId }));
        } finally {
          await nc.close();
        }
        const [letter] = await waitFor('the failing release to be dead-lettered', async () => {
          const found = await deadLettersOn(client, subjects.runRelease);
          return found.length > 0 ? found : null;
        });
        assert.match(letter!.reason, new RegExp(`run.release of run ${runId} failed on all 3 deliveries; the last error: .*quiver-runs/${runId}`));
        const attempts = logger.lines.filter((l) => l.includes(`could not apply run.release of run ${runId}`));
        assert.equal(attempts.length, 3, `expected 3 attempts, saw: ${attempts.join('\n')}`);
        // Settled once dead-lettered: nothing waits to deliver it again.
        const probe = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
        try {
          const jsm = await jetstreamManager(probe);
          await waitFor('the control consumer to settle the dead-lettered release', async () => {
            const info = await jsm.consumers.info(streams.control, consumers.orchestrator);
            return info.num_ack_pending === 0 && info.num_pending === 0;
          });
        } finally {
          await probe.close();
        }
        assert.equal(logger.lines.filter((l) => l.includes(`could not apply run.release of run ${runId}`)).length, 3);
        await client.deploy(await loadPipeline(fixture('orders.ts')));
        await eventRunSucceeds(client, 'after-poison');

        // Bounded everywhere: every consumer has max_deliver, every stream a retention.
        const admin = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
        try {
          const jsm = await jetstreamManager(admin);
          // What grows with use: requests, work, events, dead letters, and the run history.
          for (const name of [streams.control, streams.work, streams.events, streams.dead, `KV_${buckets.runs}`, `KV_${buckets.steps}`, `KV_${buckets.claims}`]) {
            const { max_age: maxAge, max_bytes: maxBytes, max_msgs: maxMsgs } = (await jsm.streams.info(name)).config;
            assert.ok(maxAge > 0 || maxBytes > 0 || maxMsgs > 0, `stream ${name} grows without bound`);
          }
          for await (const stream of jsm.streams.list()) {
            for await (const consumer of jsm.consumers.list(stream.config.name)) {
              if (!consumer.config.durable_name) continue;
              assert.ok((consumer.config.max_deliver ?? -1) > 0, `consumer ${consumer.name} on ${stream.config.name} retries for ever`);
            }
          }
          const dead = (await jsm.streams.info(streams.dead)).config;
          assert.equal(dead.max_msgs, 100_000);
          assert.equal(dead.max_age, 30 * 24 * 3600 * 1e9);
          assert.equal((await jsm.streams.info(streams.events)).config.max_msg_size, 256 * 1024);
          assert.equal((await jsm.streams.info(`KV_${buckets.runs}`)).config.max_age, 30 * 24 * 3600 * 1e9);
        } finally {
          await admin.close();
        }
      },
      { logger, topology: { messageMaxDeliver: 3 } },
    );
  });

  it('dead-letters a message whose handler died on its last delivery (the max-deliveries advisory)', async () => {
    await withCluster(async (cluster) => {
      const nc = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
      try {
        const js = jetstream(nc);
        const jsm = await jetstreamManager(nc);
        // A host whose only executor takes a step and dies with it: one delivery allowed.
        const consumer = await ensureHostConsumer(jsm, 'ghost', { ackWaitMs: 500, maxDeliver: 1 });
        const { seq } = await js.publish(subjects.stepReadyOnHost('ghost'), 'a step nobody finishes', { msgID: 'ghost-1' });
        const ghost = await js.consumers.get(streams.work, consumer);
        const taken = await ghost.next({ expires: 5000 });
        assert.ok(taken, 'the ghost executor got nothing');
        // Its restarted executor asks for work again: JetStream finds the step delivered as often
        // as allowed, hands it to nobody, and says so in the advisory the leader acts on.
        const [letter] = await waitFor('the abandoned step to be dead-lettered', async () => {
          const again = await ghost.next({ expires: 1000 });
          assert.equal(again, null, 'the step was delivered beyond max_deliver');
          const found = await deadLettersOn(cluster.client, subjects.stepReadyOnHost('ghost'));
          return found.length > 0 ? found : null;
        });
        assert.match(letter!.reason, /delivered 1 times to consumer executors-host-ghost and never acked/);
        assert.equal(letter!.payload, 'a step nobody finishes');
        // Out of the work queue, which would otherwise keep it for ever.
        await waitFor('the work queue to let go of it', async () => (await jsm.streams.getMessage(streams.work, { seq }).catch(() => null)) === null);
      } finally {
        await nc.close();
      }
    });
  });
});
