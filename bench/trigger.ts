/**
 * Trigger benchmark: what a user feels from publishing an event to the first line of their step
 * function running, and how many runs finish per second, for three routes side by side:
 *
 *   quiver process  a deployed three-step chain first → second → third (each passes a one-row
 *                   Arrow table on), started by `bench.process.*` events, `isolation: 'process'`:
 *                   every step in a fresh process.
 *   quiver worker   the same chain as its own pipeline, started by `bench.worker.*` events,
 *                   `isolation: 'worker'`: long-lived step processes per pipeline version.
 *   bullmq          a FlowProducer flow third ← second ← first on one queue (BullMQ runs children
 *                   first), processed by a Worker in this process: no process per step.
 *
 * Both quiver routes run on ONE embedded cluster (startLocalCluster: private nats-server,
 * orchestrator and executor in this process), one route after the other; the cluster is
 * stopped before the BullMQ route runs, so idle step processes do not share its CPU.
 *
 * What is timed, per event: publish → the first line of the first step's function.
 *   start  the monotonic clock (bench/first-line.ts) read right before `client.publish`
 *          (BullMQ: before `flows.add`).
 *   end    the first step function's first line: it appends `<event id> first <monotonic ns>` to
 *          the route's marks file (BullMQ: the worker callback's first line, for the `first` job).
 *          CLOCK_MONOTONIC is one clock for every process of the host; the wall clock is not
 *          (this VM's is stepped, and each process froze it at its start).
 * Runs are observed only through their run views (core NATS `quiver.status.>`, decoded with the
 * `runView` schema), cross-checked against `client.listRuns` (KV) after each phase, since
 * status messages are not durable.
 *
 * Per route:
 *   1. warm-up: one event after deploy (its latency is printed as "cold", not counted);
 *   2. latency: --latency events one at a time, each run waited for: p50, p90, p99;
 *   3. burst: --burst events published at once: runs finished per second, from the first
 *      publish to the last run heard finished; with --bursts N, N bursts one after another
 *      (the table adds the last one's runs/s): the first burst finds every process's JIT still
 *      warming after the latency phase, later ones show what a long-running cluster does;
 *   4. exactly once, over every event the route published: each event id has exactly one run,
 *      every run succeeded, and each step's user code ran exactly once per event. The step
 *      functions (BullMQ: the worker callback) append `<event id> <step> <monotonic ns>` to a marks file.
 * Per route, the CPU each process used during the burst, per run finished: this process (the
 * embedded orchestrator and executor, the client; BullMQ: its worker and producer), nats-server
 * or redis-server, and the step processes. On a 2-core machine runs/s can be no more than
 * 2,000 ms / the total.
 * After both quiver routes: the cluster's shared-memory folder must hold no segments once the
 * runs are done (runs started by events release their outputs when they end); the pool of
 * released segments kept for reuse is listed but is not a leak.
 * Exits non-zero when a check fails or a route breaks; stops the cluster, removes its temp dir
 * and obliterates the BullMQ queue in every case (also on Ctrl-C).
 *
 * --concurrency: steps the executor runs at once and the BullMQ worker's concurrency. Default:
 * the number of cores (2 on the 2-core bench machine), which is the executor's own default and
 * what a user gets; more step processes than cores only queue for the CPU, which the
 * orchestrator, nats-server and this process also need. BullMQ gets the same for parity (its
 * jobs do no work, so it only bounds the jobs in flight).
 *
 * Run: npm run bench:trigger [-- --latency 200 --burst 1000 --bursts 1 --concurrency 2 --routes process,worker,bullmq]
 * Redis: REDIS_URL, else 127.0.0.1:6379, else a redis-server the bench starts on a free port.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, appendFileSync } from 'node:fs';
import { createServer, Socket } from 'node:net';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { FlowProducer, Queue, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { decode, isFinished, runView, silentLogger, subjects, type RunView } from '../schemas/index.ts';
import { loadPipeline, startLocalCluster, type QuiverClient } from '../sdk/index.ts';
import { firstLineMark, monotonicMs, readMarks } from './first-line.ts';

const { values } = parseArgs({
  options: {
    latency: { type: 'string', default: '200' },
    burst: { type: 'string', default: '1000' },
    concurrency: { type: 'string', default: String(availableParallelism()) },
    routes: { type: 'string', default: 'process,worker,bullmq' },
    'latency-gap-ms': { type: 'string', default: '250' },
    bursts: { type: 'string', default: '1' },
  },
});
const ROUTES = new Set(values.routes.split(',').map((r) => r.trim()));
for (const r of ROUTES) if (!['process', 'worker', 'bullmq'].includes(r)) throw new Error(`--routes takes process, worker and bullmq, comma-separated: not ${r}`);
const LATENCY_EVENTS = Number(values.latency);
const BURST = Number(values.burst);
const CONCURRENCY = Number(values.concurrency);
const LATENCY_GAP_MS = Number(values['latency-gap-ms']);
const BURSTS = Number(values.bursts);
for (const [flag, n, min] of [['latency', LATENCY_EVENTS, 1], ['burst', BURST, 1], ['concurrency', CONCURRENCY, 1], ['latency-gap-ms', LATENCY_GAP_MS, 0], ['bursts', BURSTS, 1]] as const) {
  if (!Number.isInteger(n) || n < min) throw new Error(`--${flag} must be an integer ≥ ${min}`);
}
const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const STEPS = ['first', 'second', 'third'] as const;
/** A latency event's run not heard finished for this long is looked up in KV, then given up on. */
const LATENCY_STALL_MS = 20_000;
/** The burst is given up on when no run of it finished for this long. */
const BURST_STALL_MS = 60_000;

/** Where a latency starts: the clock the step's first line is read with. */
const now = monotonicMs;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Cleanup: everything started registers how to undo it; undone in reverse, on success, failure
// and signals alike.

const cleanups: { what: string; run: () => unknown }[] = [];
const onCleanup = (what: string, run: () => unknown) => void cleanups.push({ what, run });
async function cleanUp(): Promise<void> {
  while (cleanups.length > 0) {
    const { what, run } = cleanups.pop()!;
    try {
      await withTimeout(Promise.resolve().then(run), 30_000, what);
    } catch (error) {
      console.error(`cleanup: ${what} failed: ${(error as Error).message}`);
    }
  }
}
async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms)));
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    console.error(`\n${signal}: cleaning up`);
    void cleanUp().finally(() => process.exit(130));
  });
}

// ---------------------------------------------------------------------------------------------
// Routes and the one measuring loop they share.

/** Wakes waiters whenever a run finishes. */
class Progress {
  private waiters: (() => void)[] = [];
  notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
  /** Resolves at the next notification, or after `ms`. */
  next(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.waiters.push(() => (clearTimeout(timer), resolve()));
    });
  }
}

interface Check {
  ok: boolean;
  lines: string[];
}

interface Route {
  readonly label: string;
  /** Event ids are prefixed with it: unique across routes (JetStream dedups ids per stream). */
  readonly key: string;
  readonly progress: Progress;
  publish(id: string, phase: 'warmup' | 'latency' | 'burst', i: number): Promise<unknown>;
  /** True once a run of this event was seen finished. */
  finished(id: string): boolean;
  /** When the first step's code started, for the event's (first) finished run. */
  firstCodeAt(id: string): number | undefined;
  /** Why the event's finished run did not succeed (its state and its steps' errors), if it did not. */
  failure?(id: string): string | undefined;
  /** When this process heard the event's run finish. */
  finishedAt(id: string): number | undefined;
  /** Looks for finished runs the live feed missed. */
  recover?(): Promise<void>;
  /** Exactly once, for these events. */
  verify(ids: readonly string[]): Promise<Check>;
}

interface Result {
  label: string;
  cold: number;
  /** Sorted, ms. */
  latencies: number[];
  burstFinished: number;
  burstSeconds: number;
  runsPerSecond: number;
  /** Runs finished per second in each burst after the first (--bursts): the JIT warmer each time. */
  laterRunsPerSecond: number[];
  /** publish → first code within the burst (queueing included), sorted. */
  burstLatencies: number[];
  check: Check;
}

const percentile = (sorted: number[], p: number) =>
  sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;

/** How often a wait for many runs counts which have finished. */
const SCAN_EVERY_MS = 25;

/** Waits until every id has a finished run; false when none finished for `stallMs` (after one recovery). */
async function waitFinished(route: Route, ids: readonly string[], stallMs: number): Promise<boolean> {
  const pending = new Set(ids.filter((id) => !route.finished(id)));
  let lastProgress = now();
  let recovered = false;
  let lastScan = now();
  while (pending.size > 0) {
    if (now() - lastProgress > stallMs) {
      if (recovered || !route.recover) return false;
      recovered = true;
      await route.recover();
      lastProgress = now();
    } else {
      await route.progress.next(Math.min(pending.size > 1 ? SCAN_EVERY_MS : 1000, stallMs));
    }
    // A burst notifies once per run: scanning every pending id each time weighed on the cluster
    // this process shares (a run's finish time is when it was heard, not when it is counted here).
    if (pending.size > 1 && now() - lastScan < SCAN_EVERY_MS) continue;
    lastScan = now();
    const before = pending.size;
    for (const id of pending) if (route.finished(id)) pending.delete(id);
    if (pending.size < before) lastProgress = now();
  }
  return true;
}


/**
 * CPU time by process over a phase: this process (the client, orchestrator and executor of the
 * embedded cluster), and each descendant by kind (nats-server, step processes). Sampled from
 * /proc every 250 ms. A process that exits between two samples (a step process forked and done in
 * milliseconds) is never seen, or seen only in part: what it used reaches its parent's reaped-
 * children time (cutime and cstime) once its parent waits for it, so each parent's reaped time in
 * the phase, less what its children that vanished were last seen using, counts as what those
 * children used unseen (as step processes: only step processes come and go during a burst).
 * The meter's own CPU is taken off this process's.
 */
class CpuMeter {
  private readonly used = new Map<number, { kind: string; ppid: number; first: number; last: number; reapedFirst: number; reapedLast: number; gone: boolean }>();
  private timer: NodeJS.Timeout | undefined;
  private readonly ticksPerMs = 100 / 1000;
  start(): void {
    this.sample();
    this.timer = setInterval(() => this.sample(), 250);
  }
  stop(): Map<string, number> {
    clearInterval(this.timer);
    this.sample();
    const byKind = new Map<string, number>();
    const add = (kind: string, ticks: number) => byKind.set(kind, (byKind.get(kind) ?? 0) + ticks / this.ticksPerMs);
    for (const [pid, { kind, first, last, reapedFirst, reapedLast }] of this.used) {
      add(kind, last - first);
      const seenOfVanished = [...this.used.values()].filter((c) => c.gone && c.ppid === pid).reduce((n, c) => n + c.last, 0);
      add('step processes', Math.max(0, reapedLast - reapedFirst - seenOfVanished));
    }
    // The meter's own reading of /proc is not the route's.
    byKind.set('main', Math.max(0, (byKind.get('main') ?? 0) - this.ownMs));
    return byKind;
  }
  private ownMs = 0;
  private sample(): void {
    const before = process.cpuUsage();
    try {
      this.read();
    } finally {
      const spent = process.cpuUsage(before);
      this.ownMs += (spent.user + spent.system) / 1000;
    }
  }
  private read(): void {
    const parents = new Map<number, number>();
    const stats = new Map<number, { ticks: number; reaped: number; cmd: string }>();
    for (const entry of readdirSync('/proc')) {
      const pid = Number(entry);
      if (!Number.isInteger(pid)) continue;
      try {
        const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
        const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        parents.set(pid, Number(fields[1]));
        stats.set(pid, { ticks: Number(fields[11]) + Number(fields[12]), reaped: Number(fields[13]) + Number(fields[14]), cmd: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) });
      } catch {
        // exited between the listing and the read
      }
    }
    const descends = (pid: number): boolean => {
      for (let p: number | undefined = pid; p !== undefined && p > 1; p = parents.get(p)) if (p === process.pid) return true;
      return false;
    };
    for (const [pid, known] of this.used) if (!stats.has(pid)) known.gone = true;
    for (const [pid, { ticks, reaped, cmd }] of stats) {
      // BullMQ's Redis is the machine's when one runs on 6379: its CPU is the route's all the same.
      const isRedis = cmd.startsWith('redis-server');
      if (!isRedis && !descends(pid)) continue;
      const kind = pid === process.pid ? 'main' : isRedis ? 'redis-server' : cmd.includes('nats-server') ? 'nats-server' : cmd.startsWith('quiver-step') || cmd === 'node' ? 'step processes' : 'other';
      const known = this.used.get(pid);
      if (known) {
        known.last = ticks;
        known.reapedLast = reaped;
        continue;
      }
      // A process first seen mid-phase started in it: all its CPU counts.
      const fromStart = this.used.size === 0 || pid === process.pid || !this.started;
      this.used.set(pid, { kind, ppid: parents.get(pid) ?? 0, first: fromStart ? ticks : 0, last: ticks, reapedFirst: fromStart ? reaped : 0, reapedLast: reaped, gone: false });
    }
    this.started = true;
  }
  private started = false;
}

async function measure(route: Route): Promise<Result> {
  const ids: string[] = [];
  const log = (line: string) => console.log(`[${route.label}] ${line}`);

  const warm = `${route.key}-warmup`;
  ids.push(warm);
  const warmAt = now();
  await route.publish(warm, 'warmup', 0);
  if (!(await waitFinished(route, [warm], LATENCY_STALL_MS))) throw new Error(`${route.label}: the warm-up run did not finish`);
  const firstCodeOf = (id: string): number => {
    const at = route.firstCodeAt(id);
    if (at !== undefined) return at;
    throw new Error(`${route.label}: the run of ${id} finished, ${route.failure?.(id) ?? 'but its first step left no mark'}`);
  };
  const cold = firstCodeOf(warm) - warmAt;
  log(`warm-up: ${cold.toFixed(1)} ms publish → first code`);

  const latencies: number[] = [];
  const latencyStart = now();
  for (let i = 0; i < LATENCY_EVENTS; i++) {
    await sleep(LATENCY_GAP_MS);
    const id = `${route.key}-latency-${i}`;
    ids.push(id);
    const publishedAt = now();
    await route.publish(id, 'latency', i);
    if (!(await waitFinished(route, [id], LATENCY_STALL_MS))) throw new Error(`${route.label}: the run of ${id} did not finish`);
    latencies.push(firstCodeOf(id) - publishedAt);
  }
  log(`latency: ${LATENCY_EVENTS} events one at a time in ${((now() - latencyStart) / 1000).toFixed(1)} s`);

  const bursts: Burst[] = [];
  for (let pass = 0; pass < BURSTS; pass++) bursts.push(await burst(route, ids, pass, log));
  const [first, ...later] = bursts as [Burst, ...Burst[]];
  const check = await route.verify(ids);
  log(`exactly once over ${ids.length} events: ${check.ok ? 'ok' : 'FAIL'}`);
  for (const line of check.lines) log(`  ${line}`);
  latencies.sort((a, b) => a - b);
  return {
    label: route.label,
    cold,
    latencies,
    burstFinished: first.finished,
    burstSeconds: first.seconds,
    runsPerSecond: first.finished / first.seconds,
    laterRunsPerSecond: later.map((b) => b.finished / b.seconds),
    burstLatencies: first.latencies,
    check,
  };
}

interface Burst {
  finished: number;
  seconds: number;
  /** publish → first code (queueing included), sorted. */
  latencies: number[];
}

/**
 * --burst events published at once (pass 0 is the first burst, --bursts repeats it): runs
 * finished per second, from the first publish to the last run heard finished, and the CPU each
 * kind of process used per run.
 */
async function burst(route: Route, ids: string[], pass: number, log: (line: string) => void): Promise<Burst> {
  const name = pass === 0 ? 'burst' : `burst ${pass + 1}`;
  const burstIds = Array.from({ length: BURST }, (_, i) => pass === 0 ? `${route.key}-burst-${i}` : `${route.key}-burst${pass + 1}-${i}`);
  ids.push(...burstIds);
  const publishedAt = new Map<string, number>();
  const cpu = new CpuMeter();
  cpu.start();
  const burstStart = now();
  await Promise.all(
    burstIds.map((id, i) => {
      publishedAt.set(id, now());
      return route.publish(id, 'burst', i);
    }),
  );
  const allPublished = now();
  const complete = await waitFinished(route, burstIds, BURST_STALL_MS);
  const cpuByKind = cpu.stop();
  const done = burstIds.filter((id) => route.finished(id));
  const lastFinished = Math.max(...done.map((id) => route.finishedAt(id)!));
  const burstSeconds = (lastFinished - burstStart) / 1000;
  const burstLatencies = done.map((id) => route.firstCodeAt(id)! - publishedAt.get(id)!).sort((a, b) => a - b);
  log(
    `${name}: ${BURST} published in ${(allPublished - burstStart).toFixed(0)} ms, ${done.length} finished in ${burstSeconds.toFixed(1)} s` +
      (complete ? '' : ` (gave up: none finished for ${BURST_STALL_MS / 1000} s)`) +
      `; publish → first code while queued: p50 ${percentile(burstLatencies, 50).toFixed(0)} ms, max ${burstLatencies.at(-1)?.toFixed(0)} ms`,
  );

  const cpuPerRun = [...cpuByKind].map(([kind, ms]) => `${kind} ${(ms / Math.max(1, done.length)).toFixed(2)}`).join(', ');
  log(`${name} CPU per run finished, ms: ${cpuPerRun} (total ${([...cpuByKind.values()].reduce((a, b) => a + b, 0) / Math.max(1, done.length)).toFixed(2)})`);
  return { finished: done.length, seconds: burstSeconds, latencies: burstLatencies };
}

/** Problems grouped by kind, with a few examples each. */
class Problems {
  private readonly kinds = new Map<string, { count: number; examples: string[] }>();
  add(kind: string, example: string): void {
    const k = this.kinds.get(kind) ?? { count: 0, examples: [] };
    k.count++;
    if (k.examples.length < 3) k.examples.push(example);
    this.kinds.set(kind, k);
  }
  get empty(): boolean {
    return this.kinds.size === 0;
  }
  lines(): string[] {
    return [...this.kinds].map(([kind, { count, examples }]) => `${kind}: ${count} (e.g. ${examples.join(', ')})`);
  }
}

/** Each event id appears exactly once per step in the marks file, and no other id appears. */
function checkMarks(path: string, ids: readonly string[], problems: Problems): void {
  const counts = new Map([...readMarks(path)].map(([label, times]) => [label, times.length]));
  const expected = new Set<string>();
  for (const id of ids) {
    for (const step of STEPS) {
      const mark = `${id} ${step}`;
      expected.add(mark);
      const n = counts.get(mark) ?? 0;
      if (n === 0) problems.add('user code never ran', mark);
      else if (n > 1) problems.add('user code ran more than once', `${mark} ×${n}`);
    }
  }
  for (const mark of counts.keys()) if (!expected.has(mark)) problems.add('user code ran for an unknown event', mark);
}

// ---------------------------------------------------------------------------------------------
// Quiver

/** One deployed pipeline on the shared cluster, observed through its run views. */
class QuiverRoute implements Route {
  readonly progress = new Progress();
  /** Finished runs, by run id: the latest view and when this process first heard it finished. */
  private readonly runs = new Map<string, { view: RunView; heardAt: number }>();
  private readonly runsByEvent = new Map<string, string[]>();
  private readonly duplicates: string[] = [];
  private missedByStatus = 0;
  /** The marks file as last read: re-read when an event's first line is not in it yet. */
  private firstLines = new Map<string, number[]>();

  constructor(
    readonly label: string,
    readonly key: string,
    readonly pipeline: string,
    private readonly subjectPrefix: string,
    private readonly marks: string,
    private readonly client: QuiverClient,
  ) {}

  /** A view off the status feed (or KV): kept when it is a finished run of this pipeline's events. */
  see(view: RunView, heardAt: number): void {
    if (view.pipeline !== this.pipeline || !isFinished(view.state) || view.trigger.kind !== 'event') return;
    const known = this.runs.get(view.runId);
    if (known) {
      known.view = view;
      return;
    }
    this.runs.set(view.runId, { view, heardAt });
    const byEvent = this.runsByEvent.get(view.trigger.eventId) ?? [];
    byEvent.push(view.runId);
    this.runsByEvent.set(view.trigger.eventId, byEvent);
    this.progress.notify();
  }

  async publish(id: string, phase: string, i: number): Promise<unknown> {
    const result = await this.client.publish(`${this.subjectPrefix}.${phase}`, { i }, { id });
    if (result.duplicate) this.duplicates.push(id);
    return result;
  }

  finished(id: string): boolean {
    return this.runsByEvent.has(id);
  }

  private firstRun(id: string) {
    const runId = this.runsByEvent.get(id)?.[0];
    return runId === undefined ? undefined : this.runs.get(runId);
  }

  failure(id: string): string | undefined {
    const view = this.firstRun(id)?.view;
    if (!view || view.state === 'succeeded') return undefined;
    const errors = view.steps.filter((s) => s.error).map((s) => `${s.name}: ${s.error!.code ?? s.error!.name}: ${s.error!.message}`);
    return `${view.state}${errors.length > 0 ? ` (${errors.join('; ')})` : ''}`;
  }

  firstCodeAt(id: string): number | undefined {
    if (!this.firstLines.has(`${id} first`)) this.firstLines = readMarks(this.marks);
    return this.firstLines.get(`${id} first`)?.[0];
  }

  finishedAt(id: string): number | undefined {
    return this.firstRun(id)?.heardAt;
  }

  async recover(): Promise<void> {
    for (const view of await this.client.listRuns({ pipeline: this.pipeline })) {
      if (!this.runs.has(view.runId) && isFinished(view.state)) {
        this.missedByStatus++;
        this.see(view, now());
      }
    }
  }

  async verify(ids: readonly string[]): Promise<Check> {
    const problems = new Problems();
    const notes: string[] = [];
    // KV is the record: every run of this pipeline, finished or not.
    const stored = await this.client.listRuns({ pipeline: this.pipeline });
    const storedById = new Map(stored.map((v) => [v.runId, v]));
    const runsByEvent = new Map<string, Set<string>>();
    const add = (eventId: string, runId: string) => runsByEvent.set(eventId, (runsByEvent.get(eventId) ?? new Set()).add(runId));
    for (const [eventId, runIds] of this.runsByEvent) for (const runId of runIds) add(eventId, runId);
    for (const view of stored) {
      if (view.trigger.kind === 'event') add(view.trigger.eventId, view.runId);
      else problems.add('run not started by an event', view.runId);
      if (isFinished(view.state) && !this.runs.has(view.runId)) this.missedByStatus++;
    }
    const wanted = new Set(ids);
    let retried = 0;
    for (const id of ids) {
      const runIds = [...(runsByEvent.get(id) ?? [])];
      if (runIds.length === 0) problems.add('event with no run', id);
      else if (runIds.length > 1) problems.add('event with several runs', `${id} ×${runIds.length}`);
      for (const runId of runIds) {
        const view = storedById.get(runId) ?? this.runs.get(runId)?.view;
        if (!storedById.has(runId)) problems.add('run heard on the status feed but not in KV', runId);
        if (!view) continue;
        if (view.state !== 'succeeded') problems.add(`run ${view.state}`, `${id} (${runId})`);
        for (const step of view.steps) {
          if (step.state !== 'succeeded') problems.add(`step ${step.state}`, `${id} ${step.name}${step.error ? ` (${step.error.code ?? step.error.name}: ${step.error.message})` : ''}`);
          if (step.attempt > 1) retried++;
        }
      }
    }
    for (const eventId of runsByEvent.keys()) if (!wanted.has(eventId)) problems.add('run for an event not published', eventId);
    for (const id of this.duplicates) problems.add('publish reported a duplicate', id);
    checkMarks(this.marks, ids, problems);
    if (retried > 0) notes.push(`${retried} step(s) needed more than one attempt`);
    if (this.missedByStatus > 0) notes.push(`${this.missedByStatus} finished run(s) found only in KV, not on the status feed`);
    const isolations = new Set(stored.flatMap((v) => v.steps.map((s) => s.isolation ?? 'none')));
    notes.push(`${stored.length} runs in KV; steps ran with isolation: ${[...isolations].join(', ')}`);
    return { ok: problems.empty, lines: [...problems.lines(), ...notes] };
  }
}

function pipelineFile(dir: string, name: string, isolation: 'process' | 'worker', subjectPrefix: string, marks: string): string {
  const file = join(dir, `${name}.ts`);
  // Each step's first line marks that its user code ran for this event.
  const mark = (step: string) => firstLineMark(marks, `\${ctx.event?.id} ${step}`);
  writeFileSync(
    file,
    `import { appendFileSync } from 'node:fs';
import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline(${JSON.stringify(name)}, {
  first: step((_inputs, ctx) => {
    ${mark('first')}
    return tableFromArrays({ v: Int32Array.of(1) });
  }),
  second: step({ t: 'first' }, ({ t }, ctx) => {
    ${mark('second')}
    return t;
  }),
  third: step({ t: 'second' }, ({ t }, ctx) => {
    ${mark('third')}
    return t;
  }),
}, { on: { event: ${JSON.stringify(`${subjectPrefix}.*`)} }, isolation: ${JSON.stringify(isolation)} });
`,
  );
  return file;
}

/** Every file under `dir`, relative, with its size. */
function listFiles(dir: string, prefix = ''): { path: string; bytes: number }[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
    return entry.isDirectory() ? listFiles(path, rel) : [{ path: rel, bytes: statSync(path).size }];
  });
}

interface ShmCheck {
  ok: boolean;
  line: string;
}

/** After the runs are done their outputs are released: waits a little for the releases to land. */
async function checkShm(shmDir: string): Promise<ShmCheck> {
  const deadline = now() + 15_000;
  let files = listFiles(shmDir);
  const segments = () => files.filter((f) => !f.path.startsWith('pool/'));
  while (segments().length > 0 && now() < deadline) {
    await sleep(250);
    files = listFiles(shmDir);
  }
  const left = segments();
  const pool = files.filter((f) => f.path.startsWith('pool/'));
  const kib = (fs: { bytes: number }[]) => (fs.reduce((s, f) => s + f.bytes, 0) / 1024).toFixed(0);
  const poolNote = `pool of released segments kept for reuse: ${pool.length} file(s), ${kib(pool)} KiB`;
  if (left.length === 0) return { ok: true, line: `shared memory ${shmDir}: ok, no segments left (${poolNote})` };
  return {
    ok: false,
    line: `shared memory ${shmDir}: FAIL, ${left.length} file(s) left, ${kib(left)} KiB (e.g. ${left.slice(0, 5).map((f) => f.path).join(', ')}); ${poolNote}`,
  };
}

async function benchQuiver(): Promise<{ results: (Result | Error)[]; shm: ShmCheck | Error }> {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-trigger-'));
  onCleanup(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
  const defs = ([
    { label: 'quiver process', key: 'process', pipeline: 'bench_process', isolation: 'process', subjectPrefix: 'bench.process' },
    { label: 'quiver worker', key: 'worker', pipeline: 'bench_worker', isolation: 'worker', subjectPrefix: 'bench.worker' },
  ] as const).filter((d) => ROUTES.has(d.key));

  const cluster = await startLocalCluster({ home: dir, logger: silentLogger, executor: { concurrency: CONCURRENCY } });
  onCleanup('stop the embedded cluster', () => cluster.stop());
  const { client } = cluster;
  const routes = defs.map((d) => {
    const marks = join(dir, `${d.pipeline}.marks`);
    return { def: d, file: pipelineFile(dir, d.pipeline, d.isolation, d.subjectPrefix, marks), route: new QuiverRoute(d.label, d.key, d.pipeline, d.subjectPrefix, marks, client) };
  });
  let undecodable = 0;
  const status = cluster.client.nc.subscribe(subjects.statusAll, {
    callback: (error, msg) => {
      if (error) return;
      const heardAt = now();
      let view: RunView;
      try {
        // Only finished views count, and a run publishes one per transition: the others are
        // skipped on their state alone, so validating them does not weigh on the cluster it shares this process with.
        const state = (JSON.parse(new TextDecoder().decode(msg.data)) as { state?: unknown }).state;
        if (typeof state === 'string' && !isFinished(state as RunView['state'])) return;
        view = decode(runView, msg.subject, msg.data);
      } catch {
        undecodable++;
        return;
      }
      for (const { route } of routes) route.see(view, heardAt);
    },
  });
  onCleanup('unsubscribe from run views', () => status.unsubscribe());
  await cluster.client.nc.flush();
  for (const { file } of routes) await client.deploy(await loadPipeline(file));

  const results: (Result | Error)[] = [];
  for (const { route } of routes) {
    try {
      results.push(await measure(route));
    } catch (error) {
      console.error(`[${route.label}] failed: ${(error as Error).stack ?? error}`);
      results.push(error as Error);
    }
  }
  if (undecodable > 0) console.log(`[quiver] ${undecodable} status message(s) did not decode as a run view`);
  const shm = await checkShm(cluster.executor.shmDir).catch((e: Error) => e);
  return { results, shm };
}

// ---------------------------------------------------------------------------------------------
// BullMQ

async function reachable(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = new Socket();
    socket.setTimeout(500);
    socket.once('connect', () => (socket.destroy(), resolve(true)));
    socket.once('error', () => resolve(false));
    socket.once('timeout', () => (socket.destroy(), resolve(false)));
    socket.connect(port, host);
  });
}

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = createServer().listen(0, '127.0.0.1', () => {
      const port = (server.address() as { port: number }).port;
      server.close(() => resolve(port));
    });
  });
}

/** A Redis to use: REDIS_URL, the machine's usual one, or one started here. */
async function findRedis(): Promise<{ host: string; port: number; stop(): void }> {
  if (process.env.REDIS_URL) {
    const url = new URL(process.env.REDIS_URL);
    return { host: url.hostname, port: Number(url.port || 6379), stop: () => {} };
  }
  if (await reachable('127.0.0.1', 6379)) return { host: '127.0.0.1', port: 6379, stop: () => {} };
  const port = await freePort();
  const child: ChildProcess = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const deadline = Date.now() + 5000;
  while (!(await reachable('127.0.0.1', port))) {
    if (Date.now() > deadline) {
      child.kill();
      throw new Error('no Redis on 127.0.0.1:6379 and redis-server did not start; install redis-server or set REDIS_URL');
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { host: '127.0.0.1', port, stop: () => child.kill() };
}

async function benchBullMQ(): Promise<Result> {
  const redis = await findRedis();
  onCleanup('stop the redis-server the bench started', () => redis.stop());
  // BullMQ wants ready-made clients in an ES module; workers block, so no retry limit.
  const connection = () => new Redis({ host: redis.host, port: redis.port, maxRetriesPerRequest: null });
  const queueName = `quiver-bench-${process.pid}`;
  const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-trigger-bullmq-'));
  onCleanup(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
  const marks = join(dir, 'bullmq.marks');

  const queue = new Queue(queueName, { connection: connection() });
  onCleanup(`obliterate the bullmq queue ${queueName}`, async () => {
    await queue.obliterate({ force: true });
    await queue.close();
  });
  const flows = new FlowProducer({ connection: connection() });
  onCleanup('close the flow producer', () => flows.close());

  const progress = new Progress();
  const firstAt = new Map<string, number>();
  const finishedAt = new Map<string, number>();
  const completions = new Map<string, number>();
  const failures = new Problems();
  const worker = new Worker(
    queueName,
    async (job: Job<{ eventId: string }>) => {
      const at = now();
      appendFileSync(marks, `${job.data.eventId} ${job.name} ${process.hrtime.bigint()}\n`);
      if (job.name === 'first' && !firstAt.has(job.data.eventId)) firstAt.set(job.data.eventId, at);
      return 1;
    },
    { connection: connection(), concurrency: CONCURRENCY },
  );
  onCleanup('close the bullmq worker', () => worker.close());
  worker.on('completed', (job: Job<{ eventId: string }>) => {
    if (job.name !== 'third') return;
    const id = job.data.eventId;
    completions.set(id, (completions.get(id) ?? 0) + 1);
    if (!finishedAt.has(id)) finishedAt.set(id, now());
    progress.notify();
  });
  worker.on('failed', (job: Job<{ eventId: string }> | undefined, error: Error) => failures.add('job failed', `${job?.data.eventId} ${job?.name}: ${error.message}`));
  await worker.waitUntilReady();

  const job = (name: string, eventId: string) => ({ name, queueName, data: { eventId }, opts: { removeOnComplete: true } });
  const route: Route = {
    label: 'bullmq',
    key: 'bullmq',
    progress,
    publish: (id) => flows.add({ ...job('third', id), children: [{ ...job('second', id), children: [job('first', id)] }] }),
    finished: (id) => finishedAt.has(id),
    firstCodeAt: (id) => firstAt.get(id),
    finishedAt: (id) => finishedAt.get(id),
    verify: async (ids) => {
      const problems = new Problems();
      for (const line of failures.lines()) problems.add('failures', line);
      for (const id of ids) {
        const n = completions.get(id) ?? 0;
        if (n === 0) problems.add('flow never completed', id);
        else if (n > 1) problems.add('flow completed more than once', `${id} ×${n}`);
      }
      checkMarks(marks, ids, problems);
      return { ok: problems.empty, lines: problems.lines() };
    },
  };
  return await measure(route);
}

// ---------------------------------------------------------------------------------------------

const GOALS = {
  'quiver worker': { p50: 5, p99: 30, runsPerSecond: 300 },
  'quiver process': { p50: 15, p99: 60, runsPerSecond: 30 },
} as const;

function report(results: (Result | Error)[], bullmq: Result | Error, shm: ShmCheck | Error): boolean {
  const fmt = (n: number, digits = 1) => (Number.isFinite(n) ? n.toFixed(digits) : '-');
  console.log(
    `\npublish → first line of the first step (${LATENCY_EVENTS} events one at a time), and a burst of ${BURST} events at once; concurrency ${CONCURRENCY}`,
  );
  const later = BURSTS > 1 ? ` ${`burst ${BURSTS} runs/s`.padStart(16)}` : '';
  console.log(`${'route'.padEnd(15)} ${'p50 ms'.padStart(8)} ${'p90 ms'.padStart(8)} ${'p99 ms'.padStart(8)} ${'runs finished/s'.padStart(16)}${later} ${'exactly-once'.padStart(13)} ${'cold ms'.padStart(8)}`);
  const labels = [...['quiver process', 'quiver worker'].filter((l) => ROUTES.has(l.replace('quiver ', ''))), 'bullmq'];
  let ok = true;
  [...results, bullmq].forEach((r, i) => {
    if (r instanceof Error) {
      if (labels[i] === 'bullmq' && !ROUTES.has('bullmq')) return;
      ok = false;
      console.log(`${labels[i]!.padEnd(15)} error: ${r.message}`);
      return;
    }
    ok &&= r.check.ok && r.burstFinished === BURST;
    const p = (q: number) => fmt(percentile(r.latencies, q)).padStart(8);
    console.log(
      `${r.label.padEnd(15)} ${p(50)} ${p(90)} ${p(99)} ${fmt(r.runsPerSecond).padStart(16)}${BURSTS > 1 ? ` ${fmt(r.laterRunsPerSecond.at(-1)!).padStart(16)}` : ''} ${(r.check.ok ? 'ok' : 'FAIL').padStart(13)} ${fmt(r.cold).padStart(8)}`,
    );
  });
  for (const r of results) {
    if (r instanceof Error || bullmq instanceof Error) continue;
    const ratio = (a: number, b: number) => `${a / b >= 0.1 || !Number.isFinite(a / b) ? fmt(a / b, 2) : (a / b).toPrecision(2)}x`;
    const p50 = (x: Result) => percentile(x.latencies, 50);
    const p99 = (x: Result) => percentile(x.latencies, 99);
    console.log(
      `${r.label} / bullmq: p50 ${ratio(p50(r), p50(bullmq))}, p99 ${ratio(p99(r), p99(bullmq))}, runs/s ${ratio(r.runsPerSecond, bullmq.runsPerSecond)}` +
        (BURSTS > 1 ? `, runs/s in burst ${BURSTS} ${ratio(r.laterRunsPerSecond.at(-1)!, bullmq.laterRunsPerSecond.at(-1)!)}` : ''),
    );
  }
  const goal = (label: keyof typeof GOALS) => {
    const g = GOALS[label];
    const r = results.find((x): x is Result => !(x instanceof Error) && x.label === label);
    const mark = (met: boolean | undefined) => (met === undefined ? '?' : met ? 'met' : 'missed');
    return (
      `${label.replace('quiver ', '')} p50 ≤ ${g.p50} ms (${mark(r && percentile(r.latencies, 50) <= g.p50)}), ` +
      `p99 ≤ ${g.p99} ms (${mark(r && percentile(r.latencies, 99) <= g.p99)}), ` +
      `≥ ${g.runsPerSecond} runs/s (${mark(r && r.runsPerSecond >= g.runsPerSecond)})`
    );
  };
  console.log(`goals: ${goal('quiver worker')}; ${goal('quiver process')}`);
  if (shm instanceof Error) {
    ok = false;
    console.log(`shared memory check failed: ${shm.message}`);
  } else {
    ok &&= shm.ok;
    console.log(shm.line);
  }
  return ok;
}

let exitCode = 1;
try {
  const quiver = await benchQuiver().catch((e: Error) => ({ results: [e, e], shm: e }));
  // Stops the cluster (and its step processes) before BullMQ runs.
  await cleanUp();
  const bullmq = ROUTES.has('bullmq')
    ? await benchBullMQ().catch((e: Error) => (console.error(`[bullmq] failed: ${e.stack ?? e}`), e))
    : new Error('not run (--routes)');
  await cleanUp();
  exitCode = report(quiver.results, bullmq, quiver.shm) ? 0 : 1;
} catch (error) {
  console.error(error);
} finally {
  await cleanUp();
}
process.exit(exitCode);
