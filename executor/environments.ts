/**
 * The environment store: per exact set of npm packages, one `node_modules` per host, installed
 * once and shared by every step that needs that set (docs/packages.md).
 *
 * An environment is found, in order: on this host (`<dir>/<hash>`), in the cluster's object store
 * (`quiver-envs/<hash>.tar.gz`, packed by the host that built it), else built with `npm install`
 * and then packed for the other hosts. A new environment is built or fetched once per host:
 * concurrent steps of this process share one promise, other processes of the host wait on a lock
 * directory. Every environment is built in a temporary folder and renamed into place, so a
 * folder under its hash is always complete.
 */
import { execFile } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync, closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ObjectStore } from '@nats-io/obj';
import * as tar from 'tar';
import { quiverHome, silentLogger, type Logger, type StepPackages } from '../schemas/index.ts';
import { processAlive } from '../shm/index.ts';
import { STEP_ENV_ALLOWLIST } from './step-process.ts';

/** Options of {@link Environments}. */
export interface EnvironmentsOptions {
  /** Folder environments are kept in, one sub-folder per hash. @default QUIVER_HOME/envs */
  dir?: string;
  /** The cluster's object store of packed environments; without one, every host installs its own. @default none */
  store?: ObjectStore | null;
  /**
   * Variables set for npm (`npm_config_registry`, `npm_config_cache`...), on top of what it gets of
   * the executor's environment: the step allowlist (PATH, HOME...), npm's own settings
   * (`npm_config_*`), proxies and CA certificates. The rest (secrets) stays out of reach of the
   * packages' install scripts. @default none
   */
  npmEnv?: Readonly<Record<string, string>>;
  /** How long one `npm install` may take before the build fails. @default 600_000 (10 min) */
  installTimeoutMs?: number;
  /** @default silent */
  logger?: Logger;
}

/** {@link EnvironmentsOptions} with every default applied: resolved here only. */
interface ResolvedEnvironmentsOptions {
  dir: string;
  store: ObjectStore | null;
  npmEnv: Readonly<Record<string, string>>;
  installTimeoutMs: number;
  logger: Logger;
}

export const DEFAULT_INSTALL_TIMEOUT_MS = 600_000;
/** How often a process waiting for another's build looks again. */
const LOCK_POLL_MS = 100;
/** What npm installs and we pack: the code folder (linked bundles) stays local. */
const PACKED = ['package.json', 'package-lock.json', 'node_modules', 'quiver-env.json'];
const METADATA = 'quiver-env.json';
/** Touched whenever a step uses the environment: `quiver env list` and `prune` read its time. */
const LAST_USED = '.last-used';

export function resolveEnvironmentsOptions(options: EnvironmentsOptions = {}): ResolvedEnvironmentsOptions {
  const installTimeoutMs = options.installTimeoutMs ?? DEFAULT_INSTALL_TIMEOUT_MS;
  if (!Number.isInteger(installTimeoutMs) || installTimeoutMs <= 0) throw new RangeError(`installTimeoutMs must be a positive integer; got ${installTimeoutMs}`);
  return {
    dir: options.dir ?? environmentsDir(),
    store: options.store ?? null,
    npmEnv: options.npmEnv ?? {},
    installTimeoutMs,
    logger: options.logger ?? silentLogger,
  };
}

/** Where this host's environments are. */
export const environmentsDir = (): string => join(quiverHome(), 'envs');

/** An environment could not be installed or fetched: npm's own message says why. */
export class EnvironmentBuildError extends Error {
  override readonly name = 'EnvironmentBuildError';
  readonly code = 'ERR_STEP_ENV_BUILD';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** An environment ready to use. */
export interface ReadyEnvironment {
  hash: string;
  /** The environment's folder: code written under it resolves its packages from `<dir>/node_modules`. */
  dir: string;
  /** Where it came from this time: already on this host, fetched from the cluster, or installed. */
  source: 'local' | 'store' | 'built';
}

/** An environment on this host, as `quiver env list` shows it. */
export interface EnvironmentInfo {
  hash: string;
  dir: string;
  packages: StepPackages;
  bytes: number;
  builtAt: number;
  lastUsedAt: number;
}

/**
 * The hash an environment is kept under: the exact packages, and what decides whether installed
 * packages work here (native addons, platform-specific optional dependencies).
 */
export function environmentHash(packages: StepPackages, platform = { node: process.versions.node.split('.')[0]!, os: process.platform, arch: process.arch }): string {
  const sorted = Object.fromEntries(Object.entries(packages).sort(([a], [b]) => (a < b ? -1 : 1)));
  return createHash('sha256').update(JSON.stringify({ v: 1, packages: sorted, node: platform.node, platform: platform.os, arch: platform.arch })).digest('hex');
}

/** This host's package environments: found, fetched from the cluster or built, then reused. */
export class Environments {
  private readonly options: ResolvedEnvironmentsOptions;
  private readonly pending = new Map<string, Promise<ReadyEnvironment>>();
  /** What this store did since it was made: environments installed, and fetched from the cluster. */
  readonly counts = { built: 0, fetched: 0 };

  constructor(options: EnvironmentsOptions = {}) {
    this.options = resolveEnvironmentsOptions(options);
  }

  get dir(): string {
    return this.options.dir;
  }

  /**
   * The environment of exactly `packages`, ready on this host. Throws {@link EnvironmentBuildError}.
   * `onProgress` hears, as it happens, a line when the environment is not on this host yet (it
   * is fetched or built now) and a line once it is ready, saying how long it took and how.
   */
  async ensure(packages: StepPackages, options: { onProgress?: (line: string) => void } = {}): Promise<ReadyEnvironment> {
    const began = performance.now();
    const hash = environmentHash(packages);
    const dir = join(this.options.dir, hash);
    const say = options.onProgress ?? (() => {});
    const what = `environment ${hash.slice(0, 12)} (${describePackages(packages)})`;
    if (existsSync(dir)) {
      touch(join(dir, LAST_USED));
      say(readyLine(what, 'local', began));
      return { hash, dir, source: 'local' };
    }
    let going = this.pending.get(hash);
    if (!going) {
      going = this.obtain(hash, dir, packages).finally(() => this.pending.delete(hash));
      this.pending.set(hash, going);
    }
    say(`getting ${what}: not on this host yet, fetching it from the cluster or installing it with npm…`);
    try {
      const ready = await going;
      say(readyLine(what, ready.source, began));
      return ready;
    } catch (error) {
      say(`${what} failed after ${seconds(began)}`);
      throw error;
    }
  }

  /** Every environment on this host. */
  list(): EnvironmentInfo[] {
    return listEnvironments(this.options.dir);
  }

  /** Removes the environments not used for `olderThanMs`; returns them. */
  prune(olderThanMs: number, now = Date.now()): EnvironmentInfo[] {
    return pruneEnvironments(this.options.dir, olderThanMs, now);
  }

  private async obtain(hash: string, dir: string, packages: StepPackages): Promise<ReadyEnvironment> {
    mkdirSync(this.options.dir, { recursive: true });
    const release = await this.lock(hash, dir);
    if (!release) return { hash, dir, source: 'local' };
    try {
      if (existsSync(dir)) return { hash, dir, source: 'local' };
      if (await this.fetch(hash, dir, packages)) {
        this.counts.fetched++;
        return { hash, dir, source: 'store' };
      }
      await this.build(dir, packages);
      this.counts.built++;
      await this.pack(hash, dir).catch((error: unknown) => {
        // The step can run: other hosts will install it themselves.
        this.options.logger.warn(`could not store environment ${hash} in the cluster: ${(error as Error).message}`);
      });
      return { hash, dir, source: 'built' };
    } finally {
      release();
    }
  }

  /**
   * Takes the host-wide lock of `hash` (a directory holding its owner's pid), or returns null when
   * the environment appeared meanwhile. A lock whose owner died is taken over.
   */
  private async lock(hash: string, dir: string): Promise<(() => void) | null> {
    const lockDir = join(this.options.dir, `.lock-${hash}`);
    const deadline = Date.now() + this.options.installTimeoutMs + 60_000;
    for (;;) {
      if (existsSync(dir)) return null;
      try {
        mkdirSync(lockDir);
        writeFileSync(join(lockDir, 'pid'), String(process.pid));
        return () => rmSync(lockDir, { recursive: true, force: true });
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      }
      const owner = Number(readOrEmpty(join(lockDir, 'pid')));
      // A lock without a pid yet is being taken right now, unless it has been so for a while.
      const stale = owner > 0 ? !processAlive(owner) : ageMs(lockDir) > 10_000;
      if (stale) {
        this.options.logger.warn(`taking over the lock of environment ${hash}: its owner (pid ${owner || 'unknown'}) is gone`);
        rmSync(lockDir, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new EnvironmentBuildError(`gave up waiting for process ${owner} to build environment ${hash}`);
      await sleep(LOCK_POLL_MS);
    }
  }

  /** Unpacks the cluster's copy of the environment, if it has one. */
  private async fetch(hash: string, dir: string, packages: StepPackages): Promise<boolean> {
    const store = this.options.store;
    if (!store) return false;
    let found;
    try {
      found = await store.get(objectName(hash));
    } catch (error) {
      this.options.logger.warn(`could not look for environment ${hash} in the cluster: ${(error as Error).message}`);
      return false;
    }
    if (!found) return false;
    const tmp = this.tempDir(hash);
    try {
      mkdirSync(tmp);
      await pipeline(Readable.fromWeb(found.data as import('node:stream/web').ReadableStream<Uint8Array>), tar.x({ cwd: tmp, strict: true }));
      const error = await found.error;
      if (error) throw error;
      const meta = readMetadata(tmp);
      if (!meta || environmentHash(meta.packages) !== hash || JSON.stringify(sorted(meta.packages)) !== JSON.stringify(sorted(packages))) {
        throw new Error(`its packages are not ${JSON.stringify(packages)}`);
      }
      this.place(tmp, dir);
    } catch (error) {
      rmSync(tmp, { recursive: true, force: true });
      this.options.logger.warn(`could not use the cluster's copy of environment ${hash}, installing it instead: ${(error as Error).message}`);
      return false;
    }
    // What `quiver env prune` goes by for the cluster's copies: when a host last needed one.
    // An update replaces every field of the object's meta: the others are given again as they were.
    const { description, options } = found.info;
    const meta = { ...(description ? { description } : {}), ...(options ? { options } : {}), metadata: { ...(found.info.metadata ?? {}), [LAST_USED_METADATA]: String(Date.now()) } };
    await store.update(objectName(hash), meta).catch((error: unknown) => {
      this.options.logger.warn(`could not mark environment ${hash} used in the cluster: ${(error as Error).message}`);
    });
    return true;
  }

  /** `npm install` of exactly `packages` into a temporary folder, renamed into place once complete. */
  private async build(dir: string, packages: StepPackages): Promise<void> {
    const hash = environmentHash(packages);
    const tmp = this.tempDir(hash);
    mkdirSync(tmp);
    try {
      writeFileSync(join(tmp, 'package.json'), JSON.stringify({ name: `quiver-env-${hash.slice(0, 12)}`, private: true, dependencies: sorted(packages) }, null, 2));
      const args = ['install', '--no-audit', '--no-fund', '--ignore-scripts=false', '--omit=dev', '--no-update-notifier', '--prefix', tmp];
      await new Promise<void>((resolve, reject) => {
        execFile(
          'npm',
          args,
          { cwd: tmp, env: npmEnvironment(this.options.npmEnv), timeout: this.options.installTimeoutMs, maxBuffer: 16 << 20 },
          (error, _stdout, stderr) => {
            if (!error) return resolve();
            const said = npmErrorLines(stderr) || (error as Error).message;
            reject(new EnvironmentBuildError(`npm install ${Object.entries(packages).map(([n, v]) => `${n}@${v}`).join(' ')} failed: ${said}`, { cause: error }));
          },
        );
      });
      writeFileSync(join(tmp, METADATA), JSON.stringify({ packages: sorted(packages), node: process.versions.node, platform: process.platform, arch: process.arch, builtAt: Date.now() }));
      this.place(tmp, dir);
    } catch (error) {
      rmSync(tmp, { recursive: true, force: true });
      throw error;
    }
  }

  /** Packs the environment into the cluster's store, for the other hosts. */
  private async pack(hash: string, dir: string): Promise<void> {
    const store = this.options.store;
    if (!store) return;
    const files = PACKED.filter((f) => existsSync(join(dir, f)));
    const packed = tar.c({ gzip: true, cwd: dir, portable: true }, files) as unknown as NodeJS.ReadableStream;
    const packages = readMetadata(dir)?.packages ?? {};
    await store.put(
      { name: objectName(hash), description: Object.entries(packages).map(([n, v]) => `${n}@${v}`).join(' ').slice(0, 1000) },
      Readable.toWeb(Readable.from(packed as AsyncIterable<Uint8Array>)) as unknown as ReadableStream<Uint8Array>,
    );
  }

  private tempDir(hash: string): string {
    return join(this.options.dir, `.tmp-${hash.slice(0, 16)}-${process.pid}-${randomUUID().slice(0, 8)}`);
  }

  /** Renames a complete environment into place; one already there (placed by another) wins. */
  private place(tmp: string, dir: string): void {
    touch(join(tmp, LAST_USED));
    try {
      renameSync(tmp, dir);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw error;
      rmSync(tmp, { recursive: true, force: true });
    }
  }
}

/** Every environment under `dir`, newest use first. */
export function listEnvironments(dir: string = environmentsDir()): EnvironmentInfo[] {
  if (!existsSync(dir)) return [];
  const found: EnvironmentInfo[] = [];
  for (const hash of readdirSync(dir).filter((e) => /^[0-9a-f]{64}$/.test(e))) {
    const envDir = join(dir, hash);
    const meta = readMetadata(envDir);
    if (!meta) continue;
    found.push({ hash, dir: envDir, packages: meta.packages, bytes: sizeOf(envDir), builtAt: meta.builtAt, lastUsedAt: mtimeOr(join(envDir, LAST_USED), meta.builtAt) });
  }
  return found.sort((a, b) => b.lastUsedAt - a.lastUsedAt);
}

/**
 * Removes environments not used for `olderThanMs`, and what failed builds left behind. An
 * environment is first renamed away, so no step finds it half removed; one being used now is
 * rebuilt or fetched by its next step.
 */
export function pruneEnvironments(dir: string = environmentsDir(), olderThanMs: number, now = Date.now()): EnvironmentInfo[] {
  const removed: EnvironmentInfo[] = [];
  for (const env of listEnvironments(dir)) {
    if (now - env.lastUsedAt < olderThanMs) continue;
    const trash = join(dir, `.tmp-pruned-${env.hash.slice(0, 16)}-${process.pid}-${randomUUID().slice(0, 8)}`);
    renameSync(env.dir, trash);
    rmSync(trash, { recursive: true, force: true });
    removed.push(env);
  }
  // Temporary folders of builds whose process died (a live build's is younger than its timeout).
  for (const entry of existsSync(dir) ? readdirSync(dir).filter((e) => e.startsWith('.tmp-')) : []) {
    const pid = Number(/-(\d+)-[0-9a-f]{8}$/.exec(entry)?.[1]);
    if (!(pid > 0 && processAlive(pid))) rmSync(join(dir, entry), { recursive: true, force: true });
  }
  return removed;
}

const objectName = (hash: string) => `${hash}.tar.gz`;
/** Metadata of a packed environment in the cluster's store: when a host last fetched it (epoch ms). */
const LAST_USED_METADATA = 'quiver-last-used';

/** A packed environment in the cluster's object store, as `quiver env list --cluster` shows it. */
export interface ClusterEnvironmentInfo {
  hash: string;
  /** `name@version …`, as the host that built it described it. */
  packages: string;
  bytes: number;
  /** When it was packed, or last fetched by a host, whichever is later. */
  lastUsedAt: number;
}

/** Every packed environment in the cluster's store, newest use first. */
export async function listClusterEnvironments(store: ObjectStore): Promise<ClusterEnvironmentInfo[]> {
  const found: ClusterEnvironmentInfo[] = [];
  for (const info of await store.list()) {
    const hash = /^([0-9a-f]{64})\.tar\.gz$/.exec(info.name)?.[1];
    if (!hash || info.deleted) continue;
    const fetchedAt = Number(info.metadata?.[LAST_USED_METADATA]);
    const packedAt = Date.parse(info.mtime);
    found.push({ hash, packages: info.description ?? '', bytes: info.size, lastUsedAt: Math.max(Number.isFinite(fetchedAt) ? fetchedAt : 0, Number.isFinite(packedAt) ? packedAt : 0) });
  }
  return found.sort((a, b) => b.lastUsedAt - a.lastUsedAt);
}

/**
 * Removes the cluster's copies of environments no host packed or fetched for `olderThanMs`;
 * returns them. A host that has one installed keeps it; a new host needing it installs it again.
 */
export async function pruneClusterEnvironments(store: ObjectStore, olderThanMs: number, now = Date.now()): Promise<ClusterEnvironmentInfo[]> {
  const removed: ClusterEnvironmentInfo[] = [];
  for (const env of await listClusterEnvironments(store)) {
    if (now - env.lastUsedAt < olderThanMs) continue;
    await store.delete(objectName(env.hash));
    removed.push(env);
  }
  return removed;
}

const SOURCE_WORDS: Record<ReadyEnvironment['source'], string> = { local: 'cached on this host', store: 'fetched from the cluster', built: 'built with npm' };

function readyLine(what: string, source: ReadyEnvironment['source'], began: number): string {
  return `${what} ready in ${seconds(began)} (${SOURCE_WORDS[source]})`;
}

function seconds(since: number): string {
  return `${((performance.now() - since) / 1000).toFixed(1)} s`;
}

/** `3 packages: a@1.0.0, b@2.0.0, c@3.0.0`, shortened past a few. */
function describePackages(packages: StepPackages): string {
  const names = Object.entries(sorted(packages)).map(([n, v]) => `${n}@${v}`);
  const shown = names.length > 4 ? `${names.slice(0, 4).join(', ')}, …` : names.join(', ');
  return `${names.length} package${names.length === 1 ? '' : 's'}: ${shown}`;
}

/** What npm and install scripts see of the executor's environment, then `extra`. */
function npmEnvironment(extra: Readonly<Record<string, string>>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (STEP_ENV_ALLOWLIST.includes(name) || /^(npm_config_|NPM_CONFIG_)|^(https?_proxy|no_proxy)$|^NODE_EXTRA_CA_CERTS$/i.test(name)) env[name] = value;
  }
  return { ...env, ...extra };
}

function sorted(packages: StepPackages): Record<string, string> {
  return Object.fromEntries(Object.entries(packages).sort(([a], [b]) => (a < b ? -1 : 1)));
}

function readMetadata(dir: string): { packages: StepPackages; builtAt: number } | null {
  try {
    const meta = JSON.parse(readFileSync(join(dir, METADATA), 'utf8')) as { packages?: unknown; builtAt?: unknown };
    if (!meta.packages || typeof meta.packages !== 'object') return null;
    return { packages: meta.packages as StepPackages, builtAt: typeof meta.builtAt === 'number' ? meta.builtAt : 0 };
  } catch {
    return null;
  }
}

/** npm's `npm error …` lines, without its log-file pointer: what a user needs to see. */
function npmErrorLines(stderr: string): string {
  return stderr
    .split('\n')
    .filter((l) => /^npm (error|ERR!)/.test(l) && !/A complete log of this run|^npm error\s*$/.test(l))
    .map((l) => l.replace(/^npm (error|ERR!)\s?/, '').trim())
    .filter(Boolean)
    .join('; ')
    .slice(0, 4000);
}

/** Best effort: an environment pruned at this very moment is simply not marked. */
function touch(path: string): void {
  const now = new Date();
  try {
    utimesSync(path, now, now);
  } catch {
    try {
      closeSync(openSync(path, 'a'));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    }
  }
}

function readOrEmpty(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

function ageMs(path: string): number {
  try {
    return Date.now() - statSync(path).mtimeMs;
  } catch {
    return 0;
  }
}

function mtimeOr(path: string, fallback: number): number {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return fallback;
  }
}

/** Bytes of the files under `dir` (symlinks not followed). */
function sizeOf(dir: string): number {
  let bytes = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) bytes += statSync(join(entry.parentPath ?? (entry as unknown as { path: string }).path, entry.name)).size;
  }
  return bytes;
}
