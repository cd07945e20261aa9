/**
 * Regions (kmod/) on a host without the module: the automatic choice falls
 * back to segment files, region writes fail cleanly, and the region fd
 * broker hands real fds between real processes. The module itself is tested
 * inside a VM by kmod/test/run-vm.sh (npm run test:kmod).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, fstatSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { tableFromArrays } from 'apache-arrow';
import { TEST_SHM_ROOT } from './helpers.ts';
import {
  RegionBroker,
  ShmError,
  isRegionRef,
  isViewOf,
  regionBrokerPath,
  releaseRegionIds,
  listSegments,
  readInput,
  regionsAvailable,
  releaseSegments,
  removeDir,
  writeOutput,
  writeTableToRegions,
} from '../shm/index.ts';
import { rawAddon } from '../shm/native.ts';

const NATIVE_URL = new URL('../shm/native.ts', import.meta.url).href;
const deviceLoaded = existsSync('/dev/quiver');

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-regions-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('regionsAvailable follows /dev/quiver and QUIVER_REGIONS=off', () => {
  assert.equal(regionsAvailable(), deviceLoaded);
  process.env.QUIVER_REGIONS = 'off';
  try {
    assert.equal(regionsAvailable(), false);
  } finally {
    delete process.env.QUIVER_REGIONS;
  }
});

test('writeOutput without the module takes the file path: one copy, file segments, readInput reads them', (t) => {
  const dir = join(TEST_SHM_ROOT, `regions-${process.pid}`);
  t.after(() => removeDir(dir));
  const broker = new RegionBroker(join(tempDir(t), 'regions.sock'));
  t.after(() => broker.stop());
  process.env.QUIVER_REGIONS = 'off';
  try {
    const table = tableFromArrays({ x: Float64Array.from({ length: 10_000 }, (_, i) => i / 3) });
    const written = writeOutput(table, { dir, idPrefix: 'out', broker: broker.socketPath });
    assert.equal(written.copiedBytes, written.byteSize);
    assert.ok(written.segments.every((s) => !isRegionRef(s)));
    assert.deepEqual(listSegments(dir).map((s) => s.id), ['out-0']);
    const { table: read, mappings } = readInput(written.segments, { dir });
    assert.ok(isViewOf(read, mappings));
    assert.deepEqual([...read.getChild('x')!], [...table.getChild('x')!]);
    releaseSegments(written.segments, { dir, poolMaxBytes: 0 });
  } finally {
    delete process.env.QUIVER_REGIONS;
  }
});

test('readInput refuses a mix of regions and files, and regions without a broker', () => {
  const dir = join(TEST_SHM_ROOT, 'unused');
  const region = { kind: 'region', id: 'b-0', byteSize: 64, broker: '/nonexistent/regions.1.sock' } as const;
  assert.throws(() => readInput([{ id: 'a-0', byteSize: 64 }, region], { dir }), { code: 'ERR_SHM_ARG' });
  assert.throws(() => readInput([{ ...region, broker: undefined } as never], { dir }), { code: 'ERR_SHM_ARG' });
  assert.throws(() => readInput([region], { dir }), { code: 'ENOENT' });
});

test('releaseRegionIds drops ids from every broker in a directory and skips dead ones', (t) => {
  const dir = tempDir(t);
  // A socket a killed executor left behind is removed when the next broker starts.
  const stale = new RegionBroker(regionBrokerPath(dir, 999_999_998));
  const stalePath = stale.socketPath;
  const broker = RegionBroker.inDir(dir);
  t.after(() => broker.stop());
  assert.equal(broker.socketPath, regionBrokerPath(dir));
  assert.equal(existsSync(stalePath), false);
  stale.stop();
  // A socket left by a dead process: nobody listens.
  const dead = new RegionBroker(regionBrokerPath(dir, 999_999_999));
  const deadPath = dead.socketPath;
  dead.stop();
  writeFileSync(deadPath + '.tmp', '');
  const addon = rawAddon();
  const fd = openSync(deadPath + '.tmp', 'r');
  try {
    addon.regionPut(broker.socketPath, 'run.step.1-0', fd);
    addon.regionPut(broker.socketPath, 'run.step.1-1', fd);
  } finally {
    closeSync(fd);
  }
  assert.equal(broker.size, 2);
  assert.deepEqual(broker.names().sort(), ['run.step.1-0', 'run.step.1-1']);
  releaseRegionIds(['run.step.1-0', 'run.step.1-1', 'unknown-0'], { dir });
  assert.deepEqual(broker.names(), []);
  assert.equal(broker.size, 0);
  releaseRegionIds(['x-0'], { dir: join(dir, 'missing') });
});

test('writeTableToRegions without the module fails with ENOENT and leaves the broker empty', { skip: deviceLoaded && 'the module is loaded here' }, (t) => {
  const broker = new RegionBroker(join(tempDir(t), 'regions.sock'));
  t.after(() => broker.stop());
  const table = tableFromArrays({ x: Int32Array.of(1, 2, 3) });
  assert.throws(() => writeTableToRegions(table, { broker: broker.socketPath, idPrefix: 'r' }), (e: unknown) => {
    assert.ok(e instanceof ShmError);
    assert.equal(e.code, 'ENOENT');
    return true;
  });
  assert.equal(broker.size, 0);
});

test('the broker hands one file to another process by fd, refuses duplicate names, forgets dropped ones', (t) => {
  const dir = tempDir(t);
  const socket = join(dir, 'regions.sock');
  const broker = new RegionBroker(socket);
  t.after(() => broker.stop());
  const addon = rawAddon();
  const file = join(dir, 'payload');
  writeFileSync(file, 'bytes behind an fd');
  const fd = openSync(file, 'r');
  try {
    addon.regionPut(socket, 'payload-0', fd);
    assert.throws(() => addon.regionPut(socket, 'payload-0', fd), { code: 'EEXIST' });
  } finally {
    closeSync(fd);
  }
  assert.equal(broker.size, 1);
  // The file is gone from the directory: only the broker's fd keeps it.
  rmSync(file);
  const child = spawnSync(
    process.execPath,
    [
      '--import',
      'tsx',
      '--input-type=module',
      '-e',
      `import { rawAddon } from ${JSON.stringify(NATIVE_URL)};
       import { readFileSync } from 'node:fs';
       const fd = rawAddon().regionGet(process.env.SOCKET, 'payload-0');
       process.stdout.write(readFileSync(fd, 'utf8'));`,
    ],
    { env: { ...process.env, SOCKET: socket }, encoding: 'utf8' },
  );
  assert.equal(child.status, 0, child.stderr);
  assert.equal(child.stdout, 'bytes behind an fd');
  const again = addon.regionGet(socket, 'payload-0');
  assert.equal(fstatSync(again).nlink, 0);
  closeSync(again);
  addon.regionDrop(socket, 'payload-0');
  addon.regionDrop(socket, 'payload-0');
  assert.equal(broker.size, 0);
  assert.throws(() => addon.regionGet(socket, 'payload-0'), { code: 'ENOENT' });
  broker.stop();
  assert.equal(existsSync(socket), false);
  assert.throws(() => addon.regionGet(socket, 'payload-0'), { code: 'ENOENT' });
});

test('broker arguments are checked', (t) => {
  const addon = rawAddon();
  assert.throws(() => new RegionBroker('relative.sock'), { code: 'ERR_SHM_ARG' });
  assert.throws(() => addon.regionPut('/tmp/x.sock', 'n', -1), { code: 'ERR_SHM_ARG' });
  assert.throws(() => addon.regionGet('/tmp/x.sock', 'n'.repeat(300)), { code: 'ERR_SHM_ARG' });
  assert.throws(() => addon.regionBrokerStop({} as never), { code: 'ERR_SHM_ARG' });
  assert.throws(() => addon.shareRegion(new ArrayBuffer(4096)), { code: 'ERR_SHM_ARG' });
  const socket = join(tempDir(t), 'taken.sock');
  const broker = new RegionBroker(socket);
  t.after(() => broker.stop());
  assert.throws(() => new RegionBroker(socket), { code: 'EADDRINUSE' });
});

test('allocAnonymous gives page-aligned private memory that unmap releases', () => {
  const addon = rawAddon();
  const memory = addon.allocAnonymous(5000);
  assert.equal(memory.byteLength, 8192);
  new Uint8Array(memory).fill(7);
  assert.equal(addon.unmap(memory), true);
  assert.equal(memory.byteLength, 0);
});
