import { fixture, runFile, withCluster } from './test/helpers.ts';
await withCluster(async (cluster, home) => {
  for (let i = 0; i < 3; i++) {
    const t0 = Date.now();
    const r = await runFile(cluster, home, fixture('chain.tmp.ts'));
    console.log(r.view.state, Date.now() - t0, 'ms', r.view.steps.map(s => `${s.name}:${(s.finishedAt! - s.startedAt!)}`).join(' '),
      'gaps', r.view.steps.slice(1).map((s, j) => s.startedAt! - r.view.steps[j]!.finishedAt!).join(' ')); console.log(r.logs.map(l => l.step + ' ' + l.line).join('\n'));
  }
});
