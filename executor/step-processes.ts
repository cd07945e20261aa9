import type { Isolation, LogLine } from '../schemas/index.ts';
import type { RunnerJob, RunnerReply } from './protocol.ts';
import { StepProcess } from './step-process.ts';

/** Limits of the long-lived step processes that run steps with `isolation: 'worker'`. */
export interface WorkerOptions {
  /** Steps a worker runs before it is replaced by a new one. @default 1000 */
  maxStepsPerWorker?: number;
  /** A worker whose resident set is above this after a step is replaced (the step still succeeds). @default 1 GiB */
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
  /** Written into each step process's title, where gc finds it. */
  clusterId: string;
  /** Step processes kept booted ahead of need (each has run nothing yet). 0 starts each on demand. @default 2 */
  prewarm?: number;
  workers?: WorkerOptions;
  /** Every line a step prints, as it prints it. */
  onLog: (line: LogLine) => void;
}

export const DEFAULT_PREWARM = 2;
export const DEFAULT_MAX_STEPS_PER_WORKER = 1000;
export const DEFAULT_MAX_WORKER_RSS_BYTES = 1024 ** 3;
export const DEFAULT_WORKER_IDLE_MS = 60_000;
export const DEFAULT_WORKER_HANG_MS = 30_000;
export const DEFAULT_MAX_IDLE_WORKERS = 8;

type ResolvedOptions = Required<Omit<StepProcessesOptions, 'workers'>> & { workers: Required<WorkerOptions> };

/** User options → defaults → checked options, in one place. Throws at once on a bad value. */
export function resolveStepProcessesOptions(options: StepProcessesOptions): ResolvedOptions {
  const count = (name: string, value: number | undefined, fallback: number, min: number): number => {
    const v = value ?? fallback;
    if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`StepProcesses: ${name} must be an integer >= ${min}, got ${value}`);
    return v;
  };
  const w = options.workers ?? {};
  return {
    runnerPath: options.runnerPath,
    clusterId: options.clusterId,
    prewarm: count('prewarm', options.prewarm, DEFAULT_PREWARM, 0),
    onLog: options.onLog,
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
  /** Idle workers by code path, the most recently used last. */
  private readonly idle = new Map<string, IdleWorker[]>();
  private readonly workers = new Set<StepProcess>();
  private idleSequence = 0;
  /** The pipeline version a fresh process last ran: spares import its code while they wait. */
  private likelyCode: string | null = null;
  private stopped = false;

  constructor(options: StepProcessesOptions) {
    this.options = resolveStepProcessesOptions(options);
    this.refillSpares();
  }

  /** Live workers, busy or idle. */
  get workerCount(): number {
    return this.workers.size;
  }

  /** Runs one user step to its reply: a table's segments, or the error that ended it. */
  async run(job: RunnerJob, isolation: Isolation): Promise<RunnerReply> {
    const keepAlive = isolation === 'worker';
    const proc = keepAlive ? this.takeWorker(job.codePath) : this.takeProcess(job.codePath);
    const set = this.running.get(job.runId) ?? new Set();
    set.add(proc);
    this.running.set(job.runId, set);
    try {
      const outcome = await proc.run(job, { keepAlive, hangMs: this.options.workers.workerHangMs });
      if (keepAlive) this.afterWorkerStep(job.codePath, proc, outcome.reusable, outcome.rssBytes);
      return outcome.reply;
    } finally {
      set.delete(proc);
      if (set.size === 0 && this.running.get(job.runId) === set) this.running.delete(job.runId);
    }
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
  }

  private takeWorker(codePath: string): StepProcess {
    const idle = this.idle.get(codePath) ?? [];
    let reused: StepProcess | null = null;
    while (!reused && idle.length > 0) {
      const { worker, timer } = idle.pop()!;
      clearTimeout(timer);
      if (worker.alive) reused = worker;
    }
    if (idle.length === 0) this.idle.delete(codePath);
    if (reused) return reused;
    const worker = this.takeProcess(codePath);
    this.workers.add(worker);
    worker.onExit(() => {
      this.workers.delete(worker);
      this.dropIdle(codePath, worker);
    });
    return worker;
  }

  /** Back to idle, or replaced: by count, by memory, or because it crashed. */
  private afterWorkerStep(codePath: string, worker: StepProcess, reusable: boolean, rssBytes: number | null): void {
    const limits = this.options.workers;
    if (!reusable || !worker.alive) return; // dying already: its exit takes it out of the pool
    if (this.stopped || worker.steps >= limits.maxStepsPerWorker || (rssBytes ?? 0) > limits.maxWorkerRssBytes) {
      worker.retire();
      return;
    }
    const timer = setTimeout(() => {
      this.dropIdle(codePath, worker);
      worker.retire();
    }, limits.workerIdleMs);
    timer.unref();
    const idle = this.idle.get(codePath) ?? [];
    idle.push({ worker, timer, since: ++this.idleSequence });
    this.idle.set(codePath, idle);
    this.keepIdleWithinLimit();
  }

  private keepIdleWithinLimit(): void {
    for (;;) {
      const all = [...this.idle.entries()].flatMap(([codePath, list]) => list.map((entry) => ({ codePath, entry })));
      if (all.length <= this.options.workers.maxIdleWorkers) return;
      const oldest = all.reduce((a, b) => (b.entry.since < a.entry.since ? b : a));
      this.dropIdle(oldest.codePath, oldest.entry.worker);
      oldest.entry.worker.retire();
    }
  }

  private dropIdle(codePath: string, worker: StepProcess): void {
    const idle = this.idle.get(codePath);
    if (!idle) return;
    const at = idle.findIndex((i) => i.worker === worker);
    if (at >= 0) clearTimeout(idle.splice(at, 1)[0]!.timer);
    if (idle.length === 0) this.idle.delete(codePath);
  }

  /**
   * A step process started ahead of time: booted, past its imports, and with the code of the
   * pipeline version that ran last already imported, but it has run no step, so every step still
   * gets a fresh process. Start-up (~170 ms of node and apache-arrow, then compiling the
   * pipeline's bundle) moves off the step's critical path.
   */
  private takeProcess(codePath: string): StepProcess {
    let spare: StepProcess | undefined;
    while ((spare = this.spares.shift()) && !spare.alive);
    if (codePath !== this.likelyCode) {
      this.likelyCode = codePath;
      for (const waiting of this.spares) waiting.preload(codePath);
    }
    this.refillSpares();
    return spare ?? this.spawn();
  }

  private refillSpares(): void {
    const wanted = this.stopped ? 0 : this.options.prewarm;
    while (this.spares.length < wanted) {
      const spare = this.spawn();
      if (this.likelyCode) spare.preload(this.likelyCode);
      this.spares.push(spare);
      spare.onExit(() => {
        const at = this.spares.indexOf(spare);
        if (at >= 0) this.spares.splice(at, 1);
      });
    }
  }

  private spawn(): StepProcess {
    const { runnerPath, clusterId, onLog } = this.options;
    return new StepProcess({ runnerPath, clusterId, onLog });
  }
}
