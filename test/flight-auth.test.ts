import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect, type ClientHttp2Session, type IncomingHttpHeaders } from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials, loadPackageDefinition, Metadata, status as GrpcStatus, type Client, type ServiceError } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { tableFromArrays } from 'apache-arrow';
import { ulid } from 'ulid';
import { FlightAuthError, FlightClient, FlightServer, PROTO_PATH, SERVICE_NAME, flightAccessToken, parseListenAddress, type StoredTable } from '../flight/index.ts';
import { removeDir, writeTableToShm } from '../shm/index.ts';
import { TEST_SHM_ROOT } from './helpers.ts';

/*
 * Every Flight call, on both ports, is refused without credentials and with wrong ones, and
 * served with the cluster's token. The refusals are made with a plain grpc-js client built from
 * the Flight proto (and plain node:http2 for the bulk port): nothing of Quiver's client helps them.
 */

const secret = randomBytes(32);
const token = flightAccessToken(secret);
const shmDir = join(TEST_SHM_ROOT, `flight-auth-${ulid().toLowerCase()}`);
const runId = ulid();
const outputs = new Map<string, StoredTable>();
let server: FlightServer;
let raw: Client & Record<string, (...args: unknown[]) => unknown>;

const definition = loadSync(PROTO_PATH, { keepCase: true, longs: Number, enums: String, bytes: Buffer, defaults: true, oneofs: true });
const FlightService = (loadPackageDefinition(definition) as unknown as { arrow: { flight: { protocol: { FlightService: new (address: string, creds: ReturnType<typeof credentials.createInsecure>) => Client } } } })
  .arrow.flight.protocol.FlightService;

type Credentials = 'none' | 'wrong bearer' | 'wrong basic' | 'malformed' | 'right bearer' | 'right basic';

function metadataFor(kind: Credentials): Metadata {
  const metadata = new Metadata();
  const basic = (password: string) => `Basic ${Buffer.from(`quiver:${password}`).toString('base64')}`;
  const header: Record<Credentials, string | null> = {
    none: null,
    'wrong bearer': `Bearer ${flightAccessToken(randomBytes(32))}`,
    'wrong basic': basic('guess'),
    malformed: 'Token let-me-in',
    'right bearer': `Bearer ${token}`,
    'right basic': basic(token),
  };
  if (header[kind] !== null) metadata.set('authorization', header[kind]!);
  return metadata;
}

/** A unary call: its answer or its error. */
function unary(method: string, request: unknown, metadata: Metadata): Promise<{ value?: unknown; error?: ServiceError }> {
  return new Promise((resolve) => {
    (raw[method] as (r: unknown, m: Metadata, cb: (e: ServiceError | null, v: unknown) => void) => void).call(raw, request, metadata, (error, value) =>
      resolve(error ? { error } : { value }),
    );
  });
}

/** A server-streaming call: what arrived, and its error. */
function serverStream(method: string, request: unknown, metadata: Metadata): Promise<{ values: unknown[]; error?: ServiceError }> {
  return new Promise((resolve) => {
    const call = (raw[method] as (r: unknown, m: Metadata) => NodeJS.EventEmitter).call(raw, request, metadata);
    const values: unknown[] = [];
    call.on('data', (v: unknown) => values.push(v));
    call.on('error', (error: ServiceError) => resolve({ values, error }));
    call.on('end', () => resolve({ values }));
  });
}

/** A bidirectional call: `requests` written then half-closed; what arrived, the response headers, and its error. */
function bidi(method: string, requests: unknown[], metadata: Metadata): Promise<{ values: unknown[]; headers: Metadata | null; error?: ServiceError }> {
  return new Promise((resolve) => {
    const call = (raw[method] as (m: Metadata) => NodeJS.EventEmitter & { write(v: unknown): void; end(): void }).call(raw, metadata);
    const values: unknown[] = [];
    let headers: Metadata | null = null;
    call.on('metadata', (m: Metadata) => (headers = m));
    call.on('data', (v: unknown) => values.push(v));
    call.on('error', (error: ServiceError) => resolve({ values, headers, error }));
    call.on('end', () => resolve({ values, headers }));
    for (const r of requests) call.write(r);
    call.end();
  });
}

const descriptor = () => ({ type: 'PATH', path: ['runs', runId, 'out'], cmd: Buffer.alloc(0) });

/** Each RPC of the service, as a plain client makes it; resolves to its error, or null and what it got. */
const calls: Record<string, (metadata: Metadata) => Promise<{ error?: ServiceError; got: unknown }>> = {
  Handshake: async (m) => {
    const r = await bidi('Handshake', [], m);
    return { ...(r.error ? { error: r.error } : {}), got: r.headers?.get('authorization')[0] };
  },
  ListFlights: async (m) => {
    const r = await serverStream('ListFlights', { expression: Buffer.alloc(0) }, m);
    return { ...(r.error ? { error: r.error } : {}), got: r.values.length };
  },
  GetFlightInfo: async (m) => {
    const r = await unary('GetFlightInfo', descriptor(), m);
    return { ...(r.error ? { error: r.error } : {}), got: (r.value as { total_records?: number } | undefined)?.total_records };
  },
  GetSchema: async (m) => {
    const r = await unary('GetSchema', descriptor(), m);
    return { ...(r.error ? { error: r.error } : {}), got: (r.value as { schema?: Buffer } | undefined)?.schema?.byteLength };
  },
  PollFlightInfo: async (m) => {
    const r = await unary('PollFlightInfo', descriptor(), m);
    return { ...(r.error ? { error: r.error } : {}), got: null };
  },
  DoGet: async (m) => {
    // A valid ticket: only the missing or wrong token may be what is refused.
    const r = await serverStream('DoGet', { ticket: Buffer.from(server.ticketFor(`runs/${runId}/out`, 0)) }, m);
    return { ...(r.error ? { error: r.error } : {}), got: r.values.length };
  },
  DoPut: async (m) => {
    const r = await bidi('DoPut', [{ flight_descriptor: { type: 'PATH', path: ['sneaked'], cmd: Buffer.alloc(0) }, data_header: Buffer.alloc(0), data_body: Buffer.alloc(0) }], m);
    return { ...(r.error ? { error: r.error } : {}), got: r.values.length };
  },
  DoExchange: async (m) => {
    const r = await bidi('DoExchange', [], m);
    return { ...(r.error ? { error: r.error } : {}), got: null };
  },
  DoAction: async (m) => {
    const r = await serverStream('DoAction', { type: 'quiver.health', body: Buffer.alloc(0) }, m);
    return { ...(r.error ? { error: r.error } : {}), got: (r.values[0] as { body?: Buffer } | undefined)?.body?.toString() };
  },
  ListActions: async (m) => {
    const r = await serverStream('ListActions', {}, m);
    return { ...(r.error ? { error: r.error } : {}), got: r.values.length };
  },
};

before(async () => {
  server = await FlightServer.start({ shmDir, secret, host: '127.0.0.1', resolveOutput: (run, step) => outputs.get(`${run}/${step}`) ?? null });
  const written = writeTableToShm(tableFromArrays({ x: Int32Array.from([1, 2, 3]) }), { dir: shmDir, idPrefix: `${runId}.out.1` });
  outputs.set(`${runId}/out`, { segments: written.segments, rows: 3, byteSize: written.byteSize });
  raw = new FlightService(server.location.replace('grpc+tcp://', ''), credentials.createInsecure()) as typeof raw;
});

after(async () => {
  raw.close();
  await server.stop();
  removeDir(shmDir);
});

describe('Flight authentication on the gRPC port', () => {
  for (const kind of ['none', 'wrong bearer', 'wrong basic', 'malformed'] as const) {
    it(`refuses every RPC with UNAUTHENTICATED given ${kind === 'none' ? 'no credentials' : `${kind} credentials`}, before looking at the request`, async () => {
      for (const [method, call] of Object.entries(calls)) {
        const { error, got } = await call(metadataFor(kind));
        assert.equal(error?.code, GrpcStatus.UNAUTHENTICATED, `${method} with ${kind}: ${error ? error.details : `served (${String(got)})`}`);
        assert.match(error!.details, /cluster access token/, method);
      }
      assert.deepEqual(server.uploadNames(), [], 'nothing was uploaded');
    });
  }

  it('serves every RPC given the token, as Bearer or as the password of Basic', async () => {
    for (const kind of ['right bearer', 'right basic'] as const) {
      const served = Object.fromEntries(await Promise.all(Object.entries(calls).map(async ([method, call]) => [method, await call(metadataFor(kind))] as const)));
      assert.equal(served.Handshake!.got, `Bearer ${token}`, 'Handshake hands back the bearer header');
      assert.equal(served.GetFlightInfo!.got, 3);
      assert.ok((served.GetSchema!.got as number) > 0);
      assert.ok((served.DoGet!.got as number) >= 2, 'the schema and a record batch');
      assert.equal(served.DoAction!.got, 'ok');
      assert.equal(served.ListActions!.got, 2);
      assert.equal(served.ListFlights!.error, undefined);
      // Past authentication, these fail for what they are: unsupported, or an empty upload.
      assert.equal(served.PollFlightInfo!.error?.code, GrpcStatus.UNIMPLEMENTED);
      assert.equal(served.DoExchange!.error?.code, GrpcStatus.UNIMPLEMENTED);
      assert.notEqual(served.DoPut!.error?.code, GrpcStatus.UNAUTHENTICATED);
    }
  });

  it('exchanges a token sent as the Handshake payload (the older Flight auth flow), and refuses a wrong one', async () => {
    const right = await bidi('Handshake', [{ protocol_version: 0, payload: Buffer.from(token) }], new Metadata());
    assert.equal(right.error, undefined);
    assert.equal((right.values[0] as { payload: Buffer }).payload.toString(), token);
    const wrong = await bidi('Handshake', [{ protocol_version: 0, payload: Buffer.from('guess') }], new Metadata());
    assert.equal(wrong.error?.code, GrpcStatus.UNAUTHENTICATED);
  });

  it("Quiver's client: refused without the token, reads and uploads with it", async () => {
    const anonymous = new FlightClient(server.location, { bulkLocation: server.bulkLocation! });
    const member = new FlightClient(server.location, { bulkLocation: server.bulkLocation!, accessToken: token });
    try {
      await assert.rejects(anonymous.listActions(), FlightAuthError);
      await assert.rejects(anonymous.putTable('nope', tableFromArrays({ x: Int32Array.from([1]) })), FlightAuthError);
      await assert.rejects(
        anonymous.fetchToShm(server.ticketFor(`runs/${runId}/out`, 0), { dir: join(shmDir, 'fetched'), id: 'anonymous' }),
        (e: Error) => e instanceof FlightAuthError && /no credentials/.test(e.message),
      );
      await member.handshake();
      assert.deepEqual([...(await member.readTable(`runs/${runId}/out`)).getChild('x')!], [1, 2, 3]);
      await member.putTable('member', tableFromArrays({ x: Int32Array.from([4]) }));
      const fetched = await member.fetchToShm(server.ticketFor(`runs/${runId}/out`, 0), { dir: join(shmDir, 'fetched'), id: 'member' });
      assert.equal(fetched.rows, 3);
      assert.deepEqual(server.uploadNames(), ['member']);
      await member.doAction('quiver.drop-upload', 'member');
    } finally {
      anonymous.close();
      member.close();
      removeDir(join(shmDir, 'fetched'));
    }
  });
});

/** One request on the bulk port: the response headers and trailers merged, and the bytes received. */
function bulkRequest(
  session: ClientHttp2Session,
  options: { path?: string; authorization?: string; body: Buffer; end?: boolean },
): Promise<{ status: number | null; message: string; bytes: number }> {
  return new Promise((resolve, reject) => {
    const request = session.request({
      ':method': 'POST',
      ':path': options.path ?? `/${SERVICE_NAME}/DoGet`,
      'content-type': 'application/grpc',
      te: 'trailers',
      ...(options.authorization ? { authorization: options.authorization } : {}),
    });
    let status: number | null = null;
    let message = '';
    let bytes = 0;
    const read = (headers: IncomingHttpHeaders) => {
      if (headers['grpc-status'] !== undefined) {
        status = Number(headers['grpc-status']);
        message = decodeURIComponent(String(headers['grpc-message'] ?? ''));
      }
    };
    request.on('response', read);
    request.on('trailers', read);
    request.on('data', (chunk: Buffer) => (bytes += chunk.byteLength));
    request.on('error', reject);
    request.on('close', () => resolve({ status, message, bytes }));
    if (options.end === false) request.write(options.body);
    else request.end(options.body);
  });
}

/** A gRPC-framed Ticket message. */
function ticketRequest(ticket: Uint8Array): Buffer {
  const message = Buffer.concat([Buffer.from([0x0a, ticket.byteLength & 0x7f | 0x80, ticket.byteLength >> 7]), ticket]);
  const framed = Buffer.alloc(5 + message.byteLength);
  framed.writeUInt32BE(message.byteLength, 1);
  message.copy(framed, 5);
  return framed;
}

describe('Flight authentication on the bulk port', () => {
  let session: ClientHttp2Session;
  before(() => {
    session = connect(server.bulkLocation!.replace('grpc+tcp://', 'http://'));
  });
  after(() => session.close());

  it('refuses DoGet, and every other path, without or with wrong credentials; serves DoGet with the token', async () => {
    const ticket = server.ticketFor(`runs/${runId}/out`, 0);
    assert.ok(ticket.byteLength >= 128 && ticket.byteLength < 16_384, 'the framing above writes a two-byte length');
    const wrongs = [undefined, `Bearer ${flightAccessToken(randomBytes(32))}`, `Basic ${Buffer.from('quiver:guess').toString('base64')}`];
    for (const path of [`/${SERVICE_NAME}/DoGet`, `/${SERVICE_NAME}/ListActions`, `/${SERVICE_NAME}/DoPut`, '/anything']) {
      for (const authorization of wrongs) {
        const answer = await bulkRequest(session, { path, ...(authorization ? { authorization } : {}), body: ticketRequest(ticket) });
        assert.equal(answer.status, GrpcStatus.UNAUTHENTICATED, `${path} with ${authorization ?? 'no credentials'}: ${answer.message}`);
        assert.equal(answer.bytes, 0);
      }
    }
    const served = await bulkRequest(session, { authorization: `Bearer ${token}`, body: ticketRequest(ticket) });
    assert.equal(served.status, GrpcStatus.OK, served.message);
    assert.ok(served.bytes > 0);
    const other = await bulkRequest(session, { path: `/${SERVICE_NAME}/ListActions`, authorization: `Bearer ${token}`, body: Buffer.alloc(5) });
    assert.equal(other.status, GrpcStatus.UNIMPLEMENTED);
  });

  it('answers an anonymous request at once, without waiting for (or buffering) its body', async () => {
    // The body never ends: a server that buffered the request first would never answer.
    const answer = await bulkRequest(session, { body: randomBytes(1024 * 1024), end: false });
    assert.equal(answer.status, GrpcStatus.UNAUTHENTICATED);
  });

  it('refuses a request larger than any ticket, even with the token, before reading it all', async () => {
    const huge = Buffer.alloc(5);
    huge.writeUInt32BE(512 * 1024 * 1024, 1);
    const answer = await bulkRequest(session, { authorization: `Bearer ${token}`, body: Buffer.concat([huge, randomBytes(64 * 1024)]), end: false });
    assert.equal(answer.status, GrpcStatus.RESOURCE_EXHAUSTED, answer.message);
  });
});

describe('Flight listen address', () => {
  it('reads QUIVER_FLIGHT_LISTEN forms, and names the variable when it is wrong', () => {
    assert.deepEqual(parseListenAddress('127.0.0.1'), { host: '127.0.0.1', port: null });
    assert.deepEqual(parseListenAddress('0.0.0.0:8815'), { host: '0.0.0.0', port: 8815 });
    assert.deepEqual(parseListenAddress(':8815'), { host: '0.0.0.0', port: 8815 });
    assert.deepEqual(parseListenAddress('[::1]:8815'), { host: '::1', port: 8815 });
    assert.deepEqual(parseListenAddress('::'), { host: '::', port: null });
    assert.throws(() => parseListenAddress('host:99999'), /QUIVER_FLIGHT_LISTEN="host:99999" is not a listen address/);
  });

  it('a FlightServer listens on loopback unless told otherwise', async () => {
    const local = await FlightServer.start({ shmDir: join(shmDir, 'loopback'), secret, bulk: false });
    try {
      assert.match(local.location, /^grpc\+tcp:\/\/127\.0\.0\.1:\d+$/);
    } finally {
      await local.stop();
    }
  });
});
