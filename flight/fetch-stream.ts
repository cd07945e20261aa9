/**
 * DoGet into a shared-memory segment on plain node:http2, for the one transfer that carries
 * the bulk: grpc-js hands over each message reassembled in a fresh buffer, a copy (and page
 * faults, and garbage) per record batch. Here the gRPC and FlightData framing are parsed as the
 * bytes arrive, and each body goes from the HTTP/2 DATA frames straight to its place in the
 * segment: the one copy a receiver makes. HTTP/2 frames are allowed up to 1 MiB, and the
 * window is large, so the sender is not held back by round trips.
 *
 * It speaks the same wire protocol as any gRPC client: a POST to
 * /arrow.flight.protocol.FlightService/DoGet, the status in trailers.
 */
import { connect, constants, type ClientHttp2Session, type IncomingHttpHeaders } from 'node:http2';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { FlightProtocolError, fromGrpcError } from './errors.ts';
import { varintBytes } from './frames.ts';
import { readMessageHeader } from './ipc.ts';
import { SERVICE_NAME } from './protocol.ts';

/** Where a receiver puts a message: the body's destination, handed out once the header is known. */
export interface MessageSink {
  /** Writes the prefix and header; returns the view the body must be copied into. */
  beginMessage(header: Uint8Array, bodyLength: number): Uint8Array;
}

const WINDOW_BYTES = 64 * 1024 * 1024;
const MAX_FRAME_BYTES = 1024 * 1024;

/** One HTTP/2 session per server, opened on first use. */
export class FetchSession {
  private session: ClientHttp2Session | null = null;
  private active = 0;

  constructor(
    private readonly address: string,
    private readonly tls: boolean,
    private readonly rootCerts: Buffer | undefined,
    private readonly accessToken: string | undefined,
  ) {}

  private open(): ClientHttp2Session {
    if (this.session && !this.session.closed && !this.session.destroyed) return this.session;
    const session = connect(`${this.tls ? 'https' : 'http'}://${this.address}`, {
      settings: { initialWindowSize: WINDOW_BYTES, maxFrameSize: MAX_FRAME_BYTES },
      maxSessionMemory: Number.MAX_SAFE_INTEGER,
      ...(this.tls && this.rootCerts ? { ca: this.rootCerts } : {}),
    });
    session.on('connect', () => session.setLocalWindowSize(WINDOW_BYTES));
    // Errors reach the request; a session error alone must not crash the process.
    session.on('error', () => undefined);
    session.unref();
    this.session = session;
    return session;
  }

  close(): void {
    this.session?.close();
    this.session = null;
  }

  /** DoGet `ticket`, each message laid out by `sink`. Resolves when the server ends the stream with OK. */
  fetch(ticket: Uint8Array, sink: MessageSink, signal?: AbortSignal): Promise<void> {
    const session = this.open();
    if (this.active++ === 0) session.ref();
    const request = session.request({
      ':method': 'POST',
      ':path': `/${SERVICE_NAME}/DoGet`,
      'content-type': 'application/grpc',
      te: 'trailers',
      ...(this.accessToken ? { authorization: `Bearer ${this.accessToken}` } : {}),
    });
    // The Ticket message: field 1, bytes.
    const ticketMessage = Buffer.concat([Buffer.from([0x0a]), Buffer.from(varintBytes(ticket.byteLength)), ticket]);
    const framed = Buffer.alloc(5 + ticketMessage.byteLength);
    framed.writeUInt32BE(ticketMessage.byteLength, 1);
    ticketMessage.copy(framed, 5);
    request.end(framed);
    const parser = new DoGetParser(sink);
    const where = `DoGet at ${this.address}`;
    return new Promise<void>((resolve, reject) => {
      let status: { code: number; details: string } | null = null;
      let failed: unknown = null;
      const statusOf = (headers: IncomingHttpHeaders) => {
        if (headers['grpc-status'] === undefined) return;
        const details = String(headers['grpc-message'] ?? '');
        status = { code: Number(headers['grpc-status']), details: safeDecode(details) };
      };
      const abort = () => request.close(constants.NGHTTP2_CANCEL);
      signal?.addEventListener('abort', abort, { once: true });
      if (signal?.aborted) abort();
      request.on('response', (headers) => {
        if (headers[':status'] !== 200) failed ??= fromGrpcError({ code: GrpcStatus.UNAVAILABLE, details: `HTTP status ${headers[':status']}` }, where);
        statusOf(headers);
      });
      request.on('trailers', statusOf);
      request.on('data', (chunk: Buffer) => {
        if (failed) return;
        try {
          parser.push(chunk);
        } catch (error) {
          failed = error;
          request.close(constants.NGHTTP2_CANCEL);
        }
      });
      request.on('error', (error) => (failed ??= error));
      request.on('close', () => {
        signal?.removeEventListener('abort', abort);
        if (--this.active === 0) this.session?.unref();
        const final = status as { code: number; details: string } | null;
        if (failed) return reject(failed instanceof Error && 'code' in failed && typeof failed.code === 'string' && failed.code.startsWith('ERR_FLIGHT') ? failed : fromGrpcError(failed, where));
        if (signal?.aborted) return reject(fromGrpcError({ code: GrpcStatus.CANCELLED, details: 'Cancelled on client' }, where));
        if (!final) return reject(fromGrpcError({ code: GrpcStatus.UNAVAILABLE, details: `the stream closed without a status (HTTP/2 code ${request.rstCode})` }, where));
        if (final.code !== GrpcStatus.OK) return reject(fromGrpcError(final, where));
        try {
          parser.end();
        } catch (error) {
          return reject(error);
        }
        resolve();
      });
    });
  }
}

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/**
 * gRPC length-prefixed messages, each a FlightData, parsed byte by byte as chunks arrive. Small
 * fields are gathered; the body field is copied chunk by chunk into the sink's destination.
 */
class DoGetParser {
  private state: 'prefix' | 'key' | 'length' | 'value' | 'varint' | 'fixed' = 'prefix';
  private prefix = Buffer.alloc(5);
  private prefixHave = 0;
  /** Bytes of the current gRPC message not yet parsed. */
  private messageLeft = 0;
  private number = 0;
  private scale = 1;
  private field = 0;
  private valueLeft = 0;
  private fixedLeft = 0;
  private gathered: Buffer[] = [];
  private header: Uint8Array | null = null;
  private body: Uint8Array | null = null;
  private bodyAt = 0;
  /** A body that came before its header (legal protobuf, unusual): kept until the header comes. */
  private earlyBody: Buffer | null = null;

  constructor(private readonly sink: MessageSink) {}

  push(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.byteLength) {
      if (this.state === 'prefix') {
        const take = Math.min(5 - this.prefixHave, chunk.byteLength - at);
        chunk.copy(this.prefix, this.prefixHave, at, at + take);
        this.prefixHave += take;
        at += take;
        if (this.prefixHave < 5) return;
        if (this.prefix[0] !== 0) throw new FlightProtocolError('DoGet: the server sent a compressed message, which was not asked for');
        this.messageLeft = this.prefix.readUInt32BE(1);
        this.prefixHave = 0;
        this.startMessage();
        continue;
      }
      if (this.state === 'value') {
        const take = Math.min(this.valueLeft, chunk.byteLength - at);
        const piece = chunk.subarray(at, at + take);
        if (this.body) {
          this.body.set(piece, this.bodyAt);
          this.bodyAt += take;
        } else {
          this.gathered.push(Buffer.from(piece));
        }
        at += take;
        this.valueLeft -= take;
        this.messageLeft -= take;
        if (this.valueLeft === 0) this.endField();
        continue;
      }
      if (this.state === 'fixed') {
        const take = Math.min(this.fixedLeft, chunk.byteLength - at);
        at += take;
        this.fixedLeft -= take;
        this.messageLeft -= take;
        if (this.fixedLeft === 0) this.nextField();
        continue;
      }
      // A varint: a key, a length, or a skipped value.
      const byte = chunk[at++]!;
      this.messageLeft -= 1;
      this.number += (byte & 0x7f) * this.scale;
      this.scale *= 128;
      if (byte >= 0x80) continue;
      const value = this.number;
      this.number = 0;
      this.scale = 1;
      if (this.state === 'key') this.onKey(value);
      else if (this.state === 'length') this.onLength(value);
      else this.nextField();
    }
  }

  end(): void {
    if (this.state !== 'prefix' || this.prefixHave !== 0) throw new FlightProtocolError('DoGet: the stream ended in the middle of a message');
  }

  private startMessage(): void {
    this.header = null;
    this.body = null;
    this.earlyBody = null;
    if (this.messageLeft === 0) this.finishMessage();
    else this.state = 'key';
  }

  private onKey(key: number): void {
    this.field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 2) this.state = 'length';
    else if (wire === 0) this.state = 'varint';
    else if (wire === 1 || wire === 5) {
      this.fixedLeft = wire === 1 ? 8 : 4;
      this.state = 'fixed';
    } else throw new FlightProtocolError(`DoGet: FlightData has a field of wire type ${wire}`);
  }

  private onLength(length: number): void {
    this.valueLeft = length;
    this.gathered = [];
    if (this.field === 1000) {
      if (this.header) {
        this.body = this.sink.beginMessage(this.header, length);
        this.bodyAt = 0;
      }
    }
    if (length === 0) this.endField();
    else this.state = 'value';
  }

  private endField(): void {
    if (this.field === 1000) {
      if (this.body) {
        this.header = null;
        this.body = null;
      } else {
        this.earlyBody = Buffer.concat(this.gathered);
      }
    } else if (this.field === 2) {
      this.header = Buffer.concat(this.gathered);
    }
    this.gathered = [];
    this.nextField();
  }

  private nextField(): void {
    if (this.messageLeft < 0) throw new FlightProtocolError('DoGet: a FlightData field runs past its message');
    if (this.messageLeft === 0) this.finishMessage();
    else this.state = 'key';
  }

  /** A message whose header was not followed by a body (schema) or came after it. */
  private finishMessage(): void {
    if (this.header && this.header.byteLength > 0) {
      const body = this.earlyBody ?? Buffer.alloc(0);
      const { bodyLength } = readMessageHeader(this.header);
      if (bodyLength !== body.byteLength) throw new FlightProtocolError(`DoGet: a message's body has ${body.byteLength} bytes, its header says ${bodyLength}`);
      this.sink.beginMessage(this.header, body.byteLength).set(body);
    }
    this.header = null;
    this.earlyBody = null;
    this.state = 'prefix';
  }
}
