/**
 * Branch and tag pointers: the only mutable state of the catalog. Every move is one atomic
 * compare-and-swap, on the same primitive today's table commits use:
 *
 * - {@link ObjectStoreRefs}: pointer N of branch `dev` is `refs/branches/dev/<N, 12 digits>.json`,
 *   created with an atomic create-if-absent (link(2) locally, `If-None-Match: *` on S3). Of two
 *   writers that both read N, exactly one creates N+1. The head is the highest N listed.
 * - {@link KvRefs}: for S3 servers without conditional PUTs, the pointer is the NATS KV entry
 *   `<store hash>.refs.<kind>.<name>`, moved by `create` / `update` at the revision read.
 *
 * A deletion is a pointer to no commit, so a deleted name can be created again and its history
 * of moves stays readable.
 */
import { createHash } from 'node:crypto';
import type { KV } from '@nats-io/kv';
import { StorageError } from './errors.ts';
import { refPointer } from './metadata.ts';
import type { ObjectStore } from './object-store.ts';

export type RefKind = 'branch' | 'tag';

/** A pointer as read: the commit it names (null: absent or deleted) and proof of what was read. */
export interface RefHead {
  commit: string | null;
  /** The sequence number or KV revision read; 0 when the name was never used. Handed back to {@link RefStore.swap}. */
  token: number;
}

export interface RefStore {
  read(kind: RefKind, name: string): Promise<RefHead>;
  /** Points `name` at `commit` (null deletes) only if it is still at `expected`; false when someone moved it first. */
  swap(kind: RefKind, name: string, expected: RefHead, commit: string | null): Promise<boolean>;
  /** Every live (not deleted) name of that kind with its head, sorted by name. */
  list(kind: RefKind): Promise<{ name: string; head: RefHead }[]>;
}

/** Branch and tag names: `/`-separated segments of letters, digits, `_` and `-` (so `run/<runId>` works). */
export const REF_NAME_PATTERN = /^[A-Za-z0-9_-]{1,64}(\/[A-Za-z0-9_-]{1,64}){0,3}$/;

export function checkRefName(name: string, kind: RefKind): void {
  if (typeof name !== 'string' || !REF_NAME_PATTERN.test(name)) {
    throw new StorageError('ERR_REF_BAD_NAME', `${kind} name ${JSON.stringify(name)} must be up to four /-separated parts of letters, digits, _ or - (e.g. dev, run/01J...)`);
  }
}

const folder = (kind: RefKind) => (kind === 'branch' ? 'refs/branches/' : 'refs/tags/');
const SEQ_FILE = /^(\d{12})\.json$/;
const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));

function parsePointer(bytes: Uint8Array, where: string): string | null {
  try {
    return refPointer.parse(JSON.parse(new TextDecoder().decode(bytes))).commit;
  } catch (error) {
    throw new StorageError('ERR_CORRUPT_METADATA', `${where} is not a valid ref pointer: ${(error as Error).message}`, { cause: error });
  }
}

export class ObjectStoreRefs implements RefStore {
  constructor(private readonly objects: ObjectStore) {}

  async read(kind: RefKind, name: string): Promise<RefHead> {
    const prefix = `${folder(kind)}${name}/`;
    let best = 0;
    for (const key of await this.objects.list(prefix)) {
      const m = SEQ_FILE.exec(key.slice(prefix.length));
      if (m) best = Math.max(best, Number(m[1]));
    }
    if (best === 0) return { commit: null, token: 0 };
    const key = `${prefix}${String(best).padStart(12, '0')}.json`;
    return { commit: parsePointer(await this.objects.get(key), this.objects.describe(key)), token: best };
  }

  swap(kind: RefKind, name: string, expected: RefHead, commit: string | null): Promise<boolean> {
    const key = `${folder(kind)}${name}/${String(expected.token + 1).padStart(12, '0')}.json`;
    return this.objects.putIfAbsent!(key, encode({ commit }));
  }

  async list(kind: RefKind): Promise<{ name: string; head: RefHead }[]> {
    const last = new Map<string, number>();
    for (const key of await this.objects.list(folder(kind))) {
      const slash = key.lastIndexOf('/');
      const m = SEQ_FILE.exec(key.slice(slash + 1));
      if (!m) continue;
      const name = key.slice(folder(kind).length, slash);
      last.set(name, Math.max(last.get(name) ?? 0, Number(m[1])));
    }
    const found = await Promise.all(
      [...last].map(async ([name, token]) => {
        const key = `${folder(kind)}${name}/${String(token).padStart(12, '0')}.json`;
        return { name, head: { commit: parsePointer(await this.objects.get(key), this.objects.describe(key)), token } };
      }),
    );
    return found.filter((r) => r.head.commit !== null).sort((a, b) => (a.name < b.name ? -1 : 1));
  }
}

export class KvRefs implements RefStore {
  private readonly prefix: string;

  constructor(
    storeId: string,
    private readonly kv: KV,
  ) {
    // The same hash the per-table catalog uses: one bucket serves many stores.
    this.prefix = `${createHash('sha256').update(storeId).digest('hex').slice(0, 16)}.refs.`;
  }

  private key(kind: RefKind, name: string): string {
    return `${this.prefix}${kind}.${name}`;
  }

  async read(kind: RefKind, name: string): Promise<RefHead> {
    const entry = await this.kv.get(this.key(kind, name));
    if (!entry || entry.operation !== 'PUT' || entry.length === 0) return { commit: null, token: entry?.revision ?? 0 };
    return { commit: parsePointer(entry.value, `KV entry ${this.key(kind, name)}`), token: entry.revision };
  }

  async swap(kind: RefKind, name: string, expected: RefHead, commit: string | null): Promise<boolean> {
    const key = this.key(kind, name);
    try {
      if (expected.token === 0) await this.kv.create(key, encode({ commit }));
      else await this.kv.update(key, encode({ commit }), expected.token);
      return true;
    } catch (error) {
      // Only "someone else moved the pointer" is a lost race; anything else is trouble to report.
      const now = await this.read(kind, name);
      if (now.token !== expected.token) return false;
      throw new StorageError('ERR_OBJECT_STORE', `could not move ${kind} ${name} in the NATS KV catalog: ${(error as Error).message}`, { cause: error });
    }
  }

  async list(kind: RefKind): Promise<{ name: string; head: RefHead }[]> {
    const names: string[] = [];
    for await (const key of await this.kv.keys(`${this.prefix}${kind}.>`)) names.push(key.slice(`${this.prefix}${kind}.`.length));
    const found = await Promise.all(names.map(async (name) => ({ name, head: await this.read(kind, name) })));
    return found.filter((r) => r.head.commit !== null).sort((a, b) => (a.name < b.name ? -1 : 1));
  }
}
