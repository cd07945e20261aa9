/**
 * Run-machine benchmark: the orchestrator's CPU per run as plans grow, for the two shapes that
 * stress it differently, side by side in one run:
 *
 *   chain  s0 → s1 → … (one step ready at a time)
 *   fan    s0 → n-2 steps at once → join (a hundred steps ready together, a join with n-2 parents)
 *
 * Per run, every step started and succeeded in plan order (2 events a step), and after each
 * event what the orchestrator does besides the machine (orchestrator/runs.ts afterTransition,
 * views.ts): the machine (actor start and events), the segments no step needs any more (plan
 * topology), and the run view for `quiver.status.<runId>` (built and JSON-encoded) after every
 * event: what a run costs when its events come further apart than the 50 ms the orchestrator
 * now waits between two views of a running run (runs.ts VIEW_INTERVAL_MS); events closer together
 * share one view. Pure CPU in this process: no NATS, no executor.
 *
 * Run: npm run bench:run-machine [-- --sizes 3,30,100,300]
 */
import { parseArgs } from 'node:util';
import { createActor } from 'xstate';
import { runMachineOf, stepStatesOf } from '../orchestrator/run-machine.ts';
import { machineView } from '../orchestrator/views.ts';
import { topologyOf } from '../planner/index.ts';
import type { Plan, RunRecord, StepStarted, StepSucceeded } from '../schemas/index.ts';

const { values } = parseArgs({ options: { sizes: { type: 'string', default: '3,30,100,300' } } });
const SIZES = values.sizes.split(',').map(Number);
for (const n of SIZES) if (!Number.isInteger(n) || n < 3) throw new Error(`--sizes takes integers ≥ 3, comma-separated: not ${n}`);

const runId = '01JD0000000000000000000000';
const output = { kind: 'shm' as const, hostId: 'h', segments: [{ id: `${runId}.s.1-0`, byteSize: 64 }], byteSize: 64, rows: 1, schema: [] };
const started = (step: string): StepStarted => ({ type: 'step.started', runId, step, attempt: 1, executorId: 'e', hostId: 'h', at: 1 });
const succeeded = (step: string): StepSucceeded => ({ type: 'step.succeeded', runId, step, attempt: 1, executorId: 'e', output, transport: 'shm', inputCopiedBytes: 0, outputCopiedBytes: 64, startedAt: 1, at: 2 });

function chain(n: number): Plan {
  return { pipeline: 'chain', steps: Array.from({ length: n }, (_, i) => ({ name: `s${i}`, inputs: i === 0 ? [] : [{ param: 'x', step: `s${i - 1}` }] })) };
}

function fan(n: number): Plan {
  const middle = Array.from({ length: n - 2 }, (_, i) => ({ name: `s${i + 1}`, inputs: [{ param: 'x', step: 's0' }] }));
  return { pipeline: 'fan', steps: [{ name: 's0', inputs: [] }, ...middle, { name: 'join', inputs: middle.map((s, i) => ({ param: `p${i}`, step: s.name })) }] };
}

interface Cost {
  machine: number;
  releases: number;
  views: number;
}

/** Milliseconds of each part per run, averaged over enough runs for ~300 steps in all. */
function measure(plan: Plan): Cost {
  const machine = runMachineOf(plan);
  const record = { submit: { runId, plan, submittedAt: 1, submittedBy: 'bench', keep: false, params: {}, codeHash: '0'.repeat(64) }, state: 'running', startedAt: 1, finishedAt: null, outputsReleased: true, view: null } as unknown as RunRecord;
  const runs = Math.max(3, Math.round(900 / plan.steps.length));
  const cost: Cost = { machine: 0, releases: 0, views: 0 };
  let releasable = 0;
  for (let r = 0; r < runs; r++) {
    let at = performance.now();
    const lap = (part: keyof Cost) => {
      const now = performance.now();
      cost[part] += now - at;
      at = now;
    };
    const actor = createActor(machine, { input: { runId } }).start();
    lap('machine');
    for (const step of plan.steps) {
      for (const event of [started(step.name), succeeded(step.name)]) {
        actor.send(event);
        const snapshot = actor.getSnapshot();
        lap('machine');
        const states = stepStatesOf(snapshot);
        const { children, outputs } = topologyOf(plan);
        for (const s of plan.steps) {
          if (states[s.name] === 'succeeded' && !outputs.has(s.name) && children.get(s.name)!.every((c) => states[c] === 'succeeded')) releasable++;
        }
        lap('releases');
        JSON.stringify(machineView(record, snapshot));
        lap('views');
      }
    }
    actor.stop();
  }
  if (releasable === 0) throw new Error('no segment was ever releasable: the bench measured nothing');
  return { machine: cost.machine / runs, releases: cost.releases / runs, views: cost.views / runs };
}

const shapes: [string, (n: number) => Plan][] = [['chain', chain], ['fan', fan]];
// JIT first: the small sizes would otherwise pay for compiling everything.
for (const [, make] of shapes) measure(make(30));

const fmt = (ms: number) => (ms < 10 ? ms.toFixed(2) : ms.toFixed(0)).padStart(10);
console.log('\nOrchestrator CPU per run, ms (every step started and succeeded; no I/O)');
console.log(`${'shape'.padEnd(6)} ${'steps'.padStart(6)} ${'machine'.padStart(10)} ${'releases'.padStart(10)} ${'views'.padStart(10)} ${'total'.padStart(10)} ${'µs/event'.padStart(10)}`);
for (const [name, make] of shapes) {
  for (const n of SIZES) {
    const c = measure(make(n));
    const total = c.machine + c.releases + c.views;
    console.log(`${name.padEnd(6)} ${String(n).padStart(6)} ${fmt(c.machine)} ${fmt(c.releases)} ${fmt(c.views)} ${fmt(total)} ${fmt((total * 1000) / (2 * n))}`);
  }
}
