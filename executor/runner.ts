/**
 * The entry point of a step process. Bundled by the executor (esbuild) so a step starts with plain
 * `node`, no TypeScript loader on the hot path; or, bundled with Arrow into one script, as a V8
 * startup snapshot (build-runner.ts) whose heap already holds Arrow and this code. Its first job
 * says what it is: a one-step process (run the step, answer, exit) or a worker (answer, then wait
 * for the next step of the same pipeline version). Either way each step goes through {@link runJob}.
 */
import { Writable } from 'node:stream';
import { startupSnapshot } from 'node:v8';
import { Script, constants as vmConstants } from 'node:vm';
import * as arrow from 'apache-arrow';
import { parentPid, setParentDeathSignal } from '../shm/index.ts';
import { ARROW_GLOBAL, STEP_PROCESS_MARKER, stepProcessTitle, type RunnerJob, type RunnerMessage, type RunnerRequest } from './protocol.ts';
import { runJob } from './run-job.ts';
import { workerCrashed } from './step-errors.ts';

// Pipeline code links Arrow through a module that takes this one (build-runner.ts): one Arrow, so
// `instanceof Table` holds, even when this Arrow came from a snapshot and not from its file.
(globalThis as Record<symbol, unknown>)[Symbol.for(ARROW_GLOBAL)] = arrow;

let clusterId = '';
/** How pipeline code is imported: `import()` itself, except in a snapshot (below). */
let load: (codePath: string) => Promise<unknown> = (codePath) => import(codePath);

function send(message: RunnerMessage): Promise<void> {
  return new Promise((resolve, reject) => {
    if (!process.send || !process.connected) return reject(new Error('the executor is gone'));
    process.send(message, undefined, {}, (error) => (error ? reject(error) : resolve()));
  });
}

/**
 * The streams as they were before any step ran: a step may replace process.stdout. Writes to a
 * pipe queue when it is full, so the end marker goes through the same queue, after every line.
 */
let output: { stdout: NodeJS.WriteStream; stderr: NodeJS.WriteStream };
const writeLine = (stream: NodeJS.WriteStream, line: string) =>
  new Promise<void>((resolve, reject) => {
    Writable.prototype.write.call(stream, `${line}\n`, 'utf8', (error?: Error | null) => (error ? reject(error) : resolve()));
  });

/** The step running now, and the last one: what a worker's crash is blamed on. */
let current: RunnerJob | null = null;
let last: RunnerJob | null = null;

/**
 * What a worker's step may change for the process, put back after every call: environment and
 * working directory as they were when the step function was called (changes made while its
 * module was first imported stay, like the module's globals).
 */
let before: { env: Record<string, string | undefined>; cwd: string } | null = null;
function restoreProcessState(): void {
  if (!before) return;
  for (const key of Object.keys(process.env)) if (!(key in before.env)) delete process.env[key];
  for (const [key, value] of Object.entries(before.env)) if (process.env[key] !== value) process.env[key] = value;
  if (process.cwd() !== before.cwd) process.chdir(before.cwd);
  before = null;
}

/** Set by the first job: a worker outlives its steps. */
let isWorker = false;
let crashing = false;
/** A worker's uncaught error ends it: it cannot know what state the step left behind. */
function crash(thrown: unknown, origin: NodeJS.UncaughtExceptionOrigin): void {
  if (crashing) return;
  crashing = true;
  const running = current !== null;
  const blamed = current ?? last;
  const error = workerCrashed(blamed?.step ?? null, running, origin, thrown);
  // If the executor does not take the message within a second, go anyway.
  setTimeout(() => process.exit(1), 1000).unref();
  send({ type: 'fatal', error }).finally(() => process.exit(1));
}

async function handle(request: RunnerRequest & { type: 'job' }): Promise<void> {
  const { job, endMarker, keepAlive } = request;
  if (keepAlive && !isWorker) {
    isWorker = true;
    process.on('uncaughtException', crash);
  }
  current = job;
  process.title = stepProcessTitle(clusterId, job);
  const reply = await runJob(job, {
    load,
    beforeCall: () => {
      if (keepAlive) before = { env: { ...process.env }, cwd: process.cwd() };
    },
  });
  restoreProcessState();
  // The executor forwards lines until it sees these: every line of the step is then ahead of its reply.
  await Promise.all([writeLine(output.stdout, endMarker), writeLine(output.stderr, endMarker)]);
  current = null;
  last = job;
  if (keepAlive) process.title = stepProcessTitle(clusterId, null);
  await send({ type: 'reply', reply, rssBytes: process.memoryUsage.rss() });
  if (!keepAlive) process.exit(0);
}

function main(fromSnapshot: boolean): void {
  const expectedParent = Number(process.env.QUIVER_EXECUTOR_PID);
  // Die with the executor, even when it is SIGKILLed: no orphaned step keeps running.
  setParentDeathSignal('SIGKILL');
  if (expectedParent && parentPid() !== expectedParent) process.exit(70);
  // gc finds step processes of dead runs by this title (`quiver-step <cluster> <run> <step>`).
  clusterId = process.argv[process.argv.indexOf(STEP_PROCESS_MARKER) + 1] ?? '';
  output = { stdout: process.stdout, stderr: process.stderr };
  if (fromSnapshot) {
    // Code deserialized from a snapshot has no module loader of its own for import(); a script
    // compiled now gets the main one. Node 20 calls that experimental: keep the warning off the step's log.
    const emitWarning = process.emitWarning;
    process.emitWarning = () => undefined;
    try {
      load = new Script('(codePath) => import(codePath)', { importModuleDynamically: vmConstants.USE_MAIN_CONTEXT_DEFAULT_LOADER }).runInThisContext() as typeof load;
    } finally {
      process.emitWarning = emitWarning;
    }
  }
  // build-runner.ts checks a new snapshot this way before any step starts from it.
  if (process.env.QUIVER_RUNNER_SELF_CHECK) {
    // The check module exports the Table it linked against: it must be this one.
    void load(process.env.QUIVER_RUNNER_SELF_CHECK).then(
      (mod) => {
        const same = (mod as { default?: unknown }).default === arrow.Table;
        process.stdout.write(`quiver-runner ${same ? 'ok' : 'two-arrows'} ${fromSnapshot ? 'snapshot' : 'plain'}\n`, () => process.exit(same ? 0 : 1));
      },
      (error: unknown) => {
        process.stderr.write(`quiver-runner self-check failed: ${(error as Error).stack ?? String(error)}\n`, () => process.exit(1));
      },
    );
    return;
  }
  process.on('message', (request: RunnerRequest) => {
    if (request.type === 'ping') {
      send({ type: 'pong', seq: request.seq }).catch(() => process.exit(71));
    } else if (request.type === 'job') {
      handle(request).catch((error: unknown) => {
        // Nothing left to answer with (the executor is gone, or a restore failed): end the process.
        if (isWorker) crash(error, 'uncaughtException');
        else process.exit(1);
      });
    }
  });
  process.on('disconnect', () => process.exit(71));
}

if (startupSnapshot.isBuildingSnapshot()) startupSnapshot.setDeserializeMainFunction(() => main(true));
else main(false);
