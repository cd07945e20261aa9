import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { buildRunner } from '../executor/build-runner.ts';
import type { RunnerJob } from '../executor/protocol.ts';
import { StepProcesses, type StepProcessesOptions } from '../executor/step-processes.ts';
import { removeDir } from '../shm/index.ts';
import { bundleDir, type LogLine } from '../schemas/index.ts';
import { TEST_SHM_ROOT, tempHome, waitFor } from './helpers.ts';

/** Processes whose command line names the cluster (step processes and zygotes), with their parent. */
function processesOf(clusterId: string): { pid: number; ppid: number; title: string }[] {
  const found = [];
  for (const entry of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      const title = readFileSync(`/proc/${entry}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
      if (!title.includes(`quiver-step ${clusterId} `)) continue;
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      found.push({ pid: Number(entry), ppid: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]), title });
    } catch {
      // Gone while we looked.
    }
  }
  return found;
}

/** Each mode is one way a step can go; `report` writes what the process saw of itself. */
const SOURCE = `import { tableFromArrays } from 'apache-arrow';
  import { readlinkSync, readFileSync, writeFileSync } from 'node:fs';
  export default { steps: { probe: { fn: async (_inputs, ctx) => {
    const mode = ctx.params.mode;
    console.log('probe ' + mode + ' in ' + process.pid);
    if (mode === 'exit') process.exit(3);
    if (mode === 'unicode') throw new Error('grüße, 数据, 🚀: ' + 'é'.repeat(5000));
    if (mode === 'sleep') await new Promise((r) => setTimeout(r, 60000));
    if (mode === 'timer') {
      setTimeout(() => { throw new Error('thrown in a timer of a forked step'); }, 5);
      await new Promise((r) => setTimeout(r, 5000));
    }
    const stat = readFileSync('/proc/self/stat', 'utf8');
    writeFileSync(ctx.params.out, JSON.stringify({
      pid: process.pid,
      realPid: Number(readlinkSync('/proc/self')),
      ppid: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]),
      random: [Math.random(), Math.random()],
    }));
    return tableFromArrays({ ok: Int32Array.of(1) });
  } } } };`;

const TIMEOUT = { timeout: 120_000 };

/**
 * StepProcesses of a cluster of this test's own, with `source` linked as its pipeline code; close()
 * stops them, waits for every process of the cluster (zygote included) to exit and removes the rest.
 */
async function stepProcessesFor(name: string, source: string, options: Partial<StepProcessesOptions> = {}) {
  const home = tempHome();
  const runner = await buildRunner(bundleDir('build'));
  const codePath = join(home.dir, `${name}.mjs`);
  writeFileSync(codePath, await runner.linkCode(new TextEncoder().encode(source), codePath));
  const shmDir = join(TEST_SHM_ROOT, `step-zygote-${name}-${process.pid}`);
  mkdirSync(shmDir, { recursive: true });
  const clusterId = `zygote${name}${process.pid}`;
  const processes = new StepProcesses({ runnerPath: runner.runnerPath, snapshot: runner.snapshot, clusterId, warmUpCodePath: runner.warmUpCodePath, onLog: () => {}, ...options });
  return {
    home,
    codePath,
    shmDir,
    clusterId,
    processes,
    async close(): Promise<void> {
      processes.stop('the test ended');
      await waitFor('the zygote and its step processes to exit', () => processesOf(clusterId).length === 0, 5000);
      home.remove();
      removeDir(shmDir);
    },
  };
}

describe('step zygote', () => {
  it("forks 'process' steps from one warmed-up zygote: a fresh process each, with its own pid and randomness, and fails steps that exit or throw as before", TIMEOUT, async () => {
    // What an executor SIGKILLed before it stopped left behind: its socket folder.
    const dead = spawnSync('true').pid!;
    const leftover = mkdtempSync(join(tmpdir(), `quiver-fork-${dead}-`));
    const socketDirs = () => readdirSync(tmpdir()).filter((n) => n.startsWith(`quiver-fork-${process.pid}-`));
    const logs: LogLine[] = [];
    const { home, codePath, shmDir, clusterId, processes, close } = await stepProcessesFor('probe', SOURCE, { forkServer: true, onLog: (l) => logs.push(l) });
    const run = (n: number, mode: string) => {
      const out = join(home.dir, `probe${n}.json`);
      const job: RunnerJob = { codePath, runId: `run${n}`, step: 'probe', params: { mode, out }, event: null, inputs: [], shmDir, outputIdPrefix: `run${n}.probe.1` };
      return { reply: processes.run(job, 'process'), seen: () => JSON.parse(readFileSync(out, 'utf8')) as { pid: number; realPid: number; ppid: number; random: number[] } };
    };
    try {
      assert.ok(!existsSync(leftover), 'the socket folder of a dead executor is removed');
      assert.equal(socketDirs().length, 1, 'this one has its own');
      const first = run(1, 'report');
      assert.equal((await first.reply).type, 'result');
      const second = run(2, 'report');
      assert.equal((await second.reply).type, 'result');
      const [a, b] = [first.seen(), second.seen()];
      const zygote = processesOf(clusterId).find((p) => p.title.endsWith(' zygote'));
      assert.ok(zygote, `a zygote runs: ${JSON.stringify(processesOf(clusterId))}`);
      assert.equal(zygote.ppid, process.pid, 'the executor started the zygote');
      assert.notEqual(a.pid, b.pid, 'each step had a process of its own');
      for (const seen of [a, b]) {
        assert.equal(seen.ppid, zygote.pid, 'forked by the zygote, not booted by the executor');
        assert.equal(seen.pid, seen.realPid, 'process.pid is the forked process, not the zygote');
      }
      assert.notDeepEqual(a.random, b.random, 'Math.random is not the sequence every child shares with the zygote');
      assert.ok(logs.some((l) => l.runId === 'run1' && l.line === `probe report in ${a.pid}`), 'a forked step prints to its own log');

      const exited = await run(3, 'exit').reply;
      assert.equal(exited.type, 'error');
      assert.match(exited.type === 'error' ? exited.error.message : '', /code 3/);

      // Replies over the child's socket decode whole, whatever characters they carry.
      const unicode = await run(8, 'unicode').reply;
      assert.equal(unicode.type === 'error' ? unicode.error.message : '', 'grüße, 数据, 🚀: ' + 'é'.repeat(5000));

      const thrown = await run(4, 'timer').reply;
      assert.equal(thrown.type, 'error');
      assert.ok(logs.some((l) => l.runId === 'run4' && l.stream === 'stderr' && l.line.includes('thrown in a timer of a forked step')), `the uncaught error reached the step's log: ${JSON.stringify(logs.filter((l) => l.runId === 'run4'))}`);

      // The zygote still forks after its children failed.
      const after = run(5, 'report');
      assert.equal((await after.reply).type, 'result');
      assert.equal(after.seen().ppid, zygote.pid);

      // A zygote that dies takes its children along: their steps fail saying so, and the next
      // step is forked by a new zygote.
      const sleeping = run(6, 'sleep');
      await waitFor('the sleeping step to start', () => logs.some((l) => l.runId === 'run6'), 10_000);
      process.kill(zygote.pid, 'SIGKILL');
      const orphaned = await sleeping.reply;
      assert.equal(orphaned.type, 'error');
      assert.match(orphaned.type === 'error' ? orphaned.error.message : '', /killed by SIGKILL/);
      const reborn = run(7, 'report');
      assert.equal((await reborn.reply).type, 'result', 'the next step runs');
      const nextZygote = processesOf(clusterId).find((p) => p.title.endsWith(' zygote'));
      assert.ok(nextZygote && nextZygote.pid !== zygote.pid, 'a new zygote was started');
      assert.equal(reborn.seen().ppid, nextZygote.pid);
    } finally {
      await close();
      assert.deepEqual(socketDirs(), [], 'a stopped executor leaves no socket folder');
      rmSync(leftover, { recursive: true, force: true });
    }
  });

  it('runs forked steps that collect garbage hard: no step hangs in V8 waiting on a thread only the zygote had', TIMEOUT, async () => {
    // External memory (ArrayBuffers) forces full collections, whose weak-reference clearing V8
    // hands to its worker threads as a job: without the zygote holding them across the fork
    // (shm/addon/fork_platform.cc), a forked process hung there at the 22nd of these steps.
    const source = `import { tableFromArrays } from 'apache-arrow';
      export default { steps: { churn: { fn: async () => {
        let keep = [];
        for (let i = 0; i < 400; i++) {
          keep.push(new ArrayBuffer(1 << 20), { i, text: 'x'.repeat(1000) + i, list: new Array(1000).fill(i) });
          if (keep.length > 60) keep = keep.slice(30);
          if (i % 50 === 0) await new Promise((r) => setTimeout(r, 1));
        }
        const n = 300000;
        const values = new Float64Array(n).map(() => Math.random());
        return tableFromArrays({ values, label: Array.from({ length: n }, (_, i) => (i < 20000 ? 'row' + i : 'z')) });
      } } } };`;
    const { codePath, shmDir, processes, close } = await stepProcessesFor('churn', source, { forkServer: true, limits: { timeoutMs: 30_000 } });
    try {
      for (let i = 0; i < 40; i++) {
        const reply = await processes.run({ codePath, runId: `churn${i}`, step: 'churn', params: {}, event: null, inputs: [], shmDir, outputIdPrefix: `churn${i}.churn.1` }, 'process');
        assert.equal(reply.type, 'result', `step ${i}: ${JSON.stringify(reply)}`);
      }
    } finally {
      await close();
    }
  });

  // A child forked while a SIGCHLD of the zygote's was caught but not yet dispatched could not
  // finish closing its copy of the zygote's SIGCHLD listener, and libuv polled without a timeout
  // until it did: for ever (shm/addon/fork_core.c forget_parents_signals). Steps exiting while the
  // zygote forks make that likely; without the fix this failed about every second run.
  it('leaves the spares it forked idle: no forked process spins while it waits for a step', TIMEOUT, async () => {
    const { home, codePath, shmDir, clusterId, processes, close } = await stepProcessesFor('idle', SOURCE, { forkServer: true, prewarm: 2 });
    const ticks = (pid: number) => {
      const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      return Number(fields[11]) + Number(fields[12]);
    };
    try {
      for (let round = 0; round < 8; round++) {
        const jobs = Array.from({ length: 4 }, (_, i): RunnerJob => ({ codePath, runId: `idle${round}x${i}`, step: 'probe', params: { mode: 'report', out: join(home.dir, `idle${round}x${i}.json`) }, event: null, inputs: [], shmDir, outputIdPrefix: `idle${round}x${i}.probe.1` }));
        for (const reply of await Promise.all(jobs.map((job) => processes.run(job, 'process')))) assert.equal(reply.type, 'result');
      }
      const spares = () => processesOf(clusterId).filter((p) => p.title.endsWith(' idle'));
      await waitFor('two spares', () => spares().length === 2);
      await new Promise((r) => setTimeout(r, 500));
      const before = new Map(spares().map((p) => [p.pid, ticks(p.pid)]));
      await new Promise((r) => setTimeout(r, 2000));
      for (const [pid, at] of before) assert.ok(ticks(pid) - at < 20, `spare ${pid} used ${(ticks(pid) - at) * 10} ms of CPU in 2 s while waiting`);
    } finally {
      await close();
    }
  });

  it('boots each step process when the fork server is off', TIMEOUT, async () => {
    const { home, codePath, shmDir, clusterId, processes, close } = await stepProcessesFor('off', SOURCE, { forkServer: false });
    try {
      const out = join(home.dir, 'off.json');
      const reply = await processes.run({ codePath, runId: 'off1', step: 'probe', params: { mode: 'report', out }, event: null, inputs: [], shmDir, outputIdPrefix: 'off1.probe.1' }, 'process');
      assert.equal(reply.type, 'result');
      assert.equal((JSON.parse(readFileSync(out, 'utf8')) as { ppid: number }).ppid, process.pid);
      assert.ok(!processesOf(clusterId).some((p) => p.title.endsWith(' zygote')), 'no zygote was started');
    } finally {
      await close();
    }
  });
});
