/**
 * Steps run bounded (issue 11, part 3): a minimal environment plus declared secrets, in both
 * isolation levels; time and memory limits that fail the step with what happened, kill its
 * process tree, and leave the executor serving.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { tableFromArrays } from 'apache-arrow';
import { describe, it } from 'node:test';
import { STEP_ENV_ALLOWLIST } from '../executor/step-process.ts';
import { planPipeline } from '../planner/index.ts';
import type { RunView } from '../schemas/index.ts';
import { pipeline, step, type LocalCluster } from '../sdk/index.ts';
import { hostCache, openTableStore, scanTable, writeTable } from '../storage/index.ts';
import { fixture, runFile, stepOf, tempHome, waitFor, withCluster, withEnv } from './helpers.ts';

const TIMEOUT = { timeout: 120_000 };

/** Pids of the cluster's step processes (by command line), optionally only those running a step of `runId`. */
function stepProcessesOf(clusterId: string, runId?: string): number[] {
  const found: number[] = [];
  for (const pid of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split(/[\0 ]+/);
      const at = argv.indexOf('quiver-step');
      if (at >= 0 && argv[at + 1] === clusterId && (runId === undefined || argv[at + 2] === runId)) found.push(Number(pid));
    } catch {
      // Gone while we looked.
    }
  }
  return found;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    // A zombie is dead for our purpose: it runs nothing.
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}

/** Like withCluster, then proves the cluster left no step process behind. */
async function withLimitsCluster(fn: (cluster: LocalCluster, home: string) => Promise<void>): Promise<void> {
  let clusterId = '';
  await withCluster(async (cluster, home) => {
    clusterId = basename(cluster.executor.shmDir);
    await fn(cluster, home);
  });
  await waitFor('every step process of the cluster to exit', () => stepProcessesOf(clusterId).length === 0, 5000);
}

type Seen = { names: string; apiKey: string; shared: string; keyAtImport: string; pid: number };

function seenBy(cluster: LocalCluster, view: RunView, name: string): Seen {
  const s = stepOf(view, name);
  assert.equal(s.state, 'succeeded', `${name}: ${s.error?.message}`);
  // A step that is no output of the run loses its segment once its children are done: its leaf copy is read.
  const output = name === 'secret_worker' ? stepOf(view, 'secret_worker_seen').output! : s.output!;
  return cluster.client.openOutput(output).table.get(0)!.toJSON() as Seen;
}

const PLANTED = {
  QUIVER_TEST_API_KEY: 'api-key-123',
  QUIVER_TEST_SHARED: 'shared-456',
  AWS_SECRET_ACCESS_KEY: 'planted-aws-secret',
  QUIVER_TEST_EXECUTOR_ONLY: 'planted-executor-only',
  NODE_OPTIONS: '--no-warnings',
};

describe('planning limits and env', () => {
  const fn = () => {
    throw new Error('not run');
  };

  it('takes a step limit over the pipeline one, and adds step env to pipeline env', () => {
    const plan = planPipeline(
      pipeline(
        'p',
        {
          a: step(fn, { timeoutMs: 30_000, env: ['API_KEY'] }),
          b: step({ x: 'a' }, fn, { memoryMb: 256 }),
        },
        { timeoutMs: 60_000, memoryMb: 512, env: ['SHARED'] },
      ),
    );
    const [a, b] = plan.steps;
    assert.deepEqual(a!.limits, { timeoutMs: 30_000, memoryMb: 512 });
    assert.deepEqual(a!.env, ['SHARED', 'API_KEY']);
    assert.deepEqual(b!.limits, { timeoutMs: 60_000, memoryMb: 256 });
    assert.deepEqual(b!.env, ['SHARED']);
    const bare = planPipeline(pipeline('q', { a: step(fn) }));
    assert.equal(bare.steps[0]!.limits, undefined, 'no declared limit: the executor applies its defaults');
    assert.equal(bare.steps[0]!.env, undefined);
  });

  it('rejects bad limits and env names, naming the step', () => {
    assert.throws(() => planPipeline(pipeline('p', { a: step(fn, { memoryMb: 4 }) })), /memoryMb of step "a" must be an integer from 32/);
    assert.throws(() => planPipeline(pipeline('p', { a: step(fn, { timeoutMs: 1.5 }) })), /timeoutMs of step "a"/);
    assert.throws(() => planPipeline(pipeline('p', { a: step(fn, { env: ['NOT-A-NAME'] }) })), /env of step "a"/);
    assert.throws(() => planPipeline(pipeline('p', { a: step(fn) }, { timeoutMs: -1 })), /timeoutMs of pipeline "p"/);
  });
});

describe('step environment', () => {
  it('gives each step the allowlist and its declared secrets only, in both isolation levels', TIMEOUT, async () => {
    await withEnv(PLANTED, () =>
      withLimitsCluster(async (cluster, home) => {
        const run = await runFile(cluster, home, fixture('limits-env.ts'), { release: false });
        assert.equal(run.view.state, 'succeeded');
        const allowed = new Set([...STEP_ENV_ALLOWLIST, 'QUIVER_EXECUTOR_PID', 'QUIVER_TEST_SHARED']);
        for (const name of ['secret_process', 'plain_process', 'secret_worker', 'plain_worker']) {
          const seen = seenBy(cluster, run.view, name);
          const names = seen.names.split(',');
          const declaresKey = name.startsWith('secret_');
          for (const n of names) assert.ok(allowed.has(n) || (declaresKey && n === 'QUIVER_TEST_API_KEY'), `${name} sees ${n}, which it did not declare`);
          for (const planted of ['AWS_SECRET_ACCESS_KEY', 'QUIVER_TEST_EXECUTOR_ONLY', 'NODE_OPTIONS', 'QUIVER_CLUSTER_SECRET']) {
            assert.ok(!names.includes(planted), `${name} sees ${planted}`);
          }
          assert.equal(seen.apiKey, declaresKey ? PLANTED.QUIVER_TEST_API_KEY : '', `${name}: QUIVER_TEST_API_KEY`);
          assert.equal(seen.shared, PLANTED.QUIVER_TEST_SHARED, `${name}: the pipeline's env reaches every step`);
          assert.equal(seen.keyAtImport, '', `${name}: secrets are given to the step function, not to the module's import`);
        }
        // The point of the worker pair: the same process ran a step with the secret, then one without.
        assert.equal(seenBy(cluster, run.view, 'plain_worker').pid, seenBy(cluster, run.view, 'secret_worker').pid, 'both worker steps ran in one worker');
        await cluster.client.release(run.view.runId);
      }),
    );
  });

  it('fails a step whose declared variable the executor lacks, naming it', TIMEOUT, async () => {
    await withLimitsCluster(async (cluster, home) => {
      const run = await runFile(cluster, home, fixture('limits-missing-env.ts'));
      assert.equal(run.view.state, 'failed');
      const s = stepOf(run.view, 'needs_token');
      assert.equal(s.error?.code, 'ERR_STEP_ENV_MISSING');
      assert.match(s.error!.message, /declares the environment variable QUIVER_TEST_NEVER_SET/);
    });
  });
});

describe('time and memory limits', () => {
  it('fails steps past their memory or time limit with those words, kills their process trees, and keeps serving', TIMEOUT, async () => {
    await withEnv(PLANTED, () =>
      withLimitsCluster(async (cluster, home) => {
        const clusterId = basename(cluster.executor.shmDir);
        const run = await runFile(cluster, home, fixture('limits-bounds.ts'));
        assert.equal(run.view.state, 'failed');
        const errorOf = (name: string) => {
          const s = stepOf(run.view, name);
          assert.equal(s.state, 'failed', `${name} should have failed`);
          return s.error!;
        };
        for (const name of ['heap_process', 'heap_worker']) {
          const error = errorOf(name);
          assert.equal(error.code, 'ERR_STEP_MEMORY', `${name}: ${error.message}`);
          assert.match(error.message, new RegExp(`^step "${name}" exceeded its 128 MB memory limit \\(.*heap out of memory`));
        }
        const arrays = errorOf('arrays');
        assert.equal(arrays.code, 'ERR_STEP_MEMORY', arrays.message);
        assert.match(arrays.message, /^step "arrays" exceeded its 128 MB memory limit \(Array buffer allocation failed\)/);
        for (const name of ['sleep_process', 'sleep_worker']) {
          const error = errorOf(name);
          assert.equal(error.code, 'ERR_STEP_TIMEOUT', `${name}: ${error.message}`);
          assert.match(error.message, new RegExp(`^step "${name}" timed out after 1.5 s`));
          // What the step started went with it.
          const logged = run.logs.find((l) => l.step === name && l.line.startsWith(`${name} child `));
          assert.ok(logged, `${name} logged its child's pid`);
          const child = Number(logged.line.split(' ')[2]);
          await waitFor(`the child process ${child} of ${name} to be killed`, () => !isAlive(child), 5000);
        }
        await waitFor('no step process of the failed run left', () => stepProcessesOf(clusterId, run.view.runId).length === 0, 5000);

        // The executor keeps serving, in both isolation levels.
        const next = await runFile(cluster, home, fixture('limits-env.ts'));
        assert.equal(next.view.state, 'succeeded');
      }),
    );
  });
});

describe('system steps', () => {
  it('scans and stages in a step process, not in the executor', TIMEOUT, async () => {
    const home = tempHome();
    const root = join(home.dir, 'storage');
    const store = await openTableStore({ kind: 'local', root });
    try {
      await writeTable(store, 'events', tableFromArrays({ v: Int32Array.from([1, 2, 3, 4]), w: Float64Array.from([0.5, 1.5, 2.5, 3.5]) }));
      hostCache.clear();
      await withEnv({ QUIVER_STORAGE: root }, () =>
        withLimitsCluster(async (cluster, clusterHome) => {
          const run = await runFile(cluster, clusterHome, fixture('storage-materialize.ts'));
          assert.equal(run.view.state, 'succeeded', JSON.stringify(run.view.steps.map((s) => [s.name, s.error?.message])));
          const record = (await cluster.client.topology.steps.get(`${run.view.runId}.__scan_events`))!.json<{ scan: { bytesFetched: number } }>();
          assert.ok(record.scan.bytesFetched > 0, 'the scan read the table');
          assert.ok(run.logs.some((l) => l.step === '__stage_kept' && l.line.startsWith('staged 3 rows of kept')), 'the stage step logged from its process');
        }),
      );
      // Scanning fills the column cache of the process that scans: this one's stayed empty.
      assert.equal(hostCache.size, 0, 'the executor scanned in its own process');
      const kept = await scanTable(store, 'kept', { cache: null });
      assert.deepEqual([...kept.table.getChild('v')!], [2, 3, 4], 'the staged rows were committed');
    } finally {
      await store.close();
      home.remove();
    }
  });
});
