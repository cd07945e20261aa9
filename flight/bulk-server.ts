/**
 * DoGet, and only DoGet, on plain node:http2 beside the grpc-js server: the bulk path between
 * executors. grpc-js copies every message it sends into a fresh buffer (after we would have
 * encoded it into another); here each message goes out as a few bytes of framing followed by
 * its body as a view of the mapped segment, so the sender copies nothing. It is the same gRPC
 * wire protocol (any gRPC client's DoGet works against it), listed as a second location of
 * every endpoint. The mapping is unmapped only once every write that views it has completed.
 */
import { constants, createSecureServer, createServer, type Http2Server, type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { FlightProtocolError } from './errors.ts';
import { listenGated, type ConnectionLimits, type GatedListener } from './listener.ts';
import { varintBytes } from './frames.ts';
import { streamMessages } from './ipc.ts';
import { SERVICE_NAME } from './protocol.ts';

/** What the Flight server lends the bulk path: redeeming a ticket into a stream of bytes. */
export interface TicketRedeemer {
  /** Checks the call's `authorization` header; throws a FlightAuthError when refused. */
  authorize(header: string | undefined): void;
  /** Checks the ticket and opens its stream; throws a FlightError when refused. */
  open(ticket: Uint8Array): Promise<{ bytes: Uint8Array; close(): void }>;
  /** A thrown error as the gRPC status it is sent as. */
  toStatus(error: unknown): { code: GrpcStatus; details: string };
  /** Bytes a stream may have queued for the network before it waits. */
  maxInFlightBytes: number;
  /** Tracks streams in progress, so the server can count and cancel them. */
  track(cancel: () => void): () => void;
}

const DO_GET_PATH = `/${SERVICE_NAME}/DoGet`;
/**
 * A DoGet request is one Ticket message: a Quiver ticket is a few hundred bytes. Nothing larger
 * is buffered, so a peer cannot make the server hold more than this per stream.
 */
const MAX_REQUEST_BYTES = 16 * 1024;

/** The gRPC prefix and every FlightData byte before the body: `[0][length][2: header][1000: length]`. */
function framing(header: Uint8Array, bodyLength: number): Buffer {
  const headerField = [0x12, ...varintBytes(header.byteLength)];
  const bodyField = bodyLength > 0 ? [0xc2, 0x3e, ...varintBytes(bodyLength)] : [];
  const messageLength = headerField.length + header.byteLength + bodyField.length + bodyLength;
  const out = Buffer.allocUnsafe(5 + headerField.length + header.byteLength + bodyField.length);
  out[0] = 0;
  out.writeUInt32BE(messageLength, 1);
  out.set(headerField, 5);
  out.set(header, 5 + headerField.length);
  out.set(bodyField, 5 + headerField.length + header.byteLength);
  return out;
}

export class BulkServer {
  private constructor(
    private readonly server: Http2Server,
    private readonly listener: GatedListener,
  ) {}

  get port(): number {
    return this.listener.port;
  }

  static async start(options: {
    host: string;
    port?: number;
    tls?: { cert: Buffer; key: Buffer };
    redeemer: TicketRedeemer;
    /** Streams one connection may have open at once. */
    maxConcurrentStreams: number;
    /** Connections held at once, in all and per client; more are closed as they arrive (listener.ts). */
    limits: ConnectionLimits;
  }): Promise<BulkServer> {
    // Session memory is left unbounded because node counts queued outgoing DATA in it; what a
    // session holds is bounded instead by streams per session times maxInFlightBytes each.
    const settings = { maxConcurrentStreams: options.maxConcurrentStreams };
    const server: Http2Server = options.tls
      ? createSecureServer({ cert: options.tls.cert, key: options.tls.key, allowHTTP1: false, maxSessionMemory: Number.MAX_SAFE_INTEGER, settings })
      : createServer({ maxSessionMemory: Number.MAX_SAFE_INTEGER, settings });
    server.on('stream', (stream, headers) => receive(stream, headers, options.redeemer));
    server.on('sessionError', () => undefined);
    // The HTTP/2 server never listens itself: the gated listener hands it the connections it admits.
    const listener = await listenGated({ host: options.host, port: options.port ?? 0, limits: options.limits, accept: (socket) => server.emit('connection', socket) });
    return new BulkServer(server, listener);
  }

  stop(): void {
    // Streams in progress end with their connections; their mappings go as their writes complete.
    this.listener.close();
    this.server.close();
  }
}

function fail(stream: ServerHttp2Stream, code: GrpcStatus, details: string): void {
  if (stream.destroyed || stream.closed) return;
  if (stream.headersSent) {
    // Mid-stream (headers sent with waitForTrailers): the status goes in the trailers.
    stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': String(code), 'grpc-message': encodeURIComponent(details) }));
    stream.end();
    return;
  }
  stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': String(code), 'grpc-message': encodeURIComponent(details) }, { endStream: true });
}

/**
 * Checks the call's credentials from its headers alone, then reads its one request message
 * up to MAX_REQUEST_BYTES, and serves it as soon as that message is complete.
 */
function receive(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, redeemer: TicketRedeemer): void {
  try {
    redeemer.authorize(typeof headers.authorization === 'string' ? headers.authorization : undefined);
  } catch (error) {
    const status = redeemer.toStatus(error);
    refuse(stream, status.code, status.details);
    return;
  }
  if (headers[':path'] !== DO_GET_PATH) {
    refuse(stream, GrpcStatus.UNIMPLEMENTED, `this port serves DoGet only; use the Flight server's first location for ${headers[':path']}`);
    return;
  }
  const chunks: Buffer[] = [];
  let received = 0;
  let started = false;
  const start = (request: Buffer) => {
    started = true;
    stream.removeListener('data', onData);
    void serve(stream, request, redeemer);
  };
  const onData = (chunk: Buffer) => {
    chunks.push(chunk);
    received += chunk.byteLength;
    const head = chunks.length === 1 ? chunk : Buffer.concat(chunks);
    const wanted = head.byteLength >= 5 ? 5 + head.readUInt32BE(1) : null;
    if (received > MAX_REQUEST_BYTES || (wanted !== null && wanted > MAX_REQUEST_BYTES)) {
      started = true;
      stream.removeListener('data', onData);
      refuse(stream, GrpcStatus.RESOURCE_EXHAUSTED, `DoGet: the request is over ${MAX_REQUEST_BYTES} bytes; a ticket is far smaller`);
      return;
    }
    if (wanted !== null && head.byteLength >= wanted) start(head.subarray(0, wanted));
  };
  stream.on('data', onData);
  stream.once('end', () => {
    if (!started) start(Buffer.concat(chunks));
  });
}

/**
 * Answers with `code` and stops the peer sending: after the answer, RST_STREAM(NO_ERROR) tells
 * it the rest of its request will not be read (RFC 9113 §8.1), so nothing more is received.
 */
function refuse(stream: ServerHttp2Stream, code: GrpcStatus, details: string): void {
  fail(stream, code, details);
  if (!stream.destroyed) stream.close(constants.NGHTTP2_NO_ERROR);
}

/** The ticket out of a gRPC-framed Ticket message (field 1, bytes). */
function ticketOf(request: Buffer): Uint8Array {
  if (request.byteLength < 5) throw new FlightProtocolError('DoGet: the request holds no Ticket message');
  const message = request.subarray(5, 5 + request.readUInt32BE(1));
  let at = 0;
  while (at < message.byteLength) {
    const key = message[at++]!;
    let length = 0;
    let scale = 1;
    for (;;) {
      const byte = message[at++];
      if (byte === undefined) throw new FlightProtocolError('DoGet: truncated Ticket');
      length += (byte & 0x7f) * scale;
      scale *= 128;
      if (byte < 0x80) break;
    }
    if (key === 0x0a) return message.subarray(at, at + length);
    at += length;
  }
  return new Uint8Array(0);
}

async function serve(stream: ServerHttp2Stream, request: Buffer, redeemer: TicketRedeemer): Promise<void> {
  let opened: { bytes: Uint8Array; close(): void } | null = null;
  let cancelled = false;
  let pending = 0;
  let inFlight = 0;
  let wake: (() => void) | null = null;
  const settle = () => {
    // Nothing may still view the mapping when it goes.
    if (opened && pending === 0 && (cancelled || stream.closed)) {
      opened.close();
      opened = null;
      untrack();
    }
  };
  const untrack = redeemer.track(() => stream.close(0x8));
  stream.on('close', () => {
    cancelled = true;
    wake?.();
    settle();
    if (!opened) untrack();
  });
  try {
    opened = await redeemer.open(ticketOf(request));
    if (cancelled) return settle();
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    const messages = streamMessages(opened.bytes);
    while (!cancelled) {
      const next = messages.next();
      if (next.done) break;
      const { header, body } = next.value;
      const parts = [framing(header, body.byteLength), ...(body.byteLength ? [Buffer.from(body.buffer, body.byteOffset, body.byteLength)] : [])];
      for (const part of parts) {
        pending++;
        inFlight += part.byteLength;
        stream.write(part, () => {
          pending--;
          inFlight -= part.byteLength;
          wake?.();
          settle();
        });
      }
      while (!cancelled && inFlight > redeemer.maxInFlightBytes) {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = null;
      }
    }
    if (cancelled) return settle();
    stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end();
  } catch (error) {
    const status = redeemer.toStatus(error);
    fail(stream, status.code, status.details);
    settle();
  }
}
