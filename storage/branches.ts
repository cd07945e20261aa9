/**
 * Branches and tags over the table catalog, Nessie-like.
 *
 * A catalog commit (`catalog/commits/<sha256>.json`) is an immutable map table → metadata file,
 * with its parent commit(s). A branch or tag is a pointer to one commit (refs.ts), so creating
 * one writes one small pointer and copies nothing, whatever the tables hold. A commit on a branch
 * writes the tables' new metadata files (unique names), then one new catalog commit, then moves
 * the branch pointer by compare-and-swap: several tables change at once or not at all.
 *
 * Merges are by table against the merge base (the nearest common ancestor commit): a table
 * changed on one side only takes that side; changed on both, it merges only when both sides
 * only appended since the base (the target gets one more snapshot with the source's new files);
 * anything else is a {@link MergeConflictError} and the target does not move.
 *
 * Stores from before branches have no `main` pointer: their per-table catalog (catalog.ts) is
 * read as `main` until the first write, which records it as `main`'s first commit.
 */
import { createHash } from 'node:crypto';
import { ulid } from 'ulid';
import { type Catalog, type CatalogHead, type TableChange, type TableHeads } from './catalog.ts';
import { MergeConflictError, RefNotFoundError, StorageError, TableConflictError } from './errors.ts';
import { catalogCommit, manifest as manifestSchema, type CatalogCommit, type CatalogTableEntry, type TableMetadata } from './metadata.ts';
import type { ObjectStore } from './object-store.ts';
import { checkRefName, type RefHead, type RefKind, type RefStore } from './refs.ts';
import { buildSnapshot, readTableMetadata, resolveSnapshot } from './tables.ts';

/** The branch every table lives on unless told otherwise. */
export const MAIN_BRANCH = 'main';
const COMMITS = 'catalog/commits/';
const COMMIT_ID = /^[0-9a-f]{64}$/;
/** Lost pointer races are retried this often before giving up (each retry re-reads the head). */
const MAX_ATTEMPTS = 200;
const CACHED_COMMITS = 4096;

/** A branch or tag, as listed. */
export interface RefInfo {
  name: string;
  kind: RefKind;
  commit: string;
  timestampMs: number;
  message: string;
  tables: number;
}

/** One table that differs between two refs; null where it does not exist. */
export interface TableDiff {
  table: string;
  a: { snapshotId: string | null; rows: number } | null;
  b: { snapshotId: string | null; rows: number } | null;
}

/** What a merge did. */
export interface MergeResult {
  kind: 'up-to-date' | 'fast-forward' | 'merge';
  /** The target's head after the merge. */
  commit: string;
  /** Tables the merge changed on the target. */
  tables: string[];
  /** Tables both sides appended to, merged as both appends. */
  appended: string[];
}

export interface VersionsOptions {
  /** @default Date.now */
  clock?: () => number;
}

/** The whole versioned catalog of one store: commits, branches, tags, merges. */
export class Versions {
  private readonly cache = new Map<string, CatalogCommit>();
  private readonly clock: () => number;

  constructor(
    readonly objects: ObjectStore,
    readonly refs: RefStore,
    /** The per-table catalog from before branches, read as `main` until its first commit. */
    readonly legacy: TableHeads | null,
    options: VersionsOptions = {},
  ) {
    this.clock = options.clock ?? Date.now;
  }

  /** A catalog commit by id; commits are immutable, so each is read once per process. */
  async loadCommit(id: string): Promise<CatalogCommit> {
    const cached = this.cache.get(id);
    if (cached) return cached;
    const key = `${COMMITS}${id}.json`;
    let parsed: CatalogCommit;
    try {
      parsed = catalogCommit.parse(JSON.parse(new TextDecoder().decode(await this.objects.get(key))));
    } catch (error) {
      if (error instanceof StorageError && error.code === 'ERR_OBJECT_NOT_FOUND') throw error;
      throw new StorageError('ERR_CORRUPT_METADATA', `${this.objects.describe(key)} is not a valid catalog commit: ${(error as Error).message}`, { cause: error });
    }
    if (this.cache.size >= CACHED_COMMITS) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(id, parsed);
    return parsed;
  }

  private async writeCommit(parents: string[], tables: Record<string, CatalogTableEntry>, message: string): Promise<string> {
    const generation = 1 + Math.max(0, ...(await Promise.all(parents.map(async (p) => (await this.loadCommit(p)).generation))));
    const commit: CatalogCommit = { formatVersion: 1, parents, generation, timestampMs: this.clock(), message, tables };
    const bytes = new TextEncoder().encode(JSON.stringify(commit));
    const id = createHash('sha256').update(bytes).digest('hex');
    // Content-addressed: writing the same bytes twice is harmless, so a plain PUT is enough.
    await this.objects.put(`${COMMITS}${id}.json`, bytes);
    this.cache.set(id, commit);
    return id;
  }

  /**
   * The branch's pointer. `main` of a store from before branches has none: with `bootstrap`,
   * its per-table catalog is recorded as main's first commit (once; racing writers agree).
   */
  private async branchHead(name: string, bootstrap: boolean): Promise<RefHead> {
    const head = await this.refs.read('branch', name);
    if (head.commit !== null || head.token !== 0 || name !== MAIN_BRANCH || !bootstrap) return head;
    const tables = await this.legacyTables();
    const id = await this.writeCommit([], tables, 'main: tables from before branches');
    await this.refs.swap('branch', MAIN_BRANCH, head, id);
    return this.refs.read('branch', name);
  }

  private async legacyTables(): Promise<Record<string, CatalogTableEntry>> {
    const tables: Record<string, CatalogTableEntry> = {};
    if (!this.legacy) return tables;
    for (const table of await this.legacy.list()) {
      const head = await this.legacy.head(table);
      if (head) tables[table] = entryOf(head.metadataKey, await readTableMetadata(this.objects, head.metadataKey));
    }
    return tables;
  }

  /**
   * The tables at a ref: a branch, else a tag, else a catalog commit id. Unbootstrapped `main`
   * reads the per-table catalog without writing anything.
   */
  async tablesAt(ref: string): Promise<Record<string, CatalogTableEntry>> {
    const id = await this.resolve(ref, { legacyMain: true });
    return id === null ? this.legacyTables() : (await this.loadCommit(id)).tables;
  }

  /** One table's entry at a ref (cheaper than {@link tablesAt} for unbootstrapped main). */
  async tableAt(ref: string, table: string): Promise<CatalogHead | null> {
    const id = await this.resolve(ref, { legacyMain: true });
    if (id === null) return this.legacy ? this.legacy.head(table) : null;
    const entry = (await this.loadCommit(id)).tables[table];
    return entry ? { version: entry.version, metadataKey: entry.metadataKey } : null;
  }

  /**
   * The commit a ref names. With `legacyMain`, null means "main from before branches, not yet
   * recorded": read the per-table catalog.
   */
  async resolve(ref: string, options: { legacyMain?: boolean } = {}): Promise<string | null> {
    if (COMMIT_ID.test(ref)) {
      await this.loadCommit(ref).catch(async (error) => {
        if (error instanceof StorageError && error.code === 'ERR_OBJECT_NOT_FOUND') throw new RefNotFoundError(ref, await this.refNames());
        throw error;
      });
      return ref;
    }
    const branch = await this.refs.read('branch', ref);
    if (branch.commit) return branch.commit;
    if (ref === MAIN_BRANCH && branch.token === 0) {
      if (options.legacyMain) return null;
      return (await this.branchHead(MAIN_BRANCH, true)).commit!;
    }
    const tag = await this.refs.read('tag', ref);
    if (tag.commit) return tag.commit;
    throw new RefNotFoundError(ref, await this.refNames());
  }

  private async refNames(): Promise<string[]> {
    const [branches, tags] = await Promise.all([this.refs.list('branch'), this.refs.list('tag')]);
    const names = [...branches.map((b) => b.name), ...tags.map((t) => `${t.name} (tag)`)];
    return names.includes(MAIN_BRANCH) ? names : [MAIN_BRANCH, ...names];
  }

  /**
   * Moves `branch` to a new commit with these tables changed, only if each is still at its
   * base. A lost race with a commit to other tables is retried; one to these tables is a
   * {@link TableConflictError}.
   */
  async commitTables(branch: string, changes: readonly { table: string; base: CatalogHead | null; entry: CatalogTableEntry }[], message: string): Promise<string> {
    for (let attempt = 0; ; attempt++) {
      const head = await this.branchHead(branch, true);
      if (head.commit === null) throw new RefNotFoundError(branch, await this.refNames());
      const current = await this.loadCommit(head.commit);
      for (const change of changes) {
        if ((current.tables[change.table]?.metadataKey ?? null) !== (change.base?.metadataKey ?? null)) throw new TableConflictError(change.table, change.base?.version ?? 0);
      }
      const tables = { ...current.tables };
      for (const change of changes) tables[change.table] = change.entry;
      const id = await this.writeCommit([head.commit], tables, message);
      if (await this.refs.swap('branch', branch, head, id)) return id;
      await backoff(attempt, `commit to branch ${branch}`);
    }
  }

  /** Creates a branch at what `from` points to now: one pointer write, no data copied. */
  async createBranch(name: string, from: string = MAIN_BRANCH): Promise<string> {
    checkRefName(name, 'branch');
    const commit = await this.resolve(from);
    if (commit === null) throw new RefNotFoundError(from, await this.refNames());
    if ((await this.refs.read('tag', name)).commit) throw new StorageError('ERR_REF_EXISTS', `a tag is named "${name}": give the branch another name`);
    const head = await this.refs.read('branch', name);
    if (head.commit !== null || (name === MAIN_BRANCH && head.token === 0)) throw new StorageError('ERR_REF_EXISTS', `branch "${name}" exists already (delete it first with \`quiver branch delete ${name}\`)`);
    if (!(await this.refs.swap('branch', name, head, commit))) throw new StorageError('ERR_REF_EXISTS', `branch "${name}" was created by someone else at the same time`);
    return commit;
  }

  /** Deletes a branch pointer; its commits and files stay until expired and vacuumed. */
  async deleteBranch(name: string): Promise<void> {
    if (name === MAIN_BRANCH) throw new StorageError('ERR_REF_BAD_NAME', 'branch main cannot be deleted');
    await this.deleteRef('branch', name);
  }

  /** Creates a tag: an immutable name for what `at` points to now. */
  async createTag(name: string, at: string = MAIN_BRANCH): Promise<string> {
    checkRefName(name, 'tag');
    const commit = await this.resolve(at);
    if (commit === null) throw new RefNotFoundError(at, await this.refNames());
    if ((await this.refs.read('branch', name)).commit || name === MAIN_BRANCH) throw new StorageError('ERR_REF_EXISTS', `a branch is named "${name}": give the tag another name`);
    const head = await this.refs.read('tag', name);
    if (head.commit !== null) throw new StorageError('ERR_REF_EXISTS', `tag "${name}" exists already; tags never move (delete it first with \`quiver tag delete ${name}\`)`);
    if (!(await this.refs.swap('tag', name, head, commit))) throw new StorageError('ERR_REF_EXISTS', `tag "${name}" was created by someone else at the same time`);
    return commit;
  }

  async deleteTag(name: string): Promise<void> {
    await this.deleteRef('tag', name);
  }

  private async deleteRef(kind: RefKind, name: string): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const head = await this.refs.read(kind, name);
      if (head.commit === null) throw new RefNotFoundError(name, await this.refNames());
      if (await this.refs.swap(kind, name, head, null)) return;
      await backoff(attempt, `delete ${kind} ${name}`);
    }
  }

  /** Every branch and tag (main included, even before its first commit). */
  async list(): Promise<RefInfo[]> {
    const [branches, tags] = await Promise.all([this.refs.list('branch'), this.refs.list('tag')]);
    const infos: RefInfo[] = [];
    if (!branches.some((b) => b.name === MAIN_BRANCH)) {
      const tables = await this.legacyTables();
      infos.push({ name: MAIN_BRANCH, kind: 'branch', commit: '', timestampMs: 0, message: 'tables from before branches', tables: Object.keys(tables).length });
    }
    for (const [kind, refs] of [['branch', branches], ['tag', tags]] as const) {
      for (const r of refs) {
        const c = await this.loadCommit(r.head.commit!);
        infos.push({ name: r.name, kind, commit: r.head.commit!, timestampMs: c.timestampMs, message: c.message, tables: Object.keys(c.tables).length });
      }
    }
    return infos;
  }

  /** Tables whose current snapshot differs between two refs, with row counts. */
  async diff(a: string, b: string): Promise<TableDiff[]> {
    const [ta, tb] = await Promise.all([this.tablesAt(a), this.tablesAt(b)]);
    const names = [...new Set([...Object.keys(ta), ...Object.keys(tb)])].sort();
    const side = (e: CatalogTableEntry | undefined) => (e ? { snapshotId: e.snapshotId, rows: e.rows } : null);
    return names.filter((n) => !sameTable(ta[n], tb[n])).map((table) => ({ table, a: side(ta[table]), b: side(tb[table]) }));
  }

  /** True when commit `ancestor` is `descendant` or one of its ancestors. */
  async isAncestor(ancestor: string, descendant: string): Promise<boolean> {
    const floor = (await this.loadCommit(ancestor)).generation;
    const seen = new Set<string>();
    const stack = [descendant];
    while (stack.length > 0) {
      const id = stack.pop()!;
      if (id === ancestor) return true;
      if (seen.has(id)) continue;
      seen.add(id);
      const c = await this.loadCommit(id);
      // Generations only grow from parent to child: nothing below the ancestor's can reach it.
      if (c.generation <= floor) continue;
      stack.push(...c.parents);
    }
    return false;
  }

  /** The nearest common ancestor of two commits, or null when they share none. */
  async mergeBase(a: string, b: string): Promise<string | null> {
    // Walk both histories newest generation first; the first commit reached from both sides is
    // the nearest common ancestor (every child of a commit is visited before it).
    const flags = new Map<string, number>([
      [a, 1],
      [b, (a === b ? 1 : 0) | 2],
    ]);
    const queue: { id: string; generation: number }[] = [];
    const push = async (id: string) => queue.push({ id, generation: (await this.loadCommit(id)).generation });
    await push(a);
    if (a !== b) await push(b);
    while (queue.length > 0) {
      queue.sort((x, y) => x.generation - y.generation);
      const { id } = queue.pop()!;
      const f = flags.get(id)!;
      if (f === 3) return id;
      for (const parent of (await this.loadCommit(id)).parents) {
        const had = flags.get(parent);
        flags.set(parent, (had ?? 0) | f);
        if (had === undefined) await push(parent);
      }
    }
    return null;
  }

  /**
   * Merges `source` (a branch, tag or commit) into the branch `into`, atomically: a fast-forward
   * when `into` has not moved since `source` left it, else a three-way merge by table. Throws
   * {@link MergeConflictError} (nothing changed) when both changed a table other than by appends.
   */
  async merge(source: string, into: string = MAIN_BRANCH, message?: string): Promise<MergeResult> {
    for (let attempt = 0; ; attempt++) {
      const sourceId = await this.resolve(source);
      const head = await this.branchHead(into, true);
      if (head.commit === null) throw new RefNotFoundError(into, await this.refNames());
      const targetId = head.commit;
      if (sourceId === null) throw new RefNotFoundError(source, await this.refNames());
      if (sourceId === targetId || (await this.isAncestor(sourceId, targetId))) return { kind: 'up-to-date', commit: targetId, tables: [], appended: [] };
      let next: string;
      let result: Omit<MergeResult, 'commit'>;
      const written: string[] = [];
      if (await this.isAncestor(targetId, sourceId)) {
        const changed = await this.diff(targetId, sourceId);
        next = sourceId;
        result = { kind: 'fast-forward', tables: changed.map((d) => d.table), appended: [] };
      } else {
        const baseId = await this.mergeBase(targetId, sourceId);
        const [base, target, src] = await Promise.all([baseId ? this.loadCommit(baseId) : null, this.loadCommit(targetId), this.loadCommit(sourceId)]);
        const baseTables = base?.tables ?? {};
        const tables = { ...target.tables };
        const changedHere: string[] = [];
        const appended: string[] = [];
        const conflicts: string[] = [];
        const bothAppended: string[] = [];
        for (const table of Object.keys({ ...baseTables, ...src.tables }).sort()) {
          const b = baseTables[table];
          const s = src.tables[table];
          const t = target.tables[table];
          if (sameTable(b, s) || sameTable(s, t)) continue;
          if (sameTable(b, t)) {
            if (s) tables[table] = s;
            else delete tables[table];
            changedHere.push(table);
          } else bothAppended.push(table);
        }
        const merged = new Map<string, TableMetadata>();
        for (const table of bothAppended) {
          const m = await this.mergeAppends(table, baseTables[table], target.tables[table], src.tables[table]);
          if (m) merged.set(table, m);
          else conflicts.push(table);
        }
        if (conflicts.length > 0) throw new MergeConflictError(source, into, conflicts);
        for (const [table, metadata] of merged) {
          const key = metadataKeyFor(table, metadata.version);
          await this.objects.put(key, encodeJson(metadata));
          written.push(key);
          tables[table] = entryOf(key, metadata);
          changedHere.push(table);
          appended.push(table);
        }
        next = await this.writeCommit([targetId, sourceId], tables, message ?? `merge ${source} into ${into}`);
        result = { kind: 'merge', tables: changedHere.sort(), appended };
      }
      if (await this.refs.swap('branch', into, head, next)) return { ...result, commit: next };
      // Lost to another commit on the target: what was written for this attempt is unreferenced.
      await this.objects.delete(written);
      await backoff(attempt, `merge ${source} into ${into}`);
    }
  }

  /**
   * The target's table plus the source's appended files, when both sides only appended to the
   * base's snapshot with its schema; null when that is not so (a conflict).
   */
  private async mergeAppends(table: string, base: CatalogTableEntry | undefined, target: CatalogTableEntry | undefined, source: CatalogTableEntry | undefined): Promise<TableMetadata | null> {
    if (!target || !source || (base && !base.snapshotId)) return null;
    const [t, s] = await Promise.all([target, source].map((e) => readTableMetadata(this.objects, e.metadataKey)));
    const b = base ? await readTableMetadata(this.objects, base.metadataKey) : null;
    // Both created the table since the base (two runs appending to a new table): appends to
    // nothing, so they merge when they agree on the columns.
    if (b ? !onlyAppended(b, t!) || !onlyAppended(b, s!) : !createdByAppends(t!, s!)) return null;
    const sourceSnapshot = resolveSnapshot(s!)!;
    const readFiles = async (manifestKey: string) => manifestSchema.parse(JSON.parse(new TextDecoder().decode(await this.objects.get(manifestKey)))).dataFiles;
    const baseSnapshot = b ? resolveSnapshot(b) : null;
    const baseFiles = new Set(baseSnapshot ? (await readFiles(baseSnapshot.manifest)).map((f) => f.path) : []);
    const added = (await readFiles(sourceSnapshot.manifest)).filter((f) => !baseFiles.has(f.path));
    const schema = t!.schemas.find((x) => x.schemaId === t!.currentSchemaId)!;
    const { metadata } = await buildSnapshot(this.objects, table, t!, { fields: schema.fields, arrowSchema: () => schema.arrowSchema, files: added }, 'append', this.clock());
    return metadata;
  }
}

/** True when `side` has the base's current snapshot and only appends after it, in the same schema. */
function onlyAppended(base: TableMetadata, side: TableMetadata): boolean {
  if (base.tableUuid !== side.tableUuid || base.currentSnapshotId === null) return false;
  const at = side.snapshots.findIndex((s) => s.snapshotId === base.currentSnapshotId);
  if (at < 0) return false;
  const baseSchema = side.snapshots[at]!.schemaId;
  return side.snapshots.slice(at + 1).every((s) => s.operation === 'append' && s.schemaId === baseSchema);
}

/** Two tables that have only ever been appended to, in one schema (the same columns and types). */
function createdByAppends(a: TableMetadata, b: TableMetadata): boolean {
  const fields = (m: TableMetadata) => JSON.stringify(m.schemas.find((x) => x.schemaId === m.currentSchemaId)!.fields.map((f) => [f.name, f.type]));
  return [a, b].every((m) => m.schemas.length === 1 && m.snapshots.every((x) => x.operation === 'append')) && fields(a) === fields(b);
}

/** Same data: a rewrite that keeps the current snapshot (an expiry) is no change. */
function sameTable(a: CatalogTableEntry | undefined, b: CatalogTableEntry | undefined): boolean {
  if (!a || !b) return a === b;
  return a.metadataKey === b.metadataKey || (a.snapshotId !== null && a.snapshotId === b.snapshotId);
}

export function entryOf(metadataKey: string, metadata: TableMetadata): CatalogTableEntry {
  const current = resolveSnapshot(metadata);
  return { metadataKey, version: metadata.version, snapshotId: metadata.currentSnapshotId, rows: current?.summary.totalRows ?? 0 };
}

/** Metadata files get unique names: two branches may each make version N of a table. */
export const metadataKeyFor = (table: string, version: number) => `tables/${table}/metadata/v${version}-${ulid()}.json`;

const encodeJson = (value: unknown) => new TextEncoder().encode(JSON.stringify(value, null, 1));

async function backoff(attempt: number, what: string): Promise<void> {
  if (attempt + 1 >= MAX_ATTEMPTS) throw new StorageError('ERR_REF_CONFLICT', `${what}: lost ${MAX_ATTEMPTS} races for the branch pointer in a row; try again`);
  // Jittered, growing to ~50 ms: racing writers spread out instead of colliding again.
  await new Promise((resolve) => setTimeout(resolve, Math.random() * Math.min(50, 2 + attempt * 5)));
}

/** The catalog of one ref: what {@link TableStore.catalog} is. */
export class BranchCatalog implements Catalog {
  constructor(
    readonly versions: Versions,
    readonly ref: string = MAIN_BRANCH,
  ) {}

  at(ref: string): BranchCatalog {
    return new BranchCatalog(this.versions, ref);
  }

  head(table: string): Promise<CatalogHead | null> {
    return this.versions.tableAt(this.ref, table);
  }

  async list(): Promise<string[]> {
    return Object.keys(await this.versions.tablesAt(this.ref)).sort();
  }

  async commit(changes: readonly TableChange[], message = 'commit'): Promise<CatalogHead[]> {
    if (COMMIT_ID.test(this.ref) || (await this.versions.refs.read('tag', this.ref)).commit) {
      throw new StorageError('ERR_REF_BAD_NAME', `cannot write to ${this.ref}: it is a tag or a commit, which never move; write to a branch`);
    }
    const written: string[] = [];
    try {
      const entries = [];
      for (const change of changes) {
        const key = metadataKeyFor(change.table, change.metadata.version);
        await this.versions.objects.put(key, encodeJson(change.metadata));
        written.push(key);
        entries.push({ table: change.table, base: change.base, entry: entryOf(key, change.metadata) });
      }
      await this.versions.commitTables(this.ref, entries, message);
      return entries.map((e) => ({ version: e.entry.version, metadataKey: e.entry.metadataKey }));
    } catch (error) {
      await this.versions.objects.delete(written);
      throw error;
    }
  }
}
