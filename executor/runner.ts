/**
 * The entry point of a step process. Bundled by the executor (esbuild) so a step starts with plain
 * `node`, no TypeScript loader on the hot path. Its first job says what it is: a one-step process
 * (run the step, answer, exit) or a worker (answer, then wait for the next step of the same
 * pipeline version). Either way each step goes through {@link runJob}.
 */
import { readlinkSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { Writable } from 'node:stream';
import { inspect } from 'node:util';
import { startupSnapshot } from 'node:v8';
import { exitNow, forkChild, parentPid, reapChild, removeSegments, setParentDeathSignal } from '../shm/index.ts';
import { importCode } from './code-import.ts';
import { STEP_PROCESS_MARKER, forkHello, stepProcessTitle, type RunnerJob, type RunnerMessage, type RunnerRequest } from './protocol.ts';
import { runJob } from './run-job.ts';
import { workerCrashed } from './step-errors.ts';

/** gc finds step processes of dead runs by their title (`quiver-step <cluster> <run> <step>`). */
let clusterId = '';

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
const output = {} as { stdout: NodeJS.WriteStream; stderr: NodeJS.WriteStream };
/**
 * Whether the step running now printed to each stream. A stream it printed to gets the end
 * marker; one it did not is left alone (two pipe writes per step, and the executor's reads of
 * them: a sixth of its CPU per worker step in a direct StepProcesses loop). Only writes through
 * the stream objects count: bytes a step writes to fd 1 or 2 itself still reach its log, routed
 * to the step that ran last, but may arrive after its reply.
 */
const printed = { stdout: false, stderr: false };
function notePrinting(name: 'stdout' | 'stderr'): void {
  const stream = process[name];
  const write = stream.write;
  stream.write = function (this: NodeJS.WriteStream, ...args: Parameters<NodeJS.WriteStream['write']>) {
    printed[name] = true;
    return write.apply(this, args);
  } as NodeJS.WriteStream['write'];
}
const writeLine = (stream: NodeJS.WriteStream, line: string) =>
  new Promise<void>((resolve, reject) => {
    Writable.prototype.write.call(stream, `${line}\n`, 'utf8', (error?: Error | null) => (error ? reject(error) : resolve()));
  });

/** The step running now, and the last one: what a worker's crash is blamed on. */
let current: RunnerJob | null = null;
let last: RunnerJob | null = null;

/**
 * What a worker's step may change for the process, put back after every call: environment and
 * working directory as they were when the worker's first step function was called (changes
 * made while its module was first imported stay, like the module's globals). Taken once: every
 * call puts them back, so they are the same before the next one, and a copy of process.env per
 * step (each variable read through the C++ environment) cost a twentieth of a worker's step.
 * The step's declared secrets are not in it: they exist in process.env only during the call.
 */
let baseline: { env: Record<string, string>; cwd: string } | null = null;
/** Whether a worker's step function has been called since the last restore. */
let called = false;
function restoreProcessState(): void {
  if (!baseline || !called) return;
  called = false;
  const { env, cwd } = baseline;
  for (const key of Object.keys(process.env)) if (!Object.hasOwn(env, key)) delete process.env[key];
  for (const key in env) if (process.env[key] !== env[key]) process.env[key] = env[key];
  if (process.cwd() !== cwd) process.chdir(cwd);
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
  const exit = () => process.exit(1);
  send({ type: 'fatal', error }).then(exit, exit);
}

async function handle(request: RunnerRequest & { type: 'job' }): Promise<void> {
  const { job, endMarker, keepAlive } = request;
  if (keepAlive && !isWorker) {
    isWorker = true;
    process.on('uncaughtException', crash);
  }
  current = job;
  printed.stdout = printed.stderr = false;
  process.title = stepProcessTitle(clusterId, job);
  const reply = await runJob(job, {
    beforeCall: () => {
      // Taken before the secrets go in: putting it back after the call removes them, so the
      // worker's next step (maybe one that declared none) cannot see them.
      if (keepAlive) {
        baseline ??= { env: { ...process.env } as Record<string, string>, cwd: process.cwd() };
        called = true;
      }
      for (const [name, value] of Object.entries(job.env ?? {})) process.env[name] = value;
    },
  });
  restoreProcessState();
  // The executor forwards lines until it sees these: every line the step printed is then ahead of its reply.
  const markedStreams = (['stdout', 'stderr'] as const).filter((name) => printed[name]);
  await Promise.all(markedStreams.map((name) => writeLine(output[name], endMarker)));
  current = null;
  last = job;
  if (keepAlive) process.title = stepProcessTitle(clusterId, null);
  // The peak, from getrusage: one system call, where the current RSS reads and parses
  // /proc/self/stat (three, and 6% of a worker's CPU per step). A worker over the limit at any
  // point is recycled all the same.
  await send({ type: 'reply', reply, rssBytes: process.resourceUsage().maxRSS * 1024, markedStreams });
  if (!keepAlive) process.exit(0);
}

/**
 * Starts serving the executor. Nothing happens before it is called: in the startup snapshot
 * (step-snapshot.ts) it runs when a process starts from the snapshot, not when it is built.
 */
export function main(): void {
  const expectedParent = Number(process.env.QUIVER_EXECUTOR_PID);
  // Die with the executor, even when it is SIGKILLed: no orphaned step keeps running.
  setParentDeathSignal('SIGKILL');
  if (expectedParent && parentPid() !== expectedParent) process.exit(70);
  clusterId = process.argv[process.argv.indexOf(STEP_PROCESS_MARKER) + 1] ?? '';
  output.stdout = process.stdout;
  output.stderr = process.stderr;
  notePrinting('stdout');
  notePrinting('stderr');
  process.on('message', onRequest);
  process.on('disconnect', () => process.exit(71));
}

function onRequest(request: RunnerRequest): void {
  if (request.type === 'ping') {
    send({ type: 'pong', seq: request.seq }).catch(() => process.exit(71));
  } else if (request.type === 'fork') {
    // After the warm-up: a child forked in the middle of it would carry the rest of it along.
    void warmedUp.then(() => forkStep(request));
  } else if (request.type === 'warm-up') {
    warmedUp = warmUp(request);
  } else if (request.type === 'preload') {
    importCode(request.codePath).catch(() => undefined);
  } else if (request.type === 'job') {
    handle(request).catch((error: unknown) => {
      // Nothing left to answer with (the executor is gone, or a restore failed): end the process.
      if (isWorker) crash(error, 'uncaughtException');
      else process.exit(1);
    });
  }
}

// Bundled as the runner itself, it serves at once; bundled into the snapshot, the snapshot's entry decides.
if (!startupSnapshot.isBuildingSnapshot()) main();

/**
 * A step zygote (executor/step-zygote.ts) is a runner that has run nothing and forks step
 * processes on request: each starts from its memory (node, apache-arrow and the runner booted)
 * instead of booting. Only a process started with --single-threaded forks: V8 then hands no work
 * to the background threads a child would not have.
 */
const zygoteChildren = new Set<number>();
/** True in a forked child: it serves its own steps and forks nothing. */
let forkedChild = false;
const SIGNAL_NAMES = new Map(Object.entries(osConstants.signals).map(([name, number]) => [number, name as NodeJS.Signals]));

/** Settles once the zygote's warm-up ran (or failed: forked processes then compile it themselves). */
let warmedUp: Promise<void> = Promise.resolve();

async function warmUp(request: RunnerRequest & { type: 'warm-up' }): Promise<void> {
  const job = (step: string, inputs: RunnerJob['inputs']): RunnerJob => ({
    codePath: request.codePath, runId: request.idPrefix, step, params: {}, event: null, inputs, shmDir: request.shmDir, outputIdPrefix: `${request.idPrefix}.${step}`,
  });
  const written: string[] = [];
  try {
    const made = await runJob(job('make', []));
    if (made.type !== 'result') return;
    written.push(...made.segments.map((s) => s.id));
    const descriptor = { kind: 'shm' as const, hostId: '', segments: made.segments, byteSize: made.byteSize, rows: made.rows, schema: made.schema };
    const used = await runJob(job('use', [{ param: 'made', descriptor }]));
    if (used.type === 'result') written.push(...used.segments.map((s) => s.id));
  } catch {
    // Only a head start: a forked process compiles whatever this left out.
  } finally {
    try {
      removeSegments(written, { dir: request.shmDir });
    } catch {
      // Left for the executor, which removes the folder.
    }
  }
}

function forkStep(request: RunnerRequest & { type: 'fork' }): void {
  // A request read by the zygote before it forked this child: the zygote answers it.
  if (forkedChild) return;
  if (!process.execArgv.includes('--single-threaded')) {
    void send({ type: 'fork-failed', forkId: request.forkId, message: 'the step zygote was not started with --single-threaded' }).catch(() => process.exit(71));
    return;
  }
  const channel = process.channel as unknown as { fd: number; writeQueueSize: number };
  // A child inherits what is queued on the channel and would write it to its own: fork once it is sent.
  if (channel.writeQueueSize > 0) {
    setImmediate(() => forkStep(request));
    return;
  }
  let pid: number;
  try {
    const hellos = [forkHello(request.token, request.forkId, 'stdout'), forkHello(request.token, request.forkId, 'stderr'), forkHello(request.token, request.forkId, 'ipc')] as const;
    pid = forkChild({ socketPath: request.socketPath, hellos, ipcFd: channel.fd }, request.addressSpaceBytes);
  } catch (error) {
    void send({ type: 'fork-failed', forkId: request.forkId, message: (error as Error).message }).catch(() => process.exit(71));
    return;
  }
  if (pid === 0) {
    becomeForkedChild();
    return;
  }
  if (!process.listeners('SIGCHLD').includes(reapChildren)) {
    process.on('SIGCHLD', reapChildren);
    process.title = stepProcessTitle(clusterId, 'zygote');
  }
  zygoteChildren.add(pid);
  void send({ type: 'forked', forkId: request.forkId, pid }).catch(() => process.exit(71));
}

function reapChildren(): void {
  for (const pid of zygoteChildren) {
    const ended = reapChild(pid);
    if (!ended) continue;
    zygoteChildren.delete(pid);
    const signal = ended.signal === null ? null : (SIGNAL_NAMES.get(ended.signal) ?? null);
    void send({ type: 'exited', pid, code: ended.code, signal }).catch(() => process.exit(71));
  }
}

/**
 * What a forked child changes before it serves: it reaps nothing of the zygote's, ends with _exit
 * (Node's own exit joins threads only the zygote has), reports an uncaught error as Node would,
 * and draws Math.random from its own seed, not the one it shares with the zygote and every sibling.
 */
function becomeForkedChild(): void {
  forkedChild = true;
  // Node reads its pid once, at start: the zygote's.
  Object.defineProperty(process, 'pid', { value: Number(readlinkSync('/proc/self')), enumerable: true, configurable: true, writable: true });
  process.removeListener('SIGCHLD', reapChildren);
  zygoteChildren.clear();
  process.title = stepProcessTitle(clusterId, null);
  (process as unknown as { reallyExit: (code?: number) => never }).reallyExit = (code?: number) => exitNow(code ?? 0);
  process.on('uncaughtException', (error) => {
    // A worker's own handler (crash) reports it to the executor and exits.
    if (isWorker) return;
    try {
      output.stderr.write(`${inspect(error)}\n`);
    } finally {
      exitNow(1);
    }
  });
  const pool = new Uint32Array(1024);
  let next = pool.length;
  Math.random = function random(): number {
    if (next + 2 > pool.length) {
      crypto.getRandomValues(pool);
      next = 0;
    }
    // 53 random bits, as V8's own Math.random has.
    return ((pool[next++]! >>> 5) * 67108864 + (pool[next++]! >>> 6)) / 9007199254740992;
  };
}
