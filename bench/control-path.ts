/**
 * Control-path benchmark: how many times the orchestrator and the executor talk to NATS per step,
 * counted on their own connections, for this tree and (with --before) an older checkout of
 * Quiver side by side in one run.
 *
 *   round trips   requests that wait for NATS's answer (JetStream publishes, KV reads and
 *                 writes, stream info): `nc.request` calls, which every one of them goes through
 *   messages      every message the component sent (round trips, acks, in-progress acks,
 *                 pull requests, live status and log lines)
 *
 * Each tree runs the same three-step chain (tiny tables) as user runs, one after another, on a
 * private nats-server with an orchestrator and an executor (concurrency 1) in this process; the
 * counts are divided by the steps run. Wall time per run is shown beside them.
 *
 * Run: npm run bench:control-path [-- --runs 50 --before /path/to/older/checkout]
 * An older checkout: `git worktree add /tmp/quiver-before <commit>`, then link this tree's
 * node_modules and shm/addon/build into it.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { shmRoot } from '../schemas/index.ts';
import { listSegments, removeDir } from '../shm/index.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '50' }, before: { type: 'string' } } });
const RUNS = Number(values.runs);
const STEPS = 3;
const here = fileURLToPath(new URL('..', import.meta.url));

interface Counts {
  requests: number;
  messages: number;
}

/** Counts what `nc` sends from now on; `read()` gives the counts so far. */
function counting(nc: NatsConnection): { read(): Counts; reset(): void } {
  let requests = 0;
  const request = nc.request.bind(nc);
  nc.request = ((...args: Parameters<NatsConnection['request']>) => {
    requests++;
    return request(...args);
  }) as NatsConnection['request'];
  let base = { requests: 0, messages: 0 };
  const now = () => ({ requests, messages: nc.stats().outMsgs });
  return {
    read: () => ({ requests: now().requests - base.requests, messages: now().messages - base.messages }),
    reset: () => void (base = now()),
  };
}

interface Figures {
  orchestrator: Counts;
  executor: Counts;
  msPerRun: number;
}

async function measure(root: string): Promise<Figures> {
  const at = (path: string) => pathToFileURL(join(root, path)).href;
  const { startNatsServer } = await import(at('infra/index.ts'));
  const { Orchestrator } = await import(at('orchestrator/index.ts'));
  const { Executor } = await import(at('executor/index.ts'));
  const { QuiverClient, loadPipeline } = await import(at('sdk/index.ts'));
  const { silentLogger } = await import(at('schemas/index.ts'));

  const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-control-'));
  process.env.QUIVER_HOME = dir;
  const file = join(dir, 'chain.ts');
  writeFileSync(
    file,
    `import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(root, 'sdk', 'index.ts'))};
export default pipeline('control_path', {
  first: step(() => tableFromArrays({ v: Int32Array.of(1) })),
  second: step({ t: 'first' }, ({ t }) => t),
  third: step({ t: 'second' }, ({ t }) => t),
});
`,
  );
  const server = await startNatsServer({ dir: join(dir, 'nats') });
  let clusterId: string | null = null;
  const connections: NatsConnection[] = [];
  const open = async (name: string) => {
    const nc = await connect({ servers: server.url, name });
    connections.push(nc);
    return nc;
  };
  try {
    const orchestratorNc = await open('orchestrator');
    const executorNc = await open('executor');
    const orchestrator = await Orchestrator.start(orchestratorNc, { logger: silentLogger });
    const executor = await Executor.start(executorNc, { concurrency: 1, logger: silentLogger, flight: { host: '127.0.0.1', advertiseHost: '127.0.0.1' }, clusterSecret: randomBytes(32).toString('hex') });
    const client = await QuiverClient.connect({ nc: await open('client') });
    clusterId = client.topology.clusterId;
    const loaded = await loadPipeline(file);
    const runOnce = async () => {
      const handle = await client.run(loaded);
      const view = await handle.result();
      if (view.state !== 'succeeded') throw new Error(`run ${view.runId} ${view.state}`);
      await handle.release();
    };
    // Warm: code fetched and linked, step processes booted.
    for (let i = 0; i < 3; i++) await runOnce();
    // Heartbeats and pulls waiting for work also send messages: let the idle ones pass first.
    await new Promise((r) => setTimeout(r, 500));
    const o = counting(orchestratorNc);
    const e = counting(executorNc);
    o.reset();
    e.reset();
    const t0 = performance.now();
    for (let i = 0; i < RUNS; i++) await runOnce();
    const msPerRun = (performance.now() - t0) / RUNS;
    const per = (c: Counts): Counts => ({ requests: c.requests / (RUNS * STEPS), messages: c.messages / (RUNS * STEPS) });
    const figures = { orchestrator: per(o.read()), executor: per(e.read()), msPerRun };
    // The last run's release travels as a message: let it land before the executor stops.
    const segmentDir = join(shmRoot(), client.topology.clusterId);
    for (let waited = 0; waited < 5000 && listSegments(segmentDir).length > 0; waited += 50) await new Promise((r) => setTimeout(r, 50));
    await executor.stop();
    await orchestrator.stop();
    return figures;
  } finally {
    await Promise.all(connections.map((c) => c.close().catch(() => {})));
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
    // A private cluster: its segment folder (and its pool of released segments) goes with it.
    if (clusterId) removeDir(join(shmRoot(), clusterId));
  }
}

const trees: [string, string][] = [['this tree', here]];
if (values.before) trees.unshift(['before', resolve(values.before)]);
const results: [string, Figures][] = [];
for (const [name, root] of trees) results.push([name, await measure(root)]);

const n = (x: number) => x.toFixed(1).padStart(8);
console.log(`\nNATS traffic per step: ${RUNS} runs of a 3-step chain, one after another (executor concurrency 1)`);
console.log(`${'tree'.padEnd(10)} ${'orch. round trips'.padStart(17)} ${'exec. round trips'.padStart(17)} ${'total'.padStart(8)} ${'orch. msgs'.padStart(10)} ${'exec. msgs'.padStart(10)} ${'ms/run'.padStart(8)}`);
for (const [name, f] of results) {
  console.log(
    `${name.padEnd(10)} ${n(f.orchestrator.requests).padStart(17)} ${n(f.executor.requests).padStart(17)} ${n(f.orchestrator.requests + f.executor.requests)} ${n(f.orchestrator.messages).padStart(10)} ${n(f.executor.messages).padStart(10)} ${n(f.msPerRun)}`,
  );
}
if (results.length === 2) {
  const [[, before], [, after]] = results as [[string, Figures], [string, Figures]];
  const total = (f: Figures) => f.orchestrator.requests + f.executor.requests;
  console.log(`this tree / before: round trips ${(total(after) / total(before)).toFixed(2)}x, ms/run ${(after.msPerRun / before.msPerRun).toFixed(2)}x`);
}
process.exit(0);
