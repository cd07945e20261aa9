import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { stepCacheKey, type StepCacheParts } from '../planner/index.ts';
import { loadPipeline } from '../sdk/index.ts';
import { repoRoot } from './helpers.ts';

const dir = mkdtempSync(join(tmpdir(), 'quiver-cache-keys-'));
after(() => rmSync(dir, { recursive: true, force: true }));

interface Variant {
  helper?: string;
  shared?: string;
  a?: string;
  b?: string;
}

/** Loads a pipeline written from `variant` and returns its steps' code keys. */
async function codeKeys(variant: Variant = {}, fileName = 'pipeline.ts'): Promise<Record<string, string>> {
  const file = join(dir, fileName);
  writeFileSync(
    file,
    `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
function scale(x: number) { return ${variant.helper ?? 'x * 2'}; }
const shared = (t: any) => ${variant.shared ?? 't'};
export default pipeline('keys', {
  a: step(() => tableFromArrays({ v: Int32Array.of(${variant.a ?? '1'}) })),
  b: step({ t: 'a' }, ({ t }) => ${variant.b ?? 't.slice(0)'}),
  c: step({ t: 'a' }, ({ t }) => tableFromArrays({ v: Int32Array.of(scale(t.numRows)) })),
  d: step({ t: 'b' }, shared),
});
`,
  );
  const loaded = await loadPipeline(file);
  return Object.fromEntries(loaded.plan.steps.map((s) => [s.name, s.codeKey ?? '']));
}

test('editing one step function changes its code key only', async () => {
  const base = await codeKeys();
  assert.deepEqual(Object.keys(base).sort(), ['a', 'b', 'c', 'd']);
  for (const key of Object.values(base)) assert.match(key, /^[0-9a-f]{64}$/);
  assert.equal(new Set(Object.values(base)).size, 4, 'four steps, four keys');
  assert.deepEqual(await codeKeys(), base, 'the same file gives the same keys');
  assert.deepEqual(await codeKeys({}, 'renamed.ts'), base, 'the same code under another file name gives the same keys');

  const editedA = await codeKeys({ a: '2' });
  assert.notEqual(editedA.a, base.a);
  assert.deepEqual({ ...editedA, a: base.a }, base, 'only a changed');

  const editedB = await codeKeys({ b: 't.slice(0, 1)' });
  assert.notEqual(editedB.b, base.b);
  assert.deepEqual({ ...editedB, b: base.b }, base, 'only b changed');
});

test('code every step could call changes every key', async () => {
  const base = await codeKeys();
  // scale() is named: any step may call it, so it is in every key.
  const helper = await codeKeys({ helper: 'x * 3' });
  for (const name of Object.keys(base)) assert.notEqual(helper[name], base[name], `step ${name} keeps its key after scale() changed`);
  // A named function used as a step is not cut from the others' keys either.
  const shared = await codeKeys({ shared: 't.slice(0, 1)' });
  for (const name of Object.keys(base)) assert.notEqual(shared[name], base[name], `step ${name} keeps its key after shared() changed`);
});

test('a cache key changes exactly when code, packages, params, event, inputs or snapshot change', () => {
  const base: StepCacheParts = {
    codeKey: 'a'.repeat(64),
    params: { day: '2026-12-01', region: 'eu' },
    event: { subject: 'orders.new', payload: { id: 7, lines: [1, 2] } },
    packages: { 'date-fns': '3.6.0' },
    inputs: [
      { param: 'orders', key: 'k1' },
      { param: 'users', columns: ['id'], key: 'k2' },
    ],
  };
  const key = stepCacheKey(base);
  assert.match(key, /^[0-9a-f]{64}$/);
  // Same content, other order: same key.
  assert.equal(
    stepCacheKey({
      ...base,
      params: { region: 'eu', day: '2026-12-01' },
      event: { subject: 'orders.new', payload: { lines: [1, 2], id: 7 } },
      inputs: [...base.inputs].reverse(),
    }),
    key,
  );
  const changes: [string, StepCacheParts][] = [
    ['code', { ...base, codeKey: 'b'.repeat(64) }],
    ['a package version', { ...base, packages: { 'date-fns': '3.6.1' } }],
    ['a param', { ...base, params: { ...base.params, region: 'us' } }],
    ['a new param', { ...base, params: { ...base.params, extra: '' } }],
    ['the event payload', { ...base, event: { subject: 'orders.new', payload: { id: 8, lines: [1, 2] } } }],
    ['the event subject', { ...base, event: { subject: 'orders.old', payload: base.event!.payload } }],
    ['no event', { ...base, event: undefined } as StepCacheParts],
    ['a parent key', { ...base, inputs: [{ param: 'orders', key: 'k9' }, base.inputs[1]!] }],
    ['input columns', { ...base, inputs: [base.inputs[0]!, { param: 'users', columns: ['id', 'name'], key: 'k2' }] }],
    ['an input name', { ...base, inputs: [{ param: 'orders2', key: 'k1' }, base.inputs[1]!] }],
    ['the snapshot read', { ...base, snapshotId: 's2' }],
  ];
  const seen = new Set([key]);
  for (const [what, parts] of changes) {
    const changed = stepCacheKey(parts);
    assert.ok(!seen.has(changed), `changing ${what} did not change the key`);
    seen.add(changed);
  }
});
