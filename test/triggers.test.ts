import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { decode, deploymentsSeen, encode, isFinished, runRecord, subjects, type RunView } from '../schemas/index.ts';
import { loadPipeline, NotDeployedError, TriggerError, type QuiverClient } from '../sdk/index.ts';
import { fixture, repoRoot, waitFor, withCluster } from './helpers.ts';

const runsOf = async (client: QuiverClient, pipeline: string) => client.listRuns({ pipeline });
const byEvent = (runs: RunView[], eventId: string) => runs.filter((r) => r.trigger.kind === 'event' && r.trigger.eventId === eventId);

async function finishedRunOfEvent(client: QuiverClient, pipeline: string, eventId: string): Promise<RunView> {
  return waitFor(`the run of event ${eventId}`, async () => byEvent(await runsOf(client, pipeline), eventId).find((r) => isFinished(r.state)));
}

/** A pipeline file outside the repo, importing the SDK by absolute path: for versions of one pipeline. */
function pipelineFile(dir: string, name: string, rows: number): string {
  const file = join(dir, `${name}-${rows}.ts`);
  writeFileSync(
    file,
    `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline(${JSON.stringify(name)}, {
  out: step(async (_i, ctx) => {
    await new Promise((r) => setTimeout(r, Number(ctx.params.sleepMs ?? 0)));
    return tableFromArrays({ v: new Int32Array(${rows}) });
  }),
});
`,
  );
  return file;
}

describe('event triggers', () => {
  it('starts one run per event, hands the step the event, and drops a second publish of the same id', async () => {
    await withCluster(async ({ client }) => {
      const { deployment, changed } = await client.deploy(await loadPipeline(fixture('orders.ts')));
      assert.equal(changed, true);
      assert.equal(deployment.version, 1);

      const first = await client.publish('orders.uploaded', { count: 7 }, { id: 'order-batch-1' });
      assert.equal(first.duplicate, false);
      const again = await client.publish('orders.uploaded', { count: 7 }, { id: 'order-batch-1' });
      assert.equal(again.duplicate, true, 'JetStream drops the second publish of an id');

      const run = await finishedRunOfEvent(client, 'orders', 'order-batch-1');
      assert.equal(run.state, 'succeeded', JSON.stringify(run.steps[0]?.error));
      assert.equal(run.steps[0]!.rows, 7, 'the step saw the payload through ctx.event');
      assert.deepEqual(run.trigger, { kind: 'event', subject: 'orders.uploaded', eventId: 'order-batch-1', sequence: first.sequence });
      assert.equal(run.version, 1);

      // A later event proves the earlier ones were all handled: the events stream is in order.
      await client.publish('orders.uploaded', { count: 1 }, { id: 'order-batch-2' });
      await finishedRunOfEvent(client, 'orders', 'order-batch-2');
      assert.equal(byEvent(await runsOf(client, 'orders'), 'order-batch-1').length, 1);
      // Events nobody listens to start nothing and are not errors.
      await client.publish('invoices.uploaded', { count: 1 }, { id: 'invoice-1' });
    });
  });

  it('runs the orders example from an event, its zod schema checked', async () => {
    await withCluster(async ({ client }) => {
      const { deployment } = await client.deploy(await loadPipeline(join(repoRoot, 'examples', 'orders', 'pipeline.ts')));
      assert.ok(deployment.schedule, 'the example is also scheduled');
      assert.equal(deployment.events[0]!.schema?.type, 'object', 'the zod schema was stored as JSON Schema');
      await client.publish('orders.uploaded', { batch: 'b1', orders: 5000 }, { id: 'example-1' });
      await client.publish('orders.uploaded', { batch: 'b2', orders: -1 }, { id: 'example-bad' });
      const run = await finishedRunOfEvent(client, 'orders', 'example-1');
      assert.equal(run.state, 'succeeded', JSON.stringify(run.steps.map((s) => s.error)));
      assert.equal(run.steps.find((s) => s.name === 'orders')!.rows, 5000);
      assert.ok(run.steps.find((s) => s.name === 'totals')!.rows! > 0);
      await waitFor('the bad event to be dead-lettered', async () => (await client.deadEvents()).find((d) => d.eventId === 'example-bad'));
    });
  });

  it('starts a run for an event published right after its pipeline was deployed', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-deploy-race-'));
    try {
      await withCluster(async ({ client }) => {
        const names = Array.from({ length: 15 }, (_, i) => `race_${i}`);
        for (const name of names) {
          const file = join(dir, `${name}.ts`);
          writeFileSync(
            file,
            `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline(${JSON.stringify(name)}, { out: step(() => tableFromArrays({ v: new Int32Array(1) })) }, { on: { event: ${JSON.stringify(`race.${name}`)} } });
`,
          );
          const loaded = await loadPipeline(file);
          // No pause: the deploy travels on KV, the event on another stream.
          await client.deploy(loaded);
          await client.publish(`race.${name}`, {}, { id: `race-${name}` });
        }
        for (const name of names) await finishedRunOfEvent(client, name, `race-${name}`);
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('matches an event published right after a redeploy against the new version, and one right after an undeploy against nothing', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-redeploy-race-'));
    try {
      await withCluster(async ({ client }) => {
        // Each version's code differs (its table's rows), so each deploy makes a new version.
        const versionFile = (rows: number) => {
          const file = join(dir, `flip-${rows}.ts`);
          writeFileSync(
            file,
            `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('flip', { out: step(() => tableFromArrays({ v: new Int32Array(${rows}) })) }, { on: { event: 'flip.go' } });
`,
          );
          return file;
        };
        for (let round = 1; round <= 8; round++) {
          const rows = round % 2 === 0 ? 5 : 3;
          const { deployment } = await client.deploy(await loadPipeline(versionFile(rows)));
          // No pause: the deploy travels on KV, the event on another stream.
          await client.publish('flip.go', {}, { id: `flip-${round}` });
          const run = await finishedRunOfEvent(client, 'flip', `flip-${round}`);
          assert.equal(run.version, deployment.version, `round ${round}: the event ran version ${run.version}, deployed before it was ${deployment.version}`);
          assert.equal(run.steps[0]!.rows, rows);
        }
        // What deploy and undeploy wait for: the leader answers with the revision its triggers reflect, the bucket's last.
        const answer = decode(deploymentsSeen, subjects.deploymentsSeen, (await client.nc.request(subjects.deploymentsSeen, encode(deploymentsSeen, { type: 'deployments.seen' }))).data);
        const status = await client.topology.pipelines.status();
        assert.equal(answer.revision, status.streamInfo.state.last_seq);
        await client.undeploy('flip');
        await client.publish('flip.go', {}, { id: 'flip-after-undeploy' });
        const dead = await waitFor('the event after the undeploy to be dead-lettered', async () => (await client.deadEvents()).find((d) => d.eventId === 'flip-after-undeploy'));
        assert.match(dead.reason, /no deployed pipeline has a trigger matching "flip.go"/);
        assert.equal(byEvent(await runsOf(client, 'flip'), 'flip-after-undeploy').length, 0);
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('dead-letters an event that fails the schema, with the reason, and starts nothing for it', async () => {
    await withCluster(async ({ client }) => {
      await client.deploy(await loadPipeline(fixture('orders.ts')));
      await client.publish('orders.uploaded', { count: 'seven' }, { id: 'bad-1' });
      await client.publish('orders.uploaded', { count: 2 }, { id: 'good-1' });
      await finishedRunOfEvent(client, 'orders', 'good-1');

      assert.equal(byEvent(await runsOf(client, 'orders'), 'bad-1').length, 0);
      const dead = await client.deadEvents();
      assert.equal(dead.length, 1);
      assert.equal(dead[0]!.eventId, 'bad-1');
      assert.equal(dead[0]!.pipeline, 'orders');
      assert.match(dead[0]!.reason, /\/count must be integer/);
      assert.deepEqual(JSON.parse(dead[0]!.payload), { count: 'seven' });
    });
  });

  it('absorbs a burst of 1,000 events: runs queue under maxConcurrentRuns, start in order, and none is lost', async () => {
    await withCluster(
      async ({ client }) => {
        await client.deploy(await loadPipeline(fixture('burst.ts')));
        const published = await Promise.all(Array.from({ length: 1000 }, (_, n) => client.publish(`burst.${n % 7}`, { n }, { id: `burst-${n}` })));
        assert.equal(published.filter((p) => p.duplicate).length, 0);

        // Watched, not polled: listing 1,000 runs every few milliseconds would be most of the load.
        const finished = new Set<string>();
        const watch = await client.topology.runs.watch();
        void (async () => {
          for await (const entry of watch) {
            if (entry.operation === 'PUT' && isFinished(runRecord.parse(entry.json()).state)) finished.add(entry.key);
          }
        })();
        try {
          await waitFor('all 1,000 runs to finish', () => finished.size >= 1000, 900_000);
        } finally {
          watch.stop();
        }
        const runs = await runsOf(client, 'burst');
        assert.equal(runs.length, 1000);
        const failed = runs.filter((r) => r.state !== 'succeeded');
        assert.equal(failed.length, 0, `runs that did not succeed, e.g.: ${JSON.stringify(failed[0]?.steps[0])}`);
        assert.deepEqual(new Set(runs.map((r) => (r.trigger as { eventId: string }).eventId)), new Set(published.map((p) => p.id)));

        // Never more than three at once: count overlaps of [startedAt, finishedAt) on the orchestrator's clock.
        const edges = runs.flatMap((r) => [
          { at: r.startedAt!, delta: 1 },
          { at: r.finishedAt!, delta: -1 },
        ]);
        edges.sort((a, b) => a.at - b.at || a.delta - b.delta);
        let going = 0;
        let most = 0;
        for (const e of edges) most = Math.max(most, (going += e.delta));
        assert.ok(most <= 3, `at most 3 runs at once, saw ${most}`);
        assert.ok(runs.some((r) => r.startedAt! > r.submittedAt), 'some runs waited in the queue');

        // In order: by event sequence, each run started no earlier than the one before it.
        const bySequence = [...runs].sort((a, b) => (a.trigger as { sequence: number }).sequence - (b.trigger as { sequence: number }).sequence);
        for (let i = 1; i < bySequence.length; i++) assert.ok(bySequence[i]!.startedAt! >= bySequence[i - 1]!.startedAt!, `run ${i} started out of order`);
      },
      { executor: { concurrency: 3 } },
    );
  });
});

describe('deployments and programmatic runs', () => {
  it('makes a new version only when the code changes, and a run keeps its version when a new one is deployed', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-versions-'));
    try {
      await withCluster(async ({ client }) => {
        const v1 = await client.deploy(await loadPipeline(pipelineFile(dir, 'versions', 3)));
        assert.equal(v1.deployment.version, 1);
        assert.equal((await client.deploy(await loadPipeline(pipelineFile(dir, 'versions', 3)))).changed, false);

        const going = await client.run('versions', { params: { sleepMs: '1500' } });
        await waitFor('the v1 run to start', async () => (await client.getRun(going.id))?.steps[0]?.state === 'running');
        const v2 = await client.deploy(await loadPipeline(pipelineFile(dir, 'versions', 5)));
        assert.equal(v2.deployment.version, 2);

        const old = await going.result();
        assert.equal(old.state, 'succeeded');
        assert.equal(old.version, 1);
        assert.equal(old.steps[0]!.rows, 3, 'the run that was going ran version 1 code');
        await going.release();

        const fresh = await client.run('versions');
        const view = await fresh.result();
        await fresh.release();
        assert.equal(view.version, 2);
        assert.equal(view.steps[0]!.rows, 5);
        assert.deepEqual(view.trigger, { kind: 'user', by: process.env.USER ?? 'user' });

        assert.deepEqual((await client.listDeployments()).map((d) => [d.name, d.version]), [['versions', 2]]);
        await client.undeploy('versions');
        await assert.rejects(client.run('versions'), (e: Error) => e instanceof NotDeployedError && /not deployed; none is/.test(e.message));
        // Versions go on after an undeploy.
        assert.equal((await client.deploy(await loadPipeline(pipelineFile(dir, 'versions', 3)))).deployment.version, 3);
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('cancels a queued run without running it, and a running one, leaving no process behind', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-cancel-'));
    try {
      const file = join(dir, 'one-at-a-time.ts');
      writeFileSync(
        file,
        `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('one_at_a_time', {
  out: step(async () => { await new Promise((r) => setTimeout(r, 60_000)); return tableFromArrays({ v: new Int32Array(1) }); }),
}, { maxConcurrentRuns: 1 });
`,
      );
      await withCluster(async ({ client }) => {
        await client.deploy(await loadPipeline(file));
        const first = await client.run('one_at_a_time');
        const second = await client.run('one_at_a_time');
        await waitFor('the first run to be running', async () => (await client.getRun(first.id))?.steps[0]?.state === 'running');
        assert.equal((await client.getRun(second.id))?.state, 'queued');

        await second.cancel('not needed');
        const cancelledQueued = await second.result();
        assert.equal(cancelledQueued.state, 'cancelled');
        assert.equal(cancelledQueued.startedAt, null, 'a cancelled queued run never started');

        await first.cancel('stop');
        const cancelledRunning = await first.result();
        assert.equal(cancelledRunning.state, 'cancelled');
        await waitFor('the step process to be gone', async () => !(await import('node:child_process')).execSync('ps -eo args').toString().includes(first.id));
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses to deploy a pipeline whose stored-table source cannot be read', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-deploy-source-'));
    const storage = process.env.QUIVER_STORAGE;
    process.env.QUIVER_STORAGE = join(dir, 'storage');
    try {
      const file = join(dir, 'reads-missing.ts');
      writeFileSync(
        file,
        `import { pipeline, source, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('reads_missing', { out: step({ t: source('no_such_table') }, ({ t }) => t) }, { on: { event: 'x.y' } });
`,
      );
      await withCluster(async ({ client }) => {
        await assert.rejects(client.deploy(await loadPipeline(file)), /source\('no_such_table'\).*no_such_table/);
        assert.deepEqual(await client.listDeployments(), [], 'nothing was deployed');
      });
    } finally {
      if (storage === undefined) delete process.env.QUIVER_STORAGE;
      else process.env.QUIVER_STORAGE = storage;
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('rejects triggers that cannot work before deploying anything', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-bad-triggers-'));
    try {
      const write = (name: string, options: string) => {
        const file = join(dir, `${name}.ts`);
        writeFileSync(
          file,
          `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('bad', { out: step(() => tableFromArrays({ v: new Int32Array(1) })) }, ${options});
`,
        );
        return file;
      };
      const cases: [string, string, RegExp][] = [
        ['cron', `{ schedule: { cron: 'every tuesday' } }`, /cron "every tuesday" does not parse/],
        ['zone', `{ schedule: { cron: '0 * * * *', timezone: 'Mars/Olympus' } }`, /timezone "Mars\/Olympus" is not an IANA time zone/],
        ['subject', `{ on: { event: 'orders..uploaded' } }`, /event "orders\.\.uploaded" must be a subject/],
        ['schema', `{ on: { event: 'a', schema: { type: 'no-such-type' } } }`, /schema is not valid JSON Schema/],
        ['limit', `{ maxConcurrentRuns: 0 }`, /maxConcurrentRuns of pipeline "bad" must be a whole number/],
      ];
      for (const [name, options, message] of cases) {
        await assert.rejects(loadPipeline(write(name, options)), (e: Error) => e instanceof TriggerError && message.test(e.message), name);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
