/**
 * Branch create and merge latency against the number of tables and their size.
 *
 *   node --import tsx bench/branches.ts [--reps 7]
 *
 * For each store (a local directory; S3 served by s3rver on loopback with its catalog in a
 * private nats-server) and each shape (10 tables of 200,000 rows, 1,000 tables of 10 rows; after
 * a warm-up shape that is not shown), it
 * writes the tables to main in one catalog commit, then times, median of the reps:
 * - create: `createBranch` from main (one pointer write);
 * - merge ff: a branch that changed one table merged into a main that did not move;
 * - merge 3-way: main changed another table meanwhile (a new catalog commit with two parents);
 * - merge appends: both appended to the same table (one new snapshot of it on main);
 * - 3-way, cold: a 3-way merge by a freshly opened store, which has read no catalog commit yet
 *   (what a `quiver branch merge` process pays).
 * The goal is < 50 ms each, and no growth with table size (rows are never read or copied).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { connect } from '@nats-io/transport-node';
import { tableFromArrays } from 'apache-arrow';
import { startNatsServer, startS3Server } from '../infra/index.ts';
import { atRef, commitStagedMany, openTableStore, stageTable, writeTable, type OpenedTableStore } from '../storage/index.ts';

const { values } = parseArgs({ options: { reps: { type: 'string', default: '7' } } });
const REPS = Number(values.reps);

const rowsTable = (n: number, from = 0) => tableFromArrays({ id: Int32Array.from({ length: n }, (_, i) => from + i), v: Float64Array.from({ length: n }, (_, i) => i * 0.5) });

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function time(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return performance.now() - start;
}

async function measure(store: OpenedTableStore, open: () => Promise<OpenedTableStore>, tables: number, rows: number): Promise<number[]> {
  const staged = [];
  for (let t = 0; t < tables; t++) staged.push({ staged: await stageTable(store, `t${t}`, rowsTable(rows)), mode: 'replace' as const });
  await commitStagedMany(store, staged, { message: 'bench tables' });
  const v = store.catalog.versions;
  const create: number[] = [];
  const ff: number[] = [];
  const threeWay: number[] = [];
  const appends: number[] = [];
  const cold: number[] = [];
  for (let r = 0; r < REPS; r++) {
    create.push(await time(() => v.createBranch(`c${r}`)));

    await v.createBranch(`ff${r}`);
    await writeTable(atRef(store, `ff${r}`), 't0', rowsTable(5, 1_000_000));
    ff.push(await time(() => v.merge(`ff${r}`, 'main')));

    await v.createBranch(`tw${r}`);
    await writeTable(atRef(store, `tw${r}`), 't1', rowsTable(5, 2_000_000));
    await writeTable(store, 't2', rowsTable(5, 3_000_000));
    threeWay.push(await time(() => v.merge(`tw${r}`, 'main')));

    await v.createBranch(`ap${r}`);
    await writeTable(atRef(store, `ap${r}`), 't0', rowsTable(5, 4_000_000));
    await writeTable(store, 't0', rowsTable(5, 5_000_000));
    appends.push(await time(() => v.merge(`ap${r}`, 'main')));

    // As a new process sees it: no catalog commit cached yet.
    await v.createBranch(`cold${r}`);
    await writeTable(atRef(store, `cold${r}`), 't3', rowsTable(5, 6_000_000));
    await writeTable(store, 't4', rowsTable(5, 7_000_000));
    const fresh = await open();
    try {
      cold.push(await time(() => fresh.catalog.versions.merge(`cold${r}`, 'main')));
    } finally {
      await fresh.close();
    }
  }
  return [median(create), median(ff), median(threeWay), median(appends), median(cold)];
}

// The first shape only warms up (JIT, s3rver, connections): whichever shape ran first measured slower.
const shapes = [
  { tables: 3, rows: 10, warmUp: true },
  { tables: 10, rows: 200_000, warmUp: false },
  { tables: 1000, rows: 10, warmUp: false },
];

const rows: string[][] = [];
const dirs: string[] = [];
const s3 = await startS3Server({ buckets: shapes.map((_, i) => `bench${i}`) });
const natsDir = mkdtempSync(join(tmpdir(), 'quiver-bench-branches-nats-'));
const nats = await startNatsServer({ dir: natsDir });
const nc = await connect({ servers: nats.url });
try {
  for (const [i, shape] of shapes.entries()) {
    const root = mkdtempSync(join(tmpdir(), 'quiver-bench-branches-'));
    dirs.push(root);
    const stores: [string, () => Promise<OpenedTableStore>][] = [
      ['local', () => openTableStore({ kind: 'local', root })],
      ['S3 (s3rver) + NATS KV', () => openTableStore({ kind: 's3', s3: { bucket: `bench${i}`, endpoint: s3.endpoint, credentials: s3.credentials, forcePathStyle: true }, nc })],
    ];
    for (const [name, open] of stores) {
      const store = await open();
      try {
        const results = await measure(store, open, shape.tables, shape.rows);
        if (shape.warmUp) continue;
        rows.push([name, String(shape.tables), shape.rows.toLocaleString('en-US'), ...results.map((ms) => ms.toFixed(1))]);
        process.stderr.write(`done: ${name}, ${shape.tables} tables\n`);
      } finally {
        await store.close();
      }
    }
  }
} finally {
  await nc.close();
  await nats.stop();
  await s3.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}

const header = ['store', 'tables', 'rows/table', 'create (ms)', 'merge ff (ms)', 'merge 3-way (ms)', 'merge appends (ms)', '3-way, cold (ms)'];
const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
const line = (cells: string[]) => `| ${cells.map((cell, c) => cell.padEnd(widths[c]!)).join(' | ')} |`;
console.log(line(header));
console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
for (const r of rows) console.log(line(r));
console.log(`\nmedians of ${REPS}; Node ${process.version}`);
