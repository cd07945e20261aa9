/**
 * FlightData encoded and decoded by hand: protobufjs would copy every body into a fresh
 * buffer on decode, and build an object graph on encode. Decoding here returns views of the
 * received message; encoding writes header and body once into the frame grpc-js sends.
 *
 * Wire layout (proto3): field 1 flight_descriptor (message), 2 data_header (bytes),
 * 3 app_metadata (bytes), 1000 data_body (bytes), all length-delimited (wire type 2).
 */
import { FlightProtocolError } from './errors.ts';

/** FlightDescriptor: `type` 1 = PATH, 2 = CMD. */
export interface FlightDescriptor {
  type: 'PATH' | 'CMD' | 'UNKNOWN';
  path: string[];
  cmd: Uint8Array;
}

/** One FlightData message: an Arrow IPC message (header + body) and optional descriptor and metadata. */
export interface FlightDataFrame {
  descriptor: FlightDescriptor | null;
  header: Uint8Array;
  body: Uint8Array;
  appMetadata: Uint8Array;
}

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_BYTES = 2;
const WIRE_FIXED32 = 5;

const varintLength = (n: number) => {
  let length = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 128);
    length++;
  }
  return length;
};

function writeVarint(out: Uint8Array, position: number, n: number): number {
  while (n >= 0x80) {
    out[position++] = (n & 0x7f) | 0x80;
    n = Math.floor(n / 128);
  }
  out[position++] = n;
  return position;
}

/** The varint encoding of `n`, as bytes (for framing written by hand elsewhere). */
export function varintBytes(n: number): number[] {
  const out = new Uint8Array(varintLength(n));
  writeVarint(out, 0, n);
  return [...out];
}

const keyOf = (field: number, wire: number) => field * 8 + wire;
const bytesFieldLength = (field: number, length: number) => varintLength(keyOf(field, WIRE_BYTES)) + varintLength(length) + length;

function writeBytesField(out: Uint8Array, position: number, field: number, bytes: Uint8Array): number {
  position = writeVarint(out, position, keyOf(field, WIRE_BYTES));
  position = writeVarint(out, position, bytes.byteLength);
  out.set(bytes, position);
  return position + bytes.byteLength;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export function encodeDescriptor(descriptor: FlightDescriptor): Uint8Array {
  const type = descriptor.type === 'PATH' ? 1 : descriptor.type === 'CMD' ? 2 : 0;
  const path = descriptor.path.map((p) => encoder.encode(p));
  const length =
    (type ? 2 : 0) + (descriptor.cmd.byteLength ? bytesFieldLength(2, descriptor.cmd.byteLength) : 0) + path.reduce((n, p) => n + bytesFieldLength(3, p.byteLength), 0);
  const out = new Uint8Array(length);
  let position = 0;
  if (type) {
    out[position++] = keyOf(1, WIRE_VARINT);
    out[position++] = type;
  }
  if (descriptor.cmd.byteLength) position = writeBytesField(out, position, 2, descriptor.cmd);
  for (const p of path) position = writeBytesField(out, position, 3, p);
  return out;
}

/** Bytes {@link encodeFlightData} writes for `frame`. */
export function flightDataLength(frame: Partial<FlightDataFrame> & { header: Uint8Array; body: Uint8Array }): number {
  return (
    (frame.descriptor ? bytesFieldLength(1, encodeDescriptor(frame.descriptor).byteLength) : 0) +
    (frame.header.byteLength ? bytesFieldLength(2, frame.header.byteLength) : 0) +
    (frame.appMetadata?.byteLength ? bytesFieldLength(3, frame.appMetadata.byteLength) : 0) +
    (frame.body.byteLength ? bytesFieldLength(1000, frame.body.byteLength) : 0)
  );
}

/**
 * Encodes a FlightData message into one Buffer (header and body copied in once): into `into`
 * when it is large enough (a reused buffer spares the page faults of a fresh one), else a new one.
 */
export function encodeFlightData(frame: Partial<FlightDataFrame> & { header: Uint8Array; body: Uint8Array }, into?: Buffer): Buffer {
  const descriptor = frame.descriptor ? encodeDescriptor(frame.descriptor) : null;
  const metadata = frame.appMetadata ?? new Uint8Array(0);
  const length =
    (descriptor ? bytesFieldLength(1, descriptor.byteLength) : 0) +
    (frame.header.byteLength ? bytesFieldLength(2, frame.header.byteLength) : 0) +
    (metadata.byteLength ? bytesFieldLength(3, metadata.byteLength) : 0) +
    (frame.body.byteLength ? bytesFieldLength(1000, frame.body.byteLength) : 0);
  const out = into && into.byteLength >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
  let position = 0;
  if (descriptor) position = writeBytesField(out, position, 1, descriptor);
  if (frame.header.byteLength) position = writeBytesField(out, position, 2, frame.header);
  if (metadata.byteLength) position = writeBytesField(out, position, 3, metadata);
  if (frame.body.byteLength) position = writeBytesField(out, position, 1000, frame.body);
  return out;
}

class Reader {
  position = 0;
  constructor(readonly bytes: Uint8Array) {}

  get done(): boolean {
    return this.position >= this.bytes.byteLength;
  }

  varint(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.position >= this.bytes.byteLength) throw new FlightProtocolError('FlightData: truncated varint');
      const byte = this.bytes[this.position++]!;
      result += (byte & 0x7f) * scale;
      if (byte < 0x80) return result;
      scale *= 128;
    }
    throw new FlightProtocolError('FlightData: varint longer than 10 bytes');
  }

  bytesField(): Uint8Array {
    const length = this.varint();
    const end = this.position + length;
    if (end > this.bytes.byteLength) throw new FlightProtocolError(`FlightData: a field of ${length} bytes runs past the message (${this.bytes.byteLength})`);
    const out = this.bytes.subarray(this.position, end);
    this.position = end;
    return out;
  }

  skip(wire: number): void {
    if (wire === WIRE_VARINT) this.varint();
    else if (wire === WIRE_FIXED64) this.position += 8;
    else if (wire === WIRE_BYTES) this.bytesField();
    else if (wire === WIRE_FIXED32) this.position += 4;
    else throw new FlightProtocolError(`FlightData: unsupported wire type ${wire}`);
  }
}

export function decodeDescriptor(bytes: Uint8Array): FlightDescriptor {
  const reader = new Reader(bytes);
  const descriptor: FlightDescriptor = { type: 'UNKNOWN', path: [], cmd: new Uint8Array(0) };
  while (!reader.done) {
    const key = reader.varint();
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (field === 1 && wire === WIRE_VARINT) {
      const type = reader.varint();
      descriptor.type = type === 1 ? 'PATH' : type === 2 ? 'CMD' : 'UNKNOWN';
    } else if (field === 2 && wire === WIRE_BYTES) descriptor.cmd = reader.bytesField();
    else if (field === 3 && wire === WIRE_BYTES) descriptor.path.push(decoder.decode(reader.bytesField()));
    else reader.skip(wire);
  }
  return descriptor;
}

/** Decodes a FlightData message; header, body and metadata are views of `bytes`. */
export function decodeFlightData(bytes: Uint8Array): FlightDataFrame {
  const reader = new Reader(bytes);
  const empty = new Uint8Array(0);
  const frame: FlightDataFrame = { descriptor: null, header: empty, body: empty, appMetadata: empty };
  while (!reader.done) {
    const key = reader.varint();
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire !== WIRE_BYTES) {
      reader.skip(wire);
      continue;
    }
    const value = reader.bytesField();
    if (field === 1) frame.descriptor = decodeDescriptor(value);
    else if (field === 2) frame.header = value;
    else if (field === 3) frame.appMetadata = value;
    else if (field === 1000) frame.body = value;
  }
  return frame;
}
