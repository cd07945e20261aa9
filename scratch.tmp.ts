import { fixture, runFile, withCluster, stepOf } from './test/helpers.ts';
import { consoleLogger } from './schemas/index.ts';
await withCluster(async (cluster, home) => {
  for (const f of ['zero-copy.ts', 'failing.ts', 'not-a-table.ts']) {
    const t0 = Date.now();
    const r = await runFile(cluster, home, fixture(f), { release: false });
    console.log(f, r.view.state, Date.now() - t0, 'ms', JSON.stringify(r.view.steps.map(s => [s.name, s.state, s.rows, s.bytes, s.copiedBytes, s.error?.message])), r.logs);
    const out = r.view.steps.find(s => s.name === 'child')?.output;
    if (out) console.log(cluster.client.openOutput(out).table.toString());
  }
}, { logger: consoleLogger('dbg') });
