import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Int64, Table, Utf8, tableFromArrays, vectorFromArray } from 'apache-arrow';
import { ulid } from 'ulid';
import { CorruptDataFileError, LocalObjectStore, dataFileLayout, decodeParquet, encodeParquet, openTableStore, scanTable, writeTable, type OpenedTableStore } from '../storage/index.ts';
import { compactRowGroupFile, parseFooter } from '../storage/parquet-footer.ts';
import { ShmUnsafePathError, mapSegment, readTableFromShm, removeDir, unmapSegments, writeTableToShm } from '../shm/index.ts';
import { TEST_SHM_ROOT } from './helpers.ts';

const dirs: string[] = [];
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(dir);
  return dir;
}

/** A Parquet file whose FileMetaData is `metadata` (Thrift compact bytes): magic, nothing, footer. */
function parquetWithFooter(metadata: number[]): Uint8Array {
  const magic = [0x50, 0x41, 0x52, 0x31];
  const length = Buffer.alloc(4);
  length.writeUInt32LE(metadata.length);
  return Uint8Array.from([...magic, ...metadata, ...length, ...magic]);
}

/** Unsigned LEB128, as Thrift compact writes sizes. */
function varint(n: bigint): number[] {
  const out: number[] = [];
  while (n >= 0x80n) {
    out.push(Number(n & 0x7fn) | 0x80);
    n >>= 7n;
  }
  out.push(Number(n));
  return out;
}

const CRAFTED: Record<string, { metadata: number[]; reason: RegExp }> = {
  // Field 1 as a map<bool, bool> of 2^62 entries: booleans in a map take a byte each, so a reader
  // that takes them as free (as in struct fields) loops for ever without reading anything.
  'a bool/bool map of 2^62 entries': { metadata: [0x1b, ...varint(2n ** 62n), 0x11, 1, 1, 0], reason: /map .* claims 4611686018427387904 elements, but only \d+ bytes follow/ },
  'a list of 2^40 structs': { metadata: [0x19, 0xfc, ...varint(2n ** 40n), 0, 0, 0], reason: /list .* claims 1099511627776 elements, but only \d+ bytes follow/ },
  'a string of 2^31 bytes': { metadata: [0x18, ...varint(2n ** 31n), 0x41, 0], reason: /binary field .* claims 2147483648 bytes/ },
  'structs nested 100,000 deep': { metadata: [...Array(100_000).fill(0x1c), 0], reason: /nest more than \d+ deep/ },
  'a map of an unknown element type': { metadata: [0x1b, 2, 0xdd, 1, 1, 1, 1, 0], reason: /unknown Thrift element type 13/ },
};

describe('a crafted Parquet footer', () => {
  for (const [what, { metadata, reason }] of Object.entries(CRAFTED)) {
    it(`with ${what} fails at once, naming the file`, { timeout: 10_000 }, async () => {
      const bytes = parquetWithFooter(metadata);
      // Imports read whole files.
      await assert.rejects(decodeParquet(bytes, 'upload/crafted.parquet'), (e: Error) => {
        assert.ok(e instanceof CorruptDataFileError, String(e));
        assert.equal(e.code, 'ERR_CORRUPT_DATA_FILE');
        assert.match(e.message, /^data file upload\/crafted\.parquet is not valid Parquet: /);
        assert.match(e.message, reason);
        return true;
      });
      // Scans read footers through the object store.
      const root = tempDir('quiver-crafted-');
      mkdirSync(join(root, 'tables'), { recursive: true });
      writeFileSync(join(root, 'tables', 'crafted.parquet'), bytes);
      await assert.rejects(dataFileLayout(new LocalObjectStore(root), 'tables/crafted.parquet'), (e: Error) => {
        assert.ok(e instanceof CorruptDataFileError, String(e));
        assert.ok(e.message.includes(join(root, 'tables', 'crafted.parquet')), e.message);
        assert.match(e.message, reason);
        return true;
      });
    });
  }
});

describe('statistics and filters against real Parquet files (parquet-wasm)', () => {
  let opened: OpenedTableStore;
  const open = async () => (opened ??= await openTableStore({ kind: 'local', root: tempDir('quiver-stats-') }));

  it('compares strings in UTF-8 byte order, as Parquet statistics are written', async () => {
    const store = await open();
    // Row group 0 holds U+FF5E and U+1F600: in byte order (EF.. < F0..) its min is '～' and its
    // max '😀'; in UTF-16 order '😀' (D83D ..) sorts first, and a filter would skip the group.
    await writeTable(store, 'strings', new Table({ s: vectorFromArray(['～', '😀', 'a', 'b'], new Utf8()) }), { rowGroupRows: 2 });

    const equal = await scanTable(store, 'strings', { filter: "s = '😀'", cache: null });
    assert.deepEqual([...equal.table.getChild('s')!], ['😀']);
    assert.equal(equal.stats.rowGroupsSkipped, 1, 'the group of a and b is skipped, not the one holding the match');

    const above = await scanTable(store, 'strings', { filter: "s > '～'", cache: null });
    assert.deepEqual([...above.table.getChild('s')!], ['😀'], 'rows compare in byte order too');
    const below = await scanTable(store, 'strings', { filter: "s < '😀'", cache: null });
    assert.deepEqual([...below.table.getChild('s')!], ['～', 'a', 'b']);
    const between = await scanTable(store, 'strings', { filter: "s BETWEEN 'b' AND '～'", cache: null });
    assert.deepEqual([...between.table.getChild('s')!], ['～', 'b']);
  });

  it('ignores the legacy (signed-order) min/max of unsigned columns, and keeps them for signed ones', async () => {
    // 3,000,000,000 is negative as a signed int32: a writer of legacy statistics calls it the minimum.
    const bytes = await encodeParquet(tableFromArrays({ u: Uint32Array.from([1, 3_000_000_000]), i: Int32Array.from([-5, 7]) }));
    const footer = parseFooter(bytes);
    const int32 = (n: number) => new Uint8Array(Int32Array.of(n | 0).buffer);
    // The same file with only legacy statistics (Statistics 1 max, 2 min; 5 and 6 removed), as old writers left them.
    type Struct = { get(id: number): unknown; set(id: number, type: number, value: unknown): Struct; delete(id: number): Struct };
    const chunks = (footer.raw.get(4) as Struct[])[0]!.get(1) as Struct[];
    const legacy: Record<string, [number, number]> = { u: [3_000_000_000, 1], i: [-5, 7] };
    footer.rowGroups[0]!.columns.forEach((info, index) => {
      const stats = ((chunks[index]!.get(3) as Struct).get(12) as Struct).delete(5).delete(6);
      stats.set(2, 8, int32(legacy[info.column]![0])).set(1, 8, int32(legacy[info.column]![1]));
    });
    const data = new Map(footer.rowGroups[0]!.columns.map((c, index) => [index, bytes.subarray(c.start, c.start + c.length)]));
    const rewritten = parseFooter(compactRowGroupFile(footer, 0, new Set(['u', 'i']), data, (schema) => schema));
    const [u, i] = ['u', 'i'].map((name) => rewritten.rowGroups[0]!.columns.find((c) => c.column === name)!);
    assert.equal(u!.min, null, 'an unsigned column has no usable legacy minimum');
    assert.equal(u!.max, null);
    assert.deepEqual([...i!.min!], [...int32(-5)], 'a signed column keeps its legacy statistics');
    assert.deepEqual([...i!.max!], [...int32(7)]);
    // And the file as written: min_value/max_value, in unsigned order.
    const original = footer.rowGroups[0]!.columns.find((c) => c.column === 'u')!;
    assert.equal(new DataView(original.min!.buffer, original.min!.byteOffset).getUint32(0, true), 1);
    assert.equal(new DataView(original.max!.buffer, original.max!.byteOffset).getUint32(0, true), 3_000_000_000);
  });

  it('keeps int64 filter literals exact above 2^53', async () => {
    const store = await open();
    const base = 2n ** 53n;
    // As doubles, 2^53 + 1 is 2^53: a filter losing precision would match the first group.
    const values = BigInt64Array.from([base, base, base + 1n, base + 2n]);
    await writeTable(store, 'bigints', tableFromArrays({ big: values }), { rowGroupRows: 2 });
    assert.ok(new Table({ big: tableFromArrays({ big: values }).getChild('big')! }).schema.fields[0]!.type instanceof Int64);

    const exact = await scanTable(store, 'bigints', { filter: `big = ${base + 1n}`, cache: null });
    assert.deepEqual([...exact.table.getChild('big')!], [base + 1n]);
    assert.equal(exact.stats.rowGroupsSkipped, 1, 'the group of 2^53 is skipped by its statistics');

    const above = await scanTable(store, 'bigints', { filter: `big > ${base}`, cache: null });
    assert.deepEqual([...above.table.getChild('big')!], [base + 1n, base + 2n]);
    const listed = await scanTable(store, 'bigints', { filter: `big IN (${base + 2n}, 1)`, cache: null });
    assert.deepEqual([...listed.table.getChild('big')!], [base + 2n]);
  });
});

describe('shared-memory folders', () => {
  const root = join(TEST_SHM_ROOT, `hardening-${ulid().toLowerCase()}`);
  after(() => removeDir(root));
  const small = () => tableFromArrays({ x: Int32Array.from([1, 2, 3]) });

  it('are created mode 0700, root and cluster folder alike', () => {
    const dir = join(root, 'fresh-root', 'cluster');
    writeTableToShm(small(), { dir, idPrefix: 'modes' });
    assert.equal(statSync(join(root, 'fresh-root')).mode & 0o777, 0o700);
    assert.equal(statSync(dir).mode & 0o777, 0o700);
  });

  it('refuses a symlink planted in place of a segment, for reading and for writing', () => {
    const dir = join(root, 'planted');
    const written = writeTableToShm(small(), { dir, idPrefix: 'real' });
    const outside = tempDir('quiver-outside-');
    writeFileSync(join(outside, 'secret'), 'not yours');
    symlinkSync(join(outside, 'secret'), join(dir, 'link-0'));
    const ref = { id: 'link-0', byteSize: written.segments[0]!.byteSize };
    for (const read of [() => mapSegment(ref, { dir }), () => readTableFromShm([ref], { dir })]) {
      assert.throws(read, (e: Error) => {
        assert.ok(e instanceof ShmUnsafePathError, String(e));
        assert.equal(e.code, 'ERR_SHM_UNSAFE_PATH');
        assert.match(e.message, /link-0.*symbolic link/);
        return true;
      });
    }
    // A writer whose segment name is taken by a link fails rather than write through it.
    assert.throws(() => writeTableToShm(small(), { dir, idPrefix: 'link' }), (e: Error & { code?: string }) => e.code === 'EEXIST');
    assert.equal(readFileSync(join(outside, 'secret'), 'utf8'), 'not yours');
    const real = readTableFromShm(written.segments, { dir });
    assert.equal(real.table.numRows, 3);
    unmapSegments(real.mappings);
  });

  it('refuses a folder that is a symlink, is writable by others, or belongs to another user, naming it and what to do', () => {
    const linked = join(root, 'linked');
    symlinkSync(tempDir('quiver-elsewhere-'), linked);
    assert.throws(() => writeTableToShm(small(), { dir: linked, idPrefix: 'x' }), (e: Error) => e instanceof ShmUnsafePathError && e.message.includes(`refusing ${linked}: it is a symbolic link`));

    const open = join(root, 'world-writable');
    mkdirSync(open, { recursive: true });
    chmodSync(open, 0o777);
    assert.throws(() => writeTableToShm(small(), { dir: open, idPrefix: 'x' }), (e: Error) => e instanceof ShmUnsafePathError && /writable by group and others \(mode 0777\).*; run chmod 700 /.test(e.message));
    assert.throws(() => readTableFromShm([{ id: 'x-0', byteSize: 64 }], { dir: open }), ShmUnsafePathError);

    const foreign = join(root, 'foreign', 'cluster');
    mkdirSync(foreign, { recursive: true, mode: 0o700 });
    const uid = process.getuid!();
    // Another user's folder (as root, made so with chown; as anyone else, this user's is tested above).
    if (uid === 0) {
      chownSync(join(root, 'foreign'), 4242, 4242);
      assert.throws(() => writeTableToShm(small(), { dir: foreign, idPrefix: 'x' }), (e: Error) => e instanceof ShmUnsafePathError && /belongs to uid 4242/.test(e.message));
    }
  });
});
