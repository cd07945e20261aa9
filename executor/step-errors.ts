import type { StepError } from '../schemas/index.ts';

/**
 * How a user step can end without its own answer, each with a stable code. They travel as data
 * (a step's `error` in its completion and the run's view), so each is a function building one.
 */
export type StepProcessErrorCode =
  | 'ERR_STEP_SPAWN'
  | 'ERR_STEP_PROCESS'
  | 'ERR_STEP_KILLED'
  | 'ERR_WORKER_CRASHED'
  | 'ERR_WORKER_HUNG'
  | 'ERR_STEP_TIMEOUT'
  | 'ERR_STEP_MEMORY'
  | 'ERR_STEP_ENV_MISSING';

/** A {@link StepError} whose code says which way a step process ended it. */
export type StepProcessError<C extends StepProcessErrorCode = StepProcessErrorCode> = StepError & { code: C };

/** Signals that mean the step touched memory it may not: input tables are read-only mappings. */
const TERMINAL_SIGNALS = new Set(['SIGSEGV', 'SIGBUS']);
const READ_ONLY_HINT = ' (input tables are read-only shared memory: writing into their buffers is not allowed)';

/** The step process could not be started. */
export function stepSpawnFailed(step: string, cause: Error): StepProcessError<'ERR_STEP_SPAWN'> {
  return { name: 'SpawnError', code: 'ERR_STEP_SPAWN', message: `could not start the process of step "${step}": ${cause.message}` };
}

/** A one-step process ended before it answered. */
export function stepProcessDied(step: string, code: number | null, signal: NodeJS.Signals | null): StepProcessError<'ERR_STEP_PROCESS'> {
  const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
  const hint = signal && TERMINAL_SIGNALS.has(signal) ? READ_ONLY_HINT : '';
  return { name: 'StepProcessDied', code: 'ERR_STEP_PROCESS', message: `the process of step "${step}" ${how} before returning a table${hint}` };
}

/** The executor killed the step: its run was cancelled, or the executor is stopping. */
export function stepKilled(step: string, why: string): StepProcessError<'ERR_STEP_KILLED'> {
  return { name: 'StepKilled', code: 'ERR_STEP_KILLED', message: `step "${step}" was killed: ${why}` };
}

/** A worker ended while it ran a step: process.exit, a signal. */
export function workerDied(step: string, code: number | null, signal: NodeJS.Signals | null): StepProcessError<'ERR_WORKER_CRASHED'> {
  const how = signal
    ? `was killed by ${signal}${TERMINAL_SIGNALS.has(signal) ? READ_ONLY_HINT : ''}`
    : `exited with code ${code} (did the step call process.exit? A step must return a table or throw)`;
  return {
    name: 'WorkerCrashed',
    code: 'ERR_WORKER_CRASHED',
    message: `the worker process running step "${step}" ${how} before the step returned; the worker was replaced, the next step gets a new one`,
  };
}

/**
 * A worker's uncaught exception or unhandled rejection, built inside the worker (which exits
 * right after). `step` is the step running then, or the one that ran last when it was idle.
 */
export function workerCrashed(step: string | null, running: boolean, origin: 'uncaughtException' | 'unhandledRejection', thrown: unknown): StepProcessError<'ERR_WORKER_CRASHED'> {
  const what = origin === 'unhandledRejection' ? 'an unhandled promise rejection' : 'an uncaught exception (thrown in a callback, a timer or an event handler)';
  const detail = thrown instanceof Error ? `${thrown.name}: ${thrown.message}` : String(thrown);
  const when = step === null ? 'before running any step' : running ? `while step "${step}" ran` : `after step "${step}" had returned`;
  return {
    name: 'WorkerCrashed',
    code: 'ERR_WORKER_CRASHED',
    message: `the worker process crashed ${when} with ${what}: ${detail}. The worker was replaced; await or catch asynchronous work inside the step so it fails the step instead`,
    ...(thrown instanceof Error && thrown.stack ? { stack: thrown.stack } : {}),
  };
}

/** A worker whose event loop stopped answering: killed so the next step gets a new one. */
export function workerHung(step: string, hangMs: number): StepProcessError<'ERR_WORKER_HUNG'> {
  return {
    name: 'WorkerHung',
    code: 'ERR_WORKER_HUNG',
    message:
      `the worker process running step "${step}" stopped responding: its event loop was blocked for more than ${hangMs} ms ` +
      `(an endless loop, or synchronous work longer than workerHangMs). It was killed and replaced; ` +
      `split long synchronous work with awaits, raise workerHangMs, or give the step isolation: 'process'`,
  };
}

/** "30 s", "1.5 s", "15 min": how a limit reads in a message. */
export function formatDuration(ms: number): string {
  if (ms >= 60_000 && ms % 60_000 === 0) return `${ms / 60_000} min`;
  return `${Number((ms / 1000).toFixed(3))} s`;
}

/** The step ran past its timeoutMs: its process tree was killed. */
export function stepTimedOut(step: string, timeoutMs: number): StepProcessError<'ERR_STEP_TIMEOUT'> {
  return {
    name: 'StepTimedOut',
    code: 'ERR_STEP_TIMEOUT',
    message:
      `step "${step}" timed out after ${formatDuration(timeoutMs)}: its process and every process it started were killed. ` +
      `Give it more time with timeoutMs (a step or pipeline option, in ms) if it needs longer`,
  };
}

/**
 * The step went past its memoryMb: the V8 heap limit (the process aborts), or the address-space
 * limit (an allocation fails, or the process aborts). `detail` says which, as the process said it.
 */
export function stepOutOfMemory(step: string, memoryMb: number, detail: string): StepProcessError<'ERR_STEP_MEMORY'> {
  return {
    name: 'StepOutOfMemory',
    code: 'ERR_STEP_MEMORY',
    message:
      `step "${step}" exceeded its ${memoryMb} MB memory limit (${detail}); its process was ended. ` +
      `Raise memoryMb (a step or pipeline option) or have the step hold less at once`,
  };
}

/** The step declares environment variables the executor does not have. */
export function stepEnvMissing(step: string, names: readonly string[], hostId: string): StepProcessError<'ERR_STEP_ENV_MISSING'> {
  const list = names.join(', ');
  return {
    name: 'StepEnvMissing',
    code: 'ERR_STEP_ENV_MISSING',
    message:
      `step "${step}" declares the environment variable${names.length > 1 ? 's' : ''} ${list} (its env option or its pipeline's), ` +
      `which the executor on host ${hostId} does not have: set ${names.length > 1 ? 'them' : 'it'} where the executor starts, or remove ${names.length > 1 ? 'them' : 'it'} from env`,
  };
}
