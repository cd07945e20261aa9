import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import {
  Binary,
  Bool,
  DateDay,
  Decimal,
  Dictionary,
  Field,
  Float32,
  Float64,
  Int8,
  Int16,
  Int32,
  Int64,
  LargeUtf8,
  List,
  Struct,
  Table,
  TimestampMillisecond,
  Uint8,
  Uint16,
  Uint32,
  Uint64,
  Utf8,
  makeData,
  tableFromArrays,
  tableFromIPC,
  tableToIPC,
  vectorFromArray,
  type DataType,
} from 'apache-arrow';
import { ulid } from 'ulid';
import { FlightAuthError, FlightClient, FlightNotFoundError, FlightServer, flightAccessToken, signTicket, type StoredTable } from '../flight/index.ts';
import { listSegments, readTableFromShm, removeDir, unmapSegments, writeTableToShm } from '../shm/index.ts';
import { TEST_SHM_ROOT, waitFor } from './helpers.ts';

const secret = randomBytes(32);
const accessToken = flightAccessToken(secret);
const shmDir = join(TEST_SHM_ROOT, `flight-${ulid().toLowerCase()}`);
const outputs = new Map<string, StoredTable>();
let server: FlightServer;
let client: FlightClient;
/** Fetches through the server's DoGet-only bulk port. */
let bulkClient: FlightClient;

/** A column of `n` values of `type` where every third is null. */
function column<T extends DataType>(type: T, n: number, make: (i: number) => unknown) {
  return vectorFromArray(Array.from({ length: n }, (_, i) => (i % 3 === 1 ? null : make(i))), type);
}

function decimalColumn(n: number) {
  // Decimal128 values are four little-endian 32-bit words; validity marks every third null.
  const words = new Uint32Array(n * 4);
  const validity = new Uint8Array(Math.ceil(n / 8));
  for (let i = 0; i < n; i++) {
    words[i * 4] = i * 1234 + 5;
    if (i % 3 !== 1) validity[i >> 3]! |= 1 << (i & 7);
  }
  return makeData({ type: new Decimal(2, 18, 128), length: n, nullCount: Math.floor((n + 1) / 3), nullBitmap: validity, data: words });
}

function everyType(n: number): Table {
  const fields = {
    i8: column(new Int8(), n, (i) => (i % 256) - 128),
    i16: column(new Int16(), n, (i) => i * 7 - 30_000),
    i32: column(new Int32(), n, (i) => i * 100_003 - 2 ** 30),
    i64: column(new Int64(), n, (i) => BigInt(i) * 10_000_000_000n - 5n),
    u8: column(new Uint8(), n, (i) => i % 256),
    u16: column(new Uint16(), n, (i) => (i * 31) % 65_536),
    u32: column(new Uint32(), n, (i) => (i * 2_654_435_761) % 2 ** 32),
    u64: column(new Uint64(), n, (i) => BigInt(i) * 2n ** 40n),
    f32: column(new Float32(), n, (i) => i / 4),
    f64: column(new Float64(), n, (i) => Math.PI * i),
    bool: column(new Bool(), n, (i) => i % 2 === 0),
    utf8: column(new Utf8(), n, (i) => `row ${i} ✓`),
    large_utf8: column(new LargeUtf8(), n, (i) => 'x'.repeat(i % 50)),
    binary: column(new Binary(), n, (i) => Uint8Array.from({ length: i % 9 }, (_, k) => k + i)),
    date: column(new DateDay(), n, (i) => new Date(Date.UTC(2020, 0, 1 + i))),
    ts_tz: column(new TimestampMillisecond('Europe/Paris'), n, (i) => 1_700_000_000_000 + i * 1000),
    dict: column(new Dictionary(new Utf8(), new Int32()), n, (i) => ['fr', 'de', 'it', 'es'][i % 4]),
    list: column(new List(new Field('item', new Int32(), true)), n, (i) => Array.from({ length: i % 4 }, (_, k) => (k === 1 ? null : k * i))),
    struct: column(new Struct([new Field('a', new Int32(), true), new Field('b', new Utf8(), true)]), n, (i) => ({ a: i % 5 === 0 ? null : i, b: `s${i}` })),
  };
  const decimal = new Table({ d: decimalColumn(n) }).getChild('d')!;
  return new Table({ ...fields, decimal } as never);
}

/** Same schema and values: compared through the IPC form arrow-js writes for each. */
function assertSameTable(actual: Table, expected: Table): void {
  assert.equal(actual.numRows, expected.numRows);
  assert.deepEqual(
    actual.schema.fields.map((f) => [f.name, String(f.type), f.nullable]),
    expected.schema.fields.map((f) => [f.name, String(f.type), f.nullable]),
  );
  assert.deepEqual(Buffer.from(tableToIPC(actual, 'stream')), Buffer.from(tableToIPC(expected, 'stream')));
}

/** The flight fetched stream by stream into shared memory (the executors' path), then read back from there. */
async function fetchedTable(path: string): Promise<Table> {
  const info = await client.getFlightInfo(path);
  const dir = join(shmDir, `fetched-${ulid().toLowerCase()}`);
  const segments = [];
  for (const [index, endpoint] of info.endpoints.entries()) segments.push((await client.fetchToShm(endpoint.ticket, { dir, id: `s-${index}` })).segment);
  const opened = readTableFromShm(segments, { dir });
  // Serialized before the mappings go: the comparison reads the bytes.
  const copy = tableFromIPC(tableToIPC(opened.table, 'stream'));
  unmapSegments(opened.mappings);
  removeDir(dir);
  return copy;
}

before(async () => {
  server = await FlightServer.start({
    shmDir,
    secret,
    host: '127.0.0.1',
    resolveOutput: (runId, step) => outputs.get(`${runId}/${step}`) ?? null,
  });
  client = new FlightClient(server.location, { accessToken });
  bulkClient = new FlightClient(server.location, { bulkLocation: server.bulkLocation!, accessToken });
});

after(async () => {
  client.close();
  bulkClient.close();
  await server.stop();
  removeDir(shmDir);
});

describe('Arrow Flight: DoPut and DoGet round trips', () => {
  it('speaks the real Flight service (Handshake, ListActions, DoAction)', async () => {
    await client.handshake();
    const actions = await client.listActions();
    assert.ok(actions.some((a) => a.type === 'quiver.health'));
    const [answer] = await client.doAction('quiver.health');
    assert.equal(answer!.toString(), 'ok');
  });

  it('keeps every Arrow type, with nulls everywhere, through DoPut then DoGet', async () => {
    const table = everyType(1000);
    const put = await client.putTable('every_type', table);
    assert.equal(put.rows, 1000);
    const info = await client.getFlightInfo('uploads/every_type');
    assert.equal(info.totalRecords, 1000);
    const schema = await client.getSchema('uploads/every_type');
    assert.deepEqual(schema.fields.map((f) => f.name), table.schema.fields.map((f) => f.name));
    assertSameTable(await client.readTable(info), table);
    assertSameTable(await fetchedTable('uploads/every_type'), table);
    assert.ok((await client.listFlights()).some((f) => f.path.join('/') === 'uploads/every_type'));
  });

  it('keeps empty tables and tables of several batches', async () => {
    const empty = everyType(0);
    await client.putTable('empty', empty);
    const back = await client.readTable('uploads/empty');
    assert.equal(back.numRows, 0);
    assert.deepEqual(back.schema.fields.map((f) => String(f.type)), empty.schema.fields.map((f) => String(f.type)));
    assert.equal((await fetchedTable('uploads/empty')).numRows, 0);

    const whole = everyType(500);
    const several = new Table([...whole.slice(0, 300).batches, ...whole.slice(300).batches]);
    assert.equal(several.batches.length, 2);
    await client.putTable('several', several);
    assertSameTable(await client.readTable('uploads/several'), several);
  });

  it('serves a multi-segment run output and fetches each stream into shared memory byte for byte', async () => {
    const table = tableFromArrays({ id: Int32Array.from({ length: 200_000 }, (_, i) => i), v: Float64Array.from({ length: 200_000 }, (_, i) => i / 3) });
    const batched = new Table(Array.from({ length: 8 }, (_, k) => table.slice(k * 25_000, (k + 1) * 25_000).batches).flat());
    const runId = ulid();
    const written = writeTableToShm(batched, { dir: shmDir, idPrefix: `${runId}.source.1`, maxSegmentBytes: 1024 * 1024 });
    assert.ok(written.segments.length > 1, 'the output spans several segments');
    outputs.set(`${runId}/source`, { segments: written.segments, rows: written.rows, byteSize: written.byteSize });

    const info = await client.getFlightInfo(['runs', runId, 'source']);
    assert.equal(info.endpoints.length, written.segments.length);
    assert.equal(info.totalBytes, written.byteSize);
    assertSameTable(await client.readTable(info), batched);

    const fetchedDir = join(shmDir, 'fetched');
    const fetched = [];
    for (const [index, endpoint] of info.endpoints.entries()) {
      assert.deepEqual(endpoint.locations, [server.location, server.bulkLocation]);
      const result = await bulkClient.fetchToShm(endpoint.ticket, { dir: fetchedDir, id: `copy-${index}`, byteSize: endpoint.byteSize });
      assert.equal(result.segment.byteSize, written.segments[index]!.byteSize);
      assert.deepEqual(readFileSync(join(fetchedDir, `copy-${index}`)).subarray(0, result.segment.byteSize), readFileSync(join(shmDir, written.segments[index]!.id)).subarray(0, result.segment.byteSize));
      fetched.push(result.segment);
    }
    const opened = readTableFromShm(fetched, { dir: fetchedDir });
    assertSameTable(opened.table, batched);
    unmapSegments(opened.mappings);
    removeDir(fetchedDir);
  });
});

describe('Arrow Flight: tickets', () => {
  const runId = ulid();
  before(() => {
    const written = writeTableToShm(tableFromArrays({ x: Int32Array.from([1, 2, 3]) }), { dir: shmDir, idPrefix: `${runId}.secret.1` });
    outputs.set(`${runId}/secret`, { segments: written.segments, rows: 3, byteSize: written.byteSize });
  });

  /** DoGet with `ticket`: the error it fails with, and how many frames arrived before it. */
  async function refused(ticket: Uint8Array): Promise<{ error: FlightAuthError | FlightNotFoundError; frames: number }> {
    let frames = 0;
    try {
      for await (const _ of client.doGet(ticket)) frames++;
    } catch (error) {
      return { error: error as FlightAuthError, frames };
    }
    throw new Error(`the ticket was accepted (${frames} frames)`);
  }

  it('accepts a ticket from GetFlightInfo', async () => {
    const info = await client.getFlightInfo(`runs/${runId}/secret`);
    assert.equal((await client.readTable(info)).numRows, 3);
  });

  it('refuses forged, tampered and expired tickets with UNAUTHENTICATED and no data', async () => {
    const forged = signTicket({ path: `runs/${runId}/secret`, segment: 0, expiresAt: Date.now() + 60_000 }, randomBytes(32));
    const good = Buffer.from(server.ticketFor(`runs/${runId}/secret`, 0)).toString();
    const [prefix, claims, signature] = good.split('.');
    const otherClaims = Buffer.from(JSON.stringify({ p: `runs/${runId}/other`, s: 0, e: Date.now() + 60_000 })).toString('base64url');
    const tampered = Buffer.from(`${prefix}.${otherClaims}.${signature}`);
    const expired = server.ticketFor(`runs/${runId}/secret`, 0, -1);
    const garbage = Buffer.from('not a ticket');
    assert.ok(claims);
    for (const [ticket, why] of [
      [forged, /forged, altered/],
      [tampered, /forged, altered/],
      [expired, /expired/],
      [garbage, /not a Quiver ticket/],
    ] as const) {
      const { error, frames } = await refused(ticket);
      assert.ok(error instanceof FlightAuthError, `${why}: got ${error}`);
      assert.equal(error.grpcStatus, GrpcStatus.UNAUTHENTICATED);
      assert.match(error.message, why);
      assert.equal(frames, 0);
    }
  });

  it('answers NOT_FOUND for a valid ticket to an unknown output, and for unknown flights', async () => {
    const { error, frames } = await refused(server.ticketFor(`runs/${ulid()}/missing`, 0));
    assert.ok(error instanceof FlightNotFoundError);
    assert.equal(error.grpcStatus, GrpcStatus.NOT_FOUND);
    assert.match(error.message, /no output runs\/.*\/missing/);
    assert.equal(frames, 0);
    await assert.rejects(client.getFlightInfo('runs/nope/nothing'), FlightNotFoundError);
    await assert.rejects(client.getFlightInfo('elsewhere'), /unknown flight path/);
  });

  it('takes another access token when one is configured', async () => {
    const guarded = await FlightServer.start({ shmDir, secret, host: '127.0.0.1', accessToken: 'let-me-in', resolveOutput: () => outputs.get(`${runId}/secret`)! });
    const anonymous = new FlightClient(guarded.location);
    const member = new FlightClient(guarded.location, { accessToken: 'let-me-in' });
    try {
      await assert.rejects(anonymous.getFlightInfo(`runs/${runId}/secret`), FlightAuthError);
      assert.equal((await member.readTable(`runs/${runId}/secret`)).numRows, 3);
    } finally {
      anonymous.close();
      member.close();
      await guarded.stop();
    }
  });
});

describe('Arrow Flight: TLS', () => {
  const openssl = spawnSync('openssl', ['version'], { encoding: 'utf8' });
  it('serves over TLS to a client that trusts the certificate, and not to one that does not', { skip: openssl.status !== 0 ? 'openssl is not installed (needed to make a certificate)' : false }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'quiver-flight-tls-'));
    const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')], { encoding: 'utf8' });
    assert.equal(made.status, 0, made.stderr);
    const cert = readFileSync(join(dir, 'cert.pem'));
    const tls = await FlightServer.start({ shmDir, secret, host: '127.0.0.1', tls: { cert, key: readFileSync(join(dir, 'key.pem')) } });
    const trusting = new FlightClient(tls.location, { rootCerts: cert, accessToken });
    const untrusting = new FlightClient(tls.location, { accessToken });
    try {
      assert.match(tls.location, /^grpc\+tls:\/\/127\.0\.0\.1:\d+$/);
      await trusting.putTable('over_tls', tableFromArrays({ x: Int32Array.from([7, 8]) }));
      assert.deepEqual([...(await trusting.readTable('uploads/over_tls')).getChild('x')!], [7, 8]);
      const [endpoint] = (await trusting.getFlightInfo('uploads/over_tls')).endpoints;
      const fetched = await trusting.fetchToShm(endpoint!.ticket, { dir: join(shmDir, 'tls-fetched'), id: 'copy', byteSize: endpoint!.byteSize });
      assert.equal(fetched.rows, 2);
      removeDir(join(shmDir, 'tls-fetched'));
      await assert.rejects(untrusting.listActions());
    } finally {
      trusting.close();
      untrusting.close();
      await tls.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('Arrow Flight: cancellation', () => {
  it('unmaps the segment as soon as the client cancels mid-stream', async () => {
    const runId = ulid();
    const big = new Table(Array.from({ length: 64 }, (_, k) => tableFromArrays({ v: new Float64Array(128 * 1024).fill(k) }).batches).flat());
    const written = writeTableToShm(big, { dir: shmDir, idPrefix: `${runId}.big.1` });
    outputs.set(`${runId}/big`, { segments: written.segments, rows: written.rows, byteSize: written.byteSize });
    const info = await client.getFlightInfo(`runs/${runId}/big`);
    let frames = 0;
    for await (const _ of client.doGet(info.endpoints[0]!.ticket)) {
      if (++frames === 3) {
        assert.equal(server.openStreams, 1, 'the stream holds its mapping while it runs');
        break;
      }
    }
    await waitFor('the server to unmap the cancelled stream', () => server.openStreams === 0);
    const controller = new AbortController();
    const fetch = client.fetchToShm(info.endpoints[0]!.ticket, { dir: shmDir, id: `${runId}.partial`, signal: controller.signal });
    controller.abort();
    await assert.rejects(fetch, /cancel/i);
    assert.ok(!listSegments(shmDir).some((s) => s.id === `${runId}.partial`), 'a cancelled fetch leaves no partial segment');
    await waitFor('the server to unmap the aborted stream', () => server.openStreams === 0);

    // The same through the bulk port, cancelled once the stream is under way.
    const bulkAbort = new AbortController();
    let seen = 0;
    const bulkFetch = bulkClient.fetchToShm(info.endpoints[0]!.ticket, {
      dir: shmDir,
      id: `${runId}.bulk-partial`,
      signal: bulkAbort.signal,
      onProgress: ({ messages }) => {
        seen = messages;
        if (messages === 2) bulkAbort.abort();
      },
    });
    await assert.rejects(bulkFetch, /cancel/i);
    assert.ok(seen >= 2 && seen < 64, `cancelled mid-stream (after ${seen} of 65 messages)`);
    assert.ok(!listSegments(shmDir).some((s) => s.id === `${runId}.bulk-partial`));
    await waitFor('the bulk port to unmap the cancelled stream', () => server.openStreams === 0);
  });
});

describe('Arrow Flight: a non-JavaScript client', () => {
  const python = spawnSync('python3', ['-c', 'import pyarrow.flight'], { encoding: 'utf8' });
  it('pyarrow reads a run output with GetFlightInfo then DoGet', { skip: python.status !== 0 ? 'python3 with pyarrow.flight is not installed' : false }, async () => {
    const runId = ulid();
    const table = everyType(50);
    const written = writeTableToShm(table, { dir: shmDir, idPrefix: `${runId}.shared.1` });
    outputs.set(`${runId}/shared`, { segments: written.segments, rows: written.rows, byteSize: written.byteSize });
    const script = `
import sys, pyarrow.flight as fl
client = fl.connect("${server.location}")
try:
    client.list_actions()
    sys.exit("listed actions without credentials")
except fl.FlightUnauthenticatedError:
    pass
# Basic auth with the token as password, exchanged by Handshake for the bearer header.
options = fl.FlightCallOptions(headers=[client.authenticate_basic_token("quiver", "${accessToken}")])
info = client.get_flight_info(fl.FlightDescriptor.for_path("runs", "${runId}", "shared"), options)
table = client.do_get(info.endpoints[0].ticket, options).read_all()
bulk = fl.connect(info.endpoints[0].locations[1]).do_get(info.endpoints[0].ticket, options).read_all()
assert bulk.equals(table), "the bulk port serves the same stream"
print(table.num_rows, table.schema.field("ts_tz").type, table.column("utf8")[0], table.column("i64")[2], table.column("dict")[3])
client.do_put(fl.FlightDescriptor.for_path("from_python"), table.schema, options)[0].close()
`;
    const result = await new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = require_spawn(script);
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d));
      child.stderr.on('data', (d: Buffer) => (stderr += d));
      child.on('exit', (status: number | null) => resolve({ status, stdout, stderr }));
    });
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout.trim(), '50 timestamp[ms, tz=Europe/Paris] row 0 ✓ 20000000000-5 es'.replace('20000000000-5', String(2n * 10_000_000_000n - 5n)));
    assert.ok(server.uploadNames().includes('from_python'));
  });
});

function require_spawn(script: string) {
  return spawn('python3', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'] });
}
