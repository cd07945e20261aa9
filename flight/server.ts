/**
 * An Arrow Flight server over this host's shared memory. DoGet streams the IPC messages
 * already in a segment (nothing is decoded or re-encoded), with bounded memory: it stops
 * writing while more than `maxInFlightBytes` wait for the network, and unmaps the segment the
 * moment the client cancels. DoPut lays the uploaded stream straight into a segment.
 */
import { hostname } from 'node:os';
import { rmdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import {
  Metadata,
  Server,
  ServerCredentials,
  status as GrpcStatus,
  type sendUnaryData,
  type ServerDuplexStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import { tableToIPC } from 'apache-arrow';
import { ulid } from 'ulid';
import type { Logger } from '../schemas/index.ts';
import { type SegmentRef, mapSegment, readInput, releaseSegments, removeDir, unmapSegments } from '../shm/index.ts';
import { FlightAuthError, FlightError, FlightNotFoundError, FlightProtocolError } from './errors.ts';
import { type FlightDataFrame, encodeFlightData, flightDataLength } from './frames.ts';
import { MessageType, schemaBytes, streamMessages } from './ipc.ts';
import { type ActionMessage, type FlightDescriptorMessage, type FlightInfoMessage, type TicketMessage, TRANSFER_CHANNEL_OPTIONS, flightServiceDefinition } from './protocol.ts';
import { BulkServer, type TicketRedeemer } from './bulk-server.ts';
import { listenGated, type ConnectionLimits, type GatedListener } from './listener.ts';
import { SegmentWriter } from './segment-writer.ts';
import { DEFAULT_TICKET_TTL_MS, checkSecret, signTicket, verifyTicket } from './tickets.ts';
import { authorize, bearer, flightAccessToken, sameToken } from './auth.ts';

/** A table held in shared memory on this host. */
export interface StoredTable {
  segments: SegmentRef[];
  rows: number;
  byteSize: number;
}

/** Options for {@link FlightServer.start}. */
export interface FlightServerOptions {
  /** This host's cluster shared-memory folder; uploads go to `<shmDir>/uploads/<server>/`, removed on stop. */
  shmDir: string;
  /** Cluster secret tickets are signed with (at least 16 bytes). */
  secret: string | Uint8Array;
  /** Finds a run output held on this host, or null. */
  resolveOutput?: (runId: string, step: string) => Promise<StoredTable | null> | StoredTable | null;
  /** Address to listen on; '0.0.0.0' or '::' for every address. @default '127.0.0.1' (this machine only) */
  host?: string;
  /** Port; 0 picks a free one. @default 0 */
  port?: number;
  /** Host name put in endpoint URIs. @default `host`, or this machine's hostname when listening on every address */
  advertiseHost?: string;
  /** PEM certificate chain and key: serve TLS (`grpc+tls://`) instead of plaintext. @default plaintext */
  tls?: { cert: Buffer; key: Buffer };
  /**
   * The bearer token every call must carry (`authorization: Bearer <token>`, or exchanged by
   * Handshake), on both ports; anything else is UNAUTHENTICATED.
   * @default flightAccessToken(secret): the cluster's token, which every member derives alike
   */
  accessToken?: string;
  /** Largest gRPC message the server accepts (one DoPut record batch is one message). @default 64 MiB */
  maxMessageBytes?: number;
  /** Calls one client connection may have open at once, on each port. @default 128 */
  maxConcurrentStreams?: number;
  /** Connections the bulk port holds at once; more are closed as they arrive. @default 256 */
  maxBulkConnections?: number;
  /** Connections the gRPC port holds at once; more are closed as they arrive. @default 256 */
  maxConnections?: number;
  /**
   * Connections one client address may hold at once, on each port; more are closed as they
   * arrive, so one client cannot take every connection. @default 64
   */
  maxConnectionsPerClient?: number;
  /** Lifetime of tickets handed out by GetFlightInfo. @default 10 minutes */
  ticketTtlMs?: number;
  /** Bytes a DoGet stream may have queued for the network before it waits. @default 32 MiB */
  maxInFlightBytes?: number;
  /**
   * Also serve DoGet on plain node:http2 on a second port (bulk-server.ts: the sender copies
   * nothing), listed as a second location of every endpoint. `port` 0 picks a free one.
   * @default { port: 0 }
   */
  bulk?: { port?: number } | false;
  /** @default silent */
  logger?: Logger;
  /** @default Date.now */
  now?: () => number;
}

const DEFAULT_MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024;
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const DEFAULT_MAX_CONCURRENT_STREAMS = 128;
const DEFAULT_MAX_BULK_CONNECTIONS = 256;
const DEFAULT_MAX_CONNECTIONS = 256;
const DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 64;
/** A Handshake is one or two messages; more is someone keeping the call open. */
const MAX_HANDSHAKE_REQUESTS = 4;
const UPLOAD_NAME = /^[A-Za-z0-9_-]{1,128}$/;

const ACTIONS = [
  { type: 'quiver.drop-upload', description: 'Removes an uploaded table; body: its name (UTF-8).' },
  { type: 'quiver.health', description: 'Answers "ok": the server is up.' },
];

interface Located {
  table: StoredTable;
  dir: string;
}

/**
 * A table assembled from several region tables (columns passed through by reference, see
 * shm/region.ts) is no IPC stream anywhere: it is served as one stream, encoded on request.
 */
export function isComposed(table: StoredTable): boolean {
  return table.segments.some((s) => (s as { columns?: unknown }).columns !== undefined);
}

/** The bytes of one stream of a flight, and how to let them go. */
function openStream(located: Located, segment: number, path: string): { bytes: Uint8Array; close(): void } {
  const { table, dir } = located;
  if (isComposed(table)) {
    if (segment !== 0) throw new FlightNotFoundError(`${path} is served as one stream; the ticket asks for stream ${segment}`);
    const read = readInput(table.segments, { dir });
    try {
      return { bytes: tableToIPC(read.table, 'stream'), close: () => undefined };
    } finally {
      unmapSegments(read.mappings);
    }
  }
  const ref = table.segments[segment];
  if (!ref) throw new FlightNotFoundError(`${path} has ${table.segments.length} segment(s); the ticket asks for segment ${segment}`);
  const mapping = mapSegment(ref, { dir });
  return { bytes: new Uint8Array(mapping, 0, ref.byteSize), close: () => unmapSegments([mapping]) };
}

/** A Flight server; see the file comment. */
export class FlightServer {
  private readonly secret: Uint8Array;
  private readonly accessToken: string;
  private readonly uploads = new Map<string, StoredTable>();
  private readonly openStreamsNow = new Set<{ close(): void }>();
  private readonly activeCalls = new Set<() => void>();
  private readonly uploadDir: string;
  private readonly now: () => number;

  private bulk: BulkServer | null = null;
  /** URI of the DoGet-only bulk port, or null without one. */
  bulkLocation: string | null = null;

  private constructor(
    private readonly server: Server,
    /** Accepts the gRPC port's connections, within its caps, and hands them to `server`. */
    private readonly listener: GatedListener,
    readonly port: number,
    /** URI clients use to reach this server: `grpc+tcp://host:port` or `grpc+tls://host:port`. */
    readonly location: string,
    private readonly options: FlightServerOptions,
  ) {
    this.secret = checkSecret(options.secret, 'FlightServer');
    this.accessToken = options.accessToken ?? flightAccessToken(this.secret);
    // Each server keeps its own uploads: executors of one host share shmDir.
    this.uploadDir = join(options.shmDir, 'uploads', ulid().toLowerCase());
    this.now = options.now ?? Date.now;
  }

  static async start(options: FlightServerOptions): Promise<FlightServer> {
    checkSecret(options.secret, 'FlightServer.start');
    const server = new Server({
      ...TRANSFER_CHANNEL_OPTIONS,
      // What one peer can make this process hold: a message, and a number of calls per connection.
      'grpc.max_receive_message_length': options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
      'grpc.max_concurrent_streams': options.maxConcurrentStreams ?? DEFAULT_MAX_CONCURRENT_STREAMS,
    });
    const host = options.host ?? '127.0.0.1';
    const credentials = options.tls ? ServerCredentials.createSsl(null, [{ cert_chain: options.tls.cert, private_key: options.tls.key }]) : ServerCredentials.createInsecure();
    const perClient = options.maxConnectionsPerClient ?? DEFAULT_MAX_CONNECTIONS_PER_CLIENT;
    // grpc-js never listens itself: the gated listener hands it the connections it admits.
    const injector = server.createConnectionInjector(credentials);
    const limits: ConnectionLimits = { maxConnections: options.maxConnections ?? DEFAULT_MAX_CONNECTIONS, maxConnectionsPerClient: perClient };
    const listener = await listenGated({ host, port: options.port ?? 0, limits, accept: (socket) => injector.injectConnection(socket) });
    const port = listener.port;
    const advertised = options.advertiseHost ?? (host === '0.0.0.0' || host === '::' ? hostname() : host);
    const scheme = options.tls ? 'grpc+tls' : 'grpc+tcp';
    const flight = new FlightServer(server, listener, port, `${scheme}://${advertised.includes(':') ? `[${advertised}]` : advertised}:${port}`, options);
    server.addService(flightServiceDefinition(), flight.handlers());
    if (options.bulk !== false) {
      flight.bulk = await BulkServer.start({
        host,
        port: options.bulk?.port ?? 0,
        ...(options.tls ? { tls: options.tls } : {}),
        redeemer: flight.redeemer(),
        maxConcurrentStreams: options.maxConcurrentStreams ?? DEFAULT_MAX_CONCURRENT_STREAMS,
        limits: { maxConnections: options.maxBulkConnections ?? DEFAULT_MAX_BULK_CONNECTIONS, maxConnectionsPerClient: perClient },
      });
      flight.bulkLocation = flight.location.replace(/:\d+$/, `:${flight.bulk.port}`);
    }
    return flight;
  }

  /** Mints a ticket for one segment of a flight (`runs/<runId>/<step>` or `uploads/<name>`). */
  ticketFor(path: string, segment: number, ttlMs = this.options.ticketTtlMs ?? DEFAULT_TICKET_TTL_MS): Uint8Array {
    return signTicket({ path, segment, expiresAt: this.now() + ttlMs }, this.secret);
  }

  /** Mappings held by DoGet streams in progress; 0 once every stream ended or was cancelled. */
  get openStreams(): number {
    return this.openStreamsNow.size;
  }

  /** Names of uploaded tables. */
  uploadNames(): string[] {
    return [...this.uploads.keys()];
  }

  /** Stops at once: streams in progress are cancelled and uploads removed. */
  async stop(): Promise<void> {
    for (const cancel of [...this.activeCalls]) cancel();
    this.listener.close();
    this.server.forceShutdown();
    this.bulk?.stop();
    this.uploads.clear();
    removeDir(this.uploadDir);
    try {
      rmdirSync(dirname(this.uploadDir));
    } catch (error) {
      // Another server of this host still keeps uploads there, or it is gone already.
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOTEMPTY' && code !== 'ENOENT' && code !== 'EEXIST') throw error;
    }
  }

  private handlers(): UntypedServiceImplementation {
    // Every call is checked before anything of its request is looked at.
    const unary =
      <Req, Res>(fn: (request: Req) => Promise<Res>) =>
      (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
        Promise.resolve()
          .then(() => this.checkCall(call.metadata))
          .then(() => fn(call.request))
          .then(
            (value) => callback(null, value),
            (error) => callback(this.toStatus(error)),
          );
      };
    const stream =
      <Req, Res>(fn: (request: Req) => Promise<Res[]>) =>
      (call: ServerWritableStream<Req, Res>) => {
        Promise.resolve()
          .then(() => this.checkCall(call.metadata))
          .then(() => fn(call.request))
          .then(
            (values) => {
              for (const value of values) call.write(value);
              call.end();
            },
            (error) => call.emit('error', this.toStatus(error)),
          );
      };
    return {
      Handshake: (call: ServerDuplexStream<{ protocol_version: number; payload: Buffer }, { protocol_version: number; payload: Buffer }>) => this.handshake(call),
      ListFlights: stream(async () => {
        const infos: FlightInfoMessage[] = [];
        for (const name of this.uploads.keys()) infos.push(await this.flightInfo(`uploads/${name}`));
        return infos;
      }),
      GetFlightInfo: unary(async (descriptor: FlightDescriptorMessage) => this.flightInfo(flightPath(descriptor))),
      PollFlightInfo: unary(async () => {
        throw new FlightError('PollFlightInfo is not supported: Quiver flights are complete, use GetFlightInfo', 'ERR_FLIGHT_UNIMPLEMENTED', GrpcStatus.UNIMPLEMENTED);
      }),
      GetSchema: unary(async (descriptor: FlightDescriptorMessage) => {
        const info = await this.flightInfo(flightPath(descriptor));
        return { schema: info.schema };
      }),
      DoGet: (call: ServerWritableStream<TicketMessage, Buffer>) => void this.doGet(call),
      DoPut: (call: ServerDuplexStream<FlightDataFrame, { app_metadata: Buffer }>) => void this.doPut(call),
      DoExchange: (call: ServerDuplexStream<unknown, unknown>) => {
        try {
          this.checkCall(call.metadata);
          call.emit('error', { code: GrpcStatus.UNIMPLEMENTED, details: 'DoExchange is not supported by Quiver: use DoGet and DoPut' });
        } catch (error) {
          call.emit('error', this.toStatus(error));
        }
      },
      DoAction: stream(async (action: ActionMessage) => [{ body: Buffer.from(this.doAction(action)) }]),
      ListActions: stream(async () => ACTIONS),
    };
  }

  /**
   * Handshake hands the bearer token back (as `authorization` in the response headers, and as
   * the payload) to a client that proved it knows it: by its headers (Bearer, or Basic with the
   * token as password, as pyarrow's authenticate_basic_token sends) or by a request payload.
   */
  private handshake(call: ServerDuplexStream<{ protocol_version: number; payload: Buffer }, { protocol_version: number; payload: Buffer }>): void {
    let accepted = false;
    let requests = 0;
    const accept = () => {
      if (accepted) return;
      accepted = true;
      const headers = new Metadata();
      headers.set('authorization', bearer(this.accessToken));
      call.sendMetadata(headers);
    };
    const refuse = (error: unknown) => {
      call.removeAllListeners('data');
      call.emit('error', this.toStatus(error));
    };
    let byHeaders: unknown = null;
    try {
      this.checkCall(call.metadata);
      accept();
    } catch (error) {
      // Not by headers: a request payload may still carry the token.
      byHeaders = error;
    }
    call.on('data', (request: { protocol_version: number; payload: Buffer }) => {
      if (++requests > MAX_HANDSHAKE_REQUESTS) return refuse(new FlightProtocolError(`Handshake: more than ${MAX_HANDSHAKE_REQUESTS} requests`));
      if (!accepted) {
        const payload = Buffer.from(request.payload ?? []).toString('utf8');
        if (payload.length === 0) return refuse(byHeaders);
        if (!sameToken(payload, this.accessToken)) {
          return refuse(new FlightAuthError('Handshake: wrong credentials in the payload; send the cluster access token', 'ERR_FLIGHT_ACCESS_DENIED'));
        }
        accept();
      }
      call.write({ protocol_version: request.protocol_version, payload: Buffer.from(this.accessToken) });
    });
    call.on('end', () => {
      if (accepted) call.end();
      else if (requests === 0) refuse(byHeaders);
    });
  }

  private checkCall(metadata: Metadata): void {
    authorize(String(metadata.get('authorization')[0] ?? ''), this.accessToken);
  }

  private toStatus(error: unknown): { code: GrpcStatus; details: string } {
    if (error instanceof FlightError) return { code: error.grpcStatus, details: error.message };
    this.options.logger?.error(`flight: ${(error as Error).stack ?? error}`);
    return { code: GrpcStatus.INTERNAL, details: `internal error: ${(error as Error).message ?? String(error)}` };
  }

  private async locate(path: string): Promise<Located> {
    const parts = path.split('/');
    if (parts[0] === 'runs' && parts.length === 3) {
      const table = (await this.options.resolveOutput?.(parts[1]!, parts[2]!)) ?? null;
      if (!table) throw new FlightNotFoundError(`no output ${path} on this server (${this.location}): the run or step does not exist, did not succeed here, or was released`);
      return { table, dir: this.options.shmDir };
    }
    if (parts[0] === 'uploads' && parts.length === 2) {
      const table = this.uploads.get(parts[1]!);
      if (!table) throw new FlightNotFoundError(`no uploaded table named "${parts[1]}" on this server`);
      return { table, dir: this.uploadDir };
    }
    throw new FlightNotFoundError(`unknown flight path "${path}": use runs/<runId>/<step> or uploads/<name>`);
  }

  private async flightInfo(path: string): Promise<FlightInfoMessage> {
    const located = await this.locate(path);
    const { table } = located;
    if (table.segments.length === 0) throw new FlightNotFoundError(`${path} has no segments`);
    const stream = openStream(located, 0, path);
    let schema: Uint8Array;
    try {
      const message = streamMessages(stream.bytes).next().value;
      if (!message || message.type !== MessageType.schema) throw new FlightProtocolError(`${path}: its first segment does not start with a Schema`);
      schema = schemaBytes(message.header);
    } finally {
      stream.close();
    }
    const streams = isComposed(table) ? [{ byteSize: null }] : table.segments.map((s) => ({ byteSize: s.byteSize }));
    return {
      schema: Buffer.from(schema),
      flight_descriptor: { type: 'PATH', cmd: Buffer.alloc(0), path: path.split('/') },
      endpoint: streams.map((stream, index) => ({
        ticket: { ticket: Buffer.from(this.ticketFor(path, index)) },
        location: [{ uri: this.location }, ...(this.bulkLocation ? [{ uri: this.bulkLocation }] : [])],
        expiration_time: null,
        app_metadata: Buffer.from(JSON.stringify(stream)),
      })),
      total_records: table.rows,
      total_bytes: table.byteSize,
      ordered: true,
      app_metadata: Buffer.from(JSON.stringify({ segments: streams.length })),
    };
  }

  /** The bulk port's view of this server: the same tickets, flights and bookkeeping. */
  private redeemer(): TicketRedeemer {
    return {
      authorize: (header) => authorize(header, this.accessToken),
      open: async (ticket) => {
        const claims = verifyTicket(ticket, this.secret, this.now());
        const stream = openStream(await this.locate(claims.path), claims.segment, claims.path);
        this.openStreamsNow.add(stream);
        return { bytes: stream.bytes, close: () => this.openStreamsNow.delete(stream) && stream.close() };
      },
      toStatus: (error) => this.toStatus(error),
      maxInFlightBytes: this.options.maxInFlightBytes ?? DEFAULT_MAX_IN_FLIGHT_BYTES,
      track: (cancel) => {
        this.activeCalls.add(cancel);
        return () => this.activeCalls.delete(cancel);
      },
    };
  }

  private async doGet(call: ServerWritableStream<TicketMessage, Buffer>): Promise<void> {
    let stream: ReturnType<typeof openStream> | null = null;
    let cancelled = false;
    let wake: (() => void) | null = null;
    const release = () => {
      if (stream && this.openStreamsNow.delete(stream)) stream.close();
    };
    const cancel = () => {
      cancelled = true;
      // Frames already handed to grpc-js are copies: the mapping can go at once.
      release();
      wake?.();
    };
    call.on('cancelled', cancel);
    this.activeCalls.add(cancel);
    try {
      this.checkCall(call.metadata);
      const claims = verifyTicket(call.request.ticket ?? Buffer.alloc(0), this.secret, this.now());
      const located = await this.locate(claims.path);
      if (cancelled) return;
      stream = openStream(located, claims.segment, claims.path);
      this.openStreamsNow.add(stream);
      const messages = streamMessages(stream.bytes);
      const limit = this.options.maxInFlightBytes ?? DEFAULT_MAX_IN_FLIGHT_BYTES;
      let inFlight = 0;
      // Frame buffers go back here once grpc-js has sent (and so long since copied) them.
      const spare: Buffer[] = [];
      while (!cancelled) {
        const next = messages.next();
        if (next.done) break;
        const message = { header: next.value.header, body: next.value.body };
        const needed = flightDataLength(message);
        const reusable = spare.findIndex((b) => b.byteLength >= needed);
        const buffer = reusable >= 0 ? spare.splice(reusable, 1)[0]! : Buffer.allocUnsafe(needed);
        const frame = encodeFlightData(message, buffer);
        inFlight += frame.byteLength;
        const flushed = call.write(frame, () => {
          inFlight -= frame.byteLength;
          spare.push(buffer);
          wake?.();
        });
        while (!cancelled && (inFlight > limit || (!flushed && inFlight > 0))) {
          await new Promise<void>((resolve) => (wake = resolve));
          wake = null;
        }
      }
      release();
      if (!cancelled) call.end();
    } catch (error) {
      release();
      if (!cancelled) call.emit('error', this.toStatus(error));
    } finally {
      this.activeCalls.delete(cancel);
    }
  }

  private async doPut(call: ServerDuplexStream<FlightDataFrame, { app_metadata: Buffer }>): Promise<void> {
    let writer: SegmentWriter | null = null;
    let name = '';
    try {
      this.checkCall(call.metadata);
      // Not `for await (… of call)`: finishing that destroys the duplex, and with it our answer.
      for await (const frame of call.iterator({ destroyOnReturn: false }) as AsyncIterable<FlightDataFrame>) {
        if (!writer) {
          name = uploadName(frame.descriptor ? flightPath(toDescriptorMessage(frame.descriptor)) : '');
          writer = new SegmentWriter({ dir: this.uploadDir, id: `${name}.${ulid()}-0`, byteSize: 1024 * 1024 });
        }
        writer.append(frame);
      }
      if (!writer) throw new FlightProtocolError('DoPut received no FlightData');
      const segment = writer.finish();
      const stored: StoredTable = { segments: [segment], rows: writer.rows, byteSize: segment.byteSize };
      const previous = this.uploads.get(name);
      this.uploads.set(name, stored);
      if (previous) releaseSegments(previous.segments, { dir: this.uploadDir, poolMaxBytes: 0 });
      call.write({ app_metadata: Buffer.from(JSON.stringify({ name, rows: stored.rows, byteSize: stored.byteSize })) });
      call.end();
    } catch (error) {
      writer?.abort();
      call.emit('error', this.toStatus(error));
    }
  }

  private doAction(action: ActionMessage): string {
    if (action.type === 'quiver.health') return 'ok';
    if (action.type === 'quiver.drop-upload') {
      const name = Buffer.from(action.body ?? []).toString('utf8');
      const table = this.uploads.get(name);
      if (!table) throw new FlightNotFoundError(`no uploaded table named "${name}"`);
      this.uploads.delete(name);
      releaseSegments(table.segments, { dir: this.uploadDir, poolMaxBytes: 0 });
      return 'dropped';
    }
    throw new FlightError(`unknown action "${action.type}"; ListActions lists them`, 'ERR_FLIGHT_UNIMPLEMENTED', GrpcStatus.UNIMPLEMENTED);
  }
}

function toDescriptorMessage(d: { type: FlightDescriptorMessage['type']; path: string[]; cmd: Uint8Array }): FlightDescriptorMessage {
  return { type: d.type, path: d.path, cmd: Buffer.from(d.cmd) };
}

/** A PATH descriptor as `a/b/c`; `["runs/x/y"]` and `["runs", "x", "y"]` are the same flight. */
export function flightPath(descriptor: FlightDescriptorMessage): string {
  if (descriptor.type !== 'PATH' || descriptor.path.length === 0) {
    throw new FlightNotFoundError('Quiver flights are named by PATH descriptors: runs/<runId>/<step> or uploads/<name>');
  }
  return descriptor.path.flatMap((p) => p.split('/')).filter((p) => p.length > 0).join('/');
}

function uploadName(path: string): string {
  const parts = path.split('/');
  const name = parts[0] === 'uploads' && parts.length === 2 ? parts[1]! : parts.length === 1 ? parts[0]! : '';
  if (!UPLOAD_NAME.test(name)) {
    throw new FlightProtocolError(`DoPut needs a PATH descriptor naming the upload ("<name>" or "uploads/<name>", name of [A-Za-z0-9_-]), got "${path}"`);
  }
  return name;
}
