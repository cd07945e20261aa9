/**
 * Trigger benchmark: from publishing an event to the first step of its run starting, and how
 * many runs start and finish per second, side by side with BullMQ's FlowProducer running an
 * equivalent three-step flow on a Redis on this machine.
 *
 *   quiver  a deployed three-step chain started by `orders.*` events, on the embedded cluster
 *           (private nats-server, orchestrator and executor in this process). Each step runs in
 *           a fresh process, as every Quiver step does.
 *   bullmq  a FlowProducer flow third ← second ← first on one queue (BullMQ runs children
 *           first), processed by a Worker in this process: no process per step.
 *
 * Latency: one event at a time; "started" is when this process hears the first step start
 * (Quiver: the step.started message; BullMQ: the worker callback). Throughput: a burst of
 * events at once; runs admitted/s counts runs whose first step was handed to workers (Quiver:
 * dispatched on the work queue; BullMQ: the flow added), runs started/s first steps started,
 * runs finished/s last steps done.
 *
 * Run: npm run bench:trigger [-- --latency 200 --burst 300 --concurrency 4]
 * Redis: REDIS_URL, else 127.0.0.1:6379, else a redis-server the bench starts on a free port.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { FlowProducer, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { decode, silentLogger, stepReady, stepStarted, stepSucceeded, subjects } from '../schemas/index.ts';
import { loadPipeline, startLocalCluster } from '../sdk/index.ts';

const { values } = parseArgs({
  options: {
    latency: { type: 'string', default: '200' },
    burst: { type: 'string', default: '300' },
    concurrency: { type: 'string', default: '4' },
  },
});
const LATENCY_EVENTS = Number(values.latency);
const BURST = Number(values.burst);
const CONCURRENCY = Number(values.concurrency);
const repoRoot = fileURLToPath(new URL('..', import.meta.url));

interface Figures {
  p50: number;
  p99: number;
  /** Runs whose first step was handed to workers (Quiver: dispatched on the work queue; BullMQ: flow added). */
  admittedPerSecond: number;
  startedPerSecond: number;
  finishedPerSecond: number;
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;

/** Waits until `count()` reaches `target`, polling cheaply; returns when it did. */
async function until(count: () => number, target: number, timeoutMs: number, what: string): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (count() < target) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${count()} of ${target}`);
    await new Promise((r) => setTimeout(r, 1));
  }
  return performance.now();
}

/** What a route reports as it goes; its callbacks count, {@link measure} reads. */
interface Counters {
  admitted: number;
  started: number;
  finished: number;
  /** When the last first step started. */
  lastStartAt: number;
}
const counters = (): Counters => ({ admitted: 0, started: 0, finished: 0, lastStartAt: 0 });

/** One event at a time for latency, then a burst for throughput: the same for every route. */
async function measure(c: Counters, one: (i: number) => Promise<unknown>, burstOne: (i: number) => Promise<unknown>): Promise<Figures> {
  const latencies: number[] = [];
  for (let i = 0; i < LATENCY_EVENTS; i++) {
    const before = c.started;
    const t0 = performance.now();
    await one(i);
    await until(() => c.started, before + 1, 30_000, 'the first step');
    latencies.push(c.lastStartAt - t0);
    await until(() => c.finished, before + 1, 30_000, 'the run to finish');
  }
  const base = { ...c };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: BURST }, (_, i) => burstOne(i)));
  const allAdmitted = await until(() => c.admitted - base.admitted, BURST, 600_000, 'the burst to be admitted');
  const allStarted = await until(() => c.started - base.started, BURST, 600_000, 'the burst to start');
  const allFinished = await until(() => c.finished - base.finished, BURST, 600_000, 'the burst to finish');
  latencies.sort((a, b) => a - b);
  return {
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
    admittedPerSecond: BURST / ((allAdmitted - t0) / 1000),
    startedPerSecond: BURST / ((allStarted - t0) / 1000),
    finishedPerSecond: BURST / ((allFinished - t0) / 1000),
  };
}

async function benchQuiver(): Promise<Figures> {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-trigger-'));
  const file = join(dir, 'chain.ts');
  writeFileSync(
    file,
    `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('bench_chain', {
  first: step(() => tableFromArrays({ v: Int32Array.of(1) })),
  second: step({ t: 'first' }, ({ t }) => t),
  third: step({ t: 'second' }, ({ t }) => t),
}, { on: { event: 'orders.*' } });
`,
  );
  const cluster = await startLocalCluster({ home: dir, logger: silentLogger, executor: { concurrency: CONCURRENCY } });
  try {
    const { client } = cluster;
    await client.deploy(await loadPipeline(file));
    const c = counters();
    cluster.client.nc.subscribe('quiver.work.>', {
      callback: (_e, msg) => {
        if (decode(stepReady, msg.subject, msg.data).step === 'first') c.admitted++;
      },
    });
    cluster.client.nc.subscribe(subjects.stepStarted, {
      callback: (_e, msg) => {
        const s = decode(stepStarted, msg.subject, msg.data);
        if (s.step === 'first' && s.attempt === 1) {
          c.started++;
          c.lastStartAt = performance.now();
        }
      },
    });
    cluster.client.nc.subscribe(subjects.stepSucceeded, {
      callback: (_e, msg) => {
        if (decode(stepSucceeded, msg.subject, msg.data).step === 'third') c.finished++;
      },
    });
    await cluster.client.nc.flush();

    return await measure(
      c,
      (i) => client.publish('orders.one', { i }, { id: `latency-${i}` }),
      (i) => client.publish('orders.burst', { i }, { id: `burst-${i}` }),
    );
  } finally {
    await cluster.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

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
    if (Date.now() > deadline) throw new Error('no Redis on 127.0.0.1:6379 and redis-server did not start; install redis-server or set REDIS_URL');
    await new Promise((r) => setTimeout(r, 50));
  }
  return { host: '127.0.0.1', port, stop: () => child.kill() };
}

async function benchBullMQ(): Promise<Figures> {
  const redis = await findRedis();
  // BullMQ wants ready-made clients in an ES module; workers block, so no retry limit.
  const connection = () => new Redis({ host: redis.host, port: redis.port, maxRetriesPerRequest: null });
  const queueName = `quiver-bench-${process.pid}`;
  const flows = new FlowProducer({ connection: connection() });
  const c = counters();
  const worker = new Worker(
    queueName,
    async (job: Job) => {
      if (job.name === 'first') {
        c.started++;
        c.lastStartAt = performance.now();
      }
      return 1;
    },
    { connection: connection(), concurrency: CONCURRENCY },
  );
  worker.on('completed', (job) => {
    if (job.name === 'third') c.finished++;
  });
  await worker.waitUntilReady();
  const flow = (i: number, kind: string) => ({
    name: 'third',
    queueName,
    data: { i, kind },
    opts: { removeOnComplete: true },
    children: [{ name: 'second', queueName, data: {}, opts: { removeOnComplete: true }, children: [{ name: 'first', queueName, data: {}, opts: { removeOnComplete: true } }] }],
  });
  try {
    // A flow is handed to workers once it is added.
    const add = async (i: number, kind: string) => {
      await flows.add(flow(i, kind));
      c.admitted++;
    };
    return await measure(
      c,
      (i) => add(i, 'latency'),
      (i) => add(i, 'burst'),
    );
  } finally {
    await worker.close();
    await flows.close();
    redis.stop();
  }
}

const quiver = await benchQuiver();
const bullmq = await benchBullMQ();
const row = (name: string, f: Figures) =>
  `${name.padEnd(8)} ${f.p50.toFixed(1).padStart(9)} ${f.p99.toFixed(1).padStart(9)} ${f.admittedPerSecond.toFixed(1).padStart(15)} ${f.startedPerSecond.toFixed(1).padStart(14)} ${f.finishedPerSecond.toFixed(1).padStart(15)}`;
console.log(`\ntrigger → first step started (${LATENCY_EVENTS} events one at a time), and a burst of ${BURST} (worker concurrency ${CONCURRENCY})`);
console.log(
  `${'route'.padEnd(8)} ${'p50 ms'.padStart(9)} ${'p99 ms'.padStart(9)} ${'runs admitted/s'.padStart(15)} ${'runs started/s'.padStart(14)} ${'runs finished/s'.padStart(15)}`,
);
console.log(row('quiver', quiver));
console.log(row('bullmq', bullmq));
console.log(
  `quiver/bullmq: p50 ${(quiver.p50 / bullmq.p50).toFixed(2)}x, p99 ${(quiver.p99 / bullmq.p99).toFixed(2)}x, admitted/s ${(quiver.admittedPerSecond / bullmq.admittedPerSecond).toFixed(2)}x, started/s ${(quiver.startedPerSecond / bullmq.startedPerSecond).toFixed(2)}x, finished/s ${(quiver.finishedPerSecond / bullmq.finishedPerSecond).toFixed(2)}x`,
);
process.exit(0);
