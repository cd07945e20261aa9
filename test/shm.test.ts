/**
 * Shared-memory layer against real /dev/shm, real mappings and real child
 * processes. Every test has its own directory, removed afterwards.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  Binary,
  Bool,
  DateDay,
  Dictionary,
  Field,
  FixedSizeList,
  Float32,
  Float64,
  Int16,
  Int32,
  Int64,
  Int8,
  LargeUtf8,
  List,
  Null,
  RecordBatch,
  Struct,
  Table,
  TimestampMillisecond,
  Uint32,
  Uint64,
  Uint8,
  Utf8,
  Vector,
  tableFromArrays,
  tableFromIPC,
  tableToIPC,
  vectorFromArray,
} from 'apache-arrow';
import {
  ShmArgumentError,
  ShmCorruptSegmentError,
  ShmError,
  ShmSegmentExistsError,
  ShmSegmentNotFoundError,
  ShmTooLargeError,
  type SegmentRef,
  isViewOf,
  listSegments,
  parentPid,
  poolUsage,
  readTableFromShm,
  releaseSegments,
  removeDir,
  setParentDeathSignal,
  unmapSegments,
  writeTableToShm,
} from '../shm/index.ts';
import { mulberry32 } from '../examples/transactions/data.ts';

const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const SHM_URL = new URL('../shm/index.ts', import.meta.url).href;
const ADDON_PATH = join(repoRoot, 'shm/addon/build/Release/quiver_shm.node');
const TEST_TIMEOUT = 60_000;

interface RawAddon {
  create(...args: unknown[]): ArrayBuffer;
  openWritable(...args: unknown[]): ArrayBuffer;
  openReadOnly(...args: unknown[]): ArrayBuffer;
  unmap(...args: unknown[]): boolean;
  renameNoReplace(...args: unknown[]): void;
  setParentDeathSignal(...args: unknown[]): void;
  parentPid(...args: unknown[]): number;
}

function rawAddon(): RawAddon {
  assert.ok(existsSync(ADDON_PATH), `the addon is not built at ${ADDON_PATH}: run \`npm run build:addon\``);
  return createRequire(import.meta.url)(ADDON_PATH) as RawAddon;
}

/** A fresh segment directory under /dev/shm, removed when the test ends. */
function tempDir(t: TestContext): string {
  const dir = `/dev/shm/quiver-shm-test-${process.pid}-${randomBytes(4).toString('hex')}`;
  t.after(() => removeDir(dir));
  return dir;
}

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs ESM `code` in a new `node --import tsx` process (cwd: the repo, so bare imports resolve). */
function runNode(code: string, env: Record<string, string> = {}, timeoutMs = 30_000): Promise<Exit> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
      cwd: repoRoot,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`child timed out after ${timeoutMs} ms; stdout: ${stdout} stderr: ${stderr}`));
    }, timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Seeded PRNG, so failures reproduce. */
const prng = mulberry32;

/** A table with one column per interesting type, nulls everywhere, `batches` record batches. */
function manyTypesTable(rows: number, batches: number, seed = 7): Table {
  const random = prng(seed);
  const maybe = <T>(value: T): T | null => (random() < 0.15 ? null : value);
  const words = ['alpha', 'beta', 'gamma', 'δέλτα', '', 'epsilon-with-a-longer-string'];
  // One type instance per column, so every batch has the same schema (dictionary ids included).
  const types = {
    dict: new Dictionary(new Utf8(), new Int32()),
    list: new List(new Field('item', new Int32(), true)),
    fixed: new FixedSizeList(2, new Field('item', new Float64(), true)),
    struct: new Struct([new Field('x', new Int32(), true), new Field('y', new Utf8(), true)]),
  };
  const parts: RecordBatch[] = [];
  for (let b = 0; b < batches; b++) {
    const n = Math.floor(rows / batches) + (b < rows % batches ? 1 : 0);
    const col = <T>(f: (i: number) => T): (T | null)[] => Array.from({ length: n }, (_, i) => maybe(f(i)));
    const part = new Table({
      i8: vectorFromArray(col(() => Math.floor(random() * 256) - 128), new Int8()),
      i16: vectorFromArray(col(() => Math.floor(random() * 65536) - 32768), new Int16()),
      i32: vectorFromArray(col((i) => i * 7 - 1000), new Int32()),
      i64: vectorFromArray(col(() => BigInt(Math.floor(random() * 2 ** 52)) * 1024n - 2n ** 60n), new Int64()),
      u8: vectorFromArray(col(() => Math.floor(random() * 256)), new Uint8()),
      u32: vectorFromArray(col(() => Math.floor(random() * 2 ** 32)), new Uint32()),
      u64: vectorFromArray(col(() => BigInt(Math.floor(random() * 2 ** 53)) * 1000n), new Uint64()),
      f32: vectorFromArray(col(() => Math.fround(random() * 100 - 50)), new Float32()),
      f64: vectorFromArray(col(() => (random() < 0.05 ? Number.NaN : random() * 1e9)), new Float64()),
      bool: vectorFromArray(col(() => random() < 0.5), new Bool()),
      utf8: vectorFromArray(col(() => words[Math.floor(random() * words.length)] as string), new Utf8()),
      large: vectorFromArray(col(() => `row-${Math.floor(random() * 1e6)}`), new LargeUtf8()),
      bin: vectorFromArray(col(() => Uint8Array.from({ length: Math.floor(random() * 5) }, () => Math.floor(random() * 256))), new Binary()),
      dict: vectorFromArray(col(() => words[Math.floor(random() * 3)] as string), types.dict),
      list: vectorFromArray(
        col(() => Array.from({ length: Math.floor(random() * 4) }, () => maybe(Math.floor(random() * 100)))),
        types.list,
      ),
      fixed: vectorFromArray(col(() => [random(), random()]), types.fixed),
      struct: vectorFromArray(
        col(() => ({ x: maybe(Math.floor(random() * 1000)), y: maybe(words[Math.floor(random() * words.length)] as string) })),
        types.struct,
      ),
      ts: vectorFromArray(col(() => 1672531200000 + Math.floor(random() * 31536000000)), new TimestampMillisecond()),
      day: vectorFromArray(col(() => new Date(Date.UTC(2023, 0, 1 + Math.floor(random() * 365)))), new DateDay()),
      nothing: vectorFromArray(Array.from({ length: n }, () => null), new Null()),
    });
    parts.push(...part.batches);
  }
  return new Table(parts);
}

/** Plain JavaScript values of a cell, comparable with deepStrictEqual. */
function plain(value: unknown): unknown {
  if (value === null || value === undefined) return null;
  if (typeof value !== 'object') return value;
  if (value instanceof Date) return value.getTime();
  if (value instanceof Vector) return [...value].map(plain);
  if (ArrayBuffer.isView(value)) return Array.from(value as unknown as ArrayLike<unknown>, plain);
  const json = (value as { toJSON?: () => Record<string, unknown> }).toJSON?.();
  if (json !== undefined) return Object.fromEntries(Object.entries(json).map(([k, v]) => [k, plain(v)]));
  return value;
}

function assertTablesEqual(actual: Table, expected: Table): void {
  assert.deepEqual(
    actual.schema.fields.map((f) => `${f.name}: ${String(f.type)}${f.nullable ? '?' : ''}`),
    expected.schema.fields.map((f) => `${f.name}: ${String(f.type)}${f.nullable ? '?' : ''}`),
  );
  assert.equal(actual.numRows, expected.numRows);
  for (const field of expected.schema.fields) {
    const a = [...(actual.getChild(field.name) ?? [])].map(plain);
    const e = [...(expected.getChild(field.name) ?? [])].map(plain);
    assert.deepStrictEqual(a, e, `column ${field.name} differs`);
  }
}

/** Same digest in every process: JSON of all rows, bigints spelled out. */
const DIGEST_SOURCE = `(table) => JSON.stringify(table.toArray(), (_k, v) => (typeof v === 'bigint' ? v.toString() + 'n' : v))`;
const digest = (0, eval)(DIGEST_SOURCE) as (table: Table) => string;

test('many types round-trip and stay views of the mapping', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const original = manyTypesTable(3000, 3);
  const written = writeTableToShm(original, { dir, idPrefix: 'types' });
  assert.equal(written.rows, 3000);
  assert.equal(written.segments.length, 1);
  assert.equal(written.copiedBytes, written.byteSize);
  assert.equal(written.segments[0]?.byteSize, written.byteSize);

  const { table, mappings } = readTableFromShm(written.segments, { dir });
  assertTablesEqual(table, original);
  assert.equal(table.batches.length, 3);
  assert.equal(mappings.length, 1);
  assert.ok(isViewOf(table, mappings), 'every column buffer is a view of the mapping');
  assert.equal(table.getChild('i32')?.data[0]?.values.buffer, mappings[0]);
  assert.equal(table.getChild('utf8')?.data[1]?.valueOffsets.buffer, mappings[0]);
  assert.equal(table.getChild('struct')?.data[0]?.children[1]?.values.buffer, mappings[0]);
  assert.equal(table.getChild('dict')?.data[0]?.dictionary?.data[0]?.values.buffer, mappings[0]);

  // isViewOf can fail: the original and a copied table are not views of the mapping.
  assert.equal(isViewOf(original, mappings), false);
  assert.equal(isViewOf(tableFromIPC(tableToIPC(table)), mappings), false);
  assert.equal(isViewOf(table, []), false);
});

test('another process reads the same table', { timeout: TEST_TIMEOUT }, async (t) => {
  const dir = tempDir(t);
  const original = manyTypesTable(2000, 2, 11);
  const written = writeTableToShm(original, { dir, idPrefix: 'cross' });
  const child = await runNode(
    `import { readTableFromShm, isViewOf } from ${JSON.stringify(SHM_URL)};
     const { table, mappings } = readTableFromShm(JSON.parse(process.env.SEGMENTS), { dir: process.env.DIR });
     const digest = ${DIGEST_SOURCE};
     console.log(JSON.stringify({ rows: table.numRows, view: isViewOf(table, mappings), digest: digest(table) }));`,
    { SEGMENTS: JSON.stringify(written.segments), DIR: dir },
  );
  assert.equal(child.code, 0, child.stderr);
  const seen = JSON.parse(child.stdout) as { rows: number; view: boolean; digest: string };
  assert.equal(seen.rows, 2000);
  assert.equal(seen.view, true);
  assert.equal(seen.digest, digest(original));
});

test('a table larger than maxSegmentBytes spans several segments', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const maxSegmentBytes = 64 * 1024;
  const original = manyTypesTable(20_000, 4, 3);
  const written = writeTableToShm(original, { dir, idPrefix: 'multi', maxSegmentBytes });
  assert.ok(written.segments.length > 4, `expected batches to be split, got ${written.segments.length} segments`);
  written.segments.forEach((s, i) => {
    assert.equal(s.id, `multi-${i}`);
    assert.ok(s.byteSize <= maxSegmentBytes, `${s.id} is ${s.byteSize} bytes`);
  });
  assert.deepEqual(
    listSegments(dir).map((s) => s.id).sort(),
    written.segments.map((s) => s.id).sort(),
  );

  const { table, mappings } = readTableFromShm(written.segments, { dir });
  assert.equal(mappings.length, written.segments.length);
  assertTablesEqual(table, original);
  assert.ok(isViewOf(table, mappings));
  // Each mapping backs part of the table.
  const owners = new Set(table.getChild('f64')?.data.map((d) => d.values.buffer));
  for (const mapping of mappings) assert.ok(owners.has(mapping));
});

test('a batch bigger than one segment is split by rows; a single row too big is refused', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const values = Float64Array.from({ length: 100_000 }, (_, i) => i / 3);
  const original = tableFromArrays({ x: values });
  assert.equal(original.batches.length, 1);
  const written = writeTableToShm(original, { dir, idPrefix: 'split', maxSegmentBytes: 100_000 });
  assert.ok(written.segments.length >= 8);
  const { table, mappings } = readTableFromShm(written.segments, { dir });
  assert.deepEqual(table.getChild('x')?.toArray(), values);
  assert.ok(isViewOf(table, mappings));

  const wide = tableFromArrays({ s: ['x'.repeat(10_000)] });
  assert.throws(
    () => writeTableToShm(wide, { dir, idPrefix: 'wide', maxSegmentBytes: 4096 }),
    (e: unknown) => e instanceof ShmTooLargeError && e.code === 'ERR_SHM_TOO_LARGE' && /single row/.test(e.message),
  );
  assert.deepEqual(listSegments(dir).filter((s) => s.id.startsWith('wide')), []);
});

test('an empty table round-trips with its schema', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const schemaSource = manyTypesTable(10, 1);
  for (const [name, empty] of [
    ['no batches', new Table(schemaSource.schema)],
    ['an empty batch', schemaSource.slice(0, 0)],
  ] as const) {
    const written = writeTableToShm(empty, { dir, idPrefix: `empty-${name.replaceAll(' ', '-')}` });
    assert.equal(written.rows, 0);
    assert.equal(written.segments.length, 1, name);
    const { table } = readTableFromShm(written.segments, { dir });
    assert.equal(table.numRows, 0, name);
    assertTablesEqual(table, empty);
  }
});

test('a segment directory removed by someone else after a write is made again by the next write, mode 0700', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const table = tableFromArrays({ x: Int32Array.of(1, 2, 3) });
  writeTableToShm(table, { dir, idPrefix: 'before' });
  // The process remembers the directory as made; removed behind its back (not by removeDir, which
  // forgets it), it must not break the next writer.
  rmSync(dir, { recursive: true, force: true });
  assert.equal(existsSync(dir), false);
  const again = writeTableToShm(table, { dir, idPrefix: 'after' });
  assert.equal(statSync(dir).mode & 0o777, 0o700);
  assertTablesEqual(readTableFromShm(again.segments, { dir }).table, table);
});

test('the pool keeps a bounded number of files: after a burst of small releases the rest are unlinked', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const many = Array.from({ length: 300 }, (_, k) => writeTableToShm(tableFromArrays({ x: Int32Array.of(k) }), { dir, idPrefix: `burst${k}` }));
  releaseSegments(
    many.flatMap((w) => w.segments),
    { dir },
  );
  assert.deepEqual(listSegments(dir), []);
  assert.equal(poolUsage(dir).segments, 256);
  assert.equal(readdirSync(join(dir, 'pool')).length, 256);
});

test('released segments are reused from the pool, within its size band and cap', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const make = (n: number, seed: number) => tableFromArrays({ x: Float64Array.from({ length: n }, (_, i) => i * seed) });

  const first = writeTableToShm(make(50_000, 1), { dir, idPrefix: 'a' });
  assert.equal(first.reusedSegments, 0);
  const inode = statSync(join(dir, 'a-0')).ino;
  releaseSegments(first.segments, { dir });
  assert.deepEqual(listSegments(dir), []);
  assert.deepEqual(poolUsage(dir), { segments: 1, byteSize: first.byteSize });
  const pooled = readdirSync(join(dir, 'pool'));
  assert.equal(statSync(join(dir, 'pool', pooled[0] as string)).ino, inode);

  // A table needing less than half the pooled file does not take it.
  const small = writeTableToShm(make(1000, 2), { dir, idPrefix: 'small' });
  assert.equal(small.reusedSegments, 0);
  assert.equal(poolUsage(dir).segments, 1);

  // A table of about the same size does, and the file is the same inode.
  const expected = make(45_000, 3);
  const second = writeTableToShm(expected, { dir, idPrefix: 'b' });
  assert.equal(second.reusedSegments, 1);
  assert.equal(statSync(join(dir, 'b-0')).ino, inode);
  assert.deepEqual(poolUsage(dir), { segments: 0, byteSize: 0 });
  // The reused file is longer than the new stream; the reader uses only byteSize of it.
  assert.ok(statSync(join(dir, 'b-0')).size > second.byteSize);
  assertTablesEqual(readTableFromShm(second.segments, { dir }).table, expected);

  // The cap: three equal segments, room for two.
  const three = [1, 2, 3].map((k) => writeTableToShm(make(10_000, k), { dir, idPrefix: `c${k}` }));
  const size = three[0]?.byteSize ?? 0;
  releaseSegments(three.flatMap((w) => w.segments), { dir, poolMaxBytes: 2 * size });
  assert.deepEqual(poolUsage(dir), { segments: 2, byteSize: 2 * size });
  assert.deepEqual(listSegments(dir).map((s) => s.id).sort(), ['b-0', 'small-0']);

  // poolMaxBytes 0: no pool at all.
  releaseSegments(['small-0'], { dir, poolMaxBytes: 0 });
  assert.equal(poolUsage(dir).segments, 2);
  assert.deepEqual(listSegments(dir).map((s) => s.id), ['b-0']);
});

test('processes racing for one pooled segment: one wins, both tables are intact', { timeout: TEST_TIMEOUT }, async (t) => {
  const dir = tempDir(t);
  const rows = 200_000;
  const seed = writeTableToShm(tableFromArrays({ x: new Float64Array(rows) }), { dir, idPrefix: 'seed' });
  releaseSegments(seed.segments, { dir });
  assert.equal(poolUsage(dir).segments, 1);

  const startAt = String(Date.now() + 1500);
  const writer = (k: number) =>
    runNode(
      `import { writeTableToShm } from ${JSON.stringify(SHM_URL)};
       import { tableFromArrays } from 'apache-arrow';
       const table = tableFromArrays({ x: Float64Array.from({ length: ${rows} }, (_, i) => i * ${k}) });
       while (Date.now() < Number(process.env.START_AT)) {}
       const written = writeTableToShm(table, { dir: process.env.DIR, idPrefix: 'w${k}' });
       console.log(JSON.stringify(written));`,
      { DIR: dir, START_AT: startAt },
    );
  const results = await Promise.all([writer(1), writer(2)]);
  const written = results.map((r) => {
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as { segments: SegmentRef[]; reusedSegments: number };
  });
  assert.equal(written.reduce((sum, w) => sum + w.reusedSegments, 0), 1, 'exactly one writer got the pooled file');
  written.forEach((w, i) => {
    const x = readTableFromShm(w.segments, { dir }).table.getChild('x')?.toArray() as Float64Array;
    assert.equal(x.length, rows);
    assert.equal(x[rows - 1], (rows - 1) * (i + 1));
  });
});

test('readers map read-only: writing into an input kills the process with SIGSEGV', { timeout: TEST_TIMEOUT }, async (t) => {
  const dir = tempDir(t);
  const written = writeTableToShm(tableFromArrays({ x: Float64Array.from([1, 2, 3]) }), { dir, idPrefix: 'ro' });
  const child = await runNode(
    `import { readTableFromShm } from ${JSON.stringify(SHM_URL)};
     const { table } = readTableFromShm(JSON.parse(process.env.SEGMENTS), { dir: process.env.DIR });
     const values = table.getChild('x').data[0].values;
     console.log('read', values[0]);
     values[0] = 42;
     console.log('wrote', values[0]);`,
    { SEGMENTS: JSON.stringify(written.segments), DIR: dir },
  );
  assert.match(child.stdout, /^read 1$/m);
  assert.doesNotMatch(child.stdout, /wrote/);
  assert.equal(child.signal, 'SIGSEGV', `expected death by SIGSEGV, got code ${child.code} signal ${child.signal}`);
  assert.deepEqual([...(readTableFromShm(written.segments, { dir }).table.getChild('x') ?? [])], [1, 2, 3]);
});

/** Whether `pid` is still running (a zombie waiting to be reaped counts as dead). */
function isRunning(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function waitFor(predicate: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (predicate()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return predicate();
}

/** Starts a parent process whose child (the grandchild) optionally arms the parent-death signal; returns both pids. */
async function startFamily(arm: boolean): Promise<{ parent: ReturnType<typeof spawn>; grandchild: number }> {
  const grandchildCode = `import { setParentDeathSignal, parentPid } from ${JSON.stringify(SHM_URL)};
    if (process.env.ARM === '1') setParentDeathSignal('SIGKILL', { expectedParentPid: Number(process.env.PARENT_PID) });
    console.log('ready ' + process.pid + ' ' + parentPid());
    setInterval(() => {}, 1000);`;
  const parentCode = `import { spawn } from 'node:child_process';
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', ${JSON.stringify(grandchildCode)}],
      { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, PARENT_PID: String(process.pid) } });
    child.stdout.pipe(process.stdout);
    setInterval(() => {}, 1000);`;
  const parent = spawn(process.execPath, ['--input-type=module', '-e', parentCode], {
    cwd: repoRoot,
    env: { ...process.env, ARM: arm ? '1' : '0' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`grandchild never reported ready; got: ${out}`)), 20_000);
    parent.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      const match = /ready (\d+) (\d+)/.exec(out);
      if (match) {
        clearTimeout(timer);
        resolve(match[0]);
      }
    });
    parent.on('exit', () => reject(new Error(`parent exited early; got: ${out}`)));
  });
  const [, grandchild, itsParent] = line.split(' ').map(Number);
  assert.equal(itsParent, parent.pid, 'parentPid() in the grandchild is its parent');
  return { parent, grandchild: grandchild as number };
}

test('a grandchild with setParentDeathSignal dies when its parent is SIGKILLed', { timeout: TEST_TIMEOUT }, async () => {
  const { parent, grandchild } = await startFamily(true);
  assert.ok(isRunning(grandchild));
  parent.kill('SIGKILL');
  assert.ok(await waitFor(() => !isRunning(grandchild), 5000), `grandchild ${grandchild} outlived its parent`);
});

test('without setParentDeathSignal the grandchild outlives its parent (control)', { timeout: TEST_TIMEOUT }, async () => {
  const { parent, grandchild } = await startFamily(false);
  try {
    parent.kill('SIGKILL');
    assert.equal(await waitFor(() => !isRunning(grandchild), 1000), false, 'the grandchild died without the signal armed');
  } finally {
    if (isRunning(grandchild)) process.kill(grandchild, 'SIGKILL');
  }
});

test('setParentDeathSignal fires at once when the parent is already gone', { timeout: TEST_TIMEOUT }, async () => {
  const child = await runNode(
    `import { setParentDeathSignal, parentPid } from ${JSON.stringify(SHM_URL)};
     setParentDeathSignal('SIGTERM', { expectedParentPid: parentPid() + 1 });
     console.log('survived');`,
  );
  assert.equal(child.signal, 'SIGTERM');
  assert.doesNotMatch(child.stdout, /survived/);
  assert.equal(parentPid(), process.ppid);
});

/** Asserts `fn` throws an error with exactly `code` (and, if given, of `type`). */
function assertCode(fn: () => unknown, code: string, type?: new (...args: never[]) => Error): void {
  assert.throws(fn, (e: unknown) => {
    assert.equal((e as { code?: unknown }).code, code, `expected ${code}, got ${(e as Error).message}`);
    if (type) assert.ok(e instanceof type, `expected a ${type.name}, got ${(e as Error).name}`);
    assert.ok((e as Error).message.length > 20, 'the message says what went wrong');
    return true;
  });
}

test('the addon checks every argument and reports errno names', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const addon = rawAddon();
  const path = join(dir, 'seg');
  // The directory does not exist yet.
  assertCode(() => addon.create(path, 10, false), 'ENOENT');
  mkdirSync(dir, { recursive: true });

  for (const size of [Number.NaN, -1, 1.5, Number.POSITIVE_INFINITY, '10', 10n, null, undefined]) {
    assertCode(() => addon.create(path, size, false), 'ERR_SHM_ARG');
    assertCode(() => addon.openWritable(path, size, false), 'ERR_SHM_ARG');
  }
  assertCode(() => addon.create(path, 2 ** 53, false), 'ERR_SHM_TOO_LARGE');
  assertCode(() => addon.create(path, 2 ** 32 + 1, false), 'ERR_SHM_TOO_LARGE');
  for (const bad of [42, '', 'a\0b', null, {}]) assertCode(() => addon.create(bad, 10, false), 'ERR_SHM_ARG');
  assertCode(() => addon.create(path, 10, 1), 'ERR_SHM_ARG');
  assertCode(() => addon.create(path, 10), 'ERR_SHM_ARG');
  assertCode(() => addon.create(path, 10, false, 'extra'), 'ERR_SHM_ARG');
  assertCode(() => addon.openReadOnly(), 'ERR_SHM_ARG');
  assert.equal(existsSync(path), false, 'no file was created by a rejected call');

  const mapping = addon.create(path, 4096, true);
  assert.equal(mapping.byteLength, 4096);
  assertCode(() => addon.create(path, 4096, true), 'EEXIST');
  assertCode(() => addon.openReadOnly(join(dir, 'missing')), 'ENOENT');
  assertCode(() => addon.openWritable(join(dir, 'missing'), 10, false), 'ENOENT');
  assertCode(() => addon.openReadOnly(dir), 'EINVAL');
  const empty = addon.create(join(dir, 'empty'), 0, false);
  assert.equal(empty.byteLength, 0);
  assert.equal(statSync(join(dir, 'empty')).size, 0);

  const error = (() => {
    try {
      addon.create(path, 1, false);
    } catch (e) {
      return e as { errno: number; syscall: string; path: string; message: string };
    }
    return null;
  })();
  assert.equal(error?.errno, 17);
  assert.equal(error?.syscall, 'open');
  assert.equal(error?.path, path);
  assert.match(error?.message ?? '', new RegExp(`${path}.*release`));

  for (const sig of [-1, 1.5, 99, 'SIGKILL']) assertCode(() => addon.setParentDeathSignal(sig), 'ERR_SHM_ARG');
  assertCode(() => addon.parentPid(1), 'ERR_SHM_ARG');
  assertCode(() => addon.unmap(new Uint8Array(8)), 'ERR_SHM_ARG');
  assertCode(() => addon.unmap(new ArrayBuffer(8)), 'ERR_SHM_ARG');
  assertCode(() => addon.renameNoReplace(join(dir, 'missing'), join(dir, 'x')), 'ENOENT');
  assertCode(() => addon.renameNoReplace(join(dir, 'empty'), path), 'EEXIST');

  // unmap detaches: the buffer reads as empty instead of faulting.
  const view = new Uint8Array(mapping);
  view[0] = 1;
  assert.equal(addon.unmap(mapping), true);
  assert.equal(mapping.byteLength, 0);
  assert.equal(view.length, 0);
  assert.equal(addon.unmap(mapping), false);
});

test('the public functions reject bad arguments with stable codes', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const table = tableFromArrays({ x: Float64Array.from([1, 2, 3]) });
  for (const idPrefix of ['', 'a/b', '../up', 'sp ace', 'x'.repeat(300)]) {
    assertCode(() => writeTableToShm(table, { dir, idPrefix }), 'ERR_SHM_ARG', ShmArgumentError);
  }
  assertCode(() => writeTableToShm(table, { dir: 'relative/dir', idPrefix: 'a' }), 'ERR_SHM_ARG', ShmArgumentError);
  for (const maxSegmentBytes of [0, -5, 1.5, Number.NaN]) {
    assertCode(() => writeTableToShm(table, { dir, idPrefix: 'a', maxSegmentBytes }), 'ERR_SHM_ARG', ShmArgumentError);
  }
  assertCode(() => writeTableToShm(table, { dir, idPrefix: 'a', maxSegmentBytes: 2 ** 40 }), 'ERR_SHM_TOO_LARGE', ShmTooLargeError);
  assertCode(() => writeTableToShm(table, { dir, idPrefix: 'a', poolMaxBytes: -1 }), 'ERR_SHM_ARG', ShmArgumentError);
  assertCode(() => writeTableToShm({ numRows: 3 } as unknown as Table, { dir, idPrefix: 'a' }), 'ERR_SHM_ARG');
  assertCode(() => setParentDeathSignal('SIGNOPE' as NodeJS.Signals), 'ERR_SHM_ARG', ShmArgumentError);
  assertCode(() => readTableFromShm([], { dir }), 'ERR_SHM_ARG', ShmArgumentError);
  assertCode(() => readTableFromShm([{ id: 'a/b', byteSize: 100 }], { dir }), 'ERR_SHM_ARG', ShmArgumentError);
  assertCode(() => readTableFromShm([{ id: 'nope-0', byteSize: 100 }], { dir }), 'ENOENT', ShmSegmentNotFoundError);
  assertCode(() => releaseSegments(['ok', 'no/slash'], { dir }), 'ERR_SHM_ARG', ShmArgumentError);

  // An id that exists is refused and left alone; a failed multi-segment write removes what it made.
  const first = writeTableToShm(table, { dir, idPrefix: 'dup' });
  assertCode(() => writeTableToShm(table, { dir, idPrefix: 'dup' }), 'EEXIST', ShmSegmentExistsError);
  assertTablesEqual(readTableFromShm(first.segments, { dir }).table, table);
  writeFileSync(join(dir, 'multi-2'), 'someone else');
  const big = tableFromArrays({ x: Float64Array.from({ length: 50_000 }, (_, i) => i) });
  assertCode(() => writeTableToShm(big, { dir, idPrefix: 'multi', maxSegmentBytes: 100_000 }), 'EEXIST', ShmSegmentExistsError);
  assert.deepEqual(listSegments(dir).map((s) => s.id), ['dup-0', 'multi-2']);
  assert.equal(readFileSync(join(dir, 'multi-2'), 'utf8'), 'someone else');

  // A reference that does not match the file, or a file that is not a stream, is corrupt.
  const ref = first.segments[0] as SegmentRef;
  assertCode(() => readTableFromShm([{ id: ref.id, byteSize: ref.byteSize + 8 }], { dir }), 'ERR_SHM_CORRUPT', ShmCorruptSegmentError);
  writeFileSync(join(dir, 'garbage-0'), randomBytes(4096));
  assertCode(() => readTableFromShm([{ id: 'garbage-0', byteSize: 4096 }], { dir }), 'ERR_SHM_CORRUPT', ShmCorruptSegmentError);
  assert.throws(() => readTableFromShm([{ id: 'garbage-0', byteSize: 4096 }], { dir }), ShmError);
});

test('releaseSegments is idempotent; listSegments reports sizes and skips the pool', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  assert.deepEqual(listSegments(dir), [], 'a missing directory has no segments');
  releaseSegments(['never-written'], { dir });
  const written = writeTableToShm(tableFromArrays({ x: Float64Array.from({ length: 10_000 }, Math.sqrt) }), { dir, idPrefix: 'r' });
  const [info] = listSegments(dir);
  assert.equal(info?.id, 'r-0');
  assert.equal(info?.byteSize, written.byteSize);
  assert.ok((info?.allocatedBytes ?? 0) >= written.byteSize, 'pages are allocated up front');
  releaseSegments(written.segments, { dir });
  releaseSegments(written.segments, { dir });
  releaseSegments(['r-0'], { dir });
  assert.deepEqual(listSegments(dir), []);
  assert.equal(poolUsage(dir).segments, 1);
  assertCode(() => readTableFromShm(written.segments, { dir }), 'ENOENT', ShmSegmentNotFoundError);
});

test('unmapSegments releases a reader mapping without crashing later reads', { timeout: TEST_TIMEOUT }, (t) => {
  const dir = tempDir(t);
  const written = writeTableToShm(tableFromArrays({ x: Float64Array.from([1, 2, 3]) }), { dir, idPrefix: 'u' });
  const { table, mappings } = readTableFromShm(written.segments, { dir });
  assert.equal(table.getChild('x')?.get(2), 3);
  unmapSegments(mappings);
  assert.equal(mappings[0]?.byteLength, 0);
  assert.equal(table.getChild('x')?.data[0]?.values.length, 0);
  unmapSegments(mappings);
});
