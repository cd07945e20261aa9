import { fork, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Isolation, LogLine } from '../schemas/index.ts';
import { STEP_PROCESS_MARKER, type RunnerJob, type RunnerReply } from './protocol.ts';

/** Options for {@link StepProcesses}. */
export interface StepProcessesOptions {
  /** The bundled runner (see build-runner.ts). */
  runnerPath: string;
  /** Written into each step process's title, where gc finds it. */
  clusterId: string;
  /** Step processes kept booted ahead of need (each has run nothing yet). 0 starts each on demand. @default 2 */
  prewarm?: number;
  /** Every line a step prints, as it prints it. */
  onLog: (line: LogLine) => void;
}

interface RunningStep {
  child: ChildProcess;
  killedBecause: string | null;
}

const DEFAULT_PREWARM = 2;
const TERMINAL_SIGNALS = new Set(['SIGSEGV', 'SIGBUS']);

/**
 * The step processes of one executor: it hands each job to a process, forwards what the step
 * prints, and turns every way a process can end into one reply. Never throws for a step's fault.
 */
export class StepProcesses {
  private readonly running = new Map<string, Set<RunningStep>>();
  private readonly spares: ChildProcess[] = [];
  private stopped = false;

  constructor(private readonly options: StepProcessesOptions) {
    this.refillSpares();
  }

  /** Runs one user step to its reply: a table's segments, or the error that ended it. */
  run(job: RunnerJob, _isolation: Isolation): Promise<RunnerReply> {
    const child = this.takeProcess();
    const running: RunningStep = { child, killedBecause: null };
    const set = this.running.get(job.runId) ?? new Set();
    set.add(running);
    this.running.set(job.runId, set);

    const forward = (stream: 'stdout' | 'stderr', source: NodeJS.ReadableStream | null) => {
      if (!source) return Promise.resolve();
      const lines = createInterface({ input: source, crlfDelay: Infinity });
      lines.on('line', (line) => this.options.onLog({ runId: job.runId, step: job.step, stream, line, at: Date.now() }));
      return new Promise<void>((resolve) => lines.once('close', resolve));
    };
    const drained = Promise.all([forward('stdout', child.stdout), forward('stderr', child.stderr)]);

    return new Promise<RunnerReply>((resolve) => {
      let reply: RunnerReply | null = null;
      child.on('message', (m: RunnerReply) => {
        reply ??= m;
      });
      child.once('error', (error) => {
        reply ??= { type: 'error', error: { name: 'SpawnError', code: 'ERR_STEP_SPAWN', message: `could not start the step process: ${error.message}` } };
      });
      child.once('exit', (code, signal) => {
        // Every log line is published before the completion, so the terminal shows them in order.
        void drained.then(() => {
          set.delete(running);
          if (set.size === 0) this.running.delete(job.runId);
          if (running.killedBecause) {
            resolve({ type: 'error', error: { name: 'StepKilled', code: 'ERR_STEP_KILLED', message: `step "${job.step}" was killed: ${running.killedBecause}` } });
          } else if (reply) {
            resolve(reply);
          } else {
            const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
            const hint = signal && TERMINAL_SIGNALS.has(signal) ? ' (input tables are read-only shared memory: writing into their buffers is not allowed)' : '';
            resolve({ type: 'error', error: { name: 'StepProcessDied', code: 'ERR_STEP_PROCESS', message: `the process of step "${job.step}" ${how} before returning a table${hint}` } });
          }
        });
      });
      child.send(job);
    });
  }

  /** Kills the steps of a run now running here; each ends with an error saying why. */
  killRun(runId: string, why: string): void {
    for (const s of this.running.get(runId) ?? []) this.kill(s, why);
  }

  /** Kills every step process: steps still running end with an error saying why. */
  stop(why: string): void {
    this.stopped = true;
    for (const steps of this.running.values()) for (const s of steps) this.kill(s, why);
    for (const spare of this.spares.splice(0)) spare.kill('SIGKILL');
  }

  /**
   * A step process started ahead of time: booted and past its imports, but it has run nothing,
   * so every step still gets a fresh process. Start-up (~170 ms of node and apache-arrow) moves
   * off the step's critical path.
   */
  private takeProcess(): ChildProcess {
    const spare = this.spares.shift();
    this.refillSpares();
    return spare ?? this.spawnRunner();
  }

  private refillSpares(): void {
    const wanted = this.stopped ? 0 : (this.options.prewarm ?? DEFAULT_PREWARM);
    while (this.spares.length < wanted) {
      const child = this.spawnRunner();
      this.spares.push(child);
      child.once('exit', () => {
        const at = this.spares.indexOf(child);
        if (at >= 0) this.spares.splice(at, 1);
      });
    }
  }

  private spawnRunner(): ChildProcess {
    // The placeholders leave room for the runner to write its run and step into its title, where gc finds them.
    return fork(this.options.runnerPath, [STEP_PROCESS_MARKER, this.options.clusterId, '-'.repeat(26), '-'.repeat(64)], {
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      // Not the executor's flags: a TypeScript loader or test runner would triple the start-up time.
      // Source maps point step stack traces at the user's own files.
      execArgv: ['--enable-source-maps'],
      env: { ...process.env, QUIVER_EXECUTOR_PID: String(process.pid) },
      serialization: 'json',
    });
  }

  private kill(step: RunningStep, why: string): void {
    step.killedBecause ??= why;
    step.child.kill('SIGKILL');
  }
}
