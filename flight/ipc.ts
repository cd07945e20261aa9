/**
 * Arrow IPC messages, read and written by hand: a Flight frame is one IPC message (the
 * `Message` flatbuffer and its body), so a sender walks the stream already in a segment and a
 * receiver lays frames back into one, without decoding any record batch.
 *
 * Stream framing (Arrow columnar format, "Encapsulated message format"): 0xFFFFFFFF, an int32
 * metadata length (the flatbuffer plus padding to 8 bytes), the flatbuffer, the body
 * (`Message.bodyLength` bytes, 8-byte aligned); 0xFFFFFFFF 0x00000000 ends the stream.
 */
import { FlightProtocolError } from './errors.ts';

export const CONTINUATION = 0xffffffff;
export const EOS_BYTES = 8;

/** `MessageHeader` union tags of Message.fbs. */
export const MessageType = { none: 0, schema: 1, dictionaryBatch: 2, recordBatch: 3 } as const;

export interface IpcMessage {
  /** The `Message` flatbuffer (with any padding that followed it in the stream). */
  header: Uint8Array;
  body: Uint8Array;
  type: number;
  /** Rows of a record batch, else 0. */
  rows: number;
}

/** Offset of field `index` inside the flatbuffer table at `table`, or 0 when absent. */
function fieldOffset(view: DataView, table: number, index: number): number {
  const vtable = table - view.getInt32(table, true);
  const vtableLength = view.getUint16(vtable, true);
  const at = 4 + index * 2;
  return at < vtableLength ? view.getUint16(vtable + at, true) : 0;
}

/** Type, body length and (for a record batch) row count of a `Message` flatbuffer. */
export function readMessageHeader(header: Uint8Array): { type: number; bodyLength: number; rows: number } {
  try {
    const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
    const root = view.getUint32(0, true);
    const typeAt = fieldOffset(view, root, 1);
    const type = typeAt ? view.getUint8(root + typeAt) : MessageType.none;
    const bodyAt = fieldOffset(view, root, 3);
    const bodyLength = bodyAt ? Number(view.getBigInt64(root + bodyAt, true)) : 0;
    let rows = 0;
    const unionAt = fieldOffset(view, root, 2);
    if (type === MessageType.recordBatch && unionAt) {
      const batch = root + unionAt + view.getUint32(root + unionAt, true);
      const lengthAt = fieldOffset(view, batch, 0);
      rows = lengthAt ? Number(view.getBigInt64(batch + lengthAt, true)) : 0;
    }
    if (!Number.isSafeInteger(bodyLength) || bodyLength < 0) throw new RangeError(`body length ${bodyLength}`);
    return { type, bodyLength, rows };
  } catch (cause) {
    throw new FlightProtocolError(`data_header is not an Arrow IPC Message flatbuffer (${(cause as Error).message})`, { cause });
  }
}

/** The messages of one IPC stream, up to its end-of-stream marker. Yields views, copies nothing. */
export function* streamMessages(stream: Uint8Array): Generator<IpcMessage> {
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  let position = 0;
  while (position + 4 <= stream.byteLength) {
    let length = view.getInt32(position, true);
    let start = position + 4;
    if (length === -1) {
      if (position + 8 > stream.byteLength) break;
      length = view.getInt32(position + 4, true);
      start = position + 8;
    }
    if (length === 0) return;
    if (length < 0 || start + length > stream.byteLength) {
      throw new FlightProtocolError(`IPC stream: a message at byte ${position} claims ${length} bytes of metadata, past the end (${stream.byteLength})`);
    }
    const header = stream.subarray(start, start + length);
    const { type, bodyLength, rows } = readMessageHeader(header);
    const bodyEnd = start + length + bodyLength;
    if (bodyEnd > stream.byteLength) {
      throw new FlightProtocolError(`IPC stream: a message at byte ${position} has a ${bodyLength}-byte body, past the end (${stream.byteLength})`);
    }
    yield { header, body: stream.subarray(start + length, bodyEnd), type, rows };
    position = bodyEnd;
  }
}

const pad8 = (n: number) => (n + 7) & ~7;

/** Metadata length written in the prefix: the header padded so the body starts 8-byte aligned. */
export const paddedHeaderLength = (headerLength: number) => pad8(headerLength);

/** Bytes a message takes in a stream: prefix, padded header, body. */
export const framedLength = (headerLength: number, bodyLength: number) => 8 + paddedHeaderLength(headerLength) + bodyLength;

/**
 * Writes one message into `target` at `position` in stream framing and returns the new
 * position. The body is the one copy a receiver makes.
 */
export function writeFramed(target: Uint8Array, position: number, header: Uint8Array, body: Uint8Array): number {
  const view = new DataView(target.buffer, target.byteOffset, target.byteLength);
  const padded = paddedHeaderLength(header.byteLength);
  view.setUint32(position, CONTINUATION, true);
  view.setInt32(position + 4, padded, true);
  target.set(header, position + 8);
  target.fill(0, position + 8 + header.byteLength, position + 8 + padded);
  target.set(body, position + 8 + padded);
  return position + 8 + padded + body.byteLength;
}

export function writeEos(target: Uint8Array, position: number): number {
  const view = new DataView(target.buffer, target.byteOffset, target.byteLength);
  view.setUint32(position, CONTINUATION, true);
  view.setInt32(position + 4, 0, true);
  return position + EOS_BYTES;
}

/** A schema message in its IPC form (continuation, length, flatbuffer), as FlightInfo.schema and SchemaResult carry it. */
export function schemaBytes(schemaHeader: Uint8Array): Uint8Array {
  const out = new Uint8Array(framedLength(schemaHeader.byteLength, 0));
  writeFramed(out, 0, schemaHeader, new Uint8Array(0));
  return out;
}
