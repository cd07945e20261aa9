/**
 * Step start-up benchmark: the time from handing a job to a step process until the step
 * function's first line (it records the monotonic clock: bench/first-line.ts), and the CPU each
 * step costs in its step processes:
 *
 *   cold       no spare: the step waits for node, Arrow and the runner to boot
 *              (each mode twice: `plain` compiles and runs the runner and Arrow at every start,
 *              `snapshot` deserializes them from the startup snapshot)
 *   prewarmed  a spare booted ahead of need, so only the step's own work remains
 *   forked     the fork server (the executor's default): each process forked from a step zygote
 *              booted and warmed up once; `spare` forked ahead of need, `none` on demand
 *   worker     isolation 'worker': the pipeline version's long-lived process runs it (booted)
 *
 * The step itself does nothing (a one-row table), so what is measured is the platform. CPU is
 * the user+system time of this process's exited children (/proc/self/stat), per step.
 *
 * Run: node --import tsx bench/step-start.ts [--steps 30] [--gap-ms 400]
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildRunner } from '../executor/build-runner.ts';
import type { RunnerJob } from '../executor/protocol.ts';
import { StepProcesses } from '../executor/step-processes.ts';
import type { Isolation } from '../schemas/index.ts';
import { removeDir } from '../shm/index.ts';
import { firstLineMark, monotonicMs, readMarks } from './first-line.ts';

const { values } = parseArgs({ options: { steps: { type: 'string', default: '30' }, 'gap-ms': { type: 'string', default: '400' } } });
const steps = Number(values.steps);
const gapMs = Number(values['gap-ms']);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** User+system CPU of exited children, in ms (clock ticks of 10 ms, summed over many steps). */
function childrenCpuMs(): number {
  const fields = readFileSync('/proc/self/stat', 'utf8').split(') ')[1]!.split(' ');
  // After "pid (comm) ": state is field 3, cutime field 16, cstime field 17.
  return (Number(fields[13]) + Number(fields[14])) * 10;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const p90 = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * 0.9)]!;

const dir = mkdtempSync(join(tmpdir(), 'quiver-bench-start-'));
const shmDir = `/dev/shm/quiver-bench-start-${process.pid}`;
try {
  const marks = join(dir, 'first-lines');
  const source = `import { appendFileSync } from 'node:fs';\nimport { tableFromArrays } from 'apache-arrow';\nexport default { steps: { noop: { fn: (_inputs, ctx) => {\n  ${firstLineMark(marks, '${ctx.runId}')}\n  return tableFromArrays({ v: Int32Array.of(1) });\n} } } };\n`;
  const runners = { plain: await buildRunner(join(dir, 'build'), { snapshot: false }), snapshot: await buildRunner(join(dir, 'build'), { snapshot: true }) };
  if (!runners.snapshot.snapshot) throw new Error('this node cannot start step processes from a snapshot (needs >= 20.11)');
  const codePaths = { plain: join(dir, 'noop-plain.mjs'), snapshot: join(dir, 'noop-snapshot.mjs') };
  for (const kind of ['plain', 'snapshot'] as const) writeFileSync(codePaths[kind], await runners[kind].linkCode(new TextEncoder().encode(source), codePaths[kind]));

  const rows: string[] = [];
  const modes: [string, 'plain' | 'snapshot' | 'none' | 'spare', Isolation, number, boolean][] = [
    ['cold', 'plain', 'process', 0, false],
    ['cold', 'snapshot', 'process', 0, false],
    ['prewarmed', 'plain', 'process', 1, false],
    ['prewarmed', 'snapshot', 'process', 1, false],
    ['forked', 'none', 'process', 0, true],
    ['forked', 'spare', 'process', 1, true],
    ['worker', 'snapshot', 'worker', 0, true],
  ];
  for (const [mode, kind, isolation, prewarm, forkServer] of modes) {
    const runner = runners[kind === 'plain' ? 'plain' : 'snapshot'];
    const codePath = codePaths[kind === 'plain' ? 'plain' : 'snapshot'];
    const processes = new StepProcesses({ runnerPath: runner.runnerPath, snapshot: runner.snapshot, clusterId: 'bench', prewarm, forkServer, warmUpCodePath: runner.warmUpCodePath, onLog: () => undefined });
    const latencies: number[] = [];
    await sleep(gapMs);
    const cpuBefore = childrenCpuMs();
    for (let i = 0; i < steps + 1; i++) {
      const runId = `bench-${mode}-${kind}-${i}`;
      const job: RunnerJob = { codePath, runId, step: 'noop', params: {}, event: null, inputs: [], shmDir, outputIdPrefix: `bench-${mode}-${kind}-${i}` };
      const sent = monotonicMs();
      const reply = await processes.run(job, isolation);
      if (reply.type !== 'result') throw new Error(JSON.stringify(reply));
      // The first worker step boots the worker and imports the code: left out of the latencies.
      const firstLine = readMarks(marks).get(runId)?.[0];
      if (firstLine === undefined) throw new Error(`step ${runId} succeeded but left no mark in ${marks}`);
      if (!(isolation === 'worker' && i === 0)) latencies.push(firstLine - sent);
      await sleep(gapMs);
    }
    processes.stop('the benchmark is done');
    await sleep(500);
    // The spare started last never ran a step, and the worker's boot (and the zygote's) is shared by all its steps.
    const cpu = (childrenCpuMs() - cpuBefore) / (steps + 1);
    rows.push(`${mode.padEnd(10)} ${kind.padEnd(9)} ${median(latencies).toFixed(1).padStart(8)} ${p90(latencies).toFixed(1).padStart(8)} ${cpu.toFixed(0).padStart(8)}`);
    removeDir(shmDir);
  }
  console.log(`${steps} steps each, ${gapMs} ms apart; job sent → the step function's first line (ms), CPU of step processes per step (ms)`);
  console.log('mode       start        median      p90      cpu');
  for (const row of rows) console.log(row);
} finally {
  rmSync(dir, { recursive: true, force: true });
  removeDir(shmDir);
}
