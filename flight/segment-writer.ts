/**
 * Lays received Flight frames into a shared-memory segment as a complete Arrow IPC stream,
 * which `readTableFromShm` maps like any other segment. The body copy into the mapping is the
 * only copy a receiver makes; when the size is not known up front the file grows by doubling
 * (tmpfs keeps its pages, so growing does not copy).
 */
import { type SegmentRef, mapWritableSegment, removeSegments, unmapSegments } from '../shm/index.ts';
import { FlightProtocolError } from './errors.ts';
import type { FlightDataFrame } from './frames.ts';
import { EOS_BYTES, MessageType, framedLength, readMessageHeader, writeEos, writeFramed } from './ipc.ts';

export interface SegmentWriterOptions {
  dir: string;
  id: string;
  /** Expected stream size; exact when known (no growth), else a first guess. */
  byteSize: number;
  poolMaxBytes?: number;
}

const MIN_CAPACITY = 64 * 1024;

export class SegmentWriter {
  private mapping: ArrayBuffer;
  private bytes: Uint8Array;
  private position = 0;
  private messages = 0;
  /** Rows of the record batches written. */
  rows = 0;
  /** Header and body bytes copied in from frames. */
  copiedBytes = 0;
  private closed = false;

  constructor(private readonly options: SegmentWriterOptions) {
    this.mapping = mapWritableSegment(options.id, Math.max(options.byteSize, EOS_BYTES), this.shmOptions());
    this.bytes = new Uint8Array(this.mapping);
  }

  private shmOptions() {
    return { dir: this.options.dir, ...(this.options.poolMaxBytes !== undefined ? { poolMaxBytes: this.options.poolMaxBytes } : {}) };
  }

  /** Appends one frame; frames with no IPC message (metadata only) are skipped. */
  append(frame: FlightDataFrame): void {
    if (frame.header.byteLength === 0) return;
    this.beginMessage(frame.header, frame.body.byteLength).set(frame.body);
  }

  /**
   * Lays out one message whose body is `bodyLength` bytes: writes its prefix and header, and
   * returns the place in the segment the body must be copied to (straight off the network).
   */
  beginMessage(header: Uint8Array, bodyLength: number): Uint8Array {
    const { type, bodyLength: expected, rows } = readMessageHeader(header);
    if (this.messages === 0 && type !== MessageType.schema) {
      throw new FlightProtocolError(`the first message of a Flight stream must be a Schema, got message type ${type}`);
    }
    if (bodyLength !== expected) {
      throw new FlightProtocolError(`a FlightData body has ${bodyLength} bytes, its header says ${expected}`);
    }
    const needed = this.position + framedLength(header.byteLength, bodyLength) + EOS_BYTES;
    if (needed > this.bytes.byteLength) this.grow(Math.max(needed, this.bytes.byteLength * 2, MIN_CAPACITY));
    const bodyAt = writeFramed(this.bytes, this.position, header, new Uint8Array(0));
    this.position = bodyAt + bodyLength;
    this.copiedBytes += header.byteLength + bodyLength;
    this.messages += 1;
    this.rows += rows;
    return this.bytes.subarray(bodyAt, this.position);
  }

  private grow(byteSize: number): void {
    unmapSegments([this.mapping]);
    this.mapping = mapWritableSegment(this.options.id, byteSize, { ...this.shmOptions(), grow: true });
    this.bytes = new Uint8Array(this.mapping);
  }

  /** Ends the stream and unmaps; the segment is then ready for readers. */
  finish(): SegmentRef {
    if (this.messages === 0) throw new FlightProtocolError('the Flight stream ended before its Schema message');
    this.position = writeEos(this.bytes, this.position);
    this.close();
    return { id: this.options.id, byteSize: this.position };
  }

  /** Unmaps and removes the partial segment. Safe to call after finish() or twice. */
  abort(): void {
    if (this.closed) return;
    this.close();
    removeSegments([this.options.id], { dir: this.options.dir });
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    unmapSegments([this.mapping]);
  }
}
