import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstream } from '@nats-io/jetstream';
import { stepProcesses } from '../executor/index.ts';
import { startNatsServer, type NatsServer } from '../infra/index.ts';
import { subjects } from '../schemas/index.ts';
import { loadPipeline, QuiverClient } from '../sdk/index.ts';
import { tableFromArrays } from 'apache-arrow';
import { listSegments, removeDir, writeTableToShm } from '../shm/index.ts';
import { fixture, runCli, startDaemon, stopProcess, TEST_SHM_ROOT, tempHome, waitFor } from './helpers.ts';

const ACK_WAIT_MS = 2000;

describe('daemons against an existing NATS', () => {
  const home = tempHome();
  let server: NatsServer;
  let nc: NatsConnection;
  let client: QuiverClient;
  const daemons: ReturnType<typeof startDaemon>[] = [];
  const env = { QUIVER_HOME: home.dir, QUIVER_ACK_WAIT_MS: String(ACK_WAIT_MS) };
  const daemon = (kind: 'orchestrator' | 'executor', args: string[] = []) => {
    const d = startDaemon(kind, server.url, env, args);
    daemons.push(d);
    return d;
  };

  before(async () => {
    server = await startNatsServer({ dir: join(home.dir, 'nats') });
    nc = await connect({ servers: server.url });
    client = await QuiverClient.connect({ nc, topology: { ackWaitMs: ACK_WAIT_MS } });
  });
  afterEach(async () => {
    await Promise.all(daemons.splice(0).map((d) => stopProcess(d)));
  });
  after(async () => {
    await nc.close();
    await server.stop();
    home.remove();
  });

  const shmDir = () => join(TEST_SHM_ROOT, client.topology.clusterId);
  const marks = (name: string) => join(home.dir, `${name}.marks`);
  const countMarks = (file: string) => {
    const counts: Record<string, number> = {};
    if (!existsSync(file)) return counts;
    for (const line of readFileSync(file, 'utf8').split('\n').filter(Boolean)) counts[line] = (counts[line] ?? 0) + 1;
    return counts;
  };

  it('rejects malformed messages on every subject and keeps running', async () => {
    const orchestrator = daemon('orchestrator');
    const executor = daemon('executor', ['--host-id', 'malformed-host']);
    await waitFor('the executor to be ready', () => /ready/.test(executor.output()));
    const js = jetstream(nc);
    const garbage = ['not json', '{"type":"run.submit"}', '{"type":"step.succeeded","runId":"x"}', '[]', 'null', '{"type":"nope"}'];
    // A step completion is a record in quiver-steps: garbage written there reaches the orchestrator too.
    const jsSubjects = [subjects.runSubmit, subjects.runCancel, subjects.runRelease, subjects.stepCompletion('01JD0000000000000000000000', 'x'), subjects.stepReady];
    const coreSubjects = [
      subjects.stepStarted,
      subjects.segmentRelease('malformed-host'),
      subjects.runKill,
      subjects.log('01JD0000000000000000000000'),
      subjects.status('01JD0000000000000000000000'),
    ];
    for (const payload of garbage) {
      for (const subject of jsSubjects) await js.publish(subject, payload);
      for (const subject of coreSubjects) nc.publish(subject, payload);
    }
    await nc.flush();
    await waitFor('the orchestrator to reject them', () => (orchestrator.output().match(/rejected a message/g)?.length ?? 0) >= garbage.length * 5);
    await waitFor('the executor to reject them', () => (executor.output().match(/rejected a message/g)?.length ?? 0) >= garbage.length * 2);
    assert.match(orchestrator.output(), /rejected a message on quiver\.run\.submit: not JSON/);

    // Still alive and still working.
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await client.run(loaded, { params: { sleepMs: '10' } });
    const view = await handle.result();
    assert.equal(view.state, 'succeeded');
    assert.equal(orchestrator.exitCode, null);
    assert.equal(executor.exitCode, null);
    await handle.release();
    await waitFor('every segment of the run to be released', () => listSegments(shmDir()).length === 0);
  });

  it('quiver gc removes what dead runs left, against the same NATS', async () => {
    const deadRun = '01JD0000000000000000000001';
    writeTableToShm(tableFromArrays({ v: Int32Array.of(1) }), { dir: shmDir(), idPrefix: `${deadRun}.gone.1` });
    const { code, stdout } = await runCli(['gc'], { env: { ...env, QUIVER_NATS_URL: server.url } });
    assert.equal(code, 0);
    assert.match(stdout, /removed 1 segment\(s\) and 0 process\(es\)/);
    assert.deepEqual(listSegments(shmDir()), []);
    removeDir(shmDir());
  });

  it('resumes a run after the orchestrator is killed mid-step, running no step twice', async () => {
    let orchestrator = daemon('orchestrator');
    daemon('executor');
    const file = marks('orchestrator-kill');
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await client.run(loaded, { params: { sleepMs: '3000', marks: file } });
    await waitFor('the slow step to start', () => countMarks(file).slow === 1);
    orchestrator.kill('SIGKILL');
    await new Promise((r) => orchestrator.once('exit', r));
    orchestrator = daemon('orchestrator');
    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    assert.deepEqual(countMarks(file), { first: 1, slow: 1, last: 1 });
    await handle.release();
    await waitFor('every segment of the run to be released', () => listSegments(shmDir()).length === 0);
  });

  it('resumes a run whose chain was going when the orchestrator was killed: the steps the chain carries are not sent again alone', async () => {
    // A short lease: the new leader takes the run up while the chain's first step still runs.
    const leaseEnv = { ...env, QUIVER_LEASE_TTL_MS: '1500' };
    const leader = () => {
      const d = startDaemon('orchestrator', server.url, leaseEnv);
      daemons.push(d);
      return d;
    };
    let orchestrator = leader();
    daemon('executor');
    const file = marks('chain-resume');
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await client.run(loaded, { params: { firstSleepMs: '6000', sleepMs: '0', marks: file } });
    await waitFor('the first step to start', () => countMarks(file).first === 1);
    orchestrator.kill('SIGKILL');
    await new Promise((r) => orchestrator.once('exit', r));
    orchestrator = leader();
    await waitFor('the new leader to take the run up', () => orchestrator.output().includes(`resumed run ${handle.id}`));
    assert.deepEqual(countMarks(file), { first: 1 }, 'taken up while the chain was at its first step');
    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    // The executor goes down the chain; a copy of its next step sent alone would run beside it.
    assert.deepEqual(countMarks(file), { first: 1, slow: 1, last: 1 });
    for (const step of view.steps) assert.equal(step.attempt, 1, step.name);
    await handle.release();
    await waitFor('every segment of the run to be released', () => listSegments(shmDir()).length === 0);
  });

  it('hands a step to another executor when the one running it is killed', async () => {
    daemon('orchestrator');
    const executors = [daemon('executor', ['--concurrency', '1']), daemon('executor', ['--concurrency', '1'])];
    await waitFor('both executors to be ready', () => executors.every((e) => /ready/.test(e.output())));
    const file = marks('executor-kill');
    const loaded = await loadPipeline(fixture('slow.ts'));
    const handle = await client.run(loaded, { params: { sleepMs: '4000', marks: file } });
    await waitFor('the slow step to start', () => countMarks(file).slow === 1);
    const running = await waitFor('the run to say who runs the slow step', async () => {
      const view = await client.getRun(handle.id);
      const slow = view?.steps.find((s) => s.name === 'slow');
      return slow?.state === 'running' ? slow : null;
    });
    const pid = Number(running.executorId!.split('.').at(-2));
    const victim = executors.find((e) => e.pid === pid);
    assert.ok(victim, `executor ${running.executorId} is one of ours`);
    const [orphan] = stepProcesses(client.topology.clusterId).filter((p) => p.runId === handle.id && p.step === 'slow');
    assert.ok(orphan, 'the slow step runs in a process of its own');
    victim.kill('SIGKILL');
    // Its step process dies with it (parent-death signal), not left running.
    await waitFor('the orphaned step process to die', () => !existsSync(`/proc/${orphan.pid}`));

    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    const slow = view.steps.find((s) => s.name === 'slow')!;
    assert.equal(slow.attempt, 2);
    assert.notEqual(slow.executorId, running.executorId);
    assert.equal(countMarks(file).slow, 2);
    await handle.release();
    await waitFor('every segment of the run to be released', () => listSegments(shmDir()).length === 0);
  });
});
