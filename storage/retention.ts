/**
 * Retention: `expireSnapshots` drops old snapshots from tables' metadata on every branch, and
 * `vacuumTable` removes the files that no snapshot of any branch or tag refers to any more.
 *
 * What keeps a file: being listed by a snapshot in the metadata a branch or a tag points to (a
 * run's temporary branch `run/<id>` is a branch), or being younger than the vacuum's grace
 * period (a running run may have staged it and not committed yet). A run pins the snapshot
 * current when it is submitted; expiry only drops snapshots that stopped being current longer
 * ago than `olderThanMs`, so a run younger than that still finds its snapshot.
 */
import { decodeTime } from 'ulid';
import { TableNotFoundError } from './errors.ts';
import { manifest as manifestSchema, type CatalogTableEntry, type TableMetadata } from './metadata.ts';
import { checkTableName, readTableMetadata, type TableStore } from './tables.ts';

/** Options of {@link expireSnapshots}. */
export interface ExpireOptions {
  /** Only these tables. @default every table */
  tables?: readonly string[];
  /** A snapshot is dropped only once it stopped being current longer ago than this. @default 7 days */
  olderThanMs?: number;
  /** The newest `keep` snapshots of each table stay whatever their age. @default 1 */
  keep?: number;
  /** @default Date.now() */
  now?: number;
}

export interface ExpireResult {
  /** Per branch and table, the snapshots dropped. */
  expired: { branch: string; table: string; snapshots: string[] }[];
}

export const DEFAULT_EXPIRE_MS = 7 * 24 * 3_600_000;

/**
 * Drops old snapshots from the metadata of every table on every branch: never a table's current
 * snapshot on any branch or tag, never one of the newest `keep`. Their files stay until
 * {@link vacuumTable}. Tags never move, so the snapshots their metadata lists stay readable.
 */
export async function expireSnapshots(store: TableStore, options: ExpireOptions = {}): Promise<ExpireResult> {
  const keep = Math.max(1, options.keep ?? 1);
  const cutoff = (options.now ?? Date.now()) - (options.olderThanMs ?? DEFAULT_EXPIRE_MS);
  const versions = store.catalog.versions;
  const refs = await versions.list();
  // The current snapshots of every ref: never dropped from anyone's metadata.
  const pinned = new Set<string>();
  const states = new Map<string, Record<string, CatalogTableEntry>>();
  for (const ref of refs) {
    const tables = await versions.tablesAt(ref.name);
    states.set(ref.name, tables);
    for (const entry of Object.values(tables)) if (entry.snapshotId) pinned.add(entry.snapshotId);
  }
  const expired: ExpireResult['expired'] = [];
  for (const ref of refs.filter((r) => r.kind === 'branch')) {
    const tables = states.get(ref.name)!;
    const changes = [];
    for (const [table, entry] of Object.entries(tables)) {
      if (options.tables && !options.tables.includes(table)) continue;
      const metadata = await readTableMetadata(store.objects, entry.metadataKey);
      const drop = new Set<string>();
      metadata.snapshots.forEach((s, i) => {
        const supersededAt = metadata.snapshots[i + 1]?.timestampMs;
        const newest = i >= metadata.snapshots.length - keep;
        if (supersededAt !== undefined && supersededAt <= cutoff && !newest && !pinned.has(s.snapshotId) && s.snapshotId !== metadata.currentSnapshotId) drop.add(s.snapshotId);
      });
      if (drop.size === 0) continue;
      const next: TableMetadata = { ...metadata, version: metadata.version + 1, snapshots: metadata.snapshots.filter((s) => !drop.has(s.snapshotId)) };
      changes.push({ table, base: { version: entry.version, metadataKey: entry.metadataKey }, metadata: next });
      expired.push({ branch: ref.name, table, snapshots: [...drop] });
    }
    if (changes.length > 0) await store.catalog.at(ref.name).commit(changes, `expire snapshots of ${changes.map((c) => c.table).join(', ')}`);
  }
  return { expired };
}

/** Options of {@link vacuumTable}. */
export interface VacuumOptions {
  /**
   * Only files written longer ago than this are removed: younger ones may be staged by a run
   * still going, whose commit is yet to come. @default 3_600_000 (one hour)
   */
  olderThanMs?: number;
  /** @default Date.now() */
  now?: number;
}

/**
 * Removes the table's data files and manifests that no snapshot of any branch or tag refers to:
 * what failed runs staged and never committed, what losing writers left, what expired snapshots
 * alone held. File names carry their creation time (ULIDs), so nothing younger than
 * `olderThanMs` goes.
 */
export async function vacuumTable(store: TableStore, name: string, options: VacuumOptions = {}): Promise<{ removed: string[]; bytes: number }> {
  checkTableName(name);
  const versions = store.catalog.versions;
  const cutoff = (options.now ?? Date.now()) - (options.olderThanMs ?? 3_600_000);
  const metadataKeys = new Set<string>();
  const refs = await versions.list();
  for (const ref of refs) {
    const entry = (await versions.tablesAt(ref.name))[name];
    if (entry) metadataKeys.add(entry.metadataKey);
  }
  if (metadataKeys.size === 0 && !(await store.catalog.head(name))) {
    throw new TableNotFoundError(name, await store.catalog.list());
  }
  const referenced = new Set<string>();
  for (const key of metadataKeys) {
    for (const snapshot of (await readTableMetadata(store.objects, key)).snapshots) {
      if (referenced.has(snapshot.manifest)) continue;
      referenced.add(snapshot.manifest);
      const manifest = manifestSchema.parse(JSON.parse(new TextDecoder().decode(await store.objects.get(snapshot.manifest))));
      for (const file of manifest.dataFiles) referenced.add(file.path);
    }
  }
  const candidates = [...(await store.objects.list(`tables/${name}/data/`)), ...(await store.objects.list(`tables/${name}/metadata/snap-`))];
  const removed: string[] = [];
  let bytes = 0;
  for (const key of candidates) {
    if (referenced.has(key)) continue;
    const id = /([0-9A-HJKMNP-TV-Z]{26})(?:\.manifest\.json|\.parquet)$/.exec(key)?.[1];
    if (!id || decodeTime(id) > cutoff) continue;
    bytes += (await store.objects.size(key)) ?? 0;
    removed.push(key);
  }
  await store.objects.delete(removed);
  return { removed, bytes };
}

