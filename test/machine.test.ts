import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { createActor } from 'xstate';
import { createRunMachine, replayRun, runStateOf, stepStatesOf } from '../orchestrator/index.ts';
import type { Plan, TableDescriptor } from '../schemas/index.ts';

const runId = '01JD0000000000000000000000';
const diamond: Plan = {
  pipeline: 'diamond',
  steps: [
    { name: 'a', inputs: [] },
    { name: 'b', inputs: [{ param: 'x', step: 'a' }] },
    { name: 'c', inputs: [{ param: 'x', step: 'a' }] },
    { name: 'd', inputs: [{ param: 'x', step: 'b' }, { param: 'y', step: 'c' }] },
  ],
};
const output = (rows: number): TableDescriptor => ({ kind: 'shm', hostId: 'h', segments: [{ id: `${runId}.x.1-0`, byteSize: 64 }], byteSize: 64, rows, schema: [] });
const started = (step: string, at = 1) => ({ type: 'step.started' as const, runId, step, attempt: 1, executorId: 'e', hostId: 'h', at });
const succeeded = (step: string, at = 2) => ({
  type: 'step.succeeded' as const,
  runId,
  step,
  attempt: 1,
  executorId: 'e',
  output: output(3),
  transport: 'shm' as const,
  inputCopiedBytes: 0,
  outputCopiedBytes: 64,
  startedAt: 1,
  at,
});
const failed = (step: string) => ({ type: 'step.failed' as const, runId, step, attempt: 1, executorId: 'e', error: { name: 'Error', message: 'boom' }, at: 3 });

describe('run machine', () => {
  it('makes children ready only when all their parents succeeded', () => {
    const actor = createActor(createRunMachine(diamond), { input: { runId } }).start();
    assert.deepEqual(stepStatesOf(actor.getSnapshot()), { a: 'ready', b: 'waiting', c: 'waiting', d: 'waiting' });
    actor.send(started('a'));
    assert.equal(stepStatesOf(actor.getSnapshot()).a, 'running');
    actor.send(succeeded('a'));
    assert.deepEqual(stepStatesOf(actor.getSnapshot()), { a: 'succeeded', b: 'ready', c: 'ready', d: 'waiting' });
    actor.send(succeeded('b'));
    assert.equal(stepStatesOf(actor.getSnapshot()).d, 'waiting');
    actor.send(succeeded('c'));
    assert.equal(stepStatesOf(actor.getSnapshot()).d, 'ready');
    actor.send(succeeded('d'));
    assert.equal(runStateOf(actor.getSnapshot()), 'succeeded');
    assert.equal(actor.getSnapshot().context.steps.d!.copiedBytes, 64);
  });

  it('skips the descendants of a failed step and fails the run once everything settled', () => {
    const actor = createActor(createRunMachine(diamond), { input: { runId } }).start();
    actor.send(succeeded('a'));
    actor.send(failed('b'));
    assert.equal(stepStatesOf(actor.getSnapshot()).d, 'skipped');
    // c is still running: the run is not over yet.
    assert.equal(runStateOf(actor.getSnapshot()), 'running');
    actor.send(succeeded('c'));
    assert.equal(runStateOf(actor.getSnapshot()), 'failed');
    assert.equal(actor.getSnapshot().context.steps.b!.error!.message, 'boom');
  });

  it('runs a wide fan-out and its join, and skips everything below a failed step', () => {
    const middle = Array.from({ length: 200 }, (_, i) => ({ name: `m${i}`, inputs: [{ param: 'x', step: 'a' }] }));
    const wide: Plan = {
      pipeline: 'wide',
      steps: [
        { name: 'a', inputs: [] },
        ...middle,
        { name: 'join', inputs: middle.map((m, i) => ({ param: `p${i}`, step: m.name })) },
        { name: 'after', inputs: [{ param: 'x', step: 'join' }] },
        { name: 'last', inputs: [{ param: 'x', step: 'after' }] },
      ],
    };
    const states = (actor: ReturnType<typeof start>) => stepStatesOf(actor.getSnapshot());
    const start = () => createActor(createRunMachine(wide), { input: { runId } }).start();

    const ok = start();
    ok.send(succeeded('a'));
    assert.ok(middle.every((m) => states(ok)[m.name] === 'ready'), 'every child of a is ready at once');
    for (const m of middle.slice(0, -1)) ok.send(succeeded(m.name));
    assert.equal(states(ok).join, 'waiting', 'the join waits for its last parent');
    ok.send(succeeded(middle.at(-1)!.name));
    assert.equal(states(ok).join, 'ready');
    for (const step of ['join', 'after', 'last']) ok.send(succeeded(step));
    assert.equal(runStateOf(ok.getSnapshot()), 'succeeded');

    const broken = start();
    broken.send(succeeded('a'));
    broken.send(failed('m7'));
    assert.deepEqual([states(broken).join, states(broken).after, states(broken).last], ['skipped', 'skipped', 'skipped']);
    assert.equal(runStateOf(broken.getSnapshot()), 'running', 'its siblings still run');
    for (const m of middle) if (m.name !== 'm7') broken.send(succeeded(m.name));
    assert.equal(runStateOf(broken.getSnapshot()), 'failed');
    assert.equal(states(broken).m8, 'succeeded');
  });

  it('ignores repeated and stray events', () => {
    const actor = createActor(createRunMachine(diamond), { input: { runId } }).start();
    actor.send(succeeded('b')); // b is waiting: not for it yet
    assert.equal(stepStatesOf(actor.getSnapshot()).b, 'waiting');
    actor.send(succeeded('a'));
    actor.send(failed('a')); // a redelivered completion cannot undo success
    assert.equal(stepStatesOf(actor.getSnapshot()).a, 'succeeded');
  });

  it('cancels every unfinished step', () => {
    const actor = createActor(createRunMachine(diamond), { input: { runId } }).start();
    actor.send(succeeded('a'));
    actor.send(started('b'));
    actor.send({ type: 'run.cancel', runId, reason: 'user' });
    assert.deepEqual(stepStatesOf(actor.getSnapshot()), { a: 'succeeded', b: 'cancelled', c: 'cancelled', d: 'cancelled' });
    assert.equal(runStateOf(actor.getSnapshot()), 'cancelled');
    assert.equal(actor.getSnapshot().context.cancelReason, 'user');
  });

  it('resumes from a persisted snapshot as if it had never stopped', () => {
    const machine = createRunMachine(diamond);
    const first = createActor(machine, { input: { runId } }).start();
    first.send(succeeded('a'));
    first.send(started('b'));
    const persisted = JSON.parse(JSON.stringify(first.getPersistedSnapshot()));
    first.stop();
    const resumed = createActor(createRunMachine(diamond), { snapshot: persisted, input: { runId } }).start();
    assert.deepEqual(stepStatesOf(resumed.getSnapshot()), { a: 'succeeded', b: 'running', c: 'ready', d: 'waiting' });
    resumed.send(succeeded('b'));
    resumed.send(succeeded('c'));
    resumed.send(succeeded('d'));
    assert.equal(runStateOf(resumed.getSnapshot()), 'succeeded');
  });

  it('rebuilds a run from its recorded facts alone, whatever order they were written in', () => {
    // Live: a and c finish, b fails after d was skipped... as the orchestrator saw it.
    const live = createActor(createRunMachine(diamond), { input: { runId } }).start();
    live.send(started('a'));
    live.send(succeeded('a'));
    live.send(started('b'));
    live.send(started('c'));
    live.send(succeeded('c', 5));
    const claim = { executorId: 'e', hostId: 'h', attempt: 1, at: 1 };
    // Recorded facts, listed children first: replay must not depend on that order.
    const facts = {
      completions: new Map([
        ['c', succeeded('c', 5)],
        ['a', succeeded('a')],
      ]),
      claims: new Map([
        ['c', claim],
        ['b', claim],
        ['a', claim],
      ]),
    };
    const replayed = replayRun(diamond, runId, facts);
    assert.deepEqual(stepStatesOf(replayed.getSnapshot()), stepStatesOf(live.getSnapshot()));
    assert.deepEqual(stepStatesOf(replayed.getSnapshot()), { a: 'succeeded', b: 'running', c: 'succeeded', d: 'waiting' });
    assert.deepEqual(replayed.getSnapshot().context, live.getSnapshot().context);
    // And it goes on from there like the live one.
    for (const actor of [live, replayed]) {
      actor.send(succeeded('b'));
      actor.send(succeeded('d'));
      assert.equal(runStateOf(actor.getSnapshot()), 'succeeded');
    }
  });

  it("replays a chain's steps as running under its head's claim once the step before each succeeded", () => {
    const chain: Plan = {
      pipeline: 'chain',
      steps: [
        { name: 'a', inputs: [] },
        { name: 'b', inputs: [{ param: 'x', step: 'a' }] },
        { name: 'c', inputs: [{ param: 'x', step: 'b' }] },
      ],
    };
    // The executor claimed only a, for the chain a → b → c its ready message carried.
    const claims = new Map([['a', { executorId: 'e', hostId: 'h', attempt: 1, at: 1, chain: ['b', 'c'] }]]);
    const atHead = replayRun(chain, runId, { completions: new Map(), claims });
    assert.deepEqual(stepStatesOf(atHead.getSnapshot()), { a: 'running', b: 'waiting', c: 'waiting' });
    const further = replayRun(chain, runId, { completions: new Map([['a', succeeded('a')]]), claims });
    assert.deepEqual(stepStatesOf(further.getSnapshot()), { a: 'succeeded', b: 'running', c: 'waiting' });
    assert.equal(further.getSnapshot().context.steps.b!.executorId, 'e');
    // A redelivery that took the chain over claims the steps it runs: that claim is the step's.
    const takenOver = new Map([...claims, ['b', { executorId: 'f', hostId: 'h2', attempt: 2, at: 5, chain: ['c'] }]]);
    const replayed = replayRun(chain, runId, { completions: new Map([['a', succeeded('a')]]), claims: takenOver });
    assert.equal(replayed.getSnapshot().context.steps.b!.executorId, 'f');
    assert.equal(replayed.getSnapshot().context.steps.b!.attempt, 2);
  });

  it('replays a failure into skipped descendants and a failed run', () => {
    const facts = { completions: new Map<string, ReturnType<typeof succeeded> | ReturnType<typeof failed>>([['a', succeeded('a')], ['b', failed('b')], ['c', succeeded('c')]]), claims: new Map() };
    const replayed = replayRun(diamond, runId, facts);
    assert.deepEqual(stepStatesOf(replayed.getSnapshot()), { a: 'succeeded', b: 'failed', c: 'succeeded', d: 'skipped' });
    assert.equal(runStateOf(replayed.getSnapshot()), 'failed');
  });
});
