import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { startNatsServer, type NatsServer } from '../infra/index.ts';
import type { RunView } from '../schemas/index.ts';
import { loadPipeline, QuiverClient, type RunHandle } from '../sdk/index.ts';
import { listSegments } from '../shm/index.ts';
import { fixture, startDaemon, stopProcess, TEST_SHM_ROOT, tempHome, waitFor } from './helpers.ts';

/** Longer than the outage: a step whose executor merely lost NATS for a while is not handed out again. */
const ACK_WAIT_MS = 5000;
/** How long nats-server stays dead. */
const OUTAGE_MS = 1500;
/** A run that does not end this long after the restart is wedged. */
const RESULT_TIMEOUT_MS = 45_000;

/**
 * nats-server (JetStream on file storage) is killed with SIGKILL while a run goes and started
 * again on the same port with the same storage: the daemons reconnect and carry on, the run
 * succeeds, and no step's code runs twice.
 */
describe('nats-server killed and restarted mid-run', () => {
  let home: ReturnType<typeof tempHome>;
  let server: NatsServer;
  let client: QuiverClient;
  let daemons: ReturnType<typeof startDaemon>[];

  beforeEach(async () => {
    home = tempHome();
    daemons = [];
    server = await startNatsServer({ dir: join(home.dir, 'nats') });
    // The client's own connection (QuiverClient.connect) must ride out the outage too.
    client = await QuiverClient.connect({ natsUrl: server.url, topology: { ackWaitMs: ACK_WAIT_MS } });
    const env = { QUIVER_HOME: home.dir, QUIVER_ACK_WAIT_MS: String(ACK_WAIT_MS) };
    daemons.push(startDaemon('orchestrator', server.url, env), startDaemon('executor', server.url, env));
    await waitFor('the executor to be ready', () => /ready/.test(daemons[1]!.output()));
  });
  afterEach(async () => {
    await Promise.all(daemons.map((d) => stopProcess(d)));
    await client.close();
    await server.stop();
    home.remove();
  });

  const shmDir = () => join(TEST_SHM_ROOT, client.topology.clusterId);
  const marksFile = () => join(home.dir, 'steps.marks');
  const countMarks = () => {
    const counts: Record<string, number> = {};
    if (!existsSync(marksFile())) return counts;
    for (const line of readFileSync(marksFile(), 'utf8').split('\n').filter(Boolean)) counts[line] = (counts[line] ?? 0) + 1;
    return counts;
  };

  const outage = async () => {
    await server.kill();
    await sleep(OUTAGE_MS);
    await server.restart();
  };

  /** The run's end, or a failure that says where it stands and what the daemons said. */
  const finish = async (handle: RunHandle): Promise<RunView> => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        void client
          .getRun(handle.id)
          .catch((e: Error) => `(reading the run failed: ${e.message})`)
          .then((view) =>
            reject(
              new Error(
                `the run did not end within ${RESULT_TIMEOUT_MS} ms of the restart; marks ${JSON.stringify(countMarks())}; ` +
                  `run record ${JSON.stringify(typeof view === 'object' && view ? { state: view.state, steps: view.steps.map((s) => [s.name, s.state, s.attempt]) } : view)}\n` +
                  daemons.map((d) => `--- ${d.spawnargs.at(-1)} (exit ${d.exitCode}):\n${d.output()}`).join('\n'),
              ),
            ),
          );
      }, RESULT_TIMEOUT_MS);
    });
    try {
      return await Promise.race([handle.result(), timeout]);
    } finally {
      clearTimeout(timer);
    }
  };

  const assertRecovered = async (handle: RunHandle, view: RunView) => {
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    assert.deepEqual(countMarks(), { first: 1, slow: 1, last: 1 });
    for (const d of daemons) {
      assert.equal(d.exitCode, null, `${d.spawnargs.at(-1)} is still running:\n${d.output()}`);
      // The outage was real to them: they lost NATS and came back.
      assert.match(d.output(), /reconnected to NATS/, d.output());
    }
    await handle.release();
    await waitFor('every segment of the run to be released', () => listSegments(shmDir()).length === 0);
  };

  it('finishes a run whose middle step was running, running no step twice', async () => {
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await client.run(loaded, { params: { sleepMs: '4000', marks: marksFile() } });
    await waitFor('the slow step to start', () => countMarks().slow === 1);
    await outage();
    await assertRecovered(handle, await finish(handle));
  });

  it('finishes a run whose first step had just finished, running no step twice', async () => {
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await client.run(loaded, { params: { sleepMs: '1000', marks: marksFile() } });
    // The first status that shows `first` succeeded: the orchestrator has just recorded it and
    // sent the slow step out; the executor may not have it yet.
    for await (const event of handle.events()) {
      if (event.type === 'status' && event.view.steps.find((s) => s.name === 'first')?.state === 'succeeded') break;
    }
    await outage();
    await assertRecovered(handle, await finish(handle));
  });
});
