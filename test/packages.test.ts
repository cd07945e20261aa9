/**
 * Declared npm packages (docs/packages.md): resolved at load time, installed per exact set into
 * environments a host builds once, shared between hosts through the cluster's object store.
 * These tests reach the real npm registry, with tiny packages (is-number, is-odd) the repository
 * does not have.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { connect } from '@nats-io/transport-node';
import { Environments, Executor, listClusterEnvironments, listEnvironments, pruneClusterEnvironments } from '../executor/index.ts';
import { PlanError } from '../planner/index.ts';
import { loadPipeline, type LocalCluster } from '../sdk/index.ts';
import { fixture, repoRoot, runCli, runFile, stepOf, tempHome, withCluster } from './helpers.ts';

const TIMEOUT = { timeout: 180_000 };

/** A cluster whose executor keeps its environments in a folder of this test's own. */
async function withPackagesCluster(fn: (cluster: LocalCluster, envDir: string) => Promise<void>, concurrency = 2): Promise<void> {
  const envs = tempHome();
  try {
    await withCluster((cluster) => fn(cluster, join(envs.dir, 'envs')), { executor: { concurrency, environments: { dir: join(envs.dir, 'envs') } } });
  } finally {
    envs.remove();
  }
}

function rowsOf(cluster: LocalCluster, output: Parameters<LocalCluster['client']['openOutput']>[0]) {
  return cluster.client.openOutput(output).table.toArray().map((r) => r.toJSON() as Record<string, unknown>);
}

function notInRepository(name: string): void {
  assert.ok(!existsSync(join(repoRoot, 'node_modules', name)), `${name} must not be installed in the repository for this test to mean anything`);
}

describe('resolving declared packages', () => {
  it('reuses a resolution for a while, so a re-run does not ask the registry again', TIMEOUT, async () => {
    const home = tempHome();
    const saved = { home: process.env.QUIVER_HOME, registry: process.env.npm_config_registry };
    try {
      process.env.QUIVER_HOME = home.dir;
      const first = await loadPipeline(fixture('packages-basic.ts'));
      assert.deepEqual(first.plan.steps[0]!.packages, { 'is-odd': '3.0.1' });
      // The registry gone: the resolution made a moment ago stands.
      process.env.npm_config_registry = 'http://127.0.0.1:9/';
      const again = await loadPipeline(fixture('packages-basic.ts'));
      assert.deepEqual(again.plan.steps[0]!.packages, { 'is-odd': '3.0.1' });
      // Expired, it is asked again, and the unreachable registry fails the load.
      process.env.QUIVER_PACKAGE_RESOLVE_TTL_MS = '0';
      await assert.rejects(loadPipeline(fixture('packages-basic.ts')), /could not resolve package "is-odd@\^3.0.1"/);
    } finally {
      for (const [key, value] of [['QUIVER_HOME', saved.home], ['npm_config_registry', saved.registry]] as const) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
      delete process.env.QUIVER_PACKAGE_RESOLVE_TTL_MS;
      home.remove();
    }
  });
});

describe('declared packages', () => {
  it('runs a step importing a package the repository does not have', TIMEOUT, async () => {
    notInRepository('is-odd');
    notInRepository('is-number');
    await withPackagesCluster(async (cluster, envDir) => {
      const loaded = await loadPipeline(fixture('packages-basic.ts'));
      assert.deepEqual(loaded.plan.steps[0]!.packages, { 'is-odd': '3.0.1' });
      assert.doesNotMatch(new TextDecoder().decode(loaded.code), /is-odd@|function isOdd/, 'the package was bundled instead of left external');
      const run = await runFile(cluster, '', fixture('packages-basic.ts'), { release: false });
      const odds = stepOf(run.view, 'odds');
      assert.equal(run.view.state, 'succeeded', JSON.stringify(odds.error));
      assert.deepEqual(rowsOf(cluster, odds.output!).map((r) => r.odd), [true, false, true]);
      assert.equal(typeof odds.envMs, 'number');
      assert.equal(cluster.executor.environments.counts.built, 1);
      assert.equal(cluster.executor.environments.list().length, 1);
      assert.ok(cluster.executor.environments.list()[0]!.dir.startsWith(envDir));
      await cluster.client.release(run.view.runId);

      // Getting the environment is shown live, in the step's log: building it, then ready and how.
      const environmentLines = (logs: { step: string; line: string }[]) => logs.filter((l) => l.step === 'odds' && /environment [0-9a-f]{12} /.test(l.line)).map((l) => l.line);
      const [getting, built, ...more] = environmentLines(run.logs);
      assert.match(getting ?? '', /^getting environment [0-9a-f]{12} \(1 package: is-odd@3\.0\.1\): not on this host yet/);
      assert.match(built ?? '', /^environment [0-9a-f]{12} \(1 package: is-odd@3\.0\.1\) ready in \d+\.\d s \(built with npm\)$/);
      assert.deepEqual(more, []);
      const again = await runFile(cluster, '', fixture('packages-basic.ts'));
      assert.equal(again.view.state, 'succeeded');
      assert.equal(typeof stepOf(again.view, 'odds').envMs, 'number');
      const [found, ...rest] = environmentLines(again.logs);
      assert.match(found ?? '', /^environment [0-9a-f]{12} \(1 package: is-odd@3\.0\.1\) ready in \d+\.\d s \(cached on this host\)$/);
      assert.deepEqual(rest, []);
    });
  });

  it('quiver run --json reports envMs; environments go under QUIVER_HOME/envs; a deployment keeps the lock', TIMEOUT, async () => {
    const home = tempHome();
    try {
      const run = await runCli(['run', fixture('packages-basic.ts'), '--json'], { env: { QUIVER_HOME: home.dir } });
      assert.equal(run.code, 0, run.stderr);
      const odds = (JSON.parse(run.stdout) as { steps: { name: string; state: string; envMs?: number }[] }).steps.find((s) => s.name === 'odds')!;
      assert.equal(odds.state, 'succeeded');
      assert.equal(typeof odds.envMs, 'number');
      assert.equal(listEnvironments(join(home.dir, 'envs')).length, 1);
    } finally {
      home.remove();
    }
    await withPackagesCluster(async (cluster) => {
      await cluster.client.deploy(await loadPipeline(fixture('packages-versions.ts')));
      const [deployed] = await cluster.client.listDeployments();
      assert.deepEqual(Object.fromEntries(deployed!.plan.steps.map((s) => [s.name, s.packages])), { old: { 'is-number': '6.0.0' }, recent: { 'is-number': '7.0.0' } });
    });
  });

  it('gives two steps declaring different versions of one package each its own', TIMEOUT, async () => {
    notInRepository('is-number');
    await withPackagesCluster(async (cluster) => {
      const run = await runFile(cluster, '', fixture('packages-versions.ts'), { release: false });
      assert.equal(run.view.state, 'succeeded', JSON.stringify(run.view.steps.map((s) => s.error)));
      const seen = (step: string) => rowsOf(cluster, stepOf(run.view, step).output!)[0]!;
      assert.equal(seen('old').version, '6.0.0');
      assert.equal(seen('recent').version, '7.0.0');
      assert.equal(cluster.executor.environments.counts.built, 2);
      await cluster.client.release(run.view.runId);
    });
  });

  it('builds a new environment once for two runs needing it at the same time', TIMEOUT, async () => {
    await withPackagesCluster(async (cluster) => {
      const runs = await Promise.all([runFile(cluster, '', fixture('packages-basic.ts')), runFile(cluster, '', fixture('packages-basic.ts'))]);
      for (const run of runs) assert.equal(run.view.state, 'succeeded', JSON.stringify(stepOf(run.view, 'odds').error));
      assert.equal(cluster.executor.environments.counts.built, 1);
    });
  });

  it('builds an environment once for two processes of a host needing it at the same time (the lock); quiver env lists and prunes it', TIMEOUT, async () => {
    const home = tempHome();
    try {
      // Two stores on one folder: each its own promise map, as two executors of a host have.
      const dir = join(home.dir, 'envs');
      const [a, b] = [new Environments({ dir }), new Environments({ dir })];
      const [ra, rb] = await Promise.all([a.ensure({ 'is-number': '7.0.0' }), b.ensure({ 'is-number': '7.0.0' })]);
      assert.equal(ra.dir, rb.dir);
      assert.equal(a.counts.built + b.counts.built, 1);
      assert.deepEqual([ra.source, rb.source].sort(), ['built', 'local']);

      const env = { QUIVER_HOME: home.dir };
      const listed = await runCli(['env', 'list', '--json'], { env });
      assert.equal(listed.code, 0, listed.stderr);
      const [only, ...rest] = JSON.parse(listed.stdout) as { hash: string; packages: Record<string, string>; bytes: number }[];
      assert.equal(rest.length, 0);
      assert.equal(only!.hash, ra.hash);
      assert.deepEqual(only!.packages, { 'is-number': '7.0.0' });
      assert.ok(only!.bytes > 0);
      const kept = await runCli(['env', 'prune', '--older-than', '1d'], { env });
      assert.match(kept.stdout, /No environment to prune/);
      const pruned = await runCli(['env', 'prune', '--older-than', '0'], { env });
      assert.equal(pruned.code, 0, pruned.stderr);
      assert.match(pruned.stdout, /Removed 1 environment/);
      assert.ok(!existsSync(ra.dir));
      assert.deepEqual(JSON.parse((await runCli(['env', 'list', '--json'], { env })).stdout), []);
    } finally {
      home.remove();
    }
  });

  it('runs a step on a host that cannot reach the registry, from the environment in the cluster store', TIMEOUT, async () => {
    await withPackagesCluster(async (cluster) => {
      const first = await runFile(cluster, '', fixture('packages-basic.ts'));
      assert.equal(first.view.state, 'succeeded');
      const offline = tempHome();
      const nc = await connect({ servers: cluster.server.url, ...cluster.server.connectionOptions });
      let second: Executor | null = null;
      try {
        mkdirSync(join(offline.dir, 'npm-cache'));
        second = await Executor.start(nc, {
          hostId: 'second',
          concurrency: 1,
          prewarm: 0,
          environments: { dir: join(offline.dir, 'envs'), npmEnv: { npm_config_registry: 'http://127.0.0.1:9/', npm_config_cache: join(offline.dir, 'npm-cache'), npm_config_fetch_retries: '0' } },
        });
        // The offline registry really fails: an environment the store does not have cannot be built there.
        await assert.rejects(second.environments.ensure({ 'is-number': '6.0.0' }), (e: Error & { code?: string }) => e.code === 'ERR_STEP_ENV_BUILD' && /127\.0\.0\.1:9|ECONNREFUSED/.test(e.message));
        const run = await runFile(cluster, '', fixture('packages-remote.ts'), { release: false });
        const odds = stepOf(run.view, 'odds');
        assert.equal(run.view.state, 'succeeded', JSON.stringify(odds.error));
        assert.equal(odds.hostId, 'second');
        assert.deepEqual(rowsOf(cluster, odds.output!).map((r) => r.odd), [true, false, true]);
        assert.deepEqual(second.environments.counts, { built: 0, fetched: 1 });
        assert.ok(run.logs.some((l) => l.step === 'odds' && /^environment [0-9a-f]{12} .* ready in \d+\.\d s \(fetched from the cluster\)$/.test(l.line)), 'the fetch is shown live');
        await cluster.client.release(run.view.runId);

        // The cluster's copies are pruned by when a host last packed or fetched them.
        const store = cluster.client.topology.envs;
        const [packed, ...others] = await listClusterEnvironments(store);
        assert.deepEqual(others, []);
        assert.equal(packed!.packages, 'is-odd@3.0.1');
        assert.ok(Date.now() - packed!.lastUsedAt < 60_000, 'the fetch counts as a use');
        const third = new Environments({ dir: join(offline.dir, 'envs-third'), store });
        assert.equal((await third.ensure({ 'is-odd': '3.0.1' })).source, 'store', 'marked used, it is still fetched whole');
        assert.deepEqual(await pruneClusterEnvironments(store, 86_400_000), [], 'used today: kept');
        assert.deepEqual((await pruneClusterEnvironments(store, 0)).map((e) => e.hash), [packed!.hash]);
        assert.deepEqual(await listClusterEnvironments(store), []);
      } finally {
        await second?.stop();
        await nc.close();
        offline.remove();
      }
    });
  });

  it('rejects an unknown package before anything runs, naming the step and the package', TIMEOUT, async () => {
    await assert.rejects(loadPipeline(fixture('packages-unknown.ts')), (error: unknown) => {
      assert.ok(error instanceof PlanError, String(error));
      assert.equal(error.step, 'odd');
      assert.match(error.message, /step "odd".*"quiver-no-such-package-4b1d0c".*not on the registry/);
      return true;
    });
  });

  it("fails a step whose packages do not install, with npm's message", TIMEOUT, async () => {
    await withPackagesCluster(async (cluster) => {
      const loaded = await loadPipeline(fixture('packages-basic.ts'));
      // A lock naming a release that does not exist (an unpublished version, a typo in a stored plan).
      const broken = { ...loaded, plan: { ...loaded.plan, steps: loaded.plan.steps.map((s) => ({ ...s, packages: { 'is-odd': '99.0.0' } })) } };
      const handle = await cluster.client.run(broken, { params: {} });
      const view = await handle.result();
      const odds = stepOf(view, 'odds');
      assert.equal(odds.state, 'failed');
      assert.equal(odds.error?.code, 'ERR_STEP_ENV_BUILD');
      assert.match(odds.error!.message, /step "odds" could not get its packages: npm install is-odd@99\.0\.0 failed: .*No matching version found for is-odd@99\.0\.0/);
      assert.equal(typeof odds.envMs, 'number');
    });
  });
});
