import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { fixture, quiverBin, repoRoot, runCli, stopProcess, tempHome, waitFor } from './helpers.ts';

describe('quiver up, deploy, publish, runs, events', () => {
  it('deploys a pipeline, starts runs from published events, lists them, and shows dead letters', async () => {
    const home = tempHome();
    const env = { QUIVER_HOME: home.dir, QUIVER_NATS_URL: '' };
    const cli = (...args: string[]) => runCli(args, { env });
    const { QUIVER_NATS_URL: _ignored, ...inherited } = process.env;
    const up = spawn(process.execPath, [quiverBin, 'up'], { cwd: repoRoot, env: { ...inherited, QUIVER_HOME: home.dir }, stdio: ['ignore', 'pipe', 'pipe'] });
    let upOutput = '';
    up.stdout.setEncoding('utf8').on('data', (d: string) => (upOutput += d));
    up.stderr.setEncoding('utf8').on('data', (d: string) => (upOutput += d));
    try {
      const urlFile = join(home.dir, 'cluster', 'url');
      await waitFor(`quiver up to write ${urlFile} (output: ${upOutput})`, () => existsSync(urlFile), 30_000);

      const deployed = await cli('deploy', fixture('orders.ts'));
      assert.equal(deployed.code, 0, deployed.stderr);
      assert.match(deployed.stdout, /deployed orders version 1: event orders\.uploaded \(schema\)/);
      assert.match((await cli('deploy', fixture('orders.ts'))).stdout, /orders version 1 is already deployed/);
      assert.match((await cli('pipelines')).stdout, /orders\s+1\s+event orders\.uploaded \(schema\)/);

      const published = await cli('publish', 'orders.uploaded', '{"count": 3}', '--id', 'cli-1');
      assert.equal(published.code, 0, published.stderr);
      assert.match(published.stdout, /published event cli-1 on orders\.uploaded/);
      assert.match((await cli('publish', 'orders.uploaded', '{"count": 3}', '--id', 'cli-1')).stdout, /dropped as a duplicate/);
      await cli('publish', 'orders.uploaded', '{"count": "three"}', '--id', 'cli-bad');
      const notJson = await cli('publish', 'orders.uploaded', '{count: 3}');
      assert.equal(notJson.code, 2);
      assert.match(notJson.stderr, /the payload is not JSON/);

      const run = await waitFor('the run of event cli-1 to succeed', async () => {
        const listed = JSON.parse((await cli('runs', '--json')).stdout) as { runId: string; state: string; trigger: { eventId?: string } }[];
        return listed.find((r) => r.trigger.eventId === 'cli-1' && r.state === 'succeeded');
      });
      const table = await cli('runs');
      assert.match(table.stdout, new RegExp(`${run.runId}\\s+orders v1\\s+event orders\\.uploaded #cli-1\\s+succeeded`));
      const shown = await cli('runs', 'show', run.runId);
      assert.equal(shown.code, 0, shown.stderr);
      assert.match(shown.stdout, /started by event orders\.uploaded #cli-1/);
      assert.match(shown.stdout, /orders\s+succeeded\s+process\s+3\s/);

      const dead = await cli('events', 'dead');
      assert.match(dead.stdout, /orders\.uploaded\s+cli-bad\s+orders\s+fails the event schema of pipeline orders: \/count must be integer/);

      assert.equal((await cli('undeploy', 'orders')).code, 0);
      assert.match((await cli('pipelines')).stdout, /no pipeline is deployed/);
      const missing = await cli('undeploy', 'orders');
      assert.equal(missing.code, 2);
      assert.match(missing.stderr, /pipeline "orders" is not deployed/);
    } finally {
      await stopProcess(up, 'SIGINT');
      home.remove();
    }
    assert.equal(up.exitCode, 0, upOutput);
  });

  it('says how to get a cluster when there is none', async () => {
    const home = tempHome();
    try {
      const result = await runCli(['publish', 'orders.uploaded', '{}'], { env: { QUIVER_HOME: home.dir, QUIVER_NATS_URL: '' } });
      assert.equal(result.code, 2);
      assert.match(result.stderr, /needs a running cluster: start one with `quiver up`/);
    } finally {
      home.remove();
    }
  });
});
