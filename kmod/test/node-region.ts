/**
 * Node side of the VM test (bundled by run-vm.sh into one file with shm/ and
 * apache-arrow; run inside the VM where /dev/quiver exists).
 *   node node-region.mjs            a table produced in one process is read in
 *                                   another without a copy on the reading side,
 *                                   and matches (the writer's one copy is counted)
 *   node node-region.mjs bench N    hand an N MiB table to a child: regions vs files
 * Prints "ok - node: ..." / "not ok - node: ..." lines for the harness.
 */
import { type ChildProcess, fork, spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { Table, tableFromArrays, vectorFromArray } from 'apache-arrow';
import {
  RegionBroker,
  type SegmentRef,
  isViewOf,
  mapSegment,
  readInput,
  regionsAvailable,
  releaseOutput,
  unmapSegments,
  writeOutput,
} from '../../shm/index.ts';

const BROKER = '/tmp/quiver-regions.sock';
const DIR = '/dev/shm/quiver-vm';
const SYSFS = '/sys/class/misc/quiver/';

function pinnedBytes(): number {
  return Number(readFileSync(`${SYSFS}pinned_bytes`, 'utf8'));
}

/** Deterministic table: numbers, strings with offsets, nulls, a dictionary. */
function makeTable(rows: number): Table {
  const id = Int32Array.from({ length: rows }, (_, i) => i);
  const amount = Float64Array.from({ length: rows }, (_, i) => Math.sqrt(i) * 1.5);
  const name = Array.from({ length: rows }, (_, i) => (i % 7 === 0 ? null : `row-${i}`));
  const city = Array.from({ length: rows }, (_, i) => ['Lyon', 'Oslo', 'Lima'][i % 3]!);
  return tableFromArrays({ id, amount, name, city });
}

function sameTable(a: Table, b: Table): string | null {
  if (a.numRows !== b.numRows) return `rows ${a.numRows} vs ${b.numRows}`;
  for (const field of a.schema.fields) {
    const x = a.getChild(field.name)!;
    const y = b.getChild(field.name)!;
    for (let i = 0; i < a.numRows; i++) {
      if (x.get(i) !== y.get(i)) return `column ${field.name} row ${i}: ${x.get(i)} vs ${y.get(i)}`;
    }
  }
  return null;
}

function child(args: string[]): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [process.argv[1]!, ...args], { encoding: 'utf8' });
  if (r.status !== 0) process.stderr.write(r.stderr);
  return { status: r.status, out: r.stdout };
}

const ROWS = 200_000;

function produce(): void {
  const written = writeOutput(makeTable(ROWS), { dir: DIR, broker: BROKER, idPrefix: 'node-test', maxSegmentBytes: 4 << 20 });
  console.log(JSON.stringify(written));
}

function consume(segments: SegmentRef[]): void {
  const { table, mappings } = readInput(segments, { dir: DIR });
  let mismatch = sameTable(makeTable(ROWS), table);
  // Flight streams a region's raw bytes: an IPC stream, starting with the continuation marker.
  const raw = mapSegment(segments[0]!, { dir: DIR });
  if (raw.byteLength < segments[0]!.byteSize || new Uint32Array(raw, 0, 1)[0] !== 0xffffffff) mismatch = 'mapSegment of a region';
  unmapSegments([raw]);
  console.log(JSON.stringify({ mismatch, viewOf: isViewOf(table, mappings), rows: table.numRows }));
}

/** A middle step: passes `id` and `name` through, adds a computed column between them. */
function passThrough(segments: SegmentRef[]): void {
  const { table } = readInput(segments, { dir: DIR });
  const amount = table.getChild('amount')!.toArray() as Float64Array;
  const doubled = vectorFromArray(amount.map((x) => x * 2));
  const out = new Table({ id: table.getChild('id')!, doubled, name: table.getChild('name')! });
  const written = writeOutput(out, { dir: DIR, broker: BROKER, idPrefix: 'node-mid', inputs: [{ table, segments }] });
  console.log(JSON.stringify(written));
}

/** Reads the middle step's output: columns from two sources, back in their order, checked against the formula. */
function consumeMiddle(segments: SegmentRef[]): void {
  const { table, mappings } = readInput(segments, { dir: DIR });
  const expected = makeTable(ROWS);
  const names = table.schema.fields.map((f) => f.name).join(',');
  let mismatch: string | null = names === 'id,doubled,name' ? null : `columns ${names}`;
  try {
    mapSegment(segments[0]!, { dir: DIR });
    mismatch = 'mapSegment accepted a region of an assembled table';
  } catch (e) {
    if ((e as { code?: string }).code !== 'ERR_SHM_ARG') throw e;
  }
  for (let i = 0; mismatch === null && i < ROWS; i++) {
    if (table.getChild('id')!.get(i) !== i) mismatch = `id row ${i}`;
    else if (table.getChild('doubled')!.get(i) !== expected.getChild('amount')!.get(i) * 2) mismatch = `doubled row ${i}`;
    else if (table.getChild('name')!.get(i) !== expected.getChild('name')!.get(i)) mismatch = `name row ${i}`;
  }
  console.log(JSON.stringify({ mismatch, viewOf: isViewOf(table, mappings), rows: table.numRows }));
}

function roundTrip(): void {
  const fail = (why: string) => {
    console.log(`not ok - node: ${why}`);
    process.exitCode = 1;
  };
  if (!regionsAvailable()) return fail('/dev/quiver is not usable');
  const broker = new RegionBroker(BROKER);
  try {
    const produced = child(['produce']);
    if (produced.status !== 0) return fail(`producer exited with ${produced.status}`);
    const written = JSON.parse(produced.out) as { segments: SegmentRef[]; byteSize: number; copiedBytes: number };
    if (!written.segments.every((s) => (s as { kind?: string }).kind === 'region')) return fail('the output did not go to regions');
    // Encoding into the anonymous memory is the one copy, counted as for files; the reader copies nothing.
    if (written.copiedBytes !== written.byteSize) return fail(`copiedBytes ${written.copiedBytes}, expected the ${written.byteSize} bytes written`);
    if (written.segments.length < 2) return fail('expected several regions (maxSegmentBytes 4 MiB)');
    if (pinnedBytes() < written.byteSize) return fail(`regions gone with their producer: ${pinnedBytes()} bytes pinned`);
    const consumed = child(['consume', JSON.stringify(written.segments)]);
    if (consumed.status !== 0) return fail(`consumer exited with ${consumed.status}`);
    const read = JSON.parse(consumed.out) as { mismatch: string | null; viewOf: boolean; rows: number };
    if (read.mismatch !== null) return fail(`tables differ: ${read.mismatch}`);
    if (!read.viewOf) return fail('the consumer copied a column');
    console.log(
      `ok - node: a ${read.rows}-row table written by one process is read by another from ${written.segments.length} regions (${written.byteSize} bytes), copied once by the writer and 0 bytes by the reader, equal`,
    );

    // A middle step passing two columns through references the parent's regions instead of rewriting them.
    const middle = child(['pass-through', JSON.stringify(written.segments)]);
    if (middle.status !== 0) return fail(`middle step exited with ${middle.status}`);
    const mid = JSON.parse(middle.out) as { segments: (SegmentRef & { source?: number })[]; copiedBytes: number };
    const ownBytes = mid.segments.filter((s) => s.source === 0).reduce((n, s) => n + s.byteSize, 0);
    const borrowedRefs = mid.segments.filter((s) => (s.source ?? 0) > 0).length;
    if (borrowedRefs !== written.segments.length) return fail(`middle output borrows ${borrowedRefs} regions, expected ${written.segments.length}`);
    if (ownBytes === 0 || ownBytes > ROWS * 8 + 65536) return fail(`middle output wrote ${ownBytes} bytes of its own, expected about ${ROWS * 8}`);
    if (mid.copiedBytes !== ownBytes) return fail(`middle output reports copiedBytes ${mid.copiedBytes}, expected only its own ${ownBytes} bytes`);
    // The parent's output is released first: the middle output's aliases keep its regions.
    releaseOutput(written.segments, { dir: DIR });
    const last = child(['consume-middle', JSON.stringify(mid.segments)]);
    if (last.status !== 0) return fail(`consumer of the middle step exited with ${last.status}`);
    const lastRead = JSON.parse(last.out) as { mismatch: string | null; viewOf: boolean };
    if (lastRead.mismatch !== null) return fail(`passed-through table differs: ${lastRead.mismatch}`);
    if (!lastRead.viewOf) return fail('the consumer of the middle step copied a column');
    releaseOutput(mid.segments, { dir: DIR });
    console.log(
      `ok - node: a step passing 2 of 3 columns through wrote ${ownBytes} bytes of its own and referenced ${borrowedRefs} regions of its parent; read back equal after the parent was released`,
    );
    if (broker.size !== 0) return fail(`broker still holds ${broker.size} regions`);
    if (pinnedBytes() !== 0) return fail(`${pinnedBytes()} bytes still pinned after release`);
    // Over the module's cap the output still gets written: as files, with the one copy.
    const cap = readFileSync('/sys/module/quiver/parameters/max_pinned_bytes', 'utf8');
    writeFileSync('/sys/module/quiver/parameters/max_pinned_bytes', '4096');
    try {
      const fallback = writeOutput(makeTable(1000), { dir: DIR, broker: BROKER, idPrefix: 'node-full' });
      if (fallback.segments.some((s) => (s as { kind?: string }).kind === 'region')) return fail('a region over the cap');
      if (fallback.copiedBytes !== fallback.byteSize) return fail('the fallback did not report its copy');
      releaseOutput(fallback.segments, { dir: DIR, poolMaxBytes: 0 });
    } finally {
      writeFileSync('/sys/module/quiver/parameters/max_pinned_bytes', cap.trim());
    }
    console.log('ok - node: over the module cap the output falls back to files with its one copy');
  } finally {
    broker.stop();
  }
}

/* ---- benchmark ---------------------------------------------------------------- */

function shmemKiB(): number {
  const line = readFileSync('/proc/meminfo', 'utf8').split('\n').find((l) => l.startsWith('Shmem:'))!;
  return Number(line.split(/\s+/)[1]);
}

/** Child of the benchmark: maps what it is sent, touches one value per page, answers the sum. */
function benchChild(): void {
  process.on('message', (m: { segments: SegmentRef[] } | 'exit') => {
    if (m === 'exit') process.exit(0);
    const { table } = readInput(m.segments, { dir: DIR });
    let sum = 0;
    for (const data of table.getChild('x')!.data) {
      const values = data.values as Float64Array;
      for (let i = 0; i < values.length; i += 512) sum += values[i]!;
    }
    process.send!({ sum });
  });
  process.send!('ready');
}

function ask(worker: ChildProcess, message: unknown): Promise<{ sum: number }> {
  return new Promise((resolve) => {
    worker.once('message', (m) => resolve(m as { sum: number }));
    worker.send(message as object);
  });
}

async function bench(mib: number): Promise<void> {
  const rows = (mib << 20) / 8;
  const x = new Float64Array(rows);
  for (let i = 0; i < rows; i++) x[i] = i % 1000;
  const table = tableFromArrays({ x });
  let expected = 0;
  for (let i = 0; i < rows; i += 512) expected += x[i]!;
  const broker = new RegionBroker(BROKER);
  const worker = fork(process.argv[1]!, ['bench-child'], { stdio: 'inherit' });
  await new Promise((r) => worker.once('message', r));
  const results: Record<string, { ms: number; copied: number; shmem: number }> = {};
  for (let rep = 0; rep < 3; rep++) {
    for (const kind of ['region', 'file'] as const) {
      const shmem0 = shmemKiB();
      const t0 = performance.now();
      const written = writeOutput(table, { dir: DIR, broker: kind === 'region' ? BROKER : undefined, idPrefix: `bench-${kind}-${rep}` });
      const { sum } = await ask(worker, { segments: written.segments });
      const ms = performance.now() - t0;
      const shmem = (shmemKiB() - shmem0) * 1024;
      if (sum !== expected) throw new Error(`bench: the child read other values (${kind})`);
      releaseOutput(written.segments, { dir: DIR, poolMaxBytes: 0 });
      const best = results[kind];
      // The child unmaps earlier rounds' tables whenever it collects garbage, so only the first round's growth is clean.
      if (best === undefined) results[kind] = { ms, copied: written.copiedBytes, shmem };
      else if (ms < best.ms) best.ms = ms;
    }
  }
  worker.send('exit');
  broker.stop();
  const r = results.region!;
  const f = results.file!;
  console.log(`\nnode bench: hand a ${mib} MiB table to a child process (best of 3; encode + hand over + child touches every page)`);
  console.log(`  ${'path'.padEnd(34)} ${'ms'.padStart(10)} ${'copiedBytes'.padStart(14)} ${'shmem grown (bytes)'.padStart(20)}`);
  console.log(`  ${'writeOutput -> regions'.padEnd(34)} ${r.ms.toFixed(1).padStart(10)} ${String(r.copied).padStart(14)} ${String(r.shmem).padStart(20)}`);
  console.log(`  ${'writeOutput -> files (one copy)'.padEnd(34)} ${f.ms.toFixed(1).padStart(10)} ${String(f.copied).padStart(14)} ${String(f.shmem).padStart(20)}`);
  console.log(`  ratio files/regions ${(f.ms / r.ms).toFixed(2)}x`);
}

const [mode, arg] = process.argv.slice(2);
if (mode === 'produce') produce();
else if (mode === 'consume') consume(JSON.parse(arg!) as SegmentRef[]);
else if (mode === 'pass-through') passThrough(JSON.parse(arg!) as SegmentRef[]);
else if (mode === 'consume-middle') consumeMiddle(JSON.parse(arg!) as SegmentRef[]);
else if (mode === 'bench-child') benchChild();
else if (mode === 'bench') await bench(Number(arg));
else roundTrip();
