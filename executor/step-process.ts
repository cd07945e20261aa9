import { fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import type { LogLine } from '../schemas/index.ts';
import { stepProcessArgs, type RunnerJob, type RunnerMessage, type RunnerReply, type RunnerRequest } from './protocol.ts';
import { stepKilled, stepProcessDied, stepSpawnFailed, workerDied, workerHung } from './step-errors.ts';

/** How a step process is started. */
export interface SpawnOptions {
  runnerPath: string;
  clusterId: string;
  onLog: (line: LogLine) => void;
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
}

/** Lines printed before a process has a step (a spare's warnings) go to its first step, up to this many. */
const MAX_EARLY_LINES = 100;

/**
 * One forked runner (runner.ts): a one-step process, or a worker that runs one step after another.
 * It routes every line the process prints to the step running then, watches a worker's event
 * loop, and turns every way the process can end into the step's outcome. Never throws for a
 * step's fault.
 */
export class StepProcess {
  readonly child: ChildProcess;
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

  constructor(private readonly options: SpawnOptions) {
    // The placeholders leave room for the runner to write its run and step into its title, where gc finds them.
    this.child = fork(options.runnerPath, stepProcessArgs(options.clusterId), {
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      // Not the executor's flags: a TypeScript loader or test runner would triple the start-up time.
      // Source maps point step stack traces at the user's own files.
      execArgv: ['--enable-source-maps'],
      env: { ...process.env, QUIVER_EXECUTOR_PID: String(process.pid) },
      serialization: 'json',
    });
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
    return !this.exited && this.killedBecause === null && this.hungAfterMs === null;
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
  run(job: RunnerJob, options: { keepAlive: boolean; hangMs?: number }): Promise<StepOutcome> {
    if (this.active) throw new Error(`step process ${this.pid} already runs step "${this.active.job.step}" of run ${this.active.job.runId}`);
    this.steps++;
    return new Promise<StepOutcome>((resolve) => {
      const active: ActiveJob = {
        job,
        keepAlive: options.keepAlive,
        endMarker: `\u001bquiver-step-end ${randomBytes(12).toString('hex')}`,
        message: null,
        flushed: new Set(),
        resolve,
      };
      this.active = active;
      for (const { stream, line } of this.early.splice(0)) this.log(job, stream, line);
      if (this.exited) {
        // Ended before it got the job: its exit is the step's outcome.
        void this.ended.then(({ code, signal }) => this.settleOnExit(code, signal));
        return;
      }
      if (options.keepAlive && options.hangMs !== undefined) this.startPinging(options.hangMs);
      const request: RunnerRequest = { type: 'job', job, endMarker: active.endMarker, keepAlive: options.keepAlive };
      this.child.send(request, (error) => {
        // The process died before it got the job: its exit decides the outcome.
        if (error) this.child.kill('SIGKILL');
      });
    });
  }

  /** Kills the process now; a step it runs ends with ERR_STEP_KILLED saying why. */
  kill(why: string): void {
    this.killedBecause ??= why;
    this.stopPinging();
    this.child.kill('SIGKILL');
  }

  /** Ends a worker that is not needed any more (idle, recycled): nothing it runs is lost. */
  retire(): void {
    this.kill('its worker was retired');
  }

  private onLine(stream: 'stdout' | 'stderr', line: string): void {
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
    } else if (message.type === 'fatal') {
      this.fatal ??= message;
      // An idle worker's crash fails no step: the step that ran last hears of it in its log.
      if (!this.active && this.last) this.log(this.last, 'stderr', message.error.message);
    }
  }

  /** Answered and flushed: the step's outcome is its reply. */
  private settleIfDone(): void {
    const active = this.active;
    if (!active?.message || active.flushed.size < 2 || this.killedBecause !== null || this.hungAfterMs !== null) return;
    this.active = null;
    this.last = active.job;
    if (!active.keepAlive) this.stopPinging();
    active.resolve({ reply: active.message.reply, rssBytes: active.message.rssBytes, reusable: active.keepAlive && this.alive && !this.fatal });
  }

  /** The process ended: its step (if one is still open) ends with the reason. */
  private settleOnExit(code: number | null, signal: NodeJS.Signals | null): void {
    const active = this.active;
    if (!active) return;
    this.active = null;
    const step = active.job.step;
    let reply: RunnerReply;
    if (this.spawnError) reply = { type: 'error', error: stepSpawnFailed(step, this.spawnError) };
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
        this.child.kill('SIGKILL');
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
