/**
 * Flight benchmark: how fast a table moves between processes on this machine by DoGet, side
 * by side with the ceiling and with the alternative:
 *
 *   flight      DoGet from a Flight server in another process straight into a shared-memory
 *               segment (the executor's route): through the grpc-js port, and through the bulk
 *               port (the sender copies nothing) with one stream and with N parallel streams
 *               (one segment each, one connection each)
 *   raw TCP     the same bytes over a plain loopback socket between two processes, received
 *               into a shared-memory segment: the ceiling for any protocol on this machine
 *   bare gRPC   grpc-js streaming the same number of messages of the same size (one
 *               preallocated buffer, no Flight, no shared memory): the ceiling of the transport
 *   parquet     reading the table from a Parquet file (parquet-wasm, snappy) into a Table;
 *               measured on a quarter of the table (wasm's 4 GiB memory cannot hold 1 GiB
 *               three times over) and reported as throughput
 *
 * Run: npm run bench:flight [-- --gib 1 --streams 4 --reps 3]
 */
import { fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Float64, Int32, RecordBatch, Table, makeData, tableFromIPC, tableToIPC } from 'apache-arrow';
import { Compression, Table as WasmTable, WriterPropertiesBuilder, readParquet, writeParquet } from 'parquet-wasm';
import { ulid } from 'ulid';
import { Client, Metadata, Server, ServerCredentials, credentials, type ServerWritableStream } from '@grpc/grpc-js';
import { FlightClient, FlightServer, TRANSFER_CHANNEL_OPTIONS, flightAccessToken, type StoredTable } from '../flight/index.ts';
import { type SegmentRef, mapSegment, mapWritableSegment, releaseSegments, removeDir, removeSegments, unmapSegments, writeTableToShm } from '../shm/index.ts';

/** The serving child gets it with its job; the clients here present its access token. */
const BENCH_SECRET = randomBytes(32).toString('hex');
const GIB = 1024 ** 3;
const self = fileURLToPath(import.meta.url);
const arg = (name: string, fallback: number) => {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? Number(process.argv[at + 1]) : fallback;
};

interface ServeJob {
  dir: string;
  secret: string;
  outputs: Record<string, StoredTable>;
}

/** 12 bytes a row (int32 id, float64 value), 1 Mi rows (12 MiB) a batch. */
function makeTable(bytes: number): Table {
  const rowsPerBatch = 1024 * 1024;
  const id = Int32Array.from({ length: rowsPerBatch }, (_, i) => i);
  const value = Float64Array.from({ length: rowsPerBatch }, (_, i) => Math.sin(i) * 1000);
  const batches = Array.from({ length: Math.max(1, Math.round(bytes / (12 * rowsPerBatch))) }, () =>
    new RecordBatch({ id: makeData({ type: new Int32(), data: id }), value: makeData({ type: new Float64(), data: value }) }),
  );
  return new Table(batches);
}

async function serve(): Promise<void> {
  const job = await new Promise<ServeJob>((resolve) => process.once('message', (m) => resolve(m as ServeJob)));
  const server = await FlightServer.start({ shmDir: job.dir, secret: job.secret, host: '127.0.0.1', resolveOutput: (runId, step) => job.outputs[`${runId}/${step}`] ?? null });
  process.send!({ location: server.location, bulkLocation: server.bulkLocation });
  // Peak private memory since the last ask: shows that a stream's memory is bounded, not the table's size.
  let peak = 0;
  setInterval(() => (peak = Math.max(peak, anonymousRss())), 20).unref();
  process.on('message', (m) => {
    if ((m as { type?: string }).type !== 'peak') return;
    process.send!({ peak: Math.max(peak, anonymousRss()) });
    peak = 0;
  });
  process.once('disconnect', () => void server.stop().then(() => process.exit(0)));
}

const BARE_PATH = '/bench.Bare/Stream';
const bareMethod = { path: BARE_PATH, requestStream: false, responseStream: true, requestSerialize: (b: Buffer) => b, requestDeserialize: (b: Buffer) => b, responseSerialize: (b: Buffer) => b, responseDeserialize: (b: Buffer) => b };

async function bareServe(): Promise<void> {
  const job = await new Promise<{ size: number; count: number }>((resolve) => process.once('message', (m) => resolve(m as never)));
  const server = new Server(TRANSFER_CHANNEL_OPTIONS);
  const payload = Buffer.alloc(job.size, 7);
  server.addService({ Stream: bareMethod } as never, {
    Stream: async (call: ServerWritableStream<Buffer, Buffer>) => {
      for (let i = 0; i < job.count; i++) if (!call.write(payload)) await new Promise((r) => call.once('drain', r));
      call.end();
    },
  });
  server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (_error, port) => process.send!({ port }));
  process.once('disconnect', () => server.forceShutdown());
}

async function bareGrpc(size: number, count: number): Promise<number> {
  const child = start('bare-serve');
  child.send({ size, count });
  const { port } = await new Promise<{ port: number }>((r) => child.once('message', (m) => r(m as never)));
  const client = new Client(`127.0.0.1:${port}`, credentials.createInsecure(), TRANSFER_CHANNEL_OPTIONS);
  const began = process.hrtime.bigint();
  let bytes = 0;
  for await (const m of client.makeServerStreamRequest(BARE_PATH, bareMethod.requestSerialize, bareMethod.responseDeserialize, Buffer.alloc(0), new Metadata())) bytes += (m as Buffer).byteLength;
  const elapsed = seconds(began);
  client.close();
  child.disconnect();
  await new Promise((r) => child.once('exit', r));
  return bytes / GIB / elapsed;
}

async function tcpSend(): Promise<void> {
  const job = await new Promise<{ dir: string; segments: SegmentRef[]; port: number }>((resolve) => process.once('message', (m) => resolve(m as never)));
  const socket = connect(job.port, '127.0.0.1');
  await new Promise((r) => socket.once('connect', r));
  for (const ref of job.segments) {
    const mapping = mapSegment(ref, { dir: job.dir });
    // Written in 4 MiB slices so the kernel, not one giant write, paces the transfer.
    for (let at = 0; at < ref.byteSize; at += 4 * 1024 * 1024) {
      const view = new Uint8Array(mapping, at, Math.min(4 * 1024 * 1024, ref.byteSize - at));
      if (!socket.write(view)) await new Promise((r) => socket.once('drain', r));
    }
    await new Promise<void>((r) => socket.write(new Uint8Array(0), () => r()));
    unmapSegments([mapping]);
  }
  socket.end(() => process.exit(0));
}

function start(role: string): ChildProcess {
  return fork(self, [role], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
}

/** Private memory (RssAnon): heap and buffers, without the shared-memory segments a process maps. */
function anonymousRss(): number {
  const kib = /RssAnon:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
  return Number(kib ?? 0) * 1024;
}

const seconds = (start: bigint) => Number(process.hrtime.bigint() - start) / 1e9;

async function rawTcp(dir: string, segments: SegmentRef[], total: number): Promise<number> {
  const target = mapWritableSegment('tcp-target', total, { dir, poolMaxBytes: 0 });
  const bytes = new Uint8Array(target);
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const child = start('tcp-send');
  let began = 0n;
  const received = new Promise<number>((resolve) => {
    server.once('connection', (socket) => {
      began = process.hrtime.bigint();
      let at = 0;
      socket.on('data', (chunk: Buffer) => {
        bytes.set(chunk, at);
        at += chunk.byteLength;
        if (at >= total) resolve(seconds(began));
      });
    });
  });
  child.send({ dir, segments, port: (server.address() as AddressInfo).port });
  const elapsed = await received;
  await new Promise((r) => child.once('exit', r));
  server.close();
  unmapSegments([target]);
  removeSegments(['tcp-target'], { dir });
  return elapsed;
}

async function serverPeak(server: ChildProcess): Promise<number> {
  server.send({ type: 'peak' });
  return new Promise((r) => server.once('message', (m) => r((m as { peak: number }).peak)));
}

async function flightFetch(server: ChildProcess, location: string, bulkLocation: string | null, path: string, streams: number, dir: string): Promise<{ seconds: number; bytes: number; serverPeak: number; clientPeak: number }> {
  const clients = Array.from({ length: streams }, () => new FlightClient(location, { accessToken: flightAccessToken(BENCH_SECRET), ...(bulkLocation ? { bulkLocation } : {}) }));
  const info = await clients[0]!.getFlightInfo(path);
  await serverPeak(server);
  // Growth over the start: garbage of earlier routes (the raw socket's chunks) is not this one's.
  const clientStart = anonymousRss();
  let clientPeak = clientStart;
  const sampler = setInterval(() => (clientPeak = Math.max(clientPeak, anonymousRss())), 20);
  const began = process.hrtime.bigint();
  const fetched = await Promise.all(
    info.endpoints.map((e, i) => clients[i % streams]!.fetchToShm(e.ticket, { dir, id: `fetched-${i}`, byteSize: e.byteSize, poolMaxBytes: 0 })),
  );
  const elapsed = seconds(began);
  clearInterval(sampler);
  for (const c of clients) c.close();
  removeSegments(fetched.map((f) => f.segment.id), { dir });
  return { seconds: elapsed, bytes: fetched.reduce((n, f) => n + f.segment.byteSize, 0), serverPeak: await serverPeak(server), clientPeak: clientPeak - clientStart };
}

function parquetRead(table: Table, dir: string): { seconds: number; bytes: number; fileBytes: number } {
  const quarter = new Table(table.batches.slice(0, Math.max(1, Math.floor(table.batches.length / 4))));
  const path = join(dir, 'table.parquet');
  const props = new WriterPropertiesBuilder().setCompression(Compression.SNAPPY).setMaxRowGroupSize(1024 * 1024).build();
  const file = writeParquet(WasmTable.fromIPCStream(tableToIPC(quarter, 'stream')), props);
  writeFileSync(path, file);
  const began = process.hrtime.bigint();
  const read = tableFromIPC(readParquet(readFileSync(path), { batchSize: 1024 * 1024 }).intoIPCStream());
  const elapsed = seconds(began);
  if (read.numRows !== quarter.numRows) throw new Error(`parquet read ${read.numRows} rows, wrote ${quarter.numRows}`);
  return { seconds: elapsed, bytes: quarter.numRows * 12, fileBytes: file.byteLength };
}

async function main(): Promise<void> {
  const gib = arg('gib', 1);
  const streams = arg('streams', 4);
  const reps = arg('reps', 3);
  const dir = join(process.env.QUIVER_SHM_ROOT ?? '/dev/shm/quiver', `bench-flight-${ulid().toLowerCase()}`);
  const fileDir = mkdtempSync(join(tmpdir(), 'quiver-bench-flight-'));
  const runId = ulid();
  const children: ChildProcess[] = [];
  try {
    const table = makeTable(gib * GIB);
    const one = writeTableToShm(table, { dir, idPrefix: `${runId}.one.1`, poolMaxBytes: 0 });
    const split = writeTableToShm(table, { dir, idPrefix: `${runId}.split.1`, poolMaxBytes: 0, maxSegmentBytes: Math.ceil(one.byteSize / streams) + 16 * 1024 * 1024 });
    const stored = (w: typeof one): StoredTable => ({ segments: w.segments, rows: w.rows, byteSize: w.byteSize });
    console.log(`table: ${table.numRows.toLocaleString('en-US')} rows, ${(one.byteSize / GIB).toFixed(2)} GiB as IPC; ${split.segments.length} segments for the parallel run`);

    const server = start('serve');
    children.push(server);
    server.send({ dir, secret: BENCH_SECRET, outputs: { [`${runId}/one`]: stored(one), [`${runId}/split`]: stored(split) } } satisfies ServeJob);
    const { location, bulkLocation } = await new Promise<{ location: string; bulkLocation: string }>((r) => server.once('message', (m) => r(m as never)));

    const rows: { route: string; streams: number; gibPerS: number[]; rss: string }[] = [
      { route: 'raw TCP socket', streams: 1, gibPerS: [], rss: '' },
      { route: 'bare grpc-js, same messages', streams: 1, gibPerS: [], rss: '' },
      { route: 'Flight DoGet -> shm, grpc-js port', streams: 1, gibPerS: [], rss: '' },
      { route: 'Flight DoGet -> shm, bulk port', streams: 1, gibPerS: [], rss: '' },
      { route: 'Flight DoGet -> shm, bulk port', streams: split.segments.length, gibPerS: [], rss: '' },
      { route: 'Parquet file read (1/4 table)', streams: 1, gibPerS: [], rss: '' },
    ];
    const mib = (n: number) => `${Math.round(n / 1024 ** 2)}`;
    const peaks = (r: { serverPeak: number; clientPeak: number }) => `${mib(r.serverPeak)} / ${mib(r.clientPeak)}`;
    let parquetFile = 0;
    for (let rep = 0; rep < reps; rep++) {
      rows[0]!.gibPerS.push(one.byteSize / GIB / (await rawTcp(dir, one.segments, one.byteSize)));
      rows[1]!.gibPerS.push(await bareGrpc(Math.round(one.byteSize / table.batches.length), table.batches.length));
      const viaGrpc = await flightFetch(server, location, null, `runs/${runId}/one`, 1, dir);
      rows[2]!.gibPerS.push(viaGrpc.bytes / GIB / viaGrpc.seconds);
      rows[2]!.rss = peaks(viaGrpc);
      const single = await flightFetch(server, location, bulkLocation, `runs/${runId}/one`, 1, dir);
      rows[3]!.gibPerS.push(single.bytes / GIB / single.seconds);
      rows[3]!.rss = peaks(single);
      const parallel = await flightFetch(server, location, bulkLocation, `runs/${runId}/split`, split.segments.length, dir);
      rows[4]!.gibPerS.push(parallel.bytes / GIB / parallel.seconds);
      rows[4]!.rss = peaks(parallel);
      const parquet = parquetRead(table, fileDir);
      parquetFile = parquet.fileBytes;
      rows[5]!.gibPerS.push(parquet.bytes / GIB / parquet.seconds);
    }
    const best = (r: (typeof rows)[number]) => Math.max(...r.gibPerS);
    const tcp = best(rows[0]!);
    const parquet = best(rows[5]!);
    console.log(`\nbest of ${reps}, loopback, ${(one.byteSize / GIB).toFixed(2)} GiB (Parquet file ${(parquetFile / 1024 ** 2).toFixed(0)} MiB for a quarter)\n`);
    const header = ['route', 'streams', 'GiB/s', 'all runs', 'vs raw TCP', 'vs Parquet', 'peak RssAnon MiB: server / client growth'];
    const lines = rows.map((r) => [r.route, String(r.streams), best(r).toFixed(2), r.gibPerS.map((x) => x.toFixed(2)).join(' '), (best(r) / tcp).toFixed(2), (best(r) / parquet).toFixed(2), r.rss]);
    const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
    for (const line of [header, ...lines]) console.log(line.map((c, i) => c.padEnd(widths[i]!)).join('  '));
    server.disconnect();
    await new Promise((r) => server.once('exit', r));
    releaseSegments([...one.segments, ...split.segments], { dir, poolMaxBytes: 0 });
  } finally {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    removeDir(dir);
    rmSync(fileDir, { recursive: true, force: true });
  }
}

const role = process.argv[2];
if (role === 'serve') await serve();
else if (role === 'tcp-send') await tcpSend();
else if (role === 'bare-serve') await bareServe();
else await main();
