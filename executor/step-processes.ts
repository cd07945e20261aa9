import { accessSync, constants } from 'node:fs';
import { hostname } from 'node:os';
import type { Isolation, LogLine, StepLimits } from '../schemas/index.ts';
import type { CatalogHandler, RunnerJob, RunnerReply } from './protocol.ts';
import { stepEnvMissing } from './step-errors.ts';
import type { StepSnapshot } from './build-runner.ts';
import { ADDRESS_SPACE_LIMIT_SUPPORTED, StepProcess, spawnRunner, type RunLimits } from './step-process.ts';
import { StepZygote } from './step-zygote.ts';

/** The limits of steps that declare none (`timeoutMs`, `memoryMb` step or pipeline options). */
export interface StepLimitDefaults {
  /** @default QUIVER_STEP_TIMEOUT_MS, else 900_000 (15 min) */
  timeoutMs?: number;
  /** @default QUIVER_STEP_MEMORY_MB, else 1024 */
  memoryMb?: number;
  /**
   * Also bound each step process's address space (RLIMIT_AS, set with util-linux `prlimit`) to
   * {@link addressSpaceFor}; without it memoryMb bounds the V8 heap only, not Buffers and typed
   * arrays. @default true when `prlimit` is installed and node has --disable-wasm-trap-handler (>= 20.17)
   */
  addressSpace?: boolean;
}

/** Limits of the long-lived step processes that run steps with `isolation: 'worker'`. */
export interface WorkerOptions {
  /** Steps a worker runs before it is replaced by a new one. @default 100_000 */
  maxStepsPerWorker?: number;
  /** A worker whose peak resident set is above this after a step is replaced (the step still succeeds). @default 1 GiB */
  maxWorkerRssBytes?: number;
  /** A worker with no step for this long exits. @default 60_000 */
  workerIdleMs?: number;
  /**
   * Idle workers kept at most, over every pipeline version: past it the one idle longest exits,
   * so many versions deployed and run once each do not each keep a process. @default 8
   */
  maxIdleWorkers?: number;
  /**
   * A worker whose event loop does not answer for this long is killed and its step fails
   * (ERR_WORKER_HUNG): any synchronous stretch of a step counts, writing its output too. @default 30_000
   */
  workerHangMs?: number;
}

/** Options for {@link StepProcesses}. */
export interface StepProcessesOptions {
  /** The bundled runner (see build-runner.ts). */
  runnerPath: string;
  /** The runner's startup snapshot (RunnerBuild.snapshot). @default none: every process compiles the runner */
  snapshot?: StepSnapshot | null;
  /** Written into each step process's title, where gc finds it. */
  clusterId: string;
  /** Step processes kept booted ahead of need (each has run nothing yet). 0 starts each on demand. @default 2 */
  prewarm?: number;
  workers?: WorkerOptions;
  /** Limits of steps that declare none. */
  limits?: StepLimitDefaults;
  /** Where declared secrets are read from. @default process.env */
  secrets?: NodeJS.ProcessEnv;
  /** Every line a step prints, as it prints it. */
  onLog: (line: LogLine) => void;
  /**
   * Fork step processes of the default heap limit from a step zygote (step-zygote.ts) instead of
   * booting node for each. @default QUIVER_FORK_SERVER ('0' turns it off), else true
   */
  forkServer?: boolean;
  /** What a step zygote runs before it forks (RunnerBuild.warmUpCodePath). @default nothing */
  warmUpCodePath?: string | null;
}

export const DEFAULT_PREWARM = 2;
/**
 * A hundred thousand, not ten: a new worker's steps cost about twice a warm one's CPU for its
 * first few thousand steps while V8 compiles the runner, Arrow and the step's code (one step
 * after another of a one-row chain: ~600 µs a step at first, ~290 µs after 5,000), so each
 * replacement throws that warm-up away, and a worker under load (500-750 steps a second, each of
 * two, at the 320-510 runs/s of `npm run bench:trigger -- --routes worker` bursts) reached ten
 * thousand every 13-20 seconds.
 * At a thousand it was worse still: a spare booted and the code imported again every few
 * seconds. Leaks stay bounded by the RSS limit, and a worker idle for workerIdleMs goes anyway.
 */
export const DEFAULT_MAX_STEPS_PER_WORKER = 100_000;
export const DEFAULT_MAX_WORKER_RSS_BYTES = 1024 ** 3;
export const DEFAULT_WORKER_IDLE_MS = 60_000;
export const DEFAULT_WORKER_HANG_MS = 30_000;
export const DEFAULT_MAX_IDLE_WORKERS = 8;
export const DEFAULT_STEP_TIMEOUT_MS = 15 * 60_000;
export const DEFAULT_STEP_MEMORY_MB = 1024;
/**
 * Address space a step process takes before its step allocates anything: node's own
 * reservations (code range, thread stacks, the heap's reserved pages): 0.96 GB measured on
 * Node 20.20 with the runner loaded, 2.1 GB once parquet-wasm (scans) is loaded; with room to spare.
 */
export const NODE_ADDRESS_SPACE_BYTES = 3 * 1024 ** 3;

/** Inputs are allowed for in whole GiB, at least one: a step whose inputs fit needs no prlimit call (~2 ms of spawning) before it starts. */
const INPUT_ALLOWANCE_BYTES = 1024 ** 3;

/**
 * RLIMIT_AS of a step process: node's own reservations, twice memoryMb (what the step builds,
 * then its output being written to shared memory), and the inputs it maps, rounded up.
 */
export function addressSpaceFor(memoryMb: number, inputBytes: number): number {
  const inputs = Math.max(1, Math.ceil(inputBytes / INPUT_ALLOWANCE_BYTES)) * INPUT_ALLOWANCE_BYTES;
  return NODE_ADDRESS_SPACE_BYTES + 2 * memoryMb * 1024 ** 2 + inputs;
}

/** A number from the executor's environment; a value that is not one is reported by the check it then fails. */
function fromEnv(name: string): number | undefined {
  const raw = process.env[name];
  return raw === undefined || raw.trim() === '' ? undefined : Number(raw);
}

/** The util-linux prlimit binary, if installed. */
function findPrlimit(): string | null {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    try {
      accessSync(`${dir}/prlimit`, constants.X_OK);
      return `${dir}/prlimit`;
    } catch {
      // Not in this folder.
    }
  }
  return null;
}

type ResolvedOptions = Required<Omit<StepProcessesOptions, 'workers' | 'limits'>> & {
  workers: Required<WorkerOptions>;
  limits: { timeoutMs: number; memoryMb: number; prlimit: string | null };
};

function count(name: string, value: number | undefined, fallback: number, min: number): number {
  const v = value ?? fallback;
  if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`StepProcesses: ${name} must be an integer >= ${min}, got ${value}`);
  return v;
}

/** The heap limit of steps that declare none: what the executor's startup snapshot is built for. */
export function defaultStepMemoryMb(limits: StepLimitDefaults = {}): number {
  return count('limits.memoryMb', limits.memoryMb ?? fromEnv('QUIVER_STEP_MEMORY_MB'), DEFAULT_STEP_MEMORY_MB, 16);
}

/** User options → defaults → checked options, in one place. Throws at once on a bad value. */
export function resolveStepProcessesOptions(options: StepProcessesOptions): ResolvedOptions {
  const w = options.workers ?? {};
  const l = options.limits ?? {};
  return {
    runnerPath: options.runnerPath,
    snapshot: options.snapshot ?? null,
    clusterId: options.clusterId,
    prewarm: count('prewarm', options.prewarm, DEFAULT_PREWARM, 0),
    onLog: options.onLog,
    secrets: options.secrets ?? process.env,
    forkServer: options.forkServer ?? process.env.QUIVER_FORK_SERVER !== '0',
    warmUpCodePath: options.warmUpCodePath ?? null,
    limits: {
      timeoutMs: count('limits.timeoutMs', l.timeoutMs ?? fromEnv('QUIVER_STEP_TIMEOUT_MS'), DEFAULT_STEP_TIMEOUT_MS, 1),
      memoryMb: defaultStepMemoryMb(l),
      prlimit: l.addressSpace === false || !ADDRESS_SPACE_LIMIT_SUPPORTED ? null : findPrlimit(),
    },
    workers: {
      maxStepsPerWorker: count('workers.maxStepsPerWorker', w.maxStepsPerWorker, DEFAULT_MAX_STEPS_PER_WORKER, 1),
      maxWorkerRssBytes: count('workers.maxWorkerRssBytes', w.maxWorkerRssBytes, DEFAULT_MAX_WORKER_RSS_BYTES, 1),
      workerIdleMs: count('workers.workerIdleMs', w.workerIdleMs, DEFAULT_WORKER_IDLE_MS, 1),
      workerHangMs: count('workers.workerHangMs', w.workerHangMs, DEFAULT_WORKER_HANG_MS, 10),
      maxIdleWorkers: count('workers.maxIdleWorkers', w.maxIdleWorkers, DEFAULT_MAX_IDLE_WORKERS, 0),
    },
  };
}

interface IdleWorker {
  worker: StepProcess;
  timer: NodeJS.Timeout;
  /** When it became idle, in order: the first to go when too many are idle. */
  since: number;
}

/**
 * The step processes of one executor. `process` isolation: each step gets a fresh process (booted
 * ahead of need). `worker` isolation: each pipeline version (one linked bundle, `job.codePath`)
 * gets long-lived workers that import its code once and run its steps one at a time; as many as
 * run at once, recycled by count, memory, idleness, crash and hang. Never throws for a step's fault.
 */
export class StepProcesses {
  private readonly options: ResolvedOptions;
  /** Steps running now, by run: what killRun kills. */
  private readonly running = new Map<string, Set<StepProcess>>();
  private readonly spares: StepProcess[] = [];
  /** Idle workers by pool (pipeline version and heap limit, see poolKey), the most recently used last. */
  private readonly idle = new Map<string, IdleWorker[]>();
  private readonly workers = new Set<StepProcess>();
  private idleSequence = 0;
  /** The pipeline version a fresh process last ran: spares import its code while they wait. */
  private likelyCode: string | null = null;
  private refillScheduled = false;
  private stopped = false;
  /** Forks the processes of the default heap limit, when the fork server is on. */
  private readonly zygote: StepZygote | null;

  constructor(options: StepProcessesOptions) {
    this.options = resolveStepProcessesOptions(options);
    const { runnerPath, clusterId, limits } = this.options;
    this.zygote = this.options.forkServer
      ? new StepZygote(
          // Booted once, so without the startup snapshot (V8 refuses one built without
          // --single-threaded); its warmed-up bytecode is kept for the processes it forks. Node's
          // code on huge pages (where the kernel has them) is copied to a child with its page
          // tables instead of faulted in page by page: a quarter less system time per forked
          // process (7 ms against 9 in a loop of no-op steps on the 2-core bench VM).
          () => spawnRunner({ runnerPath, snapshot: null, clusterId, memoryMb: limits.memoryMb, prlimit: limits.prlimit, addressSpaceBytes: 0 }, ['--single-threaded', '--no-flush-bytecode', '--use-largepages=silent']),
          this.options.warmUpCodePath,
        )
      : null;
    this.refillSpares();
  }

  /** Live workers, busy or idle. */
  get workerCount(): number {
    return this.workers.size;
  }

  /**
   * Runs one user step to its reply: a table's segments, or the error that ended it. `limits`
   * and `env` are what the step declared (its StepReady): limits it leaves out take the defaults.
   */
  async run(
    job: RunnerJob,
    isolation: Isolation,
    declared: { limits?: StepLimits; env?: readonly string[]; system?: boolean; /** A system step's catalog calls (system-steps.ts). */ catalog?: CatalogHandler } = {},
  ): Promise<RunnerReply> {
    const secrets: Record<string, string> = {};
    const missing: string[] = [];
    for (const name of declared.env ?? []) {
      const value = this.options.secrets[name];
      if (value === undefined) missing.push(name);
      else secrets[name] = value;
    }
    if (missing.length > 0) return { type: 'error', error: stepEnvMissing(job.step, missing, hostname()) };
    if (Object.keys(secrets).length > 0) job = { ...job, env: secrets };
    const limits = this.resolveLimits(job, declared.limits);
    const keepAlive = isolation === 'worker';
    // A system step's code is Quiver's own: spares keep preloading the pipeline's.
    const preload = !declared.system;
    const proc = keepAlive ? this.takeWorker(job.codePath, limits.memoryMb, preload) : this.takeProcess(job.codePath, limits.memoryMb, preload);
    const set = this.running.get(job.runId) ?? new Set();
    set.add(proc);
    this.running.set(job.runId, set);
    try {
      const outcome = await proc.run(job, { keepAlive, hangMs: this.options.workers.workerHangMs, limits, ...(declared.catalog ? { catalog: declared.catalog } : {}) });
      if (keepAlive) this.afterWorkerStep(poolKey(job.codePath, limits.memoryMb), proc, outcome.reusable, outcome.rssBytes);
      return outcome.reply;
    } finally {
      set.delete(proc);
      if (set.size === 0 && this.running.get(job.runId) === set) this.running.delete(job.runId);
    }
  }

  /** The one place a step's limits are resolved: what it declared, else this executor's defaults. */
  resolveLimits(job: Pick<RunnerJob, 'inputs'>, declared: StepLimits = {}): RunLimits {
    const memoryMb = declared.memoryMb ?? this.options.limits.memoryMb;
    const inputBytes = job.inputs.reduce((n, i) => n + i.descriptor.byteSize, 0);
    return {
      timeoutMs: declared.timeoutMs ?? this.options.limits.timeoutMs,
      memoryMb,
      addressSpaceBytes: this.options.limits.prlimit ? addressSpaceFor(memoryMb, inputBytes) : 0,
    };
  }

  /** Kills the steps of a run now running here, workers included; each ends with an error saying why. */
  killRun(runId: string, why: string): void {
    for (const proc of this.running.get(runId) ?? []) proc.kill(why);
  }

  /** Kills every step process, workers and spares: steps still running end with an error saying why. */
  stop(why: string): void {
    this.stopped = true;
    for (const procs of this.running.values()) for (const proc of procs) proc.kill(why);
    for (const worker of this.workers) if (!worker.busy) worker.retire();
    for (const spare of this.spares.splice(0)) spare.kill(why);
    this.zygote?.stop();
  }

  /** Workers are pooled by pipeline version and heap limit: a worker's heap limit is fixed when it starts. */
  private takeWorker(codePath: string, memoryMb: number, preload: boolean): StepProcess {
    const key = poolKey(codePath, memoryMb);
    const idle = this.idle.get(key) ?? [];
    let reused: StepProcess | null = null;
    while (!reused && idle.length > 0) {
      const { worker, timer } = idle.pop()!;
      clearTimeout(timer);
      if (worker.alive) reused = worker;
    }
    if (idle.length === 0) this.idle.delete(key);
    if (reused) return reused;
    // Booted, not forked from the zygote: a worker lives for thousands of steps, and a forked
    // process runs V8 on one thread, collecting garbage without helpers. Forked workers no longer
    // hang since the zygote holds Node's platform threads across forks (60,000 garbage-heavy
    // steps, two at a time), but they gained nothing in `npm run bench:trigger -- --routes worker`
    // (CPU per run and runs/s within the noise of booted ones) while their longest step of a
    // garbage-heavy loop took 250 ms against 80-95 ms booted: full collections on one thread.
    const worker = this.spawn(memoryMb, { forked: false });
    if (preload) worker.preload(codePath);
    this.workers.add(worker);
    worker.onExit(() => {
      this.workers.delete(worker);
      this.dropIdle(key, worker);
    });
    return worker;
  }

  /** Back to idle, or replaced: by count, by memory, or because it crashed. */
  private afterWorkerStep(key: string, worker: StepProcess, reusable: boolean, rssBytes: number | null): void {
    const limits = this.options.workers;
    if (!reusable || !worker.alive) {
      // Alive but not to be trusted (it ran out of memory): replaced. Dying already: its exit takes it out of the pool.
      if (worker.alive) worker.retire();
      return;
    }
    if (this.stopped || worker.steps >= limits.maxStepsPerWorker || (rssBytes ?? 0) > limits.maxWorkerRssBytes) {
      worker.retire();
      return;
    }
    const timer = setTimeout(() => {
      this.dropIdle(key, worker);
      worker.retire();
    }, limits.workerIdleMs);
    timer.unref();
    const idle = this.idle.get(key) ?? [];
    idle.push({ worker, timer, since: ++this.idleSequence });
    this.idle.set(key, idle);
    this.keepIdleWithinLimit();
  }

  private keepIdleWithinLimit(): void {
    for (;;) {
      const all = [...this.idle.entries()].flatMap(([key, list]) => list.map((entry) => ({ key, entry })));
      if (all.length <= this.options.workers.maxIdleWorkers) return;
      const oldest = all.reduce((a, b) => (b.entry.since < a.entry.since ? b : a));
      this.dropIdle(oldest.key, oldest.entry.worker);
      oldest.entry.worker.retire();
    }
  }

  private dropIdle(key: string, worker: StepProcess): void {
    const idle = this.idle.get(key);
    if (!idle) return;
    const at = idle.findIndex((i) => i.worker === worker);
    if (at >= 0) clearTimeout(idle.splice(at, 1)[0]!.timer);
    if (idle.length === 0) this.idle.delete(key);
  }

  /**
   * A step process started ahead of time: booted, past its imports, and with the code of the
   * pipeline version that ran last already imported, but it has run no step, so every step still
   * gets a fresh process. Start-up (~170 ms of node and apache-arrow, then compiling the
   * pipeline's bundle) moves off the step's critical path.
   */
  private takeProcess(codePath: string, memoryMb: number, preload: boolean): StepProcess {
    // Spares start with the default heap limit: a step declaring another starts its own process.
    if (memoryMb !== this.options.limits.memoryMb) return this.spawn(memoryMb);
    let spare: StepProcess | undefined;
    while ((spare = this.spares.shift()) && !spare.alive);
    if (preload && codePath !== this.likelyCode) {
      this.likelyCode = codePath;
      for (const waiting of this.spares) waiting.preload(codePath);
    }
    // After this step's job is sent: forking a replacement blocks this process for milliseconds.
    if (!this.refillScheduled) {
      this.refillScheduled = true;
      setImmediate(() => {
        this.refillScheduled = false;
        this.refillSpares();
      });
    }
    return spare ?? this.spawn(memoryMb);
  }

  private refillSpares(): void {
    const wanted = this.stopped ? 0 : this.options.prewarm;
    while (this.spares.length < wanted) {
      const spare = this.spawn(this.options.limits.memoryMb);
      if (this.likelyCode) spare.preload(this.likelyCode);
      this.spares.push(spare);
      spare.onExit(() => {
        const at = this.spares.indexOf(spare);
        if (at >= 0) this.spares.splice(at, 1);
      });
    }
  }

  private spawn(memoryMb: number, { forked = true } = {}): StepProcess {
    const { runnerPath, snapshot, clusterId, onLog, limits } = this.options;
    // The zygote's heap limit is the default one: a step declaring another boots its own process.
    const zygote = forked && memoryMb === limits.memoryMb && this.zygote?.usable ? this.zygote : null;
    return new StepProcess({ runnerPath, snapshot, clusterId, onLog, memoryMb, prlimit: limits.prlimit, addressSpaceBytes: addressSpaceFor(memoryMb, 0), zygote });
  }
}

/** Idle workers of one pipeline version and heap limit. */
function poolKey(codePath: string, memoryMb: number): string {
  return `${memoryMb}:${codePath}`;
}
