/**
 * The price of replication: the same deployed three-step pipeline (isolation 'worker', started
 * by events) on an embedded cluster whose NATS is one server (R1), then three nodes on loopback
 * (every stream and bucket R3), side by side in one run:
 *
 *   latency   publish → the first line of the first step's function (it records the monotonic
 *             clock, bench/first-line.ts), one event at a time
 *             (--gap-ms apart): p50, p90, p99
 *   burst     --burst events published at once: runs finished per second
 *
 * Figures, not a test: it fails only when a run does not succeed. Both clusters run on this one
 * machine, so the three nodes share its cores: what this shows is the CPU and round trips that
 * replication adds, not a network's latency.
 *
 * Run: npm run bench:cluster [-- --latency 100 --burst 500 --gap-ms 100]
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { decode, isFinished, runView, silentLogger, subjects, type RunView } from '../schemas/index.ts';
import { loadPipeline, startLocalCluster } from '../sdk/index.ts';
import { firstLineMark, monotonicMs, readMarks } from './first-line.ts';

const { values } = parseArgs({ options: { latency: { type: 'string', default: '100' }, burst: { type: 'string', default: '500' }, 'gap-ms': { type: 'string', default: '100' } } });
const LATENCY = Number(values.latency);
const BURST = Number(values.burst);
const GAP_MS = Number(values['gap-ms']);
for (const [flag, n] of [['latency', LATENCY], ['burst', BURST], ['gap-ms', GAP_MS]] as const) {
  if (!Number.isInteger(n) || n < 0) throw new Error(`--${flag} must be a whole number ≥ 0`);
}
const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? NaN;

interface Figures {
  nodes: number;
  p50: number;
  p90: number;
  p99: number;
  runsPerSecond: number;
}

async function measure(nodes: number, file: string, marks: string): Promise<Figures> {
  const home = mkdtempSync(join(tmpdir(), `quiver-bench-cluster-${nodes}-`));
  // Both clusters publish the same event ids: each measures against its own marks.
  rmSync(marks, { force: true });
  const cluster = await startLocalCluster({ home, natsNodes: nodes, logger: silentLogger });
  try {
    const finished = new Map<string, RunView>();
    let wake: (() => void) | null = null;
    let failure: Error | null = null;
    const sub = cluster.client.nc.subscribe(subjects.statusAll, {
      callback: (_e, msg) => {
        const view = decode(runView, msg.subject, msg.data);
        if (!isFinished(view.state) || view.trigger.kind !== 'event') return;
        if (view.state !== 'succeeded') failure ??= new Error(`run ${view.runId} ${view.state}: ${JSON.stringify(view.steps.map((s) => s.error?.message))}`);
        finished.set(view.trigger.eventId, view);
        wake?.();
      },
    });
    await cluster.client.nc.flush();
    await cluster.client.deploy(await loadPipeline(file));
    const waitFor = async (ids: string[]) => {
      while (!ids.every((id) => finished.has(id))) {
        if (failure) throw failure;
        await new Promise<void>((r) => ((wake = r), setTimeout(r, 1000)));
      }
      if (failure) throw failure;
    };
    await cluster.client.publish('bench.cluster.warm', {}, { id: 'warm' });
    await waitFor(['warm']);

    const latencies: number[] = [];
    for (let i = 0; i < LATENCY; i++) {
      await sleep(GAP_MS);
      const id = `latency-${i}`;
      const at = monotonicMs();
      await cluster.client.publish('bench.cluster.one', { i }, { id });
      await waitFor([id]);
      const firstLine = readMarks(marks).get(id)?.[0];
      if (firstLine === undefined) throw new Error(`the run of ${id} succeeded but its first step left no mark in ${marks}`);
      latencies.push(firstLine - at);
    }
    latencies.sort((a, b) => a - b);

    const ids = Array.from({ length: BURST }, (_, i) => `burst-${i}`);
    const start = performance.now();
    await Promise.all(ids.map((id, i) => cluster.client.publish('bench.cluster.burst', { i }, { id })));
    await waitFor(ids);
    const seconds = (performance.now() - start) / 1000;
    sub.unsubscribe();
    const figures = { nodes, p50: percentile(latencies, 50), p90: percentile(latencies, 90), p99: percentile(latencies, 99), runsPerSecond: BURST / seconds };
    console.log(`[${nodes} node${nodes > 1 ? 's' : ''}] latency p50 ${figures.p50.toFixed(1)} ms; burst of ${BURST} in ${seconds.toFixed(1)} s`);
    return figures;
  } finally {
    await cluster.stop();
    rmSync(home, { recursive: true, force: true });
  }
}

const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-cluster-'));
try {
  const file = join(dir, 'chain.ts');
  const marks = join(dir, 'first-lines');
  // The first step's first line records when it ran (bench/first-line.ts), under its event id.
  writeFileSync(
    file,
    `import { appendFileSync } from 'node:fs';
import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline('bench_cluster', {
  first: step((_inputs, ctx) => {
    ${firstLineMark(marks, '${ctx.event?.id}')}
    return tableFromArrays({ v: Int32Array.of(1) });
  }),
  second: step({ t: 'first' }, ({ t }) => t),
  third: step({ t: 'second' }, ({ t }) => t),
}, { on: { event: 'bench.cluster.*' }, isolation: 'worker' });
`,
  );
  const one = await measure(1, file, marks);
  const three = await measure(3, file, marks);
  console.log(`\nevent → first step's code (${LATENCY} events, ${GAP_MS} ms apart) and a burst of ${BURST} events; isolation 'worker'`);
  console.log(`${'NATS'.padEnd(16)} ${'p50 ms'.padStart(8)} ${'p90 ms'.padStart(8)} ${'p99 ms'.padStart(8)} ${'runs/s'.padStart(8)}`);
  for (const f of [one, three]) {
    console.log(`${(f.nodes === 1 ? '1 node (R1)' : `${f.nodes} nodes (R3)`).padEnd(16)} ${f.p50.toFixed(1).padStart(8)} ${f.p90.toFixed(1).padStart(8)} ${f.p99.toFixed(1).padStart(8)} ${f.runsPerSecond.toFixed(1).padStart(8)}`);
  }
  console.log(`R3 / R1: p50 ${(three.p50 / one.p50).toFixed(2)}x, p99 ${(three.p99 / one.p99).toFixed(2)}x, runs/s ${(three.runsPerSecond / one.runsPerSecond).toFixed(2)}x`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
