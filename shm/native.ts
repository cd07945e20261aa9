/**
 * The native boundary, declared in one place. The addon (addon/binding.c) is
 * loaded on first use, so importing `shm/` never fails on a machine where it
 * has not been built; every call translates addon errors into ShmError
 * subclasses (errors.ts).
 */
import { constants as bufferConstants } from 'node:buffer';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { ShmAddonError, fromNativeError } from './errors.ts';

/** Functions exported by `quiver_shm.node`. All sizes are byte counts. */
export interface NativeShm {
  /** Creates `path` exclusively (0600), reserves `byteSize` bytes and maps them read-write. */
  create(path: string, byteSize: number, populate: boolean): ArrayBuffer;
  /** Opens an existing `path`, grows it to `byteSize` if smaller, maps `byteSize` bytes read-write. */
  openWritable(path: string, byteSize: number, populate: boolean): ArrayBuffer;
  /** Maps the whole of `path` read-only (PROT_READ): writes through it fault with SIGSEGV. */
  openReadOnly(path: string): ArrayBuffer;
  /** Detaches `mapping` (it becomes zero-length) and munmaps it now. False if it was already empty. */
  unmap(mapping: ArrayBuffer): boolean;
  /** rename(2) that fails with EEXIST instead of replacing `to`. */
  renameNoReplace(from: string, to: string): void;
  /** prctl(PR_SET_PDEATHSIG, signal); 0 clears it. */
  setParentDeathSignal(signal: number): void;
  /** getppid(). */
  parentPid(): number;
  /**
   * fork(2) of this process (a step zygote, executor/step-zygote.ts): the child leads its own
   * process group, dies with its parent, replaces fds 1, 2 and `ipcFd` with connections to
   * `socketPath` that first said `hellos[0..2]`, takes RLIMIT_AS `addressSpaceBytes` (0: none)
   * and re-arms the event loop. The child's pid here, 0 in the child.
   */
  forkChild(socketPath: string, hellos: readonly [string, string, string], ipcFd: number, addressSpaceBytes: number): number;
  /** waitpid(pid, WNOHANG) of a forked child: null while it runs. */
  reapChild(pid: number): { code: number | null; signal: number | null } | null;
  /** _exit(2), skipping Node's own exit (a forked child has none of the threads it would join). */
  exitNow(code: number): never;
  /** Largest mapping the addon will hand to JavaScript. */
  setMaxByteLength(byteLength: number): void;
  /** True when /dev/quiver (kmod/) can be opened. */
  regionAvailable(): boolean;
  /** Page-aligned private anonymous memory, read-write, `byteSize` rounded up to pages. */
  allocAnonymous(byteSize: number): ArrayBuffer;
  /** De-anonymizes a whole mapping from allocAnonymous: a new region fd (close-on-exec) and the region's id. */
  shareRegion(mapping: ArrayBuffer): { fd: number; id: number };
  /** Maps a region fd read-only (its whole length). */
  mapRegion(fd: number): ArrayBuffer;
  /** Serves region fds on the unix socket `socketPath` from a thread of its own. */
  regionBrokerStart(socketPath: string): RegionBrokerHandle;
  /** Stops the broker, closing every fd it holds; a second stop does nothing. */
  regionBrokerStop(broker: RegionBrokerHandle): void;
  regionBrokerCount(broker: RegionBrokerHandle): number;
  /** Names of the regions the broker holds, in no particular order. */
  regionBrokerNames(broker: RegionBrokerHandle): string[];
  /** Hands a copy of `fd` to the broker under `name` (EEXIST if taken). */
  regionPut(socketPath: string, name: string, fd: number): void;
  /** A new fd for `name` from the broker (ENOENT if unknown). */
  regionGet(socketPath: string, name: string): number;
  /** The broker closes its fd for `name`; unknown names are fine. */
  regionDrop(socketPath: string, name: string): void;
}

/** Opaque handle of a running region broker. */
export type RegionBrokerHandle = { readonly __regionBroker: unique symbol };

/** Largest ArrayBuffer this Node.js allows (4 GiB on Node 20). */
export const MAX_MAPPING_BYTES: number = bufferConstants.MAX_LENGTH;

const ADDON_PATH = fileURLToPath(new URL('./addon/build/Release/quiver_shm.node', import.meta.url));

let loaded: NativeShm | null = null;

function addon(): NativeShm {
  if (loaded !== null) return loaded;
  let module: NativeShm;
  try {
    module = createRequire(import.meta.url)(ADDON_PATH) as NativeShm;
  } catch (cause) {
    throw new ShmAddonError(
      `quiver shm: cannot load the native addon at ${ADDON_PATH}; build it with \`npm run build:addon\``,
      { path: ADDON_PATH, cause },
    );
  }
  module.setMaxByteLength(MAX_MAPPING_BYTES);
  loaded = module;
  return module;
}

function call<T>(fn: (m: NativeShm) => T): T {
  const m = addon();
  try {
    return fn(m);
  } catch (e) {
    throw fromNativeError(e);
  }
}

/** The addon with errors translated to ShmError subclasses. */
export const native: NativeShm = {
  create: (path, byteSize, populate) => call((m) => m.create(path, byteSize, populate)),
  openWritable: (path, byteSize, populate) => call((m) => m.openWritable(path, byteSize, populate)),
  openReadOnly: (path) => call((m) => m.openReadOnly(path)),
  unmap: (mapping) => call((m) => m.unmap(mapping)),
  renameNoReplace: (from, to) => call((m) => m.renameNoReplace(from, to)),
  setParentDeathSignal: (signal) => call((m) => m.setParentDeathSignal(signal)),
  parentPid: () => call((m) => m.parentPid()),
  forkChild: (socketPath, hellos, ipcFd, addressSpaceBytes) => call((m) => m.forkChild(socketPath, hellos, ipcFd, addressSpaceBytes)),
  reapChild: (pid) => call((m) => m.reapChild(pid)),
  exitNow: (code) => call((m) => m.exitNow(code)),
  setMaxByteLength: (byteLength) => call((m) => m.setMaxByteLength(byteLength)),
  regionAvailable: () => call((m) => m.regionAvailable()),
  allocAnonymous: (byteSize) => call((m) => m.allocAnonymous(byteSize)),
  shareRegion: (mapping) => call((m) => m.shareRegion(mapping)),
  mapRegion: (fd) => call((m) => m.mapRegion(fd)),
  regionBrokerStart: (socketPath) => call((m) => m.regionBrokerStart(socketPath)),
  regionBrokerStop: (broker) => call((m) => m.regionBrokerStop(broker)),
  regionBrokerCount: (broker) => call((m) => m.regionBrokerCount(broker)),
  regionBrokerNames: (broker) => call((m) => m.regionBrokerNames(broker)),
  regionPut: (socketPath, name, fd) => call((m) => m.regionPut(socketPath, name, fd)),
  regionGet: (socketPath, name) => call((m) => m.regionGet(socketPath, name)),
  regionDrop: (socketPath, name) => call((m) => m.regionDrop(socketPath, name)),
};

/** The addon exactly as loaded, errors untranslated; for tests of the binding itself. */
export function rawAddon(): NativeShm {
  return addon();
}
