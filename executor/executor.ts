import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmdirSync, writeFileSync } from 'node:fs';
import { hostname, availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { jetstream, jetstreamManager, type Consumer, type JsMsg } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { ulid } from 'ulid';
import {
  consoleLogger,
  buckets,
  consumers,
  decode,
  encode,
  encodeChecked,
  ensureTopology,
  refuse,
  retryOrDeadLetter,
  ensureHostConsumer,
  logLine,
  runKill,
  segmentRelease,
  shmRoot,
  stepReady,
  stepStarted,
  stepCompletion,
  claimRecord,
  readRunState,
  readClaim,
  readStepCompletion,
  stepKey,
  streams,
  subjects,
  bundleDir,
  type Logger,
  type StepCompletion,
  type StepError,
  type StepFailed,
  type StepReady,
  type TableDescriptor,
  InvalidMessageError,
  type Topology,
  type TopologyOptions,
} from '../schemas/index.ts';
import { RegionBroker, drainPool, regionsAvailable, releaseRegionIds, releaseSegments, removeSegments } from '../shm/index.ts';
import { buildRunner, type RunnerBuild } from './build-runner.ts';
import { EnvironmentBuildError, Environments, type EnvironmentsOptions } from './environments.ts';
import { collectGarbage } from './gc.ts';
import { OutputCache, releasable, type OutputCacheOptions } from './output-cache.ts';
import type { RunnerJob, RunnerReply } from './protocol.ts';
import { StepProcesses, defaultStepMemoryMb, type StepLimitDefaults, type WorkerOptions } from './step-processes.ts';
import { FlightInputs, type ExecutorFlightOptions } from './flight-inputs.ts';
import { closeExecutorTableStore, executorTableStore, runSystemStep, type SystemReply, type SystemStepContext } from './system-steps.ts';

/** Options for {@link Executor.start}. */
export interface ExecutorOptions {
  /** This host's id: steps whose parents live here read them from shared memory. @default QUIVER_HOST_ID, else the hostname */
  hostId?: string;
  /** Steps run at once by this executor. @default QUIVER_CONCURRENCY, else the number of cores */
  concurrency?: number;
  topology?: TopologyOptions;
  /** @default console, prefixed "executor" */
  logger?: Logger;
  /** Parent folder of the cluster's shared-memory folder. @default QUIVER_SHM_ROOT, else /dev/shm/quiver */
  shmRoot?: string;
  /** Largest shared-memory segment; larger outputs span several. @default Node's largest ArrayBuffer */
  maxSegmentBytes?: number;
  /** Bytes of released segments kept for reuse. @default 2 GiB */
  poolMaxBytes?: number;
  /** Step processes kept booted ahead of need (each has run nothing yet). 0 starts each on demand. @default 2 */
  prewarm?: number;
  /** How often to collect segments and processes of dead runs. @default 60_000 */
  gcIntervalMs?: number;
  /** Labels steps can be pinned to (`step(..., { host: 'gpu' })`); the host id is always one. @default QUIVER_HOST_LABELS (comma-separated), else none */
  labels?: string[];
  /** The Arrow Flight server other hosts fetch this host's tables from. */
  flight?: ExecutorFlightOptions;
  /** Secret Flight tickets are signed with, the same on every host. @default QUIVER_CLUSTER_SECRET, else one kept in quiver-meta */
  clusterSecret?: string;
  /**
   * Fork step processes from a booted, warmed-up step zygote instead of booting node for each
   * (executor/step-zygote.ts). @default QUIVER_FORK_SERVER ('0' turns it off), else true
   */
  forkServer?: boolean;
  /** Limits of the long-lived step processes of steps with `isolation: 'worker'`. */
  workers?: WorkerOptions;
  /** Time and memory limits of steps that declare none (docs/limits.md). @default 15 min, 1024 MB */
  stepLimits?: StepLimitDefaults;
  /** The output cache: how many bytes of step outputs this executor keeps for reuse. */
  outputCache?: OutputCacheOptions;
  /** Package environments of steps that declare packages (docs/packages.md). @default under QUIVER_HOME/envs, shared through the cluster's quiver-envs */
  environments?: EnvironmentsOptions;
}


/**
 * Claims ready steps from the work queue under its capacity and runs each in a fresh process,
 * which maps its inputs from shared memory and writes its output there. Publishes completion
 * events carrying only descriptors, and acks a step only after its completion is published.
 */
export class Executor {
  readonly executorId: string;
  private stopped = false;
  private readonly loops: Promise<void>[] = [];
  private readonly subscriptions: Subscription[] = [];
  private readonly linkedCode = new Map<string, string>();
  /** Runs cancelled lately (run kills heard): their ready steps are dropped unclaimed. */
  private readonly killedRuns = new RecentSet(KILLED_RUNS_REMEMBERED);
  /**
   * `quiver-steps` for writing completions, with requests that give up after 2 s: a write lost to
   * a NATS restart is retried soon rather than after the default 5 s.
   */
  private completions!: KV;
  private gcTimer: NodeJS.Timeout | null = null;
  /** Holds the fds of the regions this host's steps wrote, when the quiver module is loaded (kmod/). */
  private regionBroker: RegionBroker | null = null;
  private processes!: StepProcesses;
  private outputCache!: OutputCache;
  /** This host's package environments, for steps that declare packages. */
  environments!: Environments;
  /** Ready steps held now, from either queue: claimed, waiting for a slot, running or being recorded. */
  private active = 0;
  /** Steps executing at once (step processes busy): the executor's concurrency. */
  private slots!: Slots;
  private flight: FlightInputs | null = null;

  private constructor(
    private readonly nc: NatsConnection,
    private readonly topology: Topology,
    private readonly consumer: Consumer,
    private readonly runner: RunnerBuild,
    readonly hostId: string,
    readonly shmDir: string,
    private readonly options: ExecutorOptions,
    private readonly logger: Logger,
  ) {
    this.executorId = `${hostId}.${process.pid}.${ulid().slice(-6).toLowerCase()}`;
  }

  static async start(nc: NatsConnection, options: ExecutorOptions = {}): Promise<Executor> {
    const logger = options.logger ?? consoleLogger('executor');
    const jsm = await jetstreamManager(nc);
    const topology = await ensureTopology(nc, jsm, options.topology);
    const hostId = sanitizeHostId(options.hostId ?? process.env.QUIVER_HOST_ID ?? hostname());
    const shmDir = join(options.shmRoot ?? shmRoot(), topology.clusterId);
    const runner = await buildRunner(bundleDir('build'), { snapshotHeapMb: defaultStepMemoryMb(options.stepLimits) });
    if (runner.snapshotFailure) logger.warn(`step processes start without a startup snapshot: ${runner.snapshotFailure}`);
    const js = jetstream(nc);
    const consumer = await js.consumers.get(streams.work, consumers.executors);
    const executor = new Executor(nc, topology, consumer, runner, hostId, shmDir, options, logger);
    executor.completions = await new Kvm(jetstream(nc, { timeout: 2_000 })).open(buckets.steps);
    executor.environments = new Environments({ store: topology.envs, logger, ...options.environments });
    const placed = await js.consumers.get(streams.work, await ensureHostConsumer(jsm, hostId, topology));
    await executor.collectGarbage();
    if (regionsAvailable()) executor.regionBroker = RegionBroker.inDir(shmDir);
    executor.processes = new StepProcesses({
      runnerPath: runner.runnerPath,
      snapshot: runner.snapshot,
      clusterId: topology.clusterId,
      warmUpCodePath: runner.warmUpCodePath,
      ...(options.forkServer !== undefined ? { forkServer: options.forkServer } : {}),
      ...(options.prewarm !== undefined ? { prewarm: options.prewarm } : {}),
      ...(options.workers ? { workers: options.workers } : {}),
      ...(options.stepLimits ? { limits: options.stepLimits } : {}),
      onLog: (line) => nc.publish(subjects.log(line.runId), encode(logLine, line)),
    });
    executor.outputCache = new OutputCache(
      {
        kv: topology.cache,
        shmDir,
        hostId,
        executorId: executor.executorId,
        release: (ids) => executor.removeEvicted(ids),
        logger,
        // The persisted tier (QUIVER_CACHE_PERSIST) lives in the table store.
        objects: async () => (await executorTableStore(nc)).objects,
        ...(options.maxSegmentBytes ? { maxSegmentBytes: options.maxSegmentBytes } : {}),
        ...(options.poolMaxBytes !== undefined ? { poolMaxBytes: options.poolMaxBytes } : {}),
      },
      options.outputCache,
    );
    executor.listen();
    const concurrency = options.concurrency ?? (Number(process.env.QUIVER_CONCURRENCY) || availableParallelism());
    executor.slots = new Slots(concurrency);
    const labels = options.labels ?? (process.env.QUIVER_HOST_LABELS ?? '').split(',').map((l) => l.trim()).filter(Boolean);
    executor.flight = await FlightInputs.start({
      nc, topology, hostId, executorId: executor.executorId, labels, capacity: concurrency, running: () => executor.active,
      shmDir, ...(options.clusterSecret ? { secret: options.clusterSecret } : {}), ...(options.flight ? { options: options.flight } : {}), logger,
    });
    // Work placed on this host first; shared work only while there is room. Each slot has more
    // steps held beside it, claimed and their inputs at hand, so the NATS round trips of one step
    // (claim, completion, and in a chain the next step's claim) overlap the execution of another
    // instead of idling the slot.
    for (let i = 0; i < concurrency * HELD_PER_SLOT; i++) executor.loops.push(executor.pullLoop(placed, false), executor.pullLoop(executor.consumer, true));
    const gcIntervalMs = options.gcIntervalMs ?? 60_000;
    executor.gcTimer = setInterval(() => void executor.collectGarbage(), gcIntervalMs).unref();
    logger.info(`${executor.executorId} ready: ${concurrency} concurrent steps, shared memory in ${shmDir}`);
    return executor;
  }

  /**
   * Stops pulling; steps still running are killed and left unacked, so JetStream hands them to
   * another executor. The pool of released segments is emptied: a stopped executor leaves no
   * idle shared memory behind (a live one on the same host only loses its reuse).
   */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.gcTimer) clearInterval(this.gcTimer);
    for (const sub of this.subscriptions) sub.unsubscribe();
    this.processes.stop('the executor is stopping');
    await Promise.all(this.loops);
    await this.flight?.stop();
    await this.outputCache.stop();
    await closeExecutorTableStore(this.nc);
    // Its regions go once their last reader unmaps them.
    this.regionBroker?.stop();
    drainPool({ dir: this.shmDir });
    removeEmptyDir(join(this.shmDir, 'pool'));
    removeEmptyDir(this.shmDir);
  }

  /** Removes segments and step processes of runs that are no longer alive. */
  async collectGarbage(): Promise<{ segments: number; processes: number }> {
    try {
      return await collectGarbage({ topology: this.topology, hostId: this.hostId, shmDir: this.shmDir, logger: this.logger, regions: this.regionBroker });
    } catch (error) {
      this.logger.warn(`garbage collection failed: ${(error as Error).message}`);
      return { segments: 0, processes: 0 };
    }
  }

  private listen(): void {
    const release = this.nc.subscribe(subjects.segmentRelease(this.hostId), {
      queue: `shm.${this.hostId}`,
      callback: (error, msg) => {
        if (error) return;
        try {
          const message = decode(segmentRelease, msg.subject, msg.data);
          // The output cache owns what it kept; the runs that made or read it let go of it only.
          this.releaseForGood(releasable(this.shmDir, message.segments));
        } catch (e) {
          this.logger.warn((e as Error).message);
        }
      },
    });
    const kill = this.nc.subscribe(subjects.runKill, {
      callback: (error, msg) => {
        if (error) return;
        try {
          const { runId } = decode(runKill, msg.subject, msg.data);
          this.killedRuns.add(runId);
          this.processes.killRun(runId, 'the run was cancelled');
        } catch (e) {
          this.logger.warn((e as Error).message);
        }
      },
    });
    this.subscriptions.push(release, kill);
  }

  /** Gives segments back to the pool (files) or drops them (regions). */
  private releaseForGood(ids: string[]): void {
    if (ids.length === 0) return;
    releaseSegments(ids, this.shmOptions());
    if (this.regionBroker) releaseRegionIds(ids, { dir: this.shmDir });
  }

  /**
   * Unlinks evicted cache segments instead of pooling them: a step elsewhere on the host may
   * still map one, and a pooled file is rewritten by the next output; an unlinked one keeps its
   * pages until its last mapping goes.
   */
  private removeEvicted(ids: string[]): void {
    removeSegments(ids, { dir: this.shmDir });
    if (this.regionBroker) releaseRegionIds(ids, { dir: this.shmDir });
  }

  private shmOptions() {
    return {
      dir: this.shmDir,
      ...(this.options.poolMaxBytes !== undefined ? { poolMaxBytes: this.options.poolMaxBytes } : {}),
    };
  }

  private async pullLoop(consumer: Consumer, shared: boolean): Promise<void> {
    while (!this.stopped) {
      if (shared && this.active >= this.slots.size * HELD_PER_SLOT) {
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      let msg: JsMsg | null;
      try {
        msg = await consumer.next({ expires: 2000 });
      } catch (error) {
        if (this.stopped || this.nc.isClosed()) return;
        this.logger.warn(`pulling ready steps failed: ${(error as Error).message}`);
        await new Promise((r) => setTimeout(r, 500));
        continue;
      }
      if (!msg) continue;
      if (this.stopped) {
        msg.nak();
        return;
      }
      this.active++;
      try {
        await this.handle(msg);
      } finally {
        this.active--;
      }
    }
  }

  /** Never throws: a bad message is rejected with its reason. */
  private async handle(msg: JsMsg): Promise<void> {
    let ready: StepReady;
    try {
      ready = decode(stepReady, msg.subject, msg.data);
    } catch (error) {
      await refuse(msg, { js: jetstream(this.nc), kind: 'work', reason: (error as Error).message, logger: this.logger, now: Date.now() });
      return;
    }
    try {
      await this.process(ready, msg);
    } catch (error) {
      this.logger.error(`step ${ready.step} of run ${ready.runId}: ${(error as Error).stack ?? error}`);
      // Retried, and dead-lettered after its last delivery rather than dropped unseen.
      if (!this.stopped) await retryOrDeadLetter(msg, { js: jetstream(this.nc), kind: 'work', maxDeliver: this.topology.maxDeliver, error, logger: this.logger, now: Date.now(), what: `step ${ready.step} of run ${ready.runId}` });
    }
  }

  /**
   * One ready message: its step, then the steps of its chain (StepReady.then), each run in
   * stages (see {@link processStep}) on this executor, reading the output of the one before it.
   * The message is acked when the last one is recorded or the chain stops (a step failed or is
   * another executor's); a redelivery takes the chain up where it stopped.
   */
  private async process(head: StepReady, msg: JsMsg): Promise<void> {
    const attempt = msg.info.deliveryCount;
    const heartbeat = setInterval(() => msg.working(), Math.max(200, Math.floor(this.topology.ackWaitMs / 3)));
    try {
      let ready: StepReady | null = head;
      /** Who held the chain before this delivery (it died): the steps it claimed are taken over, no one else's. */
      let previousHolder: string | null = null;
      while (ready) {
        const outcome = await this.processStep(ready, attempt, ready === head ? null : { previousHolder });
        if (outcome.kind === 'nak') {
          msg.nak();
          return;
        }
        if (outcome.kind === 'stop') break;
        if (ready === head) previousHolder = outcome.previousHolder;
        ready = nextInChain(ready, outcome.output);
      }
      msg.ack();
    } finally {
      clearInterval(heartbeat);
    }
  }

  /**
   * One step, in stages: claim it (or find it done, or drop it as a duplicate), announce it,
   * prepare its code and inputs, execute it, record its completion. Two NATS round trips on the
   * way: the claim (with the run's state read alongside on a redelivery) and the completion record;
   * further down a chain only the completion (the head's claim covers the chain).
   * Says whether a chain goes on after it, with its output.
   */
  private async processStep(ready: StepReady, attempt: number, chain: ChainClaim | null): Promise<StepOutcome> {
    const claim = await this.claim(ready, attempt, chain);
    if (claim.kind === 'drop') return STOP;
    if (claim.kind === 'done') return claim.completion.type === 'step.succeeded' ? { kind: 'next', output: claim.completion.output, previousHolder: claim.holder } : STOP;
    const startedAt = Date.now();
    if (attempt >= this.topology.maxDeliver) {
      await this.fail(ready, attempt, startedAt, {
        name: 'StepAbandoned',
        code: 'ERR_STEP_ABANDONED',
        message: `step "${ready.step}" was handed out ${attempt} times and never finished: the executors running it kept dying`,
      });
      return STOP;
    }
    const stopAnnouncing = this.announceStart(ready, attempt, startedAt);
    try {
      // The output cache's persisted tier may hold the output shared memory lost: then nothing runs.
      const restored = await this.outputCache.restore(ready, attempt);
      if (restored) return await this.complete(ready, attempt, startedAt, restored, 0, undefined, 'cache', claim.holder);
      const prepared = await this.prepare(ready);
      if (prepared.kind === 'stopped') return NAK;
      if (prepared.kind === 'failed') {
        await this.fail(ready, attempt, startedAt, prepared.error, prepared.envMs !== undefined ? { envMs: prepared.envMs } : {});
        return STOP;
      }
      // Cached outputs this step maps stay while it runs, however full the cache gets.
      const mapped = prepared.inputs.flatMap((i) => i.descriptor.segments.map((s) => s.id));
      this.outputCache.pin(mapped);
      let reply: SystemReply | 'cancelled';
      try {
        await this.slots.take();
        try {
          // The run may have been cancelled while the step waited for its slot.
          reply = this.stopped ? STOPPED_REPLY : this.killedRuns.has(ready.runId) ? 'cancelled' : await this.execute(ready, prepared.inputs, attempt, prepared.codePath);
        } finally {
          this.slots.give();
        }
      } finally {
        this.outputCache.unpin(mapped);
      }
      if (reply === 'cancelled') return STOP;
      // Killed by our own stop: not the step's fault. Another executor gets it.
      if (this.stopped) return NAK;
      return await this.complete(ready, attempt, startedAt, reply, prepared.fetchedBytes, prepared.envMs, undefined, claim.holder);
    } finally {
      stopAnnouncing();
    }
  }

  /**
   * Claims the step for this executor, or says it is done already (a redelivery after a crash
   * must not run it again, and a chain goes on from its output), or to drop it: the run is over,
   * or it is a second ready message for a step another executor holds. A redelivered step whose
   * claimant stopped acking (it died) is taken over; a step further down a redelivered chain only
   * from the executor that held the chain before: a claim of anyone else's stands.
   */
  private async claim(ready: StepReady, attempt: number, chain: ChainClaim | null): Promise<Claim> {
    const key = stepKey(ready.runId, ready.step);
    // A first delivery was sent moments ago by the run's leader while the run went on: only a
    // cancel can have ended it since, and cancels reach this executor as run kills. A redelivery
    // may come long after the run ended (an executor died holding it): then the record decides.
    if (this.killedRuns.has(ready.runId)) return DROP;
    // Covered by the claim this delivery made on its chain's head (ClaimRecord.chain): no other
    // ready message carries the step, so claiming it again would only cost a round trip.
    if (chain && attempt === 1 && chain.previousHolder === null) return RUN;
    const carried = ready.then?.map((s) => s.step);
    const claim = encode(claimRecord, { executorId: this.executorId, hostId: this.hostId, attempt, at: Date.now(), ...(carried ? { chain: carried } : {}) });
    const checkRun = attempt > 1;
    const [created, run] = await Promise.all([
      this.topology.claims.create(key, claim).then(
        () => true,
        (error: unknown) => error as Error,
      ),
      !checkRun ? null : readRunState(this.topology.runs, ready.runId).catch((error: unknown) => {
        // A malformed record must not keep a step from running: the orchestrator drives the run.
        this.logger.warn((error as Error).message);
        return null;
      }),
    ]);
    if (run && run !== 'running') return DROP;
    if (created === true) return RUN;
    // Only "already claimed" is an answer; any other trouble is retried by redelivery.
    const holder = await readClaim(this.topology.claims, ready.runId, ready.step).catch(() => null);
    if (!holder) throw created;
    // A malformed completion is still one: the step is not run again, and no chain goes on from it.
    // Any other trouble reading it is retried by redelivery, as before: the step is not dropped.
    const completion = await readStepCompletion(this.topology.steps, ready.runId, ready.step).catch((error: unknown) => {
      if (error instanceof InvalidMessageError) return 'malformed' as const;
      throw error;
    });
    if (completion === 'malformed') return DROP;
    // A first delivery of a step done already is a second ready message for it: the steps of its
    // chain belong to the first one's executor (they have no claims of their own to stop a second run).
    if (completion && attempt === 1 && !chain) return DROP;
    if (completion) return { kind: 'done', completion, holder: holder.executorId };
    // A create whose answer was lost (NATS restarting) may have stored this very claim.
    if (holder.executorId === this.executorId && holder.attempt === attempt) return RUN;
    // A second ready message for a step already claimed (a resumed orchestrator re-sent it).
    if (attempt === 1) return DROP;
    if (chain && holder.executorId !== chain.previousHolder) return DROP;
    await this.topology.claims.put(key, claim);
    return { kind: 'run', holder: holder.executorId };
  }

  /**
   * Says the step started, for live views only (core NATS: losing it changes nothing, so it costs
   * no round trip), once it has run for {@link ANNOUNCE_START_AFTER_MS}. A step done sooner says
   * nothing: its completion carries when it started, and the start would only have cost a
   * message, a decode, a transition and a run view published for a state nobody could watch.
   * Returns what stops a start not yet said from being said.
   */
  private announceStart(ready: StepReady, attempt: number, at: number): () => void {
    const started = { type: 'step.started' as const, runId: ready.runId, step: ready.step, attempt, executorId: this.executorId, hostId: this.hostId, at };
    const timer = setTimeout(() => this.nc.publish(subjects.stepStarted, encode(stepStarted, started)), ANNOUNCE_START_AFTER_MS);
    return () => clearTimeout(timer);
  }

  /**
   * The step's package environment (when it declares packages: found, fetched or built once per
   * host), its code (fetched once per host) and its inputs on this host (fetched over Flight when elsewhere).
   */
  private async prepare(
    ready: StepReady,
  ): Promise<{ kind: 'ready'; codePath: string; inputs: StepReady['inputs']; fetchedBytes: number; envMs?: number } | { kind: 'failed'; error: StepError; envMs?: number } | { kind: 'stopped' }> {
    let codePath = '';
    let environment: { dir: string; packages: string[] } | undefined;
    let envMs: number | undefined;
    if (!ready.system && ready.packages && Object.keys(ready.packages).length > 0) {
      const began = performance.now();
      try {
        // Shown live in the run's log: building an environment can take a while.
        const onProgress = (line: string) => this.nc.publish(subjects.log(ready.runId), encode(logLine, { runId: ready.runId, step: ready.step, stream: 'stdout', line, at: Date.now() }));
        environment = { dir: (await this.environments.ensure(ready.packages, { onProgress })).dir, packages: Object.keys(ready.packages) };
        envMs = Math.round(performance.now() - began);
      } catch (error) {
        envMs = Math.round(performance.now() - began);
        const built = error instanceof EnvironmentBuildError ? error : new EnvironmentBuildError((error as Error).message, { cause: error });
        return { kind: 'failed', error: { name: built.name, code: built.code, message: `step "${ready.step}" could not get its packages: ${built.message}` }, envMs };
      }
    }
    if (!ready.system) {
      try {
        codePath = await this.ensureCode(ready.codeHash, environment);
      } catch (error) {
        // Missing or corrupt code will not heal by redelivery: fail the step, saying why.
        return { kind: 'failed', error: { name: 'PipelineCodeError', code: 'ERR_PIPELINE_CODE', message: (error as Error).message } };
      }
    }
    try {
      const { inputs, fetchedBytes } = await this.flight!.localize(withoutOrderOnlyInputs(ready));
      return { kind: 'ready', codePath, inputs, fetchedBytes, ...(envMs !== undefined ? { envMs } : {}) };
    } catch (error) {
      if (this.stopped) return { kind: 'stopped' };
      // The host holding the input is gone or failed mid-transfer: its data is out of reach.
      return { kind: 'failed', error: { name: (error as Error).name, code: (error as { code?: string }).code ?? 'ERR_FLIGHT_FETCH', message: (error as Error).message } };
    }
  }

  private execute(ready: StepReady, inputs: StepReady['inputs'], attempt: number, codePath: string): Promise<SystemReply> {
    return ready.system ? runSystemStep(ready, ready.system, inputs, attempt, this.systemStepContext(ready)) : this.runStep({ ...ready, inputs }, attempt, codePath);
  }

  /** Records the step's reply: a chain goes on from its output, unless it failed or another executor's completion came first. */
  private async complete(ready: StepReady, attempt: number, startedAt: number, reply: SystemReply, fetchedBytes: number, envMs: number | undefined, from: 'cache' | undefined, previousHolder: string | null): Promise<StepOutcome> {
    const ran = ready.system || from === 'cache'
      ? {}
      : { isolation: ready.isolation ?? 'process', ...('codeStartedAt' in reply && reply.codeStartedAt !== undefined ? { codeStartedAt: reply.codeStartedAt } : {}), ...(envMs !== undefined ? { envMs } : {}) };
    if (reply.type === 'error') {
      await this.fail(ready, attempt, startedAt, reply.error, ran);
      return STOP;
    }
    const completion: StepCompletion = {
      type: 'step.succeeded',
      runId: ready.runId,
      step: ready.step,
      attempt,
      executorId: this.executorId,
      output: { kind: 'shm', hostId: this.hostId, segments: reply.segments, byteSize: reply.byteSize, rows: reply.rows, schema: reply.schema },
      transport: from ?? (fetchedBytes > 0 ? 'flight' : ready.inputs.length > 0 ? (inputsAreRegions(ready) ? 'region' : 'shm') : null),
      inputCopiedBytes: reply.inputCopiedBytes + fetchedBytes,
      ...(fetchedBytes > 0 ? { fetchedBytes } : {}),
      ...(reply.scan ? { scan: reply.scan } : {}),
      outputCopiedBytes: reply.outputCopiedBytes,
      ...ran,
      ...(ready.cacheKey ? { cacheKey: ready.cacheKey } : {}),
      startedAt,
      at: Date.now(),
    };
    // Cached before the completion is recorded: once it is, the run may end and release the output.
    if (ready.cacheKey && ready.cacheWrite) {
      await this.outputCache.store(ready.cacheKey, completion.output, { runId: ready.runId, step: ready.step }).catch((error: unknown) => {
        this.logger.warn(`could not cache the output of step ${ready.step} of run ${ready.runId}: ${(error as Error).message}`);
      });
    }
    if (!(await this.record(completion))) {
      // Another executor finished this step first (it was placed again meanwhile): its output counts.
      this.releaseForGood(releasable(this.shmDir, reply.segments.map((s) => s.id)));
      return STOP;
    }
    return { kind: 'next', output: completion.output, previousHolder };
  }

  /** What a system step (scan, stage, commit) runs with: this host's shared memory, tables and the run's log. */
  private systemStepContext(ready: StepReady): SystemStepContext {
    return {
      shmDir: this.shmDir,
      ...(this.options.maxSegmentBytes ? { maxSegmentBytes: this.options.maxSegmentBytes } : {}),
      ...(this.options.poolMaxBytes !== undefined ? { poolMaxBytes: this.options.poolMaxBytes } : {}),
      tables: () => executorTableStore(this.nc),
      log: (line) => this.nc.publish(subjects.log(ready.runId), encode(logLine, { runId: ready.runId, step: ready.step, stream: 'stdout', line, at: Date.now() })),
      // Scans, stages and commits run in step processes, under the default step limits (docs/limits.md).
      processes: {
        codePath: this.runner.systemCodePath,
        run: (job, env, catalog) => this.processes.run(job, 'worker', { env, system: true, ...(catalog ? { catalog } : {}) }),
        ...(this.regionBroker ? { regionBroker: this.regionBroker.socketPath } : {}),
      },
    };
  }

  private async fail(ready: StepReady, attempt: number, startedAt: number, error: StepError, ran: Pick<StepFailed, 'isolation' | 'codeStartedAt' | 'envMs'> = {}): Promise<void> {
    await this.record({ type: 'step.failed', runId: ready.runId, step: ready.step, attempt, executorId: this.executorId, hostId: this.hostId, error, ...ran, startedAt, at: Date.now() });
  }

  /**
   * Writes the step's completion to `quiver-steps`: the one fact the orchestrator drives the run
   * by, read again by a redelivery so a finished step never runs twice. Created, never replaced:
   * false when another executor's completion of the step is there already (the first one wins).
   */
  private async record(completion: StepCompletion): Promise<boolean> {
    const key = stepKey(completion.runId, completion.step);
    // Validated once, before anything is recorded, even where outgoing messages are not (it
    // carries what a step process replied): a malformed completion is never kept.
    const data = encodeChecked(stepCompletion, completion);
    for (let tries = 1; ; tries++) {
      try {
        await this.completions.create(key, data);
        return true;
      } catch (error) {
        const there = await readStepCompletion(this.topology.steps, completion.runId, completion.step).catch(() => null);
        // A try whose answer was lost may have written it: then it is this one.
        if (there) return there.executorId === completion.executorId && there.attempt === completion.attempt;
        // NATS is away (restarting, failing over): the step's work is done and must not be
        // lost to a redelivery that would run it again, so keep trying while the step is ours.
        if (this.stopped) throw error;
        if (tries === 1 || tries % 20 === 0) this.logger.warn(`recording the completion of ${key} failed, retrying: ${(error as Error).message}`);
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  /**
   * Fetches the pipeline bundle once per host (content-addressed, so a cached file is never stale)
   * and links it against the runner's Arrow. With an environment, the linked file is written inside
   * it, so Node resolves the declared packages from its node_modules.
   */
  private async ensureCode(codeHash: string, environment?: { dir: string; packages: string[] }): Promise<string> {
    const known = this.linkedCode.get(`${codeHash}:${environment?.dir ?? ''}`);
    // An environment pruned since (quiver env prune) comes back without its linked code.
    if (known && (!environment || existsSync(known))) return known;
    const path = environment
      ? join(environment.dir, 'code', `${codeHash.slice(0, 32)}-${this.runner.linkKey}.mjs`)
      : join(bundleDir('build'), `code-${codeHash.slice(0, 32)}-${this.runner.linkKey}.mjs`);
    if (!existsSync(path)) {
      const local = join(bundleDir('code'), `${codeHash}.mjs`);
      const blob = existsSync(local) ? readFileSync(local) : await this.topology.code.getBlob(codeHash);
      if (!blob) throw new Error(`pipeline code ${codeHash} is not in the quiver-code object store`);
      const actual = createHash('sha256').update(blob).digest('hex');
      if (actual !== codeHash) throw new Error(`pipeline code ${codeHash} hashes to ${actual}: refusing to run it`);
      const linked = await this.runner.linkCode(blob, path, environment?.packages);
      if (environment) mkdirSync(dirname(path), { recursive: true });
      const tmp = `${path}.${process.pid}.${ulid()}.tmp`;
      writeFileSync(tmp, linked);
      renameSync(tmp, path);
    }
    this.linkedCode.set(`${codeHash}:${environment?.dir ?? ''}`, path);
    return path;
  }

  private runStep(ready: StepReady, attempt: number, codePath: string): Promise<RunnerReply> {
    const job: RunnerJob = {
      codePath,
      runId: ready.runId,
      step: ready.step,
      params: ready.params,
      event: ready.event ?? null,
      inputs: ready.inputs.map((i) => ({ param: i.param, descriptor: i.descriptor, ...(i.columns ? { columns: i.columns } : {}) })),
      shmDir: this.shmDir,
      outputIdPrefix: `${ready.runId}.${ready.step}.${attempt}`,
      ...(this.regionBroker ? { regionBroker: this.regionBroker.socketPath } : {}),
      ...(this.options.maxSegmentBytes ? { maxSegmentBytes: this.options.maxSegmentBytes } : {}),
      ...(this.options.poolMaxBytes !== undefined ? { poolMaxBytes: this.options.poolMaxBytes } : {}),
    };
    return this.processes.run(job, ready.isolation ?? 'process', { ...(ready.limits ? { limits: ready.limits } : {}), ...(ready.env ? { env: ready.env } : {}) });
  }
}

/** How long a step runs before the executor announces its start (see Executor.announceStart). */
const ANNOUNCE_START_AFTER_MS = 20;

/** How a step of a ready message ended for its chain: go on from its output, stop (ack), or hand the message back (nak). */
type StepOutcome = { kind: 'next'; output: TableDescriptor; previousHolder: string | null } | { kind: 'stop' } | { kind: 'nak' };
const STOP: StepOutcome = { kind: 'stop' };
const NAK: StepOutcome = { kind: 'nak' };

/** What a claim found: run the step (`holder`: whose claim this one took over), it is done already, or drop it. */
type Claim = { kind: 'run'; holder: string | null } | { kind: 'done'; completion: StepCompletion; holder: string } | { kind: 'drop' };
const DROP: Claim = { kind: 'drop' };
const RUN: Claim = { kind: 'run', holder: null };

/** A step further down a chain: whose claims on it may be taken over (the executor that held the chain before, if it died). */
interface ChainClaim {
  previousHolder: string | null;
}

/** The next step of `ready`'s chain, reading `output`, or null at its end. */
function nextInChain(ready: StepReady, output: TableDescriptor): StepReady | null {
  const [next, ...rest] = ready.then ?? [];
  if (!next) return null;
  const { then: _then, cacheKey: _key, cacheWrite: _write, cacheRead: _read, ...common } = ready;
  return { ...common, step: next.step, inputs: next.inputs.map((input) => ({ ...input, descriptor: output })), ...(rest.length > 0 ? { then: rest } : {}) };
}

/**
 * Ready messages an executor holds per slot (see Executor.start). A chain holds its message
 * through the round trips between its steps: with two per slot, slots idled between them
 * (`npm run bench:trigger -- --routes worker --burst 2000`: 215-225 runs/s with two, 231-238
 * with three, 230-244 with four). With the spinning spares gone, alternating runs put five
 * (231-283 runs/s, mean 263) ahead of three (207-256, mean 232), with less CPU per run in four
 * pairs of five, and eight (218, 218) behind five (245, 255). Each held one is work no other
 * executor takes until this one acks it or dies.
 */
const HELD_PER_SLOT = 5;

/** What a step held for a slot gets when the executor stops first: it is handed back unrun (nak). */
const STOPPED_REPLY: SystemReply = { type: 'error', error: { name: 'ExecutorStopped', code: 'ERR_EXECUTOR_STOPPED', message: 'the executor stopped before the step started' } };

/** A counting semaphore: steps wait here, first come first served, for a free slot. */
class Slots {
  private used = 0;
  private readonly waiting: (() => void)[] = [];
  constructor(readonly size: number) {}
  take(): Promise<void> {
    if (this.used < this.size) {
      this.used++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiting.push(resolve));
  }
  /** Hands the slot straight to the next waiter, if any. */
  give(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.used--;
  }
}

/** How many cancelled runs an executor remembers: far more than can have ready steps queued at once. */
const KILLED_RUNS_REMEMBERED = 10_000;

/** A set that forgets its oldest members past `capacity`. */
class RecentSet {
  private readonly members = new Set<string>();
  constructor(private readonly capacity: number) {}
  add(value: string): void {
    this.members.delete(value);
    this.members.add(value);
    if (this.members.size > this.capacity) this.members.delete(this.members.values().next().value!);
  }
  has(value: string): boolean {
    return this.members.has(value);
  }
}

/**
 * A commit step reads only what the stage steps wrote; its other inputs (the run's leaves) only
 * order it after everything else, so their tables are not fetched from other hosts.
 */
function withoutOrderOnlyInputs(ready: StepReady): StepReady {
  return ready.system?.kind === 'commit' ? { ...ready, inputs: ready.inputs.filter((i) => i.param.startsWith('staged')) } : ready;
}

/** True when every input lives in regions of the quiver module (kmod/) rather than segment files. */
function inputsAreRegions(ready: StepReady): boolean {
  return ready.inputs.every((i) => i.descriptor.segments.length > 0 && i.descriptor.segments.every((s) => s.kind === 'region'));
}

/** rmdir, not rm -r: another executor of the host may be writing here, and then the folder stays. */
function removeEmptyDir(dir: string): void {
  try {
    rmdirSync(dir);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'ENOTEMPTY' && code !== 'ENOENT' && code !== 'EEXIST') throw error;
  }
}

function sanitizeHostId(raw: string): string {
  const cleaned = raw.replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 128);
  return cleaned || 'host';
}
