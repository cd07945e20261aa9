import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { startNatsServer, type NatsServer } from '../infra/index.ts';
import { Scheduler } from '../orchestrator/index.ts';
import { ensureTopology, isFinished, silentLogger, type Deployment, type RunView, type Topology } from '../schemas/index.ts';
import { loadPipeline, QuiverClient } from '../sdk/index.ts';
import { repoRoot, startDaemon, stopProcess, tempHome, waitFor, withCluster } from './helpers.ts';

const HOUR = 3_600_000;
const MINUTE = 60_000;

function deploymentWith(schedule: Deployment['schedule'], deployedAt: number, name = 'scheduled'): Deployment {
  return {
    name,
    version: 1,
    codeHash: '0'.repeat(64),
    plan: { pipeline: name, steps: [{ name: 'tick', inputs: [] }] },
    events: [],
    schedule,
    maxConcurrentRuns: null,
    deployedAt,
    deployedBy: 'test',
  };
}

describe('the scheduler, on an injected clock', () => {
  let server: NatsServer;
  let nc: NatsConnection;
  let topology: Topology;
  const home = tempHome();

  before(async () => {
    server = await startNatsServer({ dir: join(home.dir, 'nats') });
    nc = await connect({ servers: server.url });
    topology = await ensureTopology(nc, await jetstreamManager(nc));
  });
  after(async () => {
    await nc.close();
    await server.stop();
    home.remove();
  });

  /** Drives a scheduler from `from` to `to` in steps, as a live one would poll, and returns the ticks it fired. */
  async function fire(deployment: Deployment, from: number, to: number, stepMs: number, graceMs = 30 * MINUTE): Promise<number[]> {
    let now = from;
    const fired: number[] = [];
    const scheduler = new Scheduler({ kv: topology.schedules, logger: silentLogger, now: () => now, graceMs, submit: async (_d, tick) => void fired.push(tick) });
    scheduler.set(deployment);
    for (; now <= to; now += stepMs) await scheduler.poll();
    await topology.schedules.delete(deployment.name);
    return fired;
  }

  const rome = (local: string) => {
    const fired = new Intl.DateTimeFormat('sv-SE', { timeZone: 'Europe/Rome', dateStyle: 'short', timeStyle: 'medium' });
    return (tick: number) => fired.format(tick).startsWith(local);
  };

  it('fires a daily 02:30 Europe/Rome job once a day across both daylight-saving changes', async () => {
    const spec = { cron: '30 2 * * *', timezone: 'Europe/Rome', catchUp: 'none', overlap: 'allow' } as const;
    // 29 March 2026 has no 02:30 (clocks jump 02:00 → 03:00); 25 October 2026 has it twice.
    const spring = await fire(deploymentWith(spec, Date.parse('2026-03-27T12:00:00Z')), Date.parse('2026-03-27T12:00:00Z'), Date.parse('2026-03-31T12:00:00Z'), 7 * MINUTE);
    assert.equal(spring.length, 4, spring.map((t) => new Date(t).toISOString()).join(', '));
    assert.ok(spring.some(rome('2026-03-29 03:00')), 'the missing 02:30 fires at 03:00 instead of being skipped');
    const autumn = await fire(deploymentWith(spec, Date.parse('2026-10-23T12:00:00Z')), Date.parse('2026-10-23T12:00:00Z'), Date.parse('2026-10-27T12:00:00Z'), 7 * MINUTE);
    assert.equal(autumn.length, 4, autumn.map((t) => new Date(t).toISOString()).join(', '));
    assert.equal(autumn.filter(rome('2026-10-25')).length, 1, 'the doubled 02:30 fires once');
  });

  it('fires an hourly job once per real hour: 23 on the spring day, 25 on the autumn day', async () => {
    const spec = { cron: '0 * * * *', timezone: 'Europe/Rome', catchUp: 'none', overlap: 'allow' } as const;
    const dayOf = async (startUtc: string, endUtc: string) => {
      const from = Date.parse(startUtc) - 1;
      return fire(deploymentWith(spec, from), from, Date.parse(endUtc), 13 * MINUTE);
    };
    // Local midnight to the next local midnight.
    const spring = await dayOf('2026-03-28T23:00:00Z', '2026-03-29T21:59:59Z');
    assert.equal(spring.length, 23);
    const autumn = await dayOf('2026-10-24T22:00:00Z', '2026-10-25T22:59:59Z');
    assert.equal(autumn.length, 25);
    assert.equal(new Set(autumn).size, 25, 'no tick fired twice');
  });

  it('catches up on ticks missed while no orchestrator ran as the policy says: none, the latest, or all', async () => {
    const deployedAt = Date.parse('2026-06-01T10:00:30Z');
    const back = deployedAt + 10 * MINUTE + 15_000; // ten per-minute ticks came due while down, the last 45 s ago
    const expected = { none: 0, latest: 1, all: 10 } as const;
    for (const catchUp of ['none', 'latest', 'all'] as const) {
      const spec = { cron: '* * * * *', timezone: 'UTC', catchUp, overlap: 'allow' } as const;
      const fired = await fire(deploymentWith(spec, deployedAt, `catch_${catchUp}`), back, back + 2 * MINUTE, 20_000, 30_000);
      // Then the two on-time ticks after coming back, whatever the policy.
      assert.equal(fired.length, expected[catchUp] + 2, `${catchUp}: ${fired.map((t) => new Date(t).toISOString()).join(', ')}`);
      if (catchUp === 'latest') assert.equal(fired[0], Date.parse('2026-06-01T10:10:00Z'));
    }
  });
});

/**
 * A pipeline firing on `cron` (Europe/Rome) whose step waits until the file QUIVER_TEST_GATE
 * exists, so a test decides when runs end. Written per test: a module is imported once per
 * content, so options must differ in the file, not in the environment.
 */
function scheduledPipeline(dir: string, overlap: 'skip' | 'queue' | 'allow', cron = '* * * * * *'): string {
  const file = join(dir, `scheduled-${overlap}.ts`);
  writeFileSync(
    file,
    `import { existsSync } from 'node:fs';
import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('scheduled', {
  tick: step(async () => {
    const gate = process.env.QUIVER_TEST_GATE;
    while (gate && !existsSync(gate)) await new Promise((r) => setTimeout(r, 20));
    return tableFromArrays({ done: Int32Array.of(1) });
  }, { env: ['QUIVER_TEST_GATE'] }),
}, { schedule: { cron: ${JSON.stringify(cron)}, timezone: 'Europe/Rome', catchUp: 'none', overlap: ${JSON.stringify(overlap)} } });
`,
  );
  return file;
}

describe('scheduled runs on a live cluster', () => {
  /** Scheduled runs of the fixture while its steps wait on a gate file; opens the gate at the end. */
  async function withGatedSchedule(overlap: 'skip' | 'queue' | 'allow', body: (client: QuiverClient) => Promise<void>): Promise<RunView[]> {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-gate-'));
    const gate = join(dir, 'open');
    // The executor, which starts below, has it; the step declares it (env), so it gets it.
    process.env.QUIVER_TEST_GATE = gate;
    try {
      return await withCluster(
        async ({ client }) => {
          try {
            await client.deploy(await loadPipeline(scheduledPipeline(dir, overlap)));
            await body(client);
          } finally {
            await client.undeploy('scheduled').catch(() => {});
            writeFileSync(gate, '');
          }
          return waitFor('every scheduled run to end', async () => {
            const runs = await client.listRuns();
            return runs.every((r) => isFinished(r.state)) ? runs : null;
          }, 60_000);
        },
        { executor: { concurrency: 4 } },
      );
    } finally {
      delete process.env.QUIVER_TEST_GATE;
      rmSync(dir, { recursive: true, force: true });
    }
  }

  const firstRunning = (client: QuiverClient) =>
    waitFor('a scheduled run to be running', async () => (await client.listRuns()).find((r) => r.steps[0]!.state === 'running'));
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

  it('overlap skip: ticks while the previous run goes start nothing', async () => {
    await withGatedSchedule('skip', async (client) => {
      await firstRunning(client);
      await sleep(3_000);
      const runs = await client.listRuns();
      assert.equal(runs.length, 1, `one run while the first still goes; got ${runs.map((r) => r.state).join(', ')}`);
    });
  });

  it('overlap queue: ticks while the previous run goes wait and then run one after another', async () => {
    const final = await withGatedSchedule('queue', async (client) => {
      await firstRunning(client);
      await sleep(3_000);
      const runs = await client.listRuns();
      assert.ok(runs.length >= 3, `ticks kept coming: ${runs.length} runs`);
      assert.equal(runs.filter((r) => r.state === 'running').length, 1);
      assert.ok(runs.filter((r) => r.state === 'queued').length >= 2);
    });
    assert.ok(final.length >= 3);
    assert.ok(final.every((r) => r.state === 'succeeded'), 'queued runs ran once the gate opened');
    const byStart = [...final].sort((a, b) => a.startedAt! - b.startedAt!);
    for (let i = 1; i < byStart.length; i++) {
      assert.ok(
        byStart[i]!.startedAt! >= byStart[i - 1]!.finishedAt!,
        `one after another, never two at once: ${JSON.stringify(byStart.map((r) => [r.trigger, r.startedAt, r.finishedAt]))}`,
      );
    }
  });

  it('overlap allow: ticks start runs alongside the one still going', async () => {
    await withGatedSchedule('allow', async (client) => {
      await firstRunning(client);
      const together = await waitFor('three scheduled runs running at once', async () => {
        const running = (await client.listRuns()).filter((r) => r.steps[0]!.state === 'running');
        return running.length >= 3 ? running : null;
      }, 10_000);
      assert.ok(together.every((r) => r.trigger.kind === 'schedule'));
    });
  });
});

describe('schedules with two orchestrators', () => {
  it('starts exactly one run per tick, and the standby takes over from a killed leader with no tick missed or doubled', async () => {
    const home = tempHome();
    const dir = mkdtempSync(join(tmpdir(), 'quiver-leader-'));
    const server = await startNatsServer({ dir: join(home.dir, 'nats') });
    const env = { QUIVER_LEASE_TTL_MS: '1500', QUIVER_HOME: home.dir };
    const orchestrators = [startDaemon('orchestrator', server.url, env), startDaemon('orchestrator', server.url, env)];
    const client = await QuiverClient.connect({ natsUrl: server.url });
    try {
      // A leader first: ticks of a deployment made while none runs are missed ones (catchUp).
      await waitFor('an orchestrator to lead', async () => !!(await client.topology.leases.get('orchestrator'))?.string(), 20_000);
      // No executor: runs stay running, which is all this test needs to count them.
      const deployed = await client.deploy(await loadPipeline(scheduledPipeline(dir, 'allow')));
      await waitFor('three scheduled runs', async () => (await client.listRuns()).length >= 3, 20_000);

      const lease = (await client.topology.leases.get('orchestrator'))!.json<{ pid: number }>();
      const leader = orchestrators.find((o) => o.pid === lease.pid);
      assert.ok(leader, `the lease names one of the two orchestrators (pid ${lease.pid})`);
      const killedAt = Date.now();
      leader.kill('SIGKILL');

      await waitFor('the standby to take the lease', async () => (await client.topology.leases.get('orchestrator'))?.json<{ pid: number }>().pid !== lease.pid, 10_000);
      await waitFor('three more runs after the kill', async () => (await client.listRuns()).filter((r) => (r.trigger as { tick: number }).tick > killedAt).length >= 3, 20_000);
      await client.undeploy('scheduled');
      // Submissions the killed leader had pulled but not handled come back after the consumer's ack wait.
      await new Promise((r) => setTimeout(r, 6_000));

      const runs: RunView[] = await client.listRuns();
      const ticks = runs.map((r) => (r.trigger.kind === 'schedule' ? r.trigger.tick : NaN)).sort((a, b) => a - b);
      assert.ok(ticks.every((t) => Number.isFinite(t)));
      assert.equal(new Set(ticks).size, ticks.length, 'no tick ran twice');
      for (let i = 1; i < ticks.length; i++) assert.equal(ticks[i]! - ticks[i - 1]!, 1000, `no tick missed between ${new Date(ticks[i - 1]!).toISOString()} and ${new Date(ticks[i]!).toISOString()}`);
      assert.ok(ticks[0]! > deployed.deployment.deployedAt && ticks[0]! - deployed.deployment.deployedAt <= 1000, 'the first tick is the first after deploying');
      assert.ok(ticks.at(-1)! > killedAt + 1000, 'ticks went on after the kill');
    } finally {
      await client.close();
      await Promise.all(orchestrators.map((o) => stopProcess(o, 'SIGKILL')));
      await server.stop();
      home.remove();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
