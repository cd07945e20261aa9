import { execFile, fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import type { LogLine } from '../schemas/index.ts';
import type { StepSnapshot } from './build-runner.ts';
import { stepProcessArgs, type CatalogHandler, type RunnerJob, type RunnerMessage, type RunnerReply, type RunnerRequest } from './protocol.ts';
import { stepKilled, stepOutOfMemory, stepProcessDied, stepSpawnFailed, stepTimedOut, workerDied, workerHung } from './step-errors.ts';
import type { StepChild, StepZygote } from './step-zygote.ts';

/** How a step process is started. */
export interface SpawnOptions {
  runnerPath: string;
  /** The runner's startup snapshot (RunnerBuild.snapshot): used when memoryMb is its heap limit. */
  snapshot?: StepSnapshot | null;
  clusterId: string;
  onLog: (line: LogLine) => void;
  /** Its V8 heap limit (--max-old-space-size): fixed for the life of the process. */
  memoryMb: number;
  /**
   * The `prlimit` binary (util-linux) that sets the process's RLIMIT_AS: it starts the process
   * under the limit and changes it per step. Null: no address-space limit, the heap limit only.
   */
  prlimit: string | null;
  /** RLIMIT_AS it starts with (a step changes it when it needs more for its inputs). */
  addressSpaceBytes: number;
  /** Forks the process from this zygote (booted, --single-threaded) instead of spawning node. */
  zygote?: StepZygote | null;
}

/**
 * Spawns a runner: a step process, or with `extraNodeArgs` ['--single-threaded'] a step zygote
 * (which gets no RLIMIT_AS of its own: it sets each child's).
 */
export function spawnRunner(options: Omit<SpawnOptions, 'zygote' | 'onLog'>, extraNodeArgs: readonly string[] = []): ChildProcess {
  // Not the executor's flags: a TypeScript loader or test runner would triple the start-up time.
  // Source maps point step stack traces at the user's own files.
  const nodeArgs = ['--enable-source-maps', `--max-old-space-size=${options.memoryMb}`, ...extraNodeArgs];
  if (options.snapshot?.heapMb === options.memoryMb) nodeArgs.unshift('--snapshot-blob', options.snapshot.blobPath);
  // WebAssembly memories reserve ~10 GB of guard pages each for the trap handler, which no
  // RLIMIT_AS leaves room for: under the limit, bounds are checked by code instead (parquet-wasm).
  if (options.prlimit && WASM_TRAP_HANDLER_FLAG) nodeArgs.push(WASM_TRAP_HANDLER_FLAG);
  const prlimit = options.prlimit && options.addressSpaceBytes > 0 ? options.prlimit : null;
  // The placeholders leave room for the runner to write its run and step into its title, where gc finds them.
  return fork(options.runnerPath, stepProcessArgs(options.clusterId), {
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    // prlimit sets RLIMIT_AS and execs node in place: the pid, pipes and IPC channel stay node's.
    ...(prlimit
      ? { execPath: prlimit, execArgv: [`--as=${options.addressSpaceBytes}`, '--', process.execPath, ...nodeArgs] }
      : { execArgv: nodeArgs }),
    env: stepProcessEnv(),
    // Its own process group: a timeout or kill ends whatever the step started too.
    detached: true,
    serialization: 'json',
  });
}

/**
 * The executor's environment variables a step process gets: nothing that grants access
 * (QUIVER_CLUSTER_SECRET, NATS credentials, AWS keys) and nothing that changes how node starts
 * (NODE_OPTIONS). A step's declared secrets come per step, with its job (RunnerJob.env).
 */
export const STEP_ENV_ALLOWLIST: readonly string[] = ['PATH', 'HOME', 'USER', 'LANG', 'LANGUAGE', 'LC_ALL', 'LC_CTYPE', 'TZ', 'TMPDIR', 'QUIVER_REGIONS'];

/** The whole environment of a step process: the allowlist, and the executor's pid it checks its parent against. */
export function stepProcessEnv(from: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of STEP_ENV_ALLOWLIST) {
    const value = from[name];
    if (value !== undefined) env[name] = value;
  }
  env.QUIVER_EXECUTOR_PID = String(process.pid);
  return env;
}

/** Node >= 20.17 and 22.2 can run WebAssembly without guard regions; older ones cannot have an address-space limit and wasm. */
const WASM_TRAP_HANDLER_FLAG = process.allowedNodeEnvironmentFlags.has('--disable-wasm-trap-handler') ? '--disable-wasm-trap-handler' : null;

/** An address-space limit leaves WebAssembly working only where node can turn its guard regions off. */
export const ADDRESS_SPACE_LIMIT_SUPPORTED = WASM_TRAP_HANDLER_FLAG !== null;

/** Lines a process prints when it runs out of memory: V8's heap limit, or an allocation RLIMIT_AS refused. */
const OUT_OF_MEMORY_LINE = /JavaScript heap out of memory|Fatal process out of memory|Reached heap limit|Allocation failed - process out of memory/;
/** A step's error that is an allocation RLIMIT_AS refused, when the step let it through. */
const ALLOCATION_FAILED = /^Array buffer allocation failed$|^Cannot allocate memory$|^Allocation failed/;

/** The limits one step runs under, resolved (StepProcesses.resolveLimits). */
export interface RunLimits {
  timeoutMs: number;
  memoryMb: number;
  /** RLIMIT_AS for this step: room for its mapped inputs on top of the process's own. */
  addressSpaceBytes: number;
}

/** What one step in a step process came to. */
export interface StepOutcome {
  reply: RunnerReply;
  /** The process's resident set size after the step; null when it did not answer. */
  rssBytes: number | null;
  /** The process is alive and may run another step (a worker that answered). */
  reusable: boolean;
}

interface ActiveJob {
  job: RunnerJob;
  keepAlive: boolean;
  endMarker: string;
  message: (RunnerMessage & { type: 'reply' }) | null;
  /** Streams whose end marker arrived. */
  flushed: Set<'stdout' | 'stderr'>;
  resolve: (outcome: StepOutcome) => void;
  /** Answers the step's catalog calls (a system step on a NATS catalog); absent: each is refused. */
  catalog?: CatalogHandler;
}

/** Lines printed before a process has a step (a spare's warnings) go to its first step, up to this many. */
const MAX_EARLY_LINES = 100;

/**
 * 12 random bytes in hex for a job's end marker, cut from a buffer drawn 4 KiB at a time: one
 * randomBytes call per step was a percent of the executor's CPU in a burst of worker steps.
 * Still from the CSPRNG, and never reused.
 */
const NONCE_BYTES = 12;
let nonces = Buffer.alloc(0);
let nonceAt = 0;
function markerNonce(): string {
  if (nonceAt + NONCE_BYTES > nonces.length) {
    nonces = randomBytes(4096 - (4096 % NONCE_BYTES));
    nonceAt = 0;
  }
  nonceAt += NONCE_BYTES;
  return nonces.toString('hex', nonceAt - NONCE_BYTES, nonceAt);
}

/**
 * One forked runner (runner.ts): a one-step process, or a worker that runs one step after another.
 * It routes every line the process prints to the step running then, watches a worker's event
 * loop, and turns every way the process can end into the step's outcome. Never throws for a
 * step's fault.
 */
export class StepProcess {
  readonly child: StepChild;
  /** Steps handed to it. */
  steps = 0;
  private active: ActiveJob | null = null;
  /** Where lines go between a worker's steps (a timer the last step left): to that step. */
  private last: RunnerJob | null = null;
  private early: { stream: 'stdout' | 'stderr'; line: string }[] = [];
  private killedBecause: string | null = null;
  private hungAfterMs: number | null = null;
  private fatal: (RunnerMessage & { type: 'fatal' }) | null = null;
  private exitHandlers: (() => void)[] = [];
  private pinger: NodeJS.Timeout | null = null;
  private lastPongAt = 0;
  private pingSeq = 0;
  private exited = false;
  /** Set once the process exited and its streams and channel are closed. */
  private readonly ended: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private spawnError: Error | null = null;
  private timedOutAfterMs: number | null = null;
  /** What the process said when it ran out of memory (a V8 fatal line), if it did. */
  private outOfMemory: string | null = null;
  private timeout: NodeJS.Timeout | null = null;
  /** RLIMIT_AS in force now. */
  private addressSpaceBytes: number;

  constructor(private readonly options: SpawnOptions) {
    this.addressSpaceBytes = options.addressSpaceBytes;
    this.child = options.zygote ? options.zygote.fork(options.addressSpaceBytes) : spawnRunner(options);
    const streamClosed = (stream: 'stdout' | 'stderr', source: NodeJS.ReadableStream | null) => {
      if (!source) return Promise.resolve();
      const lines = createInterface({ input: source, crlfDelay: Infinity });
      lines.on('line', (line) => this.onLine(stream, line));
      return new Promise<void>((resolve) => lines.once('close', resolve));
    };
    const streams = Promise.all([streamClosed('stdout', this.child.stdout), streamClosed('stderr', this.child.stderr)]);
    const channelClosed = new Promise<void>((resolve) => this.child.once('disconnect', resolve));
    this.child.on('message', (m: RunnerMessage) => this.onMessage(m));
    this.child.on('error', (error) => {
      // Failing to spawn: no exit event follows. Later errors (a send to a dead child) are followed by one.
      if (this.child.pid === undefined) {
        this.spawnError ??= error;
        this.child.emit('exit', null, null);
      }
    });
    this.ended = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exited = true;
        this.stopPinging();
        this.clearTimeout();
        // What the step started and left running goes with it. The group's id is not reused
        // while a member lives, so this reaches only what this process started.
        this.killGroup();
        for (const handler of this.exitHandlers.splice(0)) handler();
        // Every line and message the process sent is handled before its step's outcome is decided.
        // A process that never started has nothing to wait for.
        const channel = this.child.connected ? channelClosed : Promise.resolve();
        const drained = this.spawnError ? Promise.resolve() : Promise.all([streams, channel]);
        void drained.then(() => resolve({ code, signal }));
      });
    });
    void this.ended.then(({ code, signal }) => this.settleOnExit(code, signal));
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get alive(): boolean {
    return !this.exited && this.killedBecause === null && this.hungAfterMs === null && this.timedOutAfterMs === null;
  }

  get busy(): boolean {
    return this.active !== null;
  }

  /** Has a spare import a pipeline version's code ahead of its step (see RunnerRequest 'preload'). */
  preload(codePath: string): void {
    if (this.child.connected) this.child.send({ type: 'preload', codePath } satisfies RunnerRequest, () => undefined);
  }

  /** Called once when the process exits (at once if it has). */
  onExit(handler: () => void): void {
    if (this.exited) handler();
    else this.exitHandlers.push(handler);
  }

  /**
   * Runs `job`. With `keepAlive` the process stays for the next step (a worker) and `hangMs`
   * bounds how long its event loop may stop answering pings.
   */
  run(job: RunnerJob, options: { keepAlive: boolean; hangMs?: number; limits?: RunLimits; catalog?: CatalogHandler }): Promise<StepOutcome> {
    if (this.active) throw new Error(`step process ${this.pid} already runs step "${this.active.job.step}" of run ${this.active.job.runId}`);
    this.steps++;
    return new Promise<StepOutcome>((resolve) => {
      const active: ActiveJob = {
        job,
        keepAlive: options.keepAlive,
        endMarker: `\u001bquiver-step-end ${markerNonce()}`,
        message: null,
        flushed: new Set(),
        resolve,
        ...(options.catalog ? { catalog: options.catalog } : {}),
      };
      this.active = active;
      for (const { stream, line } of this.early.splice(0)) this.log(job, stream, line);
      if (this.exited) {
        // Ended before it got the job: its exit is the step's outcome.
        void this.ended.then(({ code, signal }) => this.settleOnExit(code, signal));
        return;
      }
      if (options.keepAlive && options.hangMs !== undefined) this.startPinging(options.hangMs);
      const limits = options.limits;
      if (limits) {
        this.timeout = setTimeout(() => {
          this.timedOutAfterMs = limits.timeoutMs;
          this.stopPinging();
          this.killGroup();
        }, limits.timeoutMs);
        this.timeout.unref();
      }
      const request: RunnerRequest = { type: 'job', job, endMarker: active.endMarker, keepAlive: options.keepAlive };
      const send = () =>
        this.child.send(request, (error) => {
          // The process died before it got the job: its exit decides the outcome.
          if (error) this.child.kill('SIGKILL');
        });
      // Only ever raised: a worker keeps the room a bigger step needed (the heap limit stays exact).
      if (limits && limits.addressSpaceBytes > this.addressSpaceBytes) void this.setAddressSpace(limits.addressSpaceBytes).then(send);
      else send();
    });
  }

  /**
   * Changes the process's RLIMIT_AS (for a step whose inputs need more room, or a worker's next
   * step). A failure (the process is gone) is left to its exit to report.
   */
  private async setAddressSpace(bytes: number): Promise<void> {
    const prlimit = this.options.prlimit;
    // A forked process has its pid once the zygote answers; one that never gets it never runs.
    if (this.pid === undefined && !this.exited) await new Promise<void>((resolve) => {
      this.child.once('spawn', () => resolve());
      this.onExit(resolve);
    });
    if (!prlimit || this.pid === undefined || this.exited) return;
    this.addressSpaceBytes = bytes;
    return new Promise((resolve) => execFile(prlimit, ['--pid', String(this.pid), `--as=${bytes}`], () => resolve()));
  }

  /** SIGKILL to the process and everything it started (its process group). */
  private killGroup(): void {
    const pid = this.child.pid;
    // A process being forked is killed once it has a pid.
    if (pid === undefined) {
      this.child.kill('SIGKILL');
      return;
    }
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // The group is empty already (ESRCH): nothing is left to kill.
      if (!this.exited) this.child.kill('SIGKILL');
    }
  }

  private clearTimeout(): void {
    if (this.timeout) clearTimeout(this.timeout);
    this.timeout = null;
  }

  /** Kills the process now; a step it runs ends with ERR_STEP_KILLED saying why. */
  kill(why: string): void {
    this.killedBecause ??= why;
    this.stopPinging();
    this.killGroup();
  }

  /** Ends a worker that is not needed any more (idle, recycled): nothing it runs is lost. */
  retire(): void {
    this.kill('its worker was retired');
  }

  private onLine(stream: 'stdout' | 'stderr', line: string): void {
    if (stream === 'stderr' && this.outOfMemory === null && OUT_OF_MEMORY_LINE.test(line)) this.outOfMemory = line.replace(/^.*?FATAL ERROR:\s*/, '').trim();
    const active = this.active;
    if (active && line.endsWith(active.endMarker)) {
      // A step's last line without a newline ends right before the marker.
      const rest = line.slice(0, -active.endMarker.length);
      if (rest) this.log(active.job, stream, rest);
      active.flushed.add(stream);
      this.settleIfDone();
      return;
    }
    const job = active?.job ?? this.last;
    if (job) this.log(job, stream, line);
    else if (this.early.length < MAX_EARLY_LINES) this.early.push({ stream, line });
  }

  private log(job: RunnerJob, stream: 'stdout' | 'stderr', line: string): void {
    this.options.onLog({ runId: job.runId, step: job.step, stream, line, at: Date.now() });
  }

  private onMessage(message: RunnerMessage): void {
    if (message.type === 'pong') {
      this.lastPongAt = performance.now();
    } else if (message.type === 'reply') {
      if (this.active && !this.active.message) {
        this.active.message = message;
        this.settleIfDone();
      }
    } else if (message.type === 'catalog') {
      void this.answerCatalog(message);
    } else if (message.type === 'fatal') {
      this.fatal ??= message;
      // An idle worker's crash fails no step: the step that ran last hears of it in its log.
      if (!this.active && this.last) this.log(this.last, 'stderr', message.error.message);
    }
  }

  /** Only the step running now is answered, by the handler its job came with. */
  private async answerCatalog(message: RunnerMessage & { type: 'catalog' }): Promise<void> {
    const active = this.active;
    let answer: RunnerRequest;
    try {
      if (!active?.catalog) throw Object.assign(new Error(`step process ${this.pid} has no catalog access now`), { name: 'CatalogCallRefused', code: 'ERR_CATALOG_REFUSED' });
      answer = { type: 'catalog-reply', id: message.id, ok: true, result: await active.catalog(message.call) };
    } catch (error) {
      const e = error as Error & { code?: unknown };
      answer = { type: 'catalog-reply', id: message.id, ok: false, error: { name: e.name ?? 'Error', message: e.message ?? String(error), ...(typeof e.code === 'string' ? { code: e.code } : {}) } };
    }
    // A process gone meanwhile: its exit decides its step.
    if (this.child.connected) this.child.send(answer, () => undefined);
  }

  /** Answered and flushed: the step's outcome is its reply. */
  private settleIfDone(): void {
    const active = this.active;
    if (!active?.message || active.message.markedStreams.some((s) => !active.flushed.has(s)) || this.killedBecause !== null || this.hungAfterMs !== null || this.timedOutAfterMs !== null) return;
    this.active = null;
    this.last = active.job;
    this.clearTimeout();
    if (!active.keepAlive) this.stopPinging();
    const reply = this.refusedAllocation(active.job.step, active.message.reply);
    // A step that ran out of memory leaves a worker in no state to trust: the caller replaces it.
    const reusable = active.keepAlive && this.alive && !this.fatal && reply === active.message.reply;
    active.resolve({ reply, rssBytes: active.message.rssBytes, reusable });
  }

  /** A step whose allocation RLIMIT_AS refused (and that let the error through) exceeded its memory limit. */
  private refusedAllocation(step: string, reply: RunnerReply): RunnerReply {
    const memoryMb = this.options.memoryMb;
    if (reply.type !== 'error' || !ALLOCATION_FAILED.test(reply.error.message)) return reply;
    return { ...reply, error: { ...stepOutOfMemory(step, memoryMb, reply.error.message), ...(reply.error.stack ? { stack: reply.error.stack } : {}) } };
  }

  /** The process ended: its step (if one is still open) ends with the reason. */
  private settleOnExit(code: number | null, signal: NodeJS.Signals | null): void {
    const active = this.active;
    if (!active) return;
    this.active = null;
    const step = active.job.step;
    let reply: RunnerReply;
    if (this.spawnError) reply = { type: 'error', error: stepSpawnFailed(step, this.spawnError) };
    else if (this.timedOutAfterMs !== null) reply = { type: 'error', error: stepTimedOut(step, this.timedOutAfterMs) };
    else if (this.outOfMemory !== null) reply = { type: 'error', error: stepOutOfMemory(step, this.options.memoryMb, this.outOfMemory) };
    else if (this.hungAfterMs !== null) reply = { type: 'error', error: workerHung(step, this.hungAfterMs) };
    else if (this.killedBecause !== null) reply = { type: 'error', error: stepKilled(step, this.killedBecause) };
    else if (this.fatal) reply = { type: 'error', error: this.fatal.error };
    // Answered, then ended before its end markers were read: the answer stands.
    else if (active.message) reply = active.message.reply;
    else reply = { type: 'error', error: active.keepAlive ? workerDied(step, code, signal) : stepProcessDied(step, code, signal) };
    active.resolve({ reply, rssBytes: active.message?.rssBytes ?? null, reusable: false });
  }

  /**
   * Pings the worker from now until it exits. Its event loop answers between callbacks, so a
   * step blocking it (an endless loop) stops the answers: after `hangMs` without one it is killed.
   */
  private startPinging(hangMs: number): void {
    if (this.pinger) return;
    const every = Math.max(10, Math.floor(hangMs / 4));
    let lastTick = performance.now();
    this.lastPongAt = lastTick;
    this.pinger = setInterval(() => {
      const now = performance.now();
      // This process was blocked itself: the answers may be waiting unread, so do not count it.
      if (now - lastTick > every * 2 + 100) this.lastPongAt = now;
      lastTick = now;
      if (now - this.lastPongAt > hangMs) {
        this.hungAfterMs = hangMs;
        this.stopPinging();
        this.killGroup();
        return;
      }
      // A failed send means the process is gone: its exit says so, not the ping.
      if (this.child.connected) this.child.send({ type: 'ping', seq: ++this.pingSeq } satisfies RunnerRequest, () => undefined);
    }, every);
    this.pinger.unref();
  }

  private stopPinging(): void {
    if (this.pinger) clearInterval(this.pinger);
    this.pinger = null;
  }
}
