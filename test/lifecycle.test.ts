import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { tableFromArrays } from 'apache-arrow';
import { jetstream } from '@nats-io/jetstream';
import { ulid } from 'ulid';
import { stepProcesses } from '../executor/index.ts';
import { consumers, decode, encode, runCancel, runSubmit, runView, stepReady, stepStarted, streams, subjects, type RunView } from '../schemas/index.ts';
import { loadPipeline } from '../sdk/index.ts';
import { listSegments, writeTableToShm } from '../shm/index.ts';
import { EUROPEAN_COUNTRIES, generateTransactions } from '../examples/transactions/data.ts';
import { fixture, runFile, stepOf, waitFor, withCluster } from './helpers.ts';

describe('run lifecycle', () => {
  it('cancels a run mid-step: the step process is killed, the rest cancelled, nothing left in shared memory', async () => {
    await withCluster(async (cluster, home) => {
      const marks = join(home, 'cancel.marks');
      const loaded = await loadPipeline(fixture('slow.ts'));
      const handle = await cluster.client.run(loaded, { params: { sleepMs: '30000', marks } });
      await waitFor('the slow step to start', () => existsSync(marks) && readFileSync(marks, 'utf8').includes('slow'));
      const [process] = stepProcesses(cluster.client.topology.clusterId).filter((p) => p.runId === handle.id);
      assert.ok(process, 'the slow step has a process');
      await handle.cancel('the user changed their mind');
      const view = await handle.result();
      assert.equal(view.state, 'cancelled');
      assert.deepEqual(
        view.steps.map((s) => [s.name, s.state]),
        [
          ['first', 'succeeded'],
          ['slow', 'cancelled'],
          ['last', 'cancelled'],
        ],
      );
      await waitFor('the step process to be killed', () => !existsSync(`/proc/${process.pid}`));
      await handle.release();
      await waitFor('the run segments to be released', () => listSegments(cluster.executor.shmDir).length === 0);
    });
  });

  it('cancels a run whose cancel comes while its admission is being written', async () => {
    await withCluster(async (cluster) => {
      const loaded = await loadPipeline(fixture('slow.ts'));
      const { nc } = cluster.client;
      // A submission as the client sends it, to send again under another run id.
      let sent: Uint8Array | null = null;
      const sub = nc.subscribe(subjects.runSubmit, { callback: (_e, msg) => void (sent ??= msg.data.slice()) });
      await nc.flush();
      const first = await cluster.client.run(loaded, { params: { sleepMs: '1' } });
      assert.equal((await first.result()).state, 'succeeded');
      await first.release();
      sub.unsubscribe();
      const submit = decode(runSubmit, subjects.runSubmit, sent!);
      const runId = ulid();
      // Back to back in the control stream: the orchestrator handles the cancel while the run's
      // record is still being written (the submission let go of its lane), before the run exists.
      const js = jetstream(nc);
      await Promise.all([
        js.publish(subjects.runSubmit, encode(runSubmit, { ...submit, runId, params: { sleepMs: '3000' }, submittedAt: Date.now() }), { msgID: `${runId}.submit` }),
        js.publish(subjects.runCancel, encode(runCancel, { type: 'run.cancel', runId, reason: 'sent right after it' }), { msgID: `${runId}.cancel` }),
      ]);
      const view = await waitFor('the run to end', async () => {
        const seen = await cluster.client.getRun(runId);
        return seen && seen.state !== 'running' && seen.state !== 'queued' ? seen : null;
      });
      assert.equal(view.state, 'cancelled', `the cancel was lost: the run ${view.state}`);
      assert.equal(stepOf(view, 'last').state, 'cancelled');
      await cluster.client.release(runId);
      await waitFor('the run segments to be released', () => listSegments(cluster.executor.shmDir).length === 0);
    });
  });

  it('splits an output larger than the segment limit across segments and reads it back whole', async () => {
    await withCluster(
      async (cluster, home) => {
        const rows = 100_000;
        const { view } = await runFile(cluster, home, fixture('transactions-generated.ts'), { params: { rows: String(rows) }, release: false });
        assert.equal(view.state, 'succeeded');
        const transactions = stepOf(view, 'transactions');
        assert.ok(transactions.output!.segments.length >= 2, `${transactions.output!.segments.length} segment(s)`);
        assert.ok(transactions.output!.segments.every((s) => s.byteSize <= 1 << 20));
        const european = new Set(EUROPEAN_COUNTRIES);
        const expected = [...generateTransactions(rows)].filter((r) => european.has(String(r.country))).length;
        assert.equal(stepOf(view, 'euro_selection').rows, expected);
        await cluster.client.release(view.runId);
      },
      { executor: { maxSegmentBytes: 1 << 20 } },
    );
  });

  it('does not run a finished step again when its ready message comes back', async () => {
    await withCluster(async (cluster, home) => {
      const marks = join(home, 'redelivery.marks');
      const { view } = await runFile(cluster, home, fixture('slow.ts'), { params: { sleepMs: '10', marks } });
      assert.equal(view.state, 'succeeded');
      const first = stepOf(view, 'first');
      // As if the orchestrator re-sent it after the duplicate window: a new message id.
      const js = jetstream(cluster.client.nc);
      const loaded = await loadPipeline(fixture('slow.ts'));
      await js.publish(
        subjects.stepReady,
        encode(stepReady, { type: 'step.ready', runId: view.runId, step: 'first', pipeline: 'slow', codeHash: loaded.codeHash, params: { marks }, inputs: [] }),
        { msgID: ulid() },
      );
      await waitFor('the work queue to drain', async () => (await (await js.consumers.get(streams.work, consumers.executors)).info()).num_pending === 0 || null);
      await new Promise((r) => setTimeout(r, 500));
      assert.deepEqual(readFileSync(marks, 'utf8').split('\n').filter(Boolean), ['first', 'slow', 'last']);
      assert.deepEqual((await cluster.client.getRun(view.runId))?.steps.find((s) => s.name === 'first')?.output, first.output);
    });
  });

  it('collects segments and step processes of runs no orchestrator knows', async () => {
    await withCluster(async (cluster) => {
      const deadRun = ulid();
      const { segments } = writeTableToShm(tableFromArrays({ v: Int32Array.of(1, 2, 3) }), { dir: cluster.executor.shmDir, idPrefix: `${deadRun}.orphan.1` });
      const stray = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)', 'quiver-step', cluster.client.topology.clusterId, deadRun, 'orphan'], { stdio: 'ignore' });
      await waitFor('the stray process to show up', () => stepProcesses(cluster.client.topology.clusterId).some((p) => p.pid === stray.pid));
      const exited = new Promise((r) => stray.once('exit', (_code, signal) => r(signal)));
      const removed = await cluster.executor.collectGarbage();
      assert.deepEqual(removed, { segments: segments.length, processes: 1 });
      assert.equal(await exited, 'SIGKILL');
      assert.deepEqual(listSegments(cluster.executor.shmDir), []);
    });
  });
});

describe('bad work', () => {
  it('fails a step whose stored pipeline code is corrupt, saying so, instead of retrying it', async () => {
    await withCluster(async (cluster) => {
      const loaded = await loadPipeline(fixture('slow.ts'));
      // Code that does not hash to its name (as after corruption in the object store).
      const handle = await cluster.client.run({ ...loaded, codeHash: 'f'.repeat(64), code: new Uint8Array([1, 2, 3]) }, {});
      const view = await handle.result();
      assert.equal(view.state, 'failed');
      const first = stepOf(view, 'first');
      assert.equal(first.error?.code, 'ERR_PIPELINE_CODE');
      assert.match(first.error?.message ?? '', /hashes to [0-9a-f]{64}: refusing to run it/);
      assert.equal(stepOf(view, 'slow').state, 'skipped');
    });
  });
});

describe('live starts', () => {
  it('a step running longer than a moment is announced and shows running; every step still reports when it started', async () => {
    await withCluster(async (cluster) => {
      const started: string[] = [];
      const sub = cluster.client.nc.subscribe(subjects.stepStarted, { callback: (_e, msg) => void started.push(decode(stepStarted, msg.subject, msg.data).step) });
      const views: RunView[] = [];
      const loaded = await loadPipeline(fixture('slow.ts'));
      const handle = await cluster.client.run(loaded, { params: { sleepMs: '1500' } });
      const status = cluster.client.nc.subscribe(subjects.status(handle.id), { callback: (_e, msg) => void views.push(decode(runView, msg.subject, msg.data)) });
      try {
        await waitFor('the slow step to be announced', () => started.includes('slow'), 20_000);
        await waitFor('a view with the slow step running', () => views.some((v) => v.steps.find((s) => s.name === 'slow')?.state === 'running'), 5000);
        const view = await handle.result();
        assert.equal(view.state, 'succeeded');
        for (const step of view.steps) assert.ok(typeof step.startedAt === 'number' && step.startedAt <= (step.finishedAt ?? 0), `step ${step.name} reports when it started`);
        await handle.release();
      } finally {
        sub.unsubscribe();
        status.unsubscribe();
      }
    });
  });
});

describe('run views', () => {
  it('a 100-step run sends fewer views than it has steps, each at least as far along as the last, ending with the final one', async () => {
    await withCluster(async (cluster) => {
      const handle = await cluster.client.run(await loadPipeline(fixture('ui-wide.ts')));
      const views: RunView[] = [];
      for await (const event of handle.events()) if (event.type === 'status') views.push(event.view);
      await handle.release();
      const last = views.at(-1)!;
      assert.equal(last.state, 'succeeded');
      assert.equal(last.steps.filter((s) => s.state === 'succeeded').length, 100);
      // One view per transition would be at least one per step (each step's completion), and each
      // holds all 100 steps: views are throttled per run, the last change of a window sent at its end.
      assert.ok(views.length < 100, `${views.length} views`);
      const done = views.map((v) => v.steps.filter((s) => s.state === 'succeeded').length);
      for (let i = 1; i < done.length; i++) assert.ok(done[i]! >= done[i - 1]!, `view ${i} shows fewer steps done than the one before: ${done.join(', ')}`);
    });
  });
});
