import { randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import { dirname, join, relative, sep } from 'node:path';
import { StorageError } from './errors.ts';

/** Bytes `[start, end)` of an object. */
export interface ByteRange {
  start: number;
  end: number;
}

/**
 * Where tables live: a flat namespace of immutable objects addressed by `/`-separated keys.
 * Both backends (a local directory, any S3-compatible server) implement exactly this.
 */
export interface ObjectStore {
  /** Names this store in cache keys and messages, e.g. `file:///var/quiver` or `s3://bucket/prefix`. */
  readonly id: string;
  /** How messages name an object: a path for files, an s3:// URL for S3. */
  describe(key: string): string;
  /** The object's bytes, or only `range` of them (a ranged read). Throws ERR_OBJECT_NOT_FOUND. */
  get(key: string, range?: ByteRange): Promise<Uint8Array>;
  /** The object's size in bytes, or null when it does not exist. */
  size(key: string): Promise<number | null>;
  /** Writes (or replaces) an object; readers see the old bytes or the new ones, never a mix. */
  put(key: string, bytes: Uint8Array): Promise<void>;
  /**
   * Writes an object only when no object has that key: true when this call created it, false when
   * it existed. Atomic, so of two concurrent callers exactly one gets true. Backends that cannot
   * guarantee this have `putIfAbsent` undefined and need another catalog (see catalog.ts).
   */
  putIfAbsent?(key: string, bytes: Uint8Array): Promise<boolean>;
  /** Keys under `prefix`, in lexicographic order. */
  list(prefix: string): Promise<string[]>;
  /** Removes objects; a missing key is not an error. */
  delete(keys: readonly string[]): Promise<void>;
  close?(): Promise<void>;
}

export function objectNotFound(store: ObjectStore, key: string, cause?: unknown): StorageError {
  return new StorageError('ERR_OBJECT_NOT_FOUND', `${store.describe(key)} does not exist`, cause === undefined ? undefined : { cause });
}

/**
 * Objects as files under a root directory (the embedded default: `<QUIVER_HOME>/tables`).
 * Writes go to a temporary file first and are renamed (put) or hard-linked (putIfAbsent) into
 * place, so a reader never sees a partly written object; link() fails with EEXIST when the key
 * exists, which makes putIfAbsent an atomic create on any POSIX filesystem.
 */
export class LocalObjectStore implements ObjectStore {
  readonly id: string;

  constructor(readonly root: string) {
    this.id = `file://${root}`;
  }

  describe(key: string): string {
    return join(this.root, ...key.split('/'));
  }

  private path(key: string): string {
    if (key.split('/').some((part) => part === '' || part === '.' || part === '..')) {
      throw new StorageError('ERR_OBJECT_STORE', `object key ${JSON.stringify(key)} is not a plain relative path`);
    }
    return join(this.root, ...key.split('/'));
  }

  async get(key: string, range?: ByteRange): Promise<Uint8Array> {
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(this.path(key), 'r');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw objectNotFound(this, key, error);
      throw error;
    }
    try {
      const size = (await handle.stat()).size;
      const start = Math.min(range?.start ?? 0, size);
      const end = Math.min(range?.end ?? size, size);
      const bytes = new Uint8Array(Math.max(0, end - start));
      let done = 0;
      while (done < bytes.length) {
        const { bytesRead } = await handle.read(bytes, done, bytes.length - done, start + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      return done === bytes.length ? bytes : bytes.subarray(0, done);
    } finally {
      await handle.close();
    }
  }

  async size(key: string): Promise<number | null> {
    try {
      return (await fs.stat(this.path(key))).size;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw error;
    }
  }

  async put(key: string, bytes: Uint8Array): Promise<void> {
    const target = this.path(key);
    const tmp = await this.writeTemp(target, bytes);
    await fs.rename(tmp, target);
  }

  async putIfAbsent(key: string, bytes: Uint8Array): Promise<boolean> {
    const target = this.path(key);
    const tmp = await this.writeTemp(target, bytes);
    try {
      await fs.link(tmp, target);
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw error;
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  private async writeTemp(target: string, bytes: Uint8Array): Promise<string> {
    await fs.mkdir(dirname(target), { recursive: true });
    const tmp = `${target}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
    const handle = await fs.open(tmp, constants.O_CREAT | constants.O_EXCL | constants.O_WRONLY, 0o644);
    try {
      await handle.writeFile(bytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    return tmp;
  }

  async list(prefix: string): Promise<string[]> {
    // Walk only the directory the prefix points into, not the whole root.
    const slash = prefix.lastIndexOf('/');
    const base = slash < 0 ? this.root : join(this.root, ...prefix.slice(0, slash).split('/'));
    const keys: string[] = [];
    const walk = async (dir: string): Promise<void> => {
      let entries;
      try {
        entries = await fs.readdir(dir, { withFileTypes: true });
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw error;
      }
      for (const entry of entries) {
        const full = join(dir, entry.name);
        if (entry.isDirectory()) await walk(full);
        else if (!entry.name.endsWith('.tmp')) {
          const key = relative(this.root, full).split(sep).join('/');
          if (key.startsWith(prefix)) keys.push(key);
        }
      }
    };
    await walk(base);
    return keys.sort();
  }

  async delete(keys: readonly string[]): Promise<void> {
    await Promise.all(keys.map((k) => fs.rm(this.path(k), { force: true })));
  }
}
