/**
 * A Flight client: the calls of the protocol, plus the two things Quiver needs on top: read a
 * flight into an apache-arrow Table, and fetch one stream straight into a local shared-memory
 * segment (one copy, off the network).
 */
import {
  Client,
  credentials as grpcCredentials,
  Metadata,
  type ClientDuplexStream,
  type ClientReadableStream,
  type MethodDefinition,
} from '@grpc/grpc-js';
import { RecordBatchReader, RecordBatchStreamWriter, AsyncByteQueue, type Schema, Table } from 'apache-arrow';
import type { SegmentRef } from '../shm/index.ts';
import { FlightProtocolError, fromGrpcError } from './errors.ts';
import { type FlightDataFrame, encodeFlightData } from './frames.ts';
import { EOS_BYTES, framedLength, streamMessages, writeEos, writeFramed } from './ipc.ts';
import { type ActionTypeMessage, type FlightInfoMessage, TRANSFER_CHANNEL_OPTIONS, flightServiceDefinition } from './protocol.ts';
import { FetchSession } from './fetch-stream.ts';
import { SegmentWriter } from './segment-writer.ts';

/** Options for {@link FlightClient}. */
export interface FlightClientOptions {
  /** Root certificates (PEM) to trust for `grpc+tls://`; the system's when omitted. */
  rootCerts?: Buffer;
  /** Sent as `authorization: Bearer <token>` on every call. */
  accessToken?: string;
  /** Extra grpc-js channel options (merged over the transfer defaults). */
  channelOptions?: Record<string, string | number>;
  /** The server's DoGet-only bulk location (FlightServer.bulkLocation): fetchToShm uses it when given. */
  bulkLocation?: string;
}

/** One stream of a flight: redeem `ticket` with DoGet at one of `locations` (or this server). */
export interface FlightEndpoint {
  ticket: Uint8Array;
  locations: string[];
  /** Size of the stream as a complete IPC stream, when the server says (Quiver servers do). */
  byteSize: number | null;
}

export interface FlightInfo {
  path: string[];
  /** The schema in its IPC form. */
  schema: Uint8Array;
  endpoints: FlightEndpoint[];
  totalRecords: number;
  totalBytes: number;
}

/** Options of {@link FlightClient.fetchToShm}. */
export interface FetchToShmOptions {
  dir: string;
  id: string;
  /** Size of the stream when known (from the descriptor): the segment is made that size at once. */
  byteSize?: number | null;
  poolMaxBytes?: number;
  signal?: AbortSignal;
  /** Called after each IPC message is in place, with the messages and bytes received so far. */
  onProgress?: (progress: { messages: number; bytes: number }) => void;
}

type Methods = Record<string, MethodDefinition<unknown, unknown>>;

/** Accepts `grpc://`, `grpc+tcp://`, `grpc+tls://` URIs or a bare `host:port`. */
export function parseLocation(uri: string): { address: string; tls: boolean } {
  const match = /^(grpc(?:\+tcp|\+tls)?):\/\/(.+)$/.exec(uri);
  if (!match) return { address: uri, tls: false };
  return { address: match[2]!.replace(/\/$/, ''), tls: match[1] === 'grpc+tls' };
}

export class FlightClient {
  private readonly client: Client;
  private readonly methods: Methods;
  private readonly fetchSession: FetchSession;

  constructor(
    readonly location: string,
    private readonly options: FlightClientOptions = {},
  ) {
    const { address, tls } = parseLocation(location);
    const creds = tls ? grpcCredentials.createSsl(options.rootCerts ?? null) : grpcCredentials.createInsecure();
    this.client = new Client(address, creds, { ...TRANSFER_CHANNEL_OPTIONS, ...options.channelOptions });
    this.methods = flightServiceDefinition() as unknown as Methods;
    const bulk = options.bulkLocation ? parseLocation(options.bulkLocation) : { address, tls };
    this.fetchSession = new FetchSession(bulk.address, bulk.tls, options.rootCerts, options.accessToken);
  }

  close(): void {
    this.client.close();
    this.fetchSession.close();
  }

  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.options.accessToken) metadata.set('authorization', `Bearer ${this.options.accessToken}`);
    return metadata;
  }

  private unary<Res>(method: string, request: unknown): Promise<Res> {
    const m = this.methods[method]!;
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(m.path, m.requestSerialize, m.responseDeserialize, request, this.metadata(), (error, value) =>
        error ? reject(fromGrpcError(error, `${method} at ${this.location}`)) : resolve(value as Res),
      );
    });
  }

  private serverStream(method: string, request: unknown): ClientReadableStream<unknown> {
    const m = this.methods[method]!;
    return this.client.makeServerStreamRequest(m.path, m.requestSerialize, m.responseDeserialize, request, this.metadata());
  }

  private async collect<T>(method: string, request: unknown): Promise<T[]> {
    const out: T[] = [];
    try {
      for await (const value of this.serverStream(method, request)) out.push(value as T);
    } catch (error) {
      throw fromGrpcError(error, `${method} at ${this.location}`);
    }
    return out;
  }

  /** Where and how to read a flight, e.g. `runs/<runId>/<step>`. */
  async getFlightInfo(path: string | readonly string[]): Promise<FlightInfo> {
    const parts = typeof path === 'string' ? path.split('/') : [...path];
    return toFlightInfo(await this.unary<FlightInfoMessage>('GetFlightInfo', { type: 'PATH', path: parts, cmd: Buffer.alloc(0) }));
  }

  async getSchema(path: string | readonly string[]): Promise<Schema> {
    const parts = typeof path === 'string' ? path.split('/') : [...path];
    const result = await this.unary<{ schema: Buffer }>('GetSchema', { type: 'PATH', path: parts, cmd: Buffer.alloc(0) });
    const bytes = new Uint8Array(result.schema.byteLength + EOS_BYTES);
    bytes.set(result.schema);
    writeEos(bytes, result.schema.byteLength);
    const reader = RecordBatchReader.from(bytes);
    reader.open();
    return reader.schema;
  }

  async listFlights(): Promise<FlightInfo[]> {
    return (await this.collect<FlightInfoMessage>('ListFlights', { expression: Buffer.alloc(0) })).map(toFlightInfo);
  }

  async listActions(): Promise<{ type: string; description: string }[]> {
    return this.collect<ActionTypeMessage>('ListActions', {});
  }

  async doAction(type: string, body: Uint8Array | string = new Uint8Array(0)): Promise<Buffer[]> {
    const results = await this.collect<{ body: Buffer }>('DoAction', { type, body: Buffer.from(body) });
    return results.map((r) => r.body);
  }

  async handshake(): Promise<void> {
    const m = this.methods.Handshake!;
    const call = this.client.makeBidiStreamRequest(m.path, m.requestSerialize, m.responseDeserialize, this.metadata());
    call.end({ protocol_version: 0, payload: Buffer.alloc(0) });
    try {
      for await (const _ of call) break;
    } catch (error) {
      throw fromGrpcError(error, `Handshake at ${this.location}`);
    }
  }

  /**
   * The frames of one stream. Reading is pulled: grpc-js asks the server for more only as
   * this is consumed, so a slow consumer holds the sender back. Aborting `signal` cancels
   * the call (the server unmaps at once).
   */
  async *doGet(ticket: Uint8Array, signal?: AbortSignal): AsyncGenerator<FlightDataFrame> {
    const call = this.serverStream('DoGet', { ticket: Buffer.from(ticket) }) as ClientReadableStream<FlightDataFrame>;
    const abort = () => call.cancel();
    signal?.addEventListener('abort', abort, { once: true });
    try {
      for await (const frame of call) yield frame as FlightDataFrame;
    } catch (error) {
      throw fromGrpcError(error, `DoGet at ${this.location}`);
    } finally {
      signal?.removeEventListener('abort', abort);
      // A consumer that stops early cancels the call rather than leaving it streaming.
      call.cancel();
    }
  }

  /** Reads a whole flight (every endpoint, in order) into a Table. */
  async readTable(pathOrInfo: string | readonly string[] | FlightInfo): Promise<Table> {
    const info = typeof pathOrInfo === 'object' && 'endpoints' in pathOrInfo ? pathOrInfo : await this.getFlightInfo(pathOrInfo);
    const batches = [];
    let schema: Schema | null = null;
    for (const endpoint of info.endpoints) {
      const chunks: Uint8Array[] = [];
      for await (const frame of this.doGet(endpoint.ticket)) {
        if (frame.header.byteLength === 0) continue;
        const chunk = new Uint8Array(framedLength(frame.header.byteLength, frame.body.byteLength));
        writeFramed(chunk, 0, frame.header, frame.body);
        chunks.push(chunk);
      }
      const eos = new Uint8Array(EOS_BYTES);
      writeEos(eos, 0);
      chunks.push(eos);
      const reader = RecordBatchReader.from(Buffer.concat(chunks));
      reader.open();
      schema ??= reader.schema;
      batches.push(...reader.readAll());
    }
    if (!schema) throw new FlightProtocolError(`flight ${info.path.join('/')} has no endpoints`);
    return new Table(schema, batches);
  }

  /**
   * DoGet straight into a new shared-memory segment `id` in `dir`: the segment is a complete
   * IPC stream that readTableFromShm maps. Bodies go from the network to the segment with no
   * copy in between (fetch-stream.ts). A failed or cancelled transfer removes the segment.
   */
  async fetchToShm(ticket: Uint8Array, options: FetchToShmOptions): Promise<{ segment: SegmentRef; rows: number; copiedBytes: number }> {
    const writer = new SegmentWriter({
      dir: options.dir,
      id: options.id,
      byteSize: options.byteSize ?? 1024 * 1024,
      ...(options.poolMaxBytes !== undefined ? { poolMaxBytes: options.poolMaxBytes } : {}),
    });
    try {
      let messages = 0;
      let bytes = 0;
      const onProgress = options.onProgress;
      // The body lands after beginMessage returns: progress is reported when the next one begins, and at the end.
      const sink = onProgress
        ? {
            beginMessage: (header: Uint8Array, bodyLength: number) => {
              if (messages > 0) onProgress({ messages, bytes });
              messages += 1;
              bytes += header.byteLength + bodyLength;
              return writer.beginMessage(header, bodyLength);
            },
          }
        : writer;
      await this.fetchSession.fetch(ticket, sink, options.signal);
      if (onProgress && messages > 0) onProgress({ messages, bytes });
      const segment = writer.finish();
      return { segment, rows: writer.rows, copiedBytes: writer.copiedBytes };
    } catch (error) {
      writer.abort();
      throw error;
    }
  }

  /** DoPut: uploads `table` under `name` (read back as `uploads/<name>`), one record batch per frame. */
  async putTable(name: string, table: Table): Promise<{ name: string; rows: number; byteSize: number }> {
    const m = this.methods.DoPut!;
    const call = this.client.makeBidiStreamRequest(m.path, m.requestSerialize, m.responseDeserialize, this.metadata()) as ClientDuplexStream<Buffer, { app_metadata: Buffer }>;
    const results: Buffer[] = [];
    const finished = new Promise<void>((resolve, reject) => {
      call.on('data', (r: { app_metadata: Buffer }) => results.push(r.app_metadata));
      call.on('error', (error) => reject(fromGrpcError(error, `DoPut at ${this.location}`)));
      // 'status' comes once the server finished; 'end' would wait for us to stop writing too.
      call.on('status', (status: { code: number }) => status.code === 0 && resolve());
    });
    finished.catch(() => {});
    const sink = new CollectingSink();
    const writer = new RecordBatchStreamWriter();
    let first = true;
    const send = async () => {
      for (const message of streamMessages(sink.take())) {
        const frame = encodeFlightData({
          ...(first ? { descriptor: { type: 'PATH' as const, path: ['uploads', name], cmd: new Uint8Array(0) } } : {}),
          header: message.header,
          body: message.body,
        });
        first = false;
        if (!call.write(frame)) await Promise.race([new Promise((r) => call.once('drain', r)), finished]);
      }
    };
    writer.reset(sink, table.schema);
    await send();
    for (const batch of table.batches) {
      writer.write(batch);
      await send();
    }
    call.end();
    await finished;
    const answer = results[0] ? JSON.parse(results[0].toString('utf8')) : {};
    return { name, rows: Number(answer.rows ?? table.numRows), byteSize: Number(answer.byteSize ?? 0) };
  }
}

/** A byte sink for RecordBatchStreamWriter that hands over what was written since the last take(). */
class CollectingSink extends AsyncByteQueue<Uint8Array> {
  private chunks: Uint8Array[] = [];

  override write(chunk: ArrayBufferView): void {
    this.chunks.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
  }

  take(): Uint8Array {
    const out = Buffer.concat(this.chunks);
    this.chunks = [];
    return out;
  }

  override close(): void {}
  override abort(): void {}
}

function toFlightInfo(message: FlightInfoMessage): FlightInfo {
  return {
    path: message.flight_descriptor?.path ?? [],
    schema: new Uint8Array(message.schema),
    endpoints: message.endpoint.map((e) => {
      let byteSize: number | null = null;
      try {
        byteSize = e.app_metadata?.byteLength ? Number(JSON.parse(e.app_metadata.toString('utf8')).byteSize) || null : null;
      } catch {
        // Another server's metadata: not ours to read.
      }
      return { ticket: new Uint8Array(e.ticket.ticket), locations: e.location.map((l) => l.uri), byteSize };
    }),
    totalRecords: message.total_records,
    totalBytes: message.total_bytes,
  };
}
