import type { Vector } from 'apache-arrow';

/** Options of {@link ColumnCache}. */
export interface ColumnCacheOptions {
  /** Bytes of decoded columns kept; the least recently used go first. @default QUIVER_SCAN_CACHE_BYTES, else 1 GiB */
  maxBytes?: number;
}

interface Entry {
  value: Vector | Uint8Array;
  bytes: number;
}

/**
 * The host's columnar, differential source cache: decoded column chunks (one column of one row
 * group of one data file) and data file footers. Keys name the data file, which is immutable and
 * never reused (a ULID in its name, its size in the key), so an entry can never be stale: a new
 * snapshot is made of new files, whose keys no older entry matches, and shares only files whose
 * bytes are the same. A scan needing one more column finds the others here and fetches only it.
 */
export class ColumnCache {
  readonly maxBytes: number;
  private readonly entries = new Map<string, Entry>();
  private used = 0;
  hits = 0;
  misses = 0;
  evictions = 0;

  constructor(options: ColumnCacheOptions = {}) {
    this.maxBytes = options.maxBytes ?? (Number(process.env.QUIVER_SCAN_CACHE_BYTES) || 1024 ** 3);
  }

  get bytes(): number {
    return this.used;
  }

  get size(): number {
    return this.entries.size;
  }

  get<T extends Vector | Uint8Array>(key: string): T | undefined {
    const entry = this.entries.get(key);
    if (!entry) {
      this.misses++;
      return undefined;
    }
    // Map order is recency order: re-inserting makes this the most recently used.
    this.entries.delete(key);
    this.entries.set(key, entry);
    this.hits++;
    return entry.value as T;
  }

  set(key: string, value: Vector | Uint8Array): void {
    const bytes = value instanceof Uint8Array ? value.byteLength : vectorBytes(value);
    const old = this.entries.get(key);
    if (old) {
      this.used -= old.bytes;
      this.entries.delete(key);
    }
    if (bytes > this.maxBytes) return;
    this.entries.set(key, { value, bytes });
    this.used += bytes;
    for (const [k, e] of this.entries) {
      if (this.used <= this.maxBytes) break;
      this.entries.delete(k);
      this.used -= e.bytes;
      this.evictions++;
    }
  }

  clear(): void {
    this.entries.clear();
    this.used = 0;
  }
}

function vectorBytes(vector: Vector): number {
  let total = 0;
  // Views, not their ArrayBuffers: columns read together share one IPC buffer, and each is
  // charged its own part of it.
  const seen = new Set<ArrayBufferView>();
  const visit = (data: Vector['data'][number]): void => {
    for (const buffer of [data.values, data.valueOffsets, data.nullBitmap, data.typeIds] as (ArrayBufferView | undefined)[]) {
      if (buffer && !seen.has(buffer)) {
        seen.add(buffer);
        total += buffer.byteLength;
      }
    }
    for (const child of data.children) visit(child);
    if (data.dictionary) for (const d of data.dictionary.data) visit(d);
  };
  for (const data of vector.data) visit(data);
  return total;
}

/** One cache per process, shared by every scan on this host (the executor runs scans in-process). */
export const hostCache = new ColumnCache();
