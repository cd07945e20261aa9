import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { chainAfter, PlanError, planPipeline } from '../planner/index.ts';
import { loadPipeline, pipeline, step } from '../sdk/index.ts';
import { fixture, tempHome } from './helpers.ts';

const home = tempHome();
after(() => home.remove());

async function planError(file: string): Promise<PlanError> {
  const error = await loadPipeline(fixture(file)).then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(error instanceof PlanError, `expected a PlanError, got ${error}`);
  return error;
}

describe('planning', () => {
  it('orders the example topologically and keeps only what runs need', async () => {
    const loaded = await loadPipeline(fixture('transactions-generated.ts'));
    assert.equal(loaded.plan.pipeline, 'transactions');
    assert.deepEqual(
      loaded.plan.steps.map((s) => s.name),
      ['transactions', 'euro_selection', 'usd_by_country'],
    );
    assert.deepEqual(loaded.plan.steps[1]!.inputs, [{ param: 'data', step: 'transactions', columns: ['id', 'usd', 'country'] }]);
    assert.match(loaded.codeHash, /^[0-9a-f]{64}$/);
    // The bundle carries the definitions only: no NATS client, no esbuild.
    const code = new TextDecoder().decode(loaded.code);
    assert.doesNotMatch(code, /@nats-io|esbuild/);
  });

  it('rejects a cycle, naming its steps', async () => {
    const e = await planError('cycle.ts');
    assert.equal(e.code, 'ERR_PLAN_CYCLE');
    assert.match(e.message, /"a", "b", "c" form a cycle/);
  });

  it('rejects an input naming no step', async () => {
    const e = await planError('unknown-input.ts');
    assert.equal(e.code, 'ERR_PLAN_UNKNOWN_INPUT');
    assert.equal(e.step, 'only');
    assert.match(e.message, /names step "nowhere", which does not exist/);
  });

  it('rejects two steps with one name', async () => {
    const e = await planError('duplicate.ts');
    assert.equal(e.code, 'ERR_PLAN_DUPLICATE_STEP');
    assert.equal(e.step, 'twice');
  });

  it('rejects a step that is not a function', async () => {
    const e = await planError('not-a-function.ts');
    assert.equal(e.code, 'ERR_PLAN_NOT_A_FUNCTION');
    assert.equal(e.step, 'broken');
    assert.match(e.message, /got number 42/);
  });

  it('rejects a default export that is not a pipeline, and bad names', () => {
    assert.throws(() => planPipeline({ hello: 1 }), { code: 'ERR_PLAN_NOT_A_PIPELINE' });
    assert.throws(() => planPipeline(pipeline('bad name', { a: step(() => null as never) })), { code: 'ERR_PLAN_BAD_NAME' });
    assert.throws(() => planPipeline(pipeline('p', { 'a-b': step(() => null as never) })), { code: 'ERR_PLAN_BAD_NAME', step: 'a-b' });
    assert.throws(() => planPipeline(pipeline('p', {})), { code: 'ERR_PLAN_EMPTY' });
  });

  it('chains a step with the steps that follow it alone and run alike', () => {
    const t = () => null as never;
    const names = (plan: ReturnType<typeof planPipeline>, from: string) => chainAfter(plan, from).map((s) => s.name);
    const line = planPipeline(pipeline('line', { a: step(t), b: step({ x: 'a' }, t), c: step({ x: 'b', y: 'b' }, t) }));
    assert.deepEqual(names(line, 'a'), ['b', 'c']);
    assert.deepEqual(names(line, 'b'), ['c']);
    assert.deepEqual(names(line, 'c'), []);
    // Two children: each is sent when ready, alone.
    const fork = planPipeline(pipeline('fork', { a: step(t), b: step({ x: 'a' }, t), c: step({ x: 'a' }, t) }));
    assert.deepEqual(names(fork, 'a'), []);
    // A child that reads another step too waits for it: not chained.
    const join = planPipeline(pipeline('join', { a: step(t), z: step(t), b: step({ x: 'a', y: 'z' }, t) }));
    assert.deepEqual(names(join, 'a'), []);
    // Steps that run differently (isolation, limits, secrets, a pinned host) start a chain of their own.
    const mixed = planPipeline(
      pipeline('mixed', {
        a: step(t),
        b: step({ x: 'a' }, t, { isolation: 'worker' }),
        c: step({ x: 'b' }, t, { isolation: 'worker' }),
        d: step({ x: 'c' }, t, { isolation: 'worker', timeoutMs: 5_000 }),
        e: step({ x: 'd' }, t, { isolation: 'worker', timeoutMs: 5_000, host: 'gpu' }),
      }),
    );
    assert.deepEqual(names(mixed, 'a'), []);
    assert.deepEqual(names(mixed, 'b'), ['c']);
    assert.deepEqual(names(mixed, 'd'), []);
  });
});
