/**
 * Handoff benchmark: how long a fresh child process takes to get its
 * parent's table, by three routes side by side:
 *
 *   shm      map the parent's shared-memory segments and open them as a Table (Quiver's route)
 *   ipc      read an Arrow IPC file from disk and open it
 *   parquet  read a Parquet file (snappy, 1M-row row groups) with parquet-wasm, batchSize 1M
 *   table-disk, table-s3
 *            scan a Quiver stored table (storage/: metadata, manifest, footers, then every column
 *            chunk by ranged reads, decoded row group by row group) from a local directory, or
 *            from S3 served by s3rver on loopback (its catalog in a private nats-server): the
 *            routes of Table 3 in the Bauplan paper, beside shared memory, in one run
 *
 * Each measurement runs in a new child process. Modules are imported before
 * the clock starts; the child reports the time to a usable Table and the time
 * to then sum the `usd` column (checked against the parent's sum, so the data
 * is real). Files are read from a warm page cache, which favours ipc and parquet.
 * Also reports the parent's write side: writeTableToShm into fresh segments vs
 * into segments reused from the pool.
 *
 * Run: npm run bench:handoff [-- --rows 1000000,10000000 --reps 5]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Table, tableFromIPC, tableToIPC } from 'apache-arrow';
import { Compression, Table as WasmTable, WriterPropertiesBuilder, readParquet, writeParquet } from 'parquet-wasm';
import { generateTransactions } from '../examples/transactions/data.ts';
import { connect } from '@nats-io/transport-node';
import { startNatsServer, startS3Server } from '../infra/index.ts';
import { openTableStore, scanTable, writeTable, type OpenedTableStore } from '../storage/index.ts';
import {
  type SegmentRef,
  drainPool,
  parentPid,
  readTableFromShm,
  releaseSegments,
  removeDir,
  writeTableToShm,
} from '../shm/index.ts';

const BENCH_FILE = fileURLToPath(import.meta.url);
const CHILD_FLAG = '--child';
const PARQUET_BATCH_ROWS = 1_000_000;
/** Pause in the child between imports and the clock, the same for every route. */
const CHILD_SETTLE_MS = 200;
/** Big enough that every released segment of the bench is pooled. */
const BENCH_POOL_MAX_BYTES = 16 * 1024 ** 3;

type Route = 'shm' | 'ipc' | 'parquet' | 'table-disk' | 'table-s3';
const ROUTES: readonly Route[] = ['shm', 'ipc', 'parquet', 'table-disk', 'table-s3'];
const ROUTE_LABEL: Record<Route, string> = {
  shm: 'shm (Quiver)',
  ipc: 'Arrow IPC file',
  parquet: 'Parquet (parquet-wasm)',
  'table-disk': 'stored table, Parquet on local disk',
  'table-s3': 'stored table, Parquet in S3 (loopback)',
};

/** Where the child finds a stored table. */
type TableLocation = { kind: 'local'; root: string } | { kind: 's3'; endpoint: string; bucket: string; natsUrl: string };

interface ChildJob {
  route: Route;
  /** shm: segment directory; ipc, parquet: file path; table routes: the table's name. */
  location: string;
  segments: SegmentRef[];
  store?: TableLocation;
}

interface ChildReport {
  tableSeconds: number;
  sumSeconds: number;
  rows: number;
  sum: number;
  /** Table routes: bytes the scan read from the store. */
  bytesFetched?: number;
}

const S3_CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' };

async function openBenchStore(location: TableLocation): Promise<OpenedTableStore & { nc?: { close(): Promise<void> } }> {
  if (location.kind === 'local') return openTableStore(location);
  const nc = await connect({ servers: location.natsUrl });
  const store = await openTableStore({ kind: 's3', s3: { bucket: location.bucket, endpoint: location.endpoint, credentials: S3_CREDENTIALS, forcePathStyle: true }, nc });
  return { ...store, close: async () => (await store.close(), await nc.close()) };
}

function sumUsd(table: Table): number {
  let sum = 0;
  for (const data of table.getChild('usd')?.data ?? []) {
    const values = data.values as Float64Array;
    for (let i = data.offset, end = data.offset + data.length; i < end; i++) sum += values[i] as number;
  }
  return sum;
}

/** In the child: get the table by one route, then sum a column. Prints one JSON line. */
async function runChild(job: ChildJob): Promise<void> {
  // Opening a store (an S3 client, a NATS connection) is set-up, like imports: before the clock.
  const store = job.store ? await openBenchStore(job.store) : null;
  let bytesFetched: number | undefined;
  const start = performance.now();
  let table: Table;
  switch (job.route) {
    case 'table-disk':
    case 'table-s3': {
      const scanned = await scanTable(store!, job.location, { cache: null });
      table = scanned.table;
      bytesFetched = scanned.stats.bytesFetched;
      break;
    }
    case 'shm':
      table = readTableFromShm(job.segments, { dir: job.location }).table;
      break;
    case 'ipc':
      table = tableFromIPC(readFileSync(job.location));
      break;
    case 'parquet':
      table = tableFromIPC(readParquet(readFileSync(job.location), { batchSize: PARQUET_BATCH_ROWS }).intoIPCStream());
      break;
  }
  const opened = performance.now();
  const sum = sumUsd(table);
  const summed = performance.now();
  const report: ChildReport = {
    tableSeconds: (opened - start) / 1000,
    sumSeconds: (summed - start) / 1000,
    rows: table.numRows,
    sum,
    ...(bytesFetched !== undefined ? { bytesFetched } : {}),
  };
  await store?.close();
  console.log(JSON.stringify(report));
}

function spawnChild(job: ChildJob): Promise<ChildReport> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', BENCH_FILE, CHILD_FLAG, JSON.stringify(job)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code !== 0) {
        reject(new Error(`${job.route} child failed (code ${code}, signal ${signal}): ${stderr.trim()}`));
        return;
      }
      resolve(JSON.parse(stdout.trim().split('\n').pop() ?? '') as ChildReport);
    });
  });
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

function timed<T>(fn: () => T): { value: T; seconds: number } {
  const start = performance.now();
  const value = fn();
  return { value, seconds: (performance.now() - start) / 1000 };
}

function parseArgs(argv: string[]): { rows: number[]; reps: number } {
  let rows = [1_000_000, 10_000_000];
  let reps = 5;
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    if (argv[i] === '--rows' && value !== undefined) {
      rows = value.split(',').map((s) => Number(s.replaceAll('_', '')));
      i++;
    } else if (argv[i] === '--reps' && value !== undefined) {
      reps = Number(value);
      i++;
    } else {
      throw new Error(`unknown argument ${argv[i]}; usage: bench/handoff.ts [--rows 1000000,10000000] [--reps 5]`);
    }
  }
  if (!rows.every((n) => Number.isSafeInteger(n) && n > 0) || !Number.isSafeInteger(reps) || reps < 1) {
    throw new Error('--rows takes positive integers separated by commas, --reps a positive integer');
  }
  return { rows, reps };
}

function pad(cells: string[], widths: number[]): string {
  return cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] as number) : c.padStart(widths[i] as number))).join('  ');
}

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  console.log(pad(header, widths));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const row of rows) console.log(pad(row, widths));
}

const fmtSeconds = (s: number) => s.toFixed(s < 0.01 ? 5 : s < 1 ? 4 : 3);
const fmtRatio = (r: number) => `${r >= 100 ? r.toFixed(0) : r.toFixed(1)}x`;
const fmtRows = (n: number) => n.toLocaleString('en-US');
const fmtMiB = (bytes: number) => `${(bytes / 1024 ** 2).toFixed(1)} MiB`;

async function main(): Promise<void> {
  const { rows: sizes, reps } = parseArgs(process.argv.slice(2));
  const shmDir = `/dev/shm/quiver-bench-${process.pid}`;
  const fileDir = mkdtempSync(join(tmpdir(), 'quiver-bench-'));
  const shmOpts = { dir: shmDir, poolMaxBytes: BENCH_POOL_MAX_BYTES };
  const readRows: string[][] = [];
  const writeRows: string[][] = [];
  const tableRows: string[][] = [];
  const nats = await startNatsServer({ dir: join(fileDir, 'nats') });
  const s3 = await startS3Server({ dir: join(fileDir, 's3'), buckets: ['bench'] });
  const stores: Record<'table-disk' | 'table-s3', TableLocation> = {
    'table-disk': { kind: 'local', root: join(fileDir, 'tables') },
    'table-s3': { kind: 's3', endpoint: s3.endpoint, bucket: 'bench', natsUrl: nats.url },
  };
  console.log(`Handoff benchmark: ${reps} repetitions per cell, medians; files in ${fileDir} (warm page cache), segments in ${shmDir}\n`);
  try {
    for (const rows of sizes) {
      process.stdout.write(`${fmtRows(rows)} rows: generating...`);
      const table = generateTransactions(rows);
      const expectedSum = sumUsd(table);

      process.stdout.write(' writing...');
      let ipcBytes = 0;
      let parquetBytes = 0;
      const ipcPath = join(fileDir, `transactions-${rows}.arrow`);
      const parquetPath = join(fileDir, `transactions-${rows}.parquet`);
      const ipcWrite = timed(() => {
        const bytes = tableToIPC(table, 'file');
        ipcBytes = bytes.byteLength;
        writeFileSync(ipcPath, bytes);
      }).seconds;
      const parquetWrite = timed(() => {
        const props = new WriterPropertiesBuilder()
          .setCompression(Compression.SNAPPY)
          .setMaxRowGroupSize(PARQUET_BATCH_ROWS)
          .build();
        const bytes = writeParquet(WasmTable.fromIPCStream(tableToIPC(table, 'stream')), props);
        parquetBytes = bytes.byteLength;
        writeFileSync(parquetPath, bytes);
      }).seconds;

      // Write side of shm: fresh segments (empty pool) vs segments reused from the pool.
      const fresh: number[] = [];
      const pooled: number[] = [];
      let shmBytes = 0;
      let previous: SegmentRef[] = [];
      for (let rep = 0; rep < reps; rep++) {
        releaseSegments(previous, { dir: shmDir, poolMaxBytes: 0 });
        drainPool(shmOpts);
        const first = timed(() => writeTableToShm(table, { ...shmOpts, idPrefix: `fresh-${rows}-${rep}` }));
        if (first.value.reusedSegments !== 0) throw new Error('a fresh write reused pooled segments');
        fresh.push(first.seconds);
        releaseSegments(first.value.segments, shmOpts);
        const again = timed(() => writeTableToShm(table, { ...shmOpts, idPrefix: `pooled-${rows}-${rep}` }));
        if (again.value.reusedSegments !== again.value.segments.length) throw new Error('a pooled write created fresh segments');
        pooled.push(again.seconds);
        shmBytes = again.value.byteSize;
        previous = again.value.segments;
      }
      const handoff = previous;
      const tableName = `transactions_${rows}`;
      for (const route of ['table-disk', 'table-s3'] as const) {
        const store = await openBenchStore(stores[route]);
        const start = performance.now();
        const written = await writeTable(store, tableName, table);
        tableRows.push([fmtRows(rows), ROUTE_LABEL[route], fmtSeconds((performance.now() - start) / 1000), String(written.files)]);
        await store.close();
      }
      // The parent can read its own segments back (sanity check before timing children).
      if (sumUsd(readTableFromShm(handoff, { dir: shmDir }).table) !== expectedSum) throw new Error('shm round trip differs');

      writeRows.push([
        fmtRows(rows),
        fmtMiB(shmBytes),
        fmtSeconds(median(fresh)),
        fmtSeconds(median(pooled)),
        fmtRatio(median(fresh) / median(pooled)),
        `${fmtSeconds(ipcWrite)} (${fmtMiB(ipcBytes)})`,
        `${fmtSeconds(parquetWrite)} (${fmtMiB(parquetBytes)})`,
      ]);

      process.stdout.write(' reading in children...');
      const results = new Map<Route, ChildReport[]>(ROUTES.map((r) => [r, []]));
      // Interleave routes so drift (thermal, page cache) hits all of them alike.
      for (let rep = 0; rep < reps; rep++) {
        for (const route of ROUTES) {
          const location = route === 'shm' ? shmDir : route === 'ipc' ? ipcPath : route === 'parquet' ? parquetPath : tableName;
          const store = route === 'table-disk' || route === 'table-s3' ? stores[route] : undefined;
          const report = await spawnChild({ route, location, segments: route === 'shm' ? handoff : [], ...(store ? { store } : {}) });
          if (report.rows !== rows || report.sum !== expectedSum) {
            throw new Error(`${route} child saw ${report.rows} rows summing to ${report.sum}; expected ${rows} and ${expectedSum}`);
          }
          results.get(route)?.push(report);
        }
      }
      const shmTable = median((results.get('shm') ?? []).map((r) => r.tableSeconds));
      const shmSum = median((results.get('shm') ?? []).map((r) => r.sumSeconds));
      for (const route of ROUTES) {
        const reports = results.get(route) ?? [];
        const table = median(reports.map((r) => r.tableSeconds));
        const sum = median(reports.map((r) => r.sumSeconds));
        const fetched = reports[0]?.bytesFetched;
        readRows.push([
          fmtRows(rows),
          ROUTE_LABEL[route],
          fmtSeconds(table),
          fmtRatio(table / shmTable),
          fmtSeconds(sum),
          fmtRatio(sum / shmSum),
          fetched === undefined ? '-' : fmtMiB(fetched),
        ]);
      }
      releaseSegments(handoff, { dir: shmDir, poolMaxBytes: 0 });
      drainPool(shmOpts);
      process.stdout.write(' done\n');
    }
  } finally {
    removeDir(shmDir);
    await s3.stop();
    await nats.stop();
    rmSync(fileDir, { recursive: true, force: true });
  }

  console.log('\nRead side: time in a fresh child process to get a usable arrow Table, then also to sum `usd`');
  printTable(['rows', 'route', 'table (s)', 'vs shm', 'table + sum (s)', 'vs shm', 'fetched'], readRows);
  console.log('\nWrite side (parent): writeTableToShm into fresh segments vs segments reused from the pool');
  printTable(
    ['rows', 'IPC bytes', 'shm fresh (s)', 'shm pooled (s)', 'pool speedup', 'IPC file write (s)', 'Parquet write (s)'],
    writeRows,
  );
  console.log('\nWrite side (parent): writeTable, a new snapshot of a stored table (Parquet, snappy, 131,072-row row groups)');
  printTable(['rows', 'store', 'write + commit (s)', 'data files'], tableRows);
}

if (process.argv[2] === CHILD_FLAG) {
  // Load the addon like the other imports, then let startup's background work (compilation, GC) settle.
  parentPid();
  await new Promise((resolve) => setTimeout(resolve, CHILD_SETTLE_MS));
  await runChild(JSON.parse(process.argv[3] ?? '{}') as ChildJob);
} else {
  await main();
}
