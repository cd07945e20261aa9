/**
 * The feedback loop with the output cache: the example pipeline (examples/transactions, scan →
 * euro_selection → usd_by_country, materialized) on a generated `transactions` table, run on
 * one embedded cluster, side by side:
 *
 *   cold        --cache off: everything computed (the baseline)
 *   first       --cache readwrite on an empty cache: everything computed, outputs kept
 *   unchanged   the same file again: what the cache reuses
 *   leaf edit   usd_by_country's code changed (a copy of the file with one edit): it and the
 *               steps after it run, its unchanged parents are reused
 *
 * For each: wall time from submit to the run's end as the client sees it, steps computed
 * (steps whose output was not reused; the stage and commit of a materialized table count as
 * reused when the table's current snapshot was written from the same cache key), and steps reused. Figures, not a test: nothing is asserted but that
 * every run succeeds and that the reuse is what the cache promises.
 *
 * Then a step declaring an npm package (`is-odd`, which the repository does not have), three
 * times: its environment built from the registry on a fresh cluster (npm's own cache may be
 * warm), found on this host, and fetched from the cluster's object store by a second executor
 * with its own environment folder and the registry unreachable. For each: the step's `envMs`,
 * the load (bundling, and resolving the range with the registry), and the whole run.
 *
 * Run: npm run bench:feedback [-- --rows 1000000 --repeat 3]
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { generateTransactions } from '../examples/transactions/data.ts';
import { Executor } from '../executor/index.ts';
import { connectForever, silentLogger, type CacheMode, type RunView } from '../schemas/index.ts';
import { loadPipeline, startLocalCluster, type LocalCluster } from '../sdk/index.ts';
import { tableStoreFromEnv, writeTable } from '../storage/index.ts';

const { values } = parseArgs({ options: { rows: { type: 'string', default: '1000000' }, repeat: { type: 'string', default: '3' } } });
const ROWS = Number(values.rows);
const REPEAT = Number(values.repeat);
if (!Number.isInteger(ROWS) || ROWS < 1) throw new Error('--rows must be a whole number ≥ 1');
if (!Number.isInteger(REPEAT) || REPEAT < 1) throw new Error('--repeat must be a whole number ≥ 1');

const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-feedback-'));
process.env.QUIVER_STORAGE = join(dir, 'storage');

/** The example with usd_by_country's code changed (its rows sorted the other way): a leaf edit. */
function editedExample(): string {
  const source = readFileSync(join(repoRoot, 'examples', 'transactions', 'pipeline.ts'), 'utf8');
  const edited = source.replace('const countries = [...totals.keys()].sort();', 'const countries = [...totals.keys()].sort().reverse();');
  if (edited === source) throw new Error('the example changed: bench/feedback cannot find the line it edits');
  const file = join(repoRoot, 'examples', 'transactions', `.bench-feedback-${process.pid}.ts`);
  writeFileSync(file, edited);
  return file;
}

interface Measured {
  ms: number;
  computed: number;
  reused: number;
}

async function runOnce(cluster: LocalCluster, file: string, cache: CacheMode): Promise<Measured> {
  const loaded = await loadPipeline(file);
  const started = performance.now();
  const handle = await cluster.client.run(loaded, { cache });
  const view: RunView = await handle.result();
  const ms = performance.now() - started;
  await handle.release();
  if (view.state !== 'succeeded') throw new Error(`a ${cache} run ${view.state}: ${JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message]))}`);
  const reused = view.steps.filter((s) => s.transport === 'cache').length;
  return { ms, computed: view.steps.length - reused, reused };
}

/** The package part: see the header. */
async function benchPackages(cluster: LocalCluster): Promise<void> {
  const pipelineFile = (name: string, host?: string) => {
    const file = join(dir, `${name}.ts`);
    writeFileSync(
      file,
      `import { tableFromArrays } from 'apache-arrow';
import isOdd from 'is-odd';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
export default pipeline(${JSON.stringify(name)}, {
  odds: step(() => tableFromArrays({ odd: [1, 2, 3].map((n) => isOdd(n) as boolean) }), { packages: { 'is-odd': '^3.0.1' }${host ? `, host: ${JSON.stringify(host)}` : ''} }),
});
`,
    );
    return file;
  };
  const once = async (file: string) => {
    const started = performance.now();
    const loaded = await loadPipeline(file);
    const loadMs = performance.now() - started;
    const handle = await cluster.client.run(loaded, { cache: 'off' });
    const view = await handle.result();
    await handle.release();
    if (view.state !== 'succeeded') throw new Error(`the package step ${view.state}: ${view.steps[0]?.error?.message}`);
    return { envMs: view.steps[0]!.envMs ?? 0, loadMs, totalMs: performance.now() - started };
  };
  const here = pipelineFile('packages_here');
  const rows: [string, Awaited<ReturnType<typeof once>>][] = [['built from the registry', await once(here)], ['found on this host', await once(here)]];
  const second = await Executor.start(await connectForever(cluster.server.urls, { auth: cluster.server.connectionOptions }), {
    hostId: 'second',
    prewarm: 0,
    logger: silentLogger,
    environments: { dir: join(dir, 'second-envs'), npmEnv: { npm_config_registry: 'http://127.0.0.1:9/' } },
  });
  try {
    rows.push(['fetched by an offline host', await once(pipelineFile('packages_there', 'second'))]);
  } finally {
    await second.stop();
  }
  console.log(`\na step with one declared npm package (is-odd)`);
  console.log(`${'environment'.padEnd(28)} ${'envMs'.padStart(7)} ${'load ms'.padStart(8)} ${'run ms'.padStart(8)}`);
  for (const [label, r] of rows) console.log(`${label.padEnd(28)} ${r.envMs.toFixed(0).padStart(7)} ${r.loadMs.toFixed(0).padStart(8)} ${r.totalMs.toFixed(0).padStart(8)}`);
  console.log('load resolves the range with the registry (npm view) unless it did in the last 10 minutes; run ms includes the load.');
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

let edited: string | null = null;
const cluster = await startLocalCluster({ home: dir, logger: silentLogger });
try {
  const store = await tableStoreFromEnv({ nc: cluster.client.nc });
  await writeTable(store, 'transactions', generateTransactions(ROWS, 1), { mode: 'replace' });
  await store.close();
  const example = join(repoRoot, 'examples', 'transactions', 'pipeline.ts');
  edited = editedExample();

  const rows: { label: string; runs: Measured[] }[] = [];
  const cold: Measured[] = [];
  for (let i = 0; i < REPEAT; i++) cold.push(await runOnce(cluster, example, 'off'));
  rows.push({ label: 'cold (--cache off)', runs: cold });
  rows.push({ label: 'first, empty cache', runs: [await runOnce(cluster, example, 'readwrite')] });
  const unchanged: Measured[] = [];
  for (let i = 0; i < REPEAT; i++) unchanged.push(await runOnce(cluster, example, 'readwrite'));
  rows.push({ label: 'unchanged re-run', runs: unchanged });
  rows.push({ label: 'leaf edited', runs: [await runOnce(cluster, edited, 'readwrite')] });
  const leafAgain: Measured[] = [];
  for (let i = 0; i < REPEAT; i++) leafAgain.push(await runOnce(cluster, edited, 'readwrite'));
  rows.push({ label: 'leaf edited, again', runs: leafAgain });

  const base = median(cold.map((r) => r.ms));
  console.log(`\nthe example pipeline on ${ROWS.toLocaleString('en-US')} rows (median of ${REPEAT} where repeated), one embedded cluster`);
  console.log(`${'run'.padEnd(22)} ${'ms'.padStart(9)} ${'vs cold'.padStart(8)} ${'computed'.padStart(9)} ${'reused'.padStart(7)}`);
  for (const { label, runs } of rows) {
    const ms = median(runs.map((r) => r.ms));
    const last = runs.at(-1)!;
    console.log(`${label.padEnd(22)} ${ms.toFixed(1).padStart(9)} ${`${(ms / base).toFixed(2)}x`.padStart(8)} ${String(last.computed).padStart(9)} ${String(last.reused).padStart(7)}`);
  }
  console.log('computed counts the stage and commit of the materialized table when they write a snapshot: an unchanged table is not written again.');
  await benchPackages(cluster);
} finally {
  if (edited) rmSync(edited, { force: true });
  await cluster.stop();
  rmSync(dir, { recursive: true, force: true });
}
