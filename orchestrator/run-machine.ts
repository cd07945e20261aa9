import { and, assign, createActor, or, setup, stateIn, type Actor, type SnapshotFrom } from 'xstate';
import type {
  Plan,
  RunState,
  StepFailed,
  StepStarted,
  StepState,
  StepSucceeded,
  StepView,
  TableDescriptor,
} from '../schemas/index.ts';

/** What the machine remembers of a step beyond its state: facts reported by executors. */
export interface StepFacts {
  attempt: number;
  executorId: string | null;
  hostId: string | null;
  startedAt: number | null;
  finishedAt: number | null;
  output: TableDescriptor | null;
  copiedBytes: number | null;
  transport: StepView['transport'];
  scan?: StepView['scan'];
  isolation?: StepView['isolation'];
  codeStartedAt?: number | null;
  /** The step's cache key, as its completion reported it: its children's keys build on it. */
  cacheKey?: string | null;
  /** Time spent getting the step's package environment, as its completion reported it. */
  envMs?: number;
  /** A commit step left unchanged: the snapshots holding the run's tables. */
  committed?: StepView['committed'];
  error: StepFailed['error'] | null;
}

export interface RunContext {
  runId: string;
  steps: Record<string, StepFacts>;
  cancelReason: string | null;
}

export type RunEvent =
  | StepStarted
  | StepSucceeded
  | StepFailed
  | { type: 'run.cancel'; runId: string; reason: string };

const emptyFacts = (): StepFacts => ({
  attempt: 0,
  executorId: null,
  hostId: null,
  startedAt: null,
  finishedAt: null,
  output: null,
  copiedBytes: null,
  transport: null,
  error: null,
});

/**
 * Guards ask which state a step is in by the state node's id: one map lookup and a scan of the
 * few active nodes, where matching a state value (`stateIn({ steps: { a: 'succeeded' } })`)
 * rebuilt and walked the whole value on every check, and the run's eventless transitions check
 * every step after every event (guards were a quarter of the machine's time for 3-step runs).
 */
const stepStateId = (stepIndex: number, state: StepState) => `step-${stepIndex}-${state}`;
/** Built guards are generic over any machine; this one's typing cannot express the dynamic regions. */
const loose = (guard: unknown) => guard as never;
/** The steps' parallel state, and the event xstate raises when all its regions are final. */
const STEPS_ID = 'run-steps';
const ALL_STEPS_SETTLED = `xstate.done.state.${STEPS_ID}`;

/**
 * One machine per run, built from its plan: a parallel region per step
 * (waiting → ready → running → succeeded | failed, or skipped / cancelled), and the run's own
 * states around them. Times come in on events, never from a clock inside the machine, so a
 * persisted snapshot replays the same way anywhere.
 */
export function createRunMachine(plan: Plan) {
  const forStep = (step: string) => ({ event }: { event: RunEvent }) => 'step' in event && event.step === step;

  const indexOf = new Map(plan.steps.map((s, i) => [s.name, i]));
  const inStep = (step: string, state: StepState) => stateIn(`#${stepStateId(indexOf.get(step)!, state)}`);
  const stepRegion = (step: Plan['steps'][number]) => {
    const id = (state: StepState) => stepStateId(indexOf.get(step.name)!, state);
    const parents = [...new Set(step.inputs.map((i) => i.step))];
    const parentsSucceeded = parents.length === 0 ? () => true : and(parents.map((p) => inStep(p, 'succeeded')));
    const aParentWillNeverSucceed =
      parents.length === 0
        ? () => false
        : or(parents.flatMap((p) => [inStep(p, 'failed'), inStep(p, 'skipped'), inStep(p, 'cancelled')]));

    const started = {
      guard: forStep(step.name),
      target: 'running',
      actions: assign(({ context, event }: { context: RunContext; event: RunEvent }) => {
        const e = event as StepStarted;
        return patch(context, step.name, {
          attempt: e.attempt,
          executorId: e.executorId,
          hostId: e.hostId,
          startedAt: e.at,
        });
      }),
    };
    const succeeded = {
      guard: forStep(step.name),
      target: 'succeeded',
      actions: assign(({ context, event }: { context: RunContext; event: RunEvent }) => {
        const e = event as StepSucceeded;
        return patch(context, step.name, {
          attempt: e.attempt,
          executorId: e.executorId,
          hostId: e.output.hostId,
          startedAt: e.startedAt,
          finishedAt: e.at,
          output: e.output,
          copiedBytes: e.inputCopiedBytes + e.outputCopiedBytes,
          transport: e.transport,
          scan: e.scan ?? null,
          isolation: e.isolation ?? null,
          codeStartedAt: e.codeStartedAt ?? null,
          cacheKey: e.cacheKey ?? null,
          ...(e.envMs !== undefined ? { envMs: e.envMs } : {}),
          ...(e.committed ? { committed: e.committed } : {}),
        });
      }),
    };
    const failed = {
      guard: forStep(step.name),
      target: 'failed',
      actions: assign(({ context, event }: { context: RunContext; event: RunEvent }) => {
        const e = event as StepFailed;
        return patch(context, step.name, {
          attempt: e.attempt,
          executorId: e.executorId,
          // A step failing fast says where only here: its start may never have been announced.
          ...(e.hostId ? { hostId: e.hostId } : {}),
          startedAt: e.startedAt ?? context.steps[step.name]?.startedAt ?? null,
          finishedAt: e.at,
          error: e.error,
          isolation: e.isolation ?? null,
          codeStartedAt: e.codeStartedAt ?? null,
          ...(e.envMs !== undefined ? { envMs: e.envMs } : {}),
        });
      }),
    };
    return {
      initial: 'waiting',
      states: {
        waiting: {
          id: id('waiting'),
          always: [
            { guard: aParentWillNeverSucceed, target: 'skipped' },
            { guard: parentsSucceeded, target: 'ready' },
          ],
          on: { 'run.cancel': 'cancelled' },
        },
        ready: {
          id: id('ready'),
          on: {
            'step.started': started,
            // A completion may overtake its start event (they travel separately).
            'step.succeeded': succeeded,
            'step.failed': failed,
            'run.cancel': 'cancelled',
          },
        },
        running: {
          id: id('running'),
          on: {
            // A redelivered step starts again on another executor: a new attempt.
            'step.started': { ...started, target: undefined },
            'step.succeeded': succeeded,
            'step.failed': failed,
            'run.cancel': 'cancelled',
          },
        },
        succeeded: { id: id('succeeded'), type: 'final' as const },
        failed: { id: id('failed'), type: 'final' as const },
        skipped: { id: id('skipped'), type: 'final' as const },
        cancelled: { id: id('cancelled'), type: 'final' as const },
      },
    };
  };

  const stepNames = plan.steps.map((s) => s.name);
  return setup({
    types: {
      context: {} as RunContext,
      events: {} as RunEvent,
      input: {} as { runId: string },
    },
  }).createMachine({
    id: 'run',
    context: ({ input }) => ({
      runId: input.runId,
      steps: Object.fromEntries(stepNames.map((n) => [n, emptyFacts()])),
      cancelReason: null,
    }),
    // Steps and run side by side, so a finished run's snapshot still says how each step ended.
    type: 'parallel',
    states: {
      steps: {
        id: STEPS_ID,
        type: 'parallel',
        states: Object.fromEntries(plan.steps.map((s) => [s.name, stepRegion(s)])) as never,
      },
      run: {
        initial: 'running',
        states: {
          running: {
            on: {
              'run.cancel': { actions: assign({ cancelReason: ({ event }) => (event as unknown as { reason: string }).reason }) },
              // Raised once, when every step's region is final: the run ends then. (Asking "all
              // settled?" as an eventless guard instead checked every step after every event.)
              [ALL_STEPS_SETTLED]: [
                { guard: loose(and(stepNames.map((n) => inStep(n, 'succeeded')))), target: 'succeeded' },
                { guard: loose(or(stepNames.map((n) => inStep(n, 'cancelled')))), target: 'cancelled' },
                { target: 'failed' },
              ],
            } as never,
          },
          succeeded: { type: 'final' },
          failed: { type: 'final' },
          cancelled: { type: 'final' },
        },
      },
    },
  });
}

export type RunMachine = ReturnType<typeof createRunMachine>;

/** Machines of recent plans: runs of one deployed version share one (a machine holds no run state). */
const machines = new Map<string, RunMachine>();
const MACHINES_KEPT = 64;

/** {@link createRunMachine}, built once per distinct plan. */
export function runMachineOf(plan: Plan): RunMachine {
  const key = JSON.stringify(plan);
  let machine = machines.get(key);
  if (machine) {
    // Most recently used last: the first key is the one to drop.
    machines.delete(key);
  } else {
    machine = createRunMachine(plan);
    if (machines.size >= MACHINES_KEPT) machines.delete(machines.keys().next().value!);
  }
  machines.set(key, machine);
  return machine;
}
export type RunSnapshot = SnapshotFrom<RunMachine>;

function patch(context: RunContext, step: string, facts: Partial<StepFacts>): Partial<RunContext> {
  return { steps: { ...context.steps, [step]: { ...(context.steps[step] ?? emptyFacts()), ...facts } } };
}

/** The run's state, read off the snapshot. */
export function runStateOf(snapshot: RunSnapshot): RunState {
  return (snapshot.value as unknown as { run: RunState }).run;
}

/** Each step's state, read off the snapshot. */
export function stepStatesOf(snapshot: RunSnapshot): Record<string, StepState> {
  return (snapshot.value as unknown as { steps: Record<string, StepState> }).steps;
}

/** What is durably known of a run's steps: completions (`quiver-steps`) and claims (`quiver-claims`). */
export interface RunFacts {
  completions: ReadonlyMap<string, StepSucceeded | StepFailed>;
  claims: ReadonlyMap<string, StepClaim>;
}

/** A claim as the run's facts hold it (schemas ClaimRecord). */
export interface StepClaim {
  executorId: string;
  hostId: string;
  attempt: number;
  at: number;
  /** The steps the claimed step's ready message carried (StepReady.then): the claim covers them too. */
  chain?: readonly string[];
}

/**
 * The claim each step runs under: its own, or, for a step a chain's ready message carried
 * (ClaimRecord.chain), the claim of the chain's head once the step before it succeeded: the
 * executor goes down a chain without claiming each step; only a redelivery that takes the chain
 * over claims them one by one.
 */
export function claimsOf(plan: Plan, facts: RunFacts): Map<string, StepClaim> {
  const claims = new Map<string, StepClaim>();
  const carriedBy = new Map<string, StepClaim>();
  for (const claim of facts.claims.values()) for (const step of claim.chain ?? []) carriedBy.set(step, claim);
  for (const step of plan.steps) {
    const own = facts.claims.get(step.name);
    const carried = carriedBy.get(step.name);
    if (own) claims.set(step.name, own);
    else if (carried && step.inputs.every((i) => facts.completions.get(i.step)?.type === 'step.succeeded')) claims.set(step.name, carried);
  }
  return claims;
}

/**
 * Rebuilds a run's machine from its facts alone: what a new leader resumes from, and what a
 * reader of a running run sees. Completions go in plan order (parents first), each after its
 * step's claim, so the result does not depend on the order the facts were written in.
 */
export function replayRun(plan: Plan, runId: string, facts: RunFacts): Actor<RunMachine> {
  const actor = createActor(runMachineOf(plan), { input: { runId } }).start();
  const claims = claimsOf(plan, facts);
  for (const step of plan.steps) {
    const claim = claims.get(step.name);
    if (claim) actor.send({ type: 'step.started', runId, step: step.name, executorId: claim.executorId, hostId: claim.hostId, attempt: claim.attempt, at: claim.at });
    const completion = facts.completions.get(step.name);
    if (completion) actor.send(completion);
  }
  return actor;
}
