/**
 * What clients see of a run (`RunView`), derived from its record and its machine: pure, so the
 * orchestrator publishing a transition and a client reading a running run agree.
 */
import type { RunRecord, RunView, StepView } from '../schemas/index.ts';
import { topologyOf } from '../planner/index.ts';
import { runStateOf, stepStatesOf, type RunSnapshot } from './run-machine.ts';

const notStarted = (name: string, state: StepView['state']): StepView => ({
  name,
  state,
  attempt: 0,
  executorId: null,
  hostId: null,
  startedAt: null,
  finishedAt: null,
  rows: null,
  bytes: null,
  transport: null,
  copiedBytes: null,
  scan: null,
  isolation: null,
  codeStartedAt: null,
  cacheKey: null,
  output: null,
  error: null,
});

function frame(record: RunRecord): Omit<RunView, 'steps' | 'state'> {
  const { submit } = record;
  return {
    runId: submit.runId,
    pipeline: submit.plan.pipeline,
    submittedAt: submit.submittedAt,
    startedAt: record.startedAt,
    finishedAt: record.finishedAt,
    keep: submit.keep,
    outputsReleased: record.outputsReleased,
    trigger: submit.trigger ?? { kind: 'user', by: submit.submittedBy },
    version: submit.version ?? null,
    outputs: [...topologyOf(submit.plan).outputs],
  };
}

/** A run that never started: queued, or cancelled while queued. */
export function unstartedView(record: RunRecord): RunView {
  const state = record.state === 'queued' ? 'waiting' : 'cancelled';
  return { ...frame(record), state: record.state, steps: record.submit.plan.steps.map((s) => notStarted(s.name, state)) };
}

/** A started run as its machine has it now. */
export function machineView(record: RunRecord, snapshot: RunSnapshot): RunView {
  const states = stepStatesOf(snapshot);
  return {
    ...frame(record),
    state: runStateOf(snapshot),
    steps: record.submit.plan.steps.map((s) => {
      const facts = snapshot.context.steps[s.name]!;
      return {
        name: s.name,
        state: states[s.name]!,
        attempt: facts.attempt,
        executorId: facts.executorId,
        hostId: facts.hostId,
        startedAt: facts.startedAt,
        finishedAt: facts.finishedAt,
        rows: facts.output?.rows ?? null,
        bytes: facts.output?.byteSize ?? null,
        transport: facts.transport,
        copiedBytes: facts.copiedBytes,
        scan: facts.scan ?? null,
        isolation: facts.isolation ?? null,
        codeStartedAt: facts.codeStartedAt ?? null,
        cacheKey: facts.cacheKey ?? null,
        ...(facts.envMs !== undefined ? { envMs: facts.envMs } : {}),
        ...(facts.committed ? { committed: facts.committed } : {}),
        output: facts.output,
        error: facts.error,
      };
    }),
  };
}
