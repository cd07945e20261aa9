import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { describe, it } from 'node:test';
import { Kvm } from '@nats-io/kv';
import { connect } from '@nats-io/transport-node';
import { buildRunner } from '../executor/build-runner.ts';
import type { RunnerJob } from '../executor/protocol.ts';
import { StepProcesses } from '../executor/step-processes.ts';
import { removeDir } from '../shm/index.ts';
import { bundleDir, buckets, type LogLine, type RunView } from '../schemas/index.ts';
import { loadPipeline, type LocalCluster, type LocalClusterOptions } from '../sdk/index.ts';
import { TEST_SHM_ROOT, fixture, runFile, stepOf, tempHome, waitFor, withCluster, withEnv } from './helpers.ts';

/** Step processes and workers of one cluster, running a step or not, found by their command line; with `zygotes`, step zygotes too. */
function stepProcessesOf(clusterId: string, zygotes = true): number[] {
  const found: number[] = [];
  for (const pid of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split(/[\0 ]+/);
      const at = argv.indexOf('quiver-step');
      if (at >= 0 && argv[at + 1] === clusterId && (zygotes || argv[at + 3] !== 'zygote')) found.push(Number(pid));
    } catch {
      // Gone while we looked.
    }
  }
  return found;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Like withCluster, then proves the cluster left no step process or worker behind. */
async function withWorkers(fn: (cluster: LocalCluster, home: string) => Promise<void>, options: LocalClusterOptions = {}): Promise<void> {
  let clusterId = '';
  await withCluster(async (cluster, home) => {
    clusterId = basename(cluster.executor.shmDir);
    await fn(cluster, home);
  }, options);
  await waitFor('every step process of the cluster to exit', () => stepProcessesOf(clusterId).length === 0, 5000);
}

type Row = Record<string, unknown>;

/** Runs test/fixtures/isolation-faults.ts once; its step's row (if it succeeded) and the pid it logged. */
async function act(cluster: LocalCluster, home: string, params: Record<string, string> = {}) {
  const run = await runFile(cluster, home, fixture('isolation-faults.ts'), { params, release: false });
  const step = stepOf(run.view, 'act');
  const row = step.output ? (cluster.client.openOutput(step.output).table.get(0)!.toJSON() as Row) : null;
  await cluster.client.release(run.view.runId);
  const logged = run.logs.find((l) => l.step === 'act' && l.line.startsWith('act pid '));
  return { view: run.view, step, row, pid: logged ? Number(logged.line.split(' ')[2]) : NaN };
}

function rowOf(cluster: LocalCluster, view: RunView, step: string): Row {
  return cluster.client.openOutput(stepOf(view, step).output!).table.get(0)!.toJSON() as Row;
}

const TIMEOUT = { timeout: 120_000 };

describe('StepProcesses, without a cluster', () => {
  it('forwards every line a worker step prints before the step resolves, attributed to that step', TIMEOUT, async () => {
    const home = tempHome();
    const runner = await buildRunner(bundleDir('build'));
    const codePath = join(home.dir, 'chatty.mjs');
    // Prints params.lines lines on each stream (the last one without a newline), returns no rows.
    const source = `import { tableFromArrays } from 'apache-arrow';
      export default { steps: { chatty: { fn: (_inputs, ctx) => {
        const n = Number(ctx.params.lines);
        const streams = ctx.params.streams;
        for (let i = 0; i < n; i++) {
          if (streams !== 'stderr') console.log(ctx.runId + ' out ' + i + ' ' + 'x'.repeat(200));
          if (streams !== 'stdout') console.error(ctx.runId + ' err ' + i);
        }
        if (streams !== 'stderr' && n > 0) process.stdout.write(ctx.runId + ' unterminated');
        return tableFromArrays({ n: Int32Array.of(n) });
      } } } };`;
    writeFileSync(codePath, await runner.linkCode(new TextEncoder().encode(source), codePath));
    const shmDir = join(TEST_SHM_ROOT, `isolation-${process.pid}`);
    mkdirSync(shmDir, { recursive: true });
    const logs: LogLine[] = [];
    const processes = new StepProcesses({ runnerPath: runner.runnerPath, clusterId: 'isolation-unit', prewarm: 0, onLog: (l) => logs.push(l) });
    const job = (runId: string, lines: number, streams: string): RunnerJob => ({
      codePath, runId, step: 'chatty', params: { lines: String(lines), streams }, event: null, inputs: [], shmDir, outputIdPrefix: `${runId}.chatty.1`,
    });
    // Only a stream a step printed to carries its end marker: steps printing to both, to one, or to none.
    const kinds = [
      { streams: 'both', lines: 2000, stdout: 2001, stderr: 2000 },
      { streams: 'stdout', lines: 2000, stdout: 2001, stderr: 0 },
      { streams: 'stderr', lines: 2000, stdout: 0, stderr: 2000 },
      { streams: 'both', lines: 0, stdout: 0, stderr: 0 },
      { streams: 'both', lines: 1500, stdout: 1501, stderr: 1500 },
    ];
    try {
      for (let i = 0; i < 15; i++) {
        const runId = `run${i}`;
        const kind = kinds[i % kinds.length]!;
        const reply = await processes.run(job(runId, kind.lines, kind.streams), 'worker');
        assert.equal(reply.type, 'result', JSON.stringify(reply));
        const mine = logs.filter((l) => l.runId === runId);
        assert.equal(mine.filter((l) => l.stream === 'stdout').length, kind.stdout, `all stdout lines of ${runId} (${kind.streams}) before its reply`);
        assert.equal(mine.filter((l) => l.stream === 'stderr').length, kind.stderr, `all stderr lines of ${runId} (${kind.streams}) before its reply`);
        assert.ok(mine.every((l) => l.line.startsWith(`${runId} `) && l.step === 'chatty'));
        if (kind.stdout > 0) assert.ok(mine.some((l) => l.stream === 'stdout' && l.line === `${runId} unterminated`), 'a last line without a newline is forwarded too');
      }
      const expected = Array.from({ length: 15 }, (_, i) => kinds[i % kinds.length]!).reduce((sum, k) => sum + k.stdout + k.stderr, 0);
      assert.equal(logs.length, expected, 'no line twice, no marker forwarded');
      assert.equal(processes.workerCount, 1, 'one worker ran all fifteen');
    } finally {
      processes.stop('the test ended');
      await waitFor('the worker to exit', () => stepProcessesOf('isolation-unit').length === 0, 5000);
      home.remove();
      removeDir(shmDir);
    }
  });
  it('starts step processes from the startup snapshot at its heap limit, and without it at any other, with one Arrow either way', TIMEOUT, async () => {
    const home = tempHome();
    const runner = await buildRunner(join(home.dir, 'build'), { snapshot: true, snapshotHeapMb: 256 });
    assert.ok(runner.snapshot, `a snapshot was built: ${runner.snapshotFailure}`);
    assert.equal(runner.snapshot.heapMb, 256);
    const codePath = join(home.dir, 'flags.mjs');
    // instanceof holds only if the step's Arrow is the runner's: the shim must hand over the snapshot's module.
    const source = `import { tableFromArrays, Table } from 'apache-arrow';
      import { writeFileSync } from 'node:fs';
      export default { steps: { flags: { fn: (_inputs, ctx) => {
        const table = tableFromArrays({ v: Int32Array.of(1) });
        writeFileSync(ctx.params.out, JSON.stringify({ execArgv: process.execArgv, sameArrow: table instanceof Table }));
        return table;
      } } } };`;
    writeFileSync(codePath, await runner.linkCode(new TextEncoder().encode(source), codePath));
    const shmDir = join(TEST_SHM_ROOT, `isolation-snapshot-${process.pid}`);
    mkdirSync(shmDir, { recursive: true });
    // Booted, not forked from a zygote: a zygote boots once, without the snapshot.
    const processes = new StepProcesses({ runnerPath: runner.runnerPath, snapshot: runner.snapshot, clusterId: 'isolation-snapshot', prewarm: 0, limits: { memoryMb: 256 }, forkServer: false, onLog: () => {} });
    try {
      const seen: Record<string, { execArgv: string[]; sameArrow: boolean }> = {};
      for (const [name, memoryMb] of [['snapshot', 256], ['plain', 300]] as const) {
        const out = join(home.dir, `${name}.json`);
        const job: RunnerJob = { codePath, runId: `run-${name}`, step: 'flags', params: { out }, event: null, inputs: [], shmDir, outputIdPrefix: `run-${name}.flags.1` };
        const reply = await processes.run(job, 'process', { limits: { memoryMb } });
        assert.equal(reply.type, 'result', JSON.stringify(reply));
        seen[name] = JSON.parse(readFileSync(out, 'utf8'));
      }
      assert.ok(seen.snapshot!.execArgv.includes('--snapshot-blob'), `from the snapshot: ${seen.snapshot!.execArgv.join(' ')}`);
      assert.ok(!seen.plain!.execArgv.includes('--snapshot-blob'), `another heap limit starts plain: ${seen.plain!.execArgv.join(' ')}`);
      assert.ok(seen.snapshot!.sameArrow && seen.plain!.sameArrow);
      assert.equal(runner.snapshot.blobPath.endsWith('-256mb.blob'), true);
    } finally {
      processes.stop('the test ended');
      await waitFor('the step processes to exit', () => stepProcessesOf('isolation-snapshot').length === 0, 5000);
      home.remove();
      removeDir(shmDir);
    }
  });
  it('builds no snapshot when QUIVER_STEP_SNAPSHOT=0', TIMEOUT, async () => {
    const home = tempHome();
    try {
      const runner = await withEnv({ QUIVER_STEP_SNAPSHOT: '0' }, () => buildRunner(join(home.dir, 'build')));
      assert.equal(runner.snapshot, null);
      assert.equal(runner.snapshotFailure, null);
    } finally {
      home.remove();
    }
  });
  it('keeps at most maxIdleWorkers idle workers over every pipeline version, letting the one idle longest go', TIMEOUT, async () => {
    const home = tempHome();
    const runner = await buildRunner(bundleDir('build'));
    const versions = await Promise.all(
      [1, 2, 3].map(async (v) => {
        const codePath = join(home.dir, `version${v}.mjs`);
        const source = `import { tableFromArrays } from 'apache-arrow';
          export default { steps: { pid: { fn: () => tableFromArrays({ pid: Int32Array.of(process.pid), v: Int32Array.of(${v}) }) } } };`;
        writeFileSync(codePath, await runner.linkCode(new TextEncoder().encode(source), codePath));
        return codePath;
      }),
    );
    const shmDir = join(TEST_SHM_ROOT, `isolation-idle-${process.pid}`);
    mkdirSync(shmDir, { recursive: true });
    const processes = new StepProcesses({ runnerPath: runner.runnerPath, clusterId: 'isolation-idle', prewarm: 0, workers: { maxIdleWorkers: 2 }, onLog: () => {} });
    const run = (codePath: string, n: number) =>
      processes.run({ codePath, runId: `idle${n}`, step: 'pid', params: {}, event: null, inputs: [], shmDir, outputIdPrefix: `idle${n}.pid.1` }, 'worker');
    try {
      for (const [n, codePath] of versions.entries()) assert.equal((await run(codePath, n)).type, 'result');
      // Three versions ran, one worker each; two may stay idle, so the first version's went.
      await waitFor('the oldest idle worker to exit', () => processes.workerCount === 2, 5000);
      assert.equal(stepProcessesOf('isolation-idle', false).length, 2);
      // The latest two are still warm: running them again starts no process.
      for (const [n, codePath] of versions.slice(1).entries()) assert.equal((await run(codePath, 10 + n)).type, 'result');
      assert.equal(processes.workerCount, 2);
    } finally {
      processes.stop('the test ended');
      await waitFor('the workers to exit', () => stepProcessesOf('isolation-idle').length === 0, 5000);
      home.remove();
      removeDir(shmDir);
    }
  });
});

describe("isolation: 'worker'", () => {
  it('runs a pipeline in one long-lived worker per version: module state survives, inputs stay zero-copy, every line reaches its step before the step completes', TIMEOUT, async () => {
    await withWorkers(async (cluster, home) => {
      const lines = 300;
      const runs = [];
      for (let i = 0; i < 2; i++) {
        const run = await runFile(cluster, home, fixture('isolation-worker.ts'), { params: { lines: String(lines) }, release: false });
        assert.equal(run.view.state, 'succeeded', JSON.stringify(run.view.steps.map((s) => [s.name, s.state, s.error])));
        runs.push({ ...run, summary: rowOf(cluster, run.view, 'summary'), fresh: rowOf(cluster, run.view, 'fresh') });
        await cluster.client.release(run.view.runId);
      }
      const [first, second] = runs as [(typeof runs)[0], (typeof runs)[0]];
      for (const run of runs) {
        assert.deepEqual(
          run.view.steps.map((s) => [s.name, s.isolation]),
          [['numbers', 'worker'], ['summary', 'worker'], ['fresh', 'process']],
        );
        assert.ok(stepOf(run.view, 'summary').codeStartedAt! >= stepOf(run.view, 'summary').startedAt!, 'codeStartedAt is set, after the claim');
        assert.equal(run.summary.zeroCopy, true, 'a worker maps its inputs without copying');
        assert.equal(run.summary.sum, (99_999 * 100_000) / 2);
        assert.equal(stepOf(run.view, 'summary').copiedBytes, stepOf(run.view, 'summary').bytes, 'only the output write is a copy');
      }
      // One worker ran numbers and summary of both runs: its module globals count all four calls.
      assert.equal(first.summary.pid, second.summary.pid, 'the second run reused the worker');
      assert.equal(first.summary.calls, 2);
      assert.equal(second.summary.calls, 4);
      // A process step gets a fresh process each time, which has run nothing else.
      assert.notEqual(first.fresh.pid, second.fresh.pid);
      assert.notEqual(first.fresh.pid, first.summary.pid);
      assert.equal(first.fresh.calls, 1);
      assert.equal(second.fresh.calls, 1);

      for (const run of runs) {
        const done = run.events.findIndex((e) => e.type === 'status' && stepOf(e.view, 'summary').state === 'succeeded');
        assert.ok(done > 0, 'summary succeeded');
        const logs = run.events.slice(0, done).flatMap((e) => (e.type === 'log' && e.log.step === 'summary' ? [e.log] : []));
        const later = run.events.slice(done).filter((e) => e.type === 'log' && e.log.step === 'summary');
        assert.equal(later.length, 0, 'no line of summary arrived after its completion');
        assert.deepEqual(logs.filter((l) => l.stream === 'stdout').map((l) => l.line), [...Array.from({ length: lines }, (_, i) => `summary out ${i}`), 'summary last words']);
        assert.deepEqual(logs.filter((l) => l.stream === 'stderr').map((l) => l.line), Array.from({ length: lines }, (_, i) => `summary err ${i}`));
        assert.deepEqual(run.logs.filter((l) => l.step === 'numbers').map((l) => l.line), ['numbers: 100000 rows']);
        assert.equal(run.logs.filter((l) => l.step === 'fresh').length, 0);
      }
      // Idle between steps, under a title gc leaves alone although the runs it served are over.
      const workerPid = Number(first.summary.pid);
      assert.match(readFileSync(`/proc/${workerPid}/cmdline`, 'utf8'), /^quiver-step \S+ - idle/);
      await cluster.executor.collectGarbage();
      assert.ok(isAlive(workerPid), 'gc spared the idle worker');
      const third = await runFile(cluster, home, fixture('isolation-worker.ts'), { release: false });
      assert.equal(rowOf(cluster, third.view, 'summary').pid, workerPid);
      await cluster.client.release(third.view.runId);
    });
  });

  it("lets a step override its pipeline's isolation", TIMEOUT, async () => {
    await withWorkers(async (cluster, home) => {
      const pids: { pooled: unknown; fresh: unknown }[] = [];
      for (let i = 0; i < 2; i++) {
        const { view } = await runFile(cluster, home, fixture('isolation-override.ts'), { release: false });
        assert.equal(view.state, 'succeeded');
        assert.equal(stepOf(view, 'pooled').isolation, 'worker');
        assert.equal(stepOf(view, 'fresh').isolation, 'process');
        pids.push({ pooled: rowOf(cluster, view, 'pooled').pid, fresh: rowOf(cluster, view, 'fresh').pid });
        await cluster.client.release(view.runId);
      }
      assert.equal(pids[0]!.pooled, pids[1]!.pooled);
      assert.notEqual(pids[0]!.fresh, pids[1]!.fresh);
    });
  });

  it('fails a step that throws with its error and stack, and keeps the worker for the next run', TIMEOUT, async () => {
    await withWorkers(async (cluster, home) => {
      const failed = await act(cluster, home, { mode: 'throw' });
      assert.equal(failed.view.state, 'failed');
      assert.equal(failed.step.error?.message, 'the act step failed on purpose');
      assert.match(failed.step.error?.stack ?? '', /isolation-faults\.ts:\d+/, 'the stack names the user file');
      assert.equal(failed.step.isolation, 'worker');
      const next = await act(cluster, home);
      assert.equal(next.view.state, 'succeeded');
      assert.equal(next.row?.pid, failed.pid, 'a step that throws does not cost its worker');
      assert.equal(next.row?.calls, 2);
    });
  });

  for (const [mode, reason] of [
    ['exit', /the worker process running step "act" exited with code 3 \(did the step call process\.exit/],
    ['timer', /the worker process crashed while step "act" ran with an uncaught exception .*: Error: thrown in a timer/],
    ['reject', /the worker process crashed while step "act" ran with an unhandled promise rejection: Error: a promise nobody awaited/],
  ] as const) {
    it(`fails a step whose worker ends (${mode}) with the reason, and runs the next step in a new worker`, TIMEOUT, async () => {
      await withWorkers(async (cluster, home) => {
        const before = await act(cluster, home);
        const crashed = await act(cluster, home, { mode });
        assert.equal(crashed.pid, before.pid, 'the crash happened in the worker of the first run');
        assert.equal(crashed.view.state, 'failed');
        assert.equal(crashed.step.error?.code, 'ERR_WORKER_CRASHED');
        assert.match(crashed.step.error?.message ?? '', reason);
        assert.match(crashed.step.error?.message ?? '', /replaced/);
        await waitFor('the crashed worker to be gone', () => !isAlive(crashed.pid), 5000);
        const after = await act(cluster, home);
        assert.equal(after.view.state, 'succeeded');
        assert.notEqual(after.pid, crashed.pid);
        assert.equal(after.row?.calls, 1, 'a new worker starts from fresh module state');
      });
    });
  }

  it('kills a worker whose event loop stops answering, fails its step saying so, and leaves nothing behind', TIMEOUT, async () => {
    await withWorkers(
      async (cluster, home) => {
        const started = Date.now();
        const hung = await act(cluster, home, { mode: 'hang' });
        const took = Date.now() - started;
        assert.equal(hung.view.state, 'failed');
        assert.equal(hung.step.error?.code, 'ERR_WORKER_HUNG');
        assert.match(hung.step.error?.message ?? '', /the worker process running step "act" stopped responding.*more than 1000 ms.*killed and replaced/);
        assert.ok(took < 10_000, `the hang was noticed in ${took} ms`);
        assert.ok(Number.isInteger(hung.pid));
        await waitFor('the hung worker to be gone', () => !isAlive(hung.pid), 5000);
        const after = await act(cluster, home);
        assert.equal(after.view.state, 'succeeded');
        assert.notEqual(after.pid, hung.pid);
      },
      { executor: { workers: { workerHangMs: 1000 } } },
    );
  });

  it('replaces a worker after maxStepsPerWorker steps and when its memory is above the limit, after the step succeeded', TIMEOUT, async () => {
    await withWorkers(
      async (cluster, home) => {
        const pids: number[] = [];
        for (let i = 0; i < 4; i++) pids.push((await act(cluster, home)).pid);
        assert.equal(pids[0], pids[1]);
        assert.equal(pids[1], pids[2]);
        assert.notEqual(pids[3], pids[2], 'a new worker after three steps');
        await waitFor('the retired worker to be gone', () => !isAlive(pids[0]!), 5000);

        const grown = await act(cluster, home, { mode: 'grow', bytes: String(256 * 1024 * 1024) });
        assert.equal(grown.view.state, 'succeeded', 'the step over the memory limit still succeeds');
        assert.equal(grown.pid, pids[3]);
        const after = await act(cluster, home);
        assert.notEqual(after.pid, grown.pid, 'a new worker after one above the memory limit');
        assert.equal(after.row?.calls, 1);
      },
      { executor: { workers: { maxStepsPerWorker: 3, maxWorkerRssBytes: 200 * 1024 * 1024 } } },
    );
  });

  it('gives every call the environment and working directory of the first, and lets idle workers go', TIMEOUT, async () => {
    await withWorkers(
      async (cluster, home) => {
        const changed = await act(cluster, home, { mode: 'env' });
        assert.equal(changed.row?.leftEnv, 'yes');
        assert.equal(changed.row?.cwd, '/');
        const next = await act(cluster, home);
        assert.equal(next.pid, changed.pid);
        assert.equal(next.row?.leftEnv, '');
        assert.equal(next.row?.cwd, process.cwd());
        // workerIdleMs later, the idle worker exits by itself.
        await waitFor('the idle worker to exit', () => !isAlive(next.pid), 10_000);
      },
      { executor: { workers: { workerIdleMs: 1500 } } },
    );
  });

  it('kills the worker of a cancelled run (ERR_STEP_KILLED) and runs the next one in a new worker', TIMEOUT, async () => {
    await withWorkers(async (cluster, home) => {
      const handle = await cluster.client.run(await loadPipeline(fixture('isolation-faults.ts')), { params: { mode: 'sleep' } });
      let pid = NaN;
      for await (const e of handle.events()) {
        if (e.type === 'log' && e.log.line.startsWith('act pid ') && Number.isNaN(pid)) {
          pid = Number(e.log.line.split(' ')[2]);
          await handle.cancel('the test cancelled it');
        }
      }
      const view = await handle.result();
      assert.equal(view.state, 'cancelled');
      await waitFor('the worker of the cancelled run to be killed', () => !isAlive(pid), 5000);
      const nc = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
      try {
        const steps = await new Kvm(nc).open(buckets.steps);
        const completion = await waitFor('the step completion', async () => (await steps.get(`${view.runId}.act`))?.json<{ type: string; error?: { code?: string; message: string } }>());
        assert.equal(completion.type, 'step.failed');
        assert.equal(completion.error?.code, 'ERR_STEP_KILLED');
        assert.match(completion.error?.message ?? '', /step "act" was killed: the run was cancelled/);
      } finally {
        await nc.close();
      }
      const next = await act(cluster, home);
      assert.equal(next.view.state, 'succeeded');
      assert.notEqual(next.pid, pid);
    });
  });
});
