import { assign, createActor, setup, type Actor, type SnapshotFrom } from 'xstate';
import { topologyOf } from '../planner/index.ts';
import type {
  ClaimRecord,
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
  /** Each step's state (see createRunMachine for why they live here). */
  states: Record<string, StepState>;
  /** Steps not yet succeeded, failed, skipped or cancelled: the run ends when none is left. */
  unsettled: number;
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

/** The states a step ends in. */
export const SETTLED_STATES: ReadonlySet<StepState> = new Set(['succeeded', 'failed', 'skipped', 'cancelled']);

/**
 * One machine per run, built from its plan: the run goes `running → succeeded | failed |
 * cancelled`, and each step `waiting → ready → running → succeeded | failed`, or `skipped` (a
 * parent will never succeed) or `cancelled`. Times come in on events, never from a clock inside
 * the machine, so a persisted snapshot replays the same way anywhere.
 *
 * The steps' states are the context's, moved by one pure transition per event, not a parallel
 * region per step: xstate evaluates every region's eventless transitions after every event and
 * checks every pair of transitions taken together for conflicts, so a run of N steps cost its
 * orchestrator O(N³) (3-4 s of CPU for a 300-step run, 220-280 ms for 100 steps). Here an event costs
 * the step it names and, when it settles, its children.
 */
export function createRunMachine(plan: Plan) {
  const { parents: parentsOf, children: childrenOf } = topologyOf(plan);

  /** Puts `step` in a settled state and moves the steps waiting on it: ready once all their parents succeeded, skipped as soon as one will not. */
  const settle = (states: Record<string, StepState>, step: string, state: StepState): number => {
    states[step] = state;
    let settled = 1;
    for (const child of childrenOf.get(step) ?? []) {
      if (states[child] !== 'waiting') continue;
      if (state !== 'succeeded') settled += settle(states, child, 'skipped');
      else if (parentsOf.get(child)!.every((p) => states[p] === 'succeeded')) states[child] = 'ready';
    }
    return settled;
  };

  const initialStates = (): Record<string, StepState> =>
    Object.fromEntries(plan.steps.map((s) => [s.name, parentsOf.get(s.name)!.length === 0 ? 'ready' : 'waiting']));

  /** A step's event: applied when the step is ready or running (a completion may overtake its start), ignored otherwise. */
  const stepEvent = (context: RunContext, event: RunEvent): Partial<RunContext> => {
    if (!('step' in event)) return {};
    const state = context.states[event.step];
    if (state !== 'ready' && state !== 'running') return {};
    const states = { ...context.states };
    let facts: Partial<StepFacts>;
    let unsettled = context.unsettled;
    if (event.type === 'step.started') {
      // A redelivered step starts again on another executor: a new attempt.
      states[event.step] = 'running';
      facts = { attempt: event.attempt, executorId: event.executorId, hostId: event.hostId, startedAt: event.at };
    } else if (event.type === 'step.succeeded') {
      unsettled -= settle(states, event.step, 'succeeded');
      facts = {
        attempt: event.attempt,
        executorId: event.executorId,
        hostId: event.output.hostId,
        startedAt: event.startedAt,
        finishedAt: event.at,
        output: event.output,
        copiedBytes: event.inputCopiedBytes + event.outputCopiedBytes,
        transport: event.transport,
        scan: event.scan ?? null,
        isolation: event.isolation ?? null,
        codeStartedAt: event.codeStartedAt ?? null,
        cacheKey: event.cacheKey ?? null,
        ...(event.envMs !== undefined ? { envMs: event.envMs } : {}),
        ...(event.committed ? { committed: event.committed } : {}),
      };
    } else {
      unsettled -= settle(states, event.step, 'failed');
      facts = {
        attempt: event.attempt,
        executorId: event.executorId,
        // A step failing fast says where only here: its start may never have been announced.
        ...(event.hostId ? { hostId: event.hostId } : {}),
        startedAt: event.startedAt ?? context.steps[event.step]?.startedAt ?? null,
        finishedAt: event.at,
        error: event.error,
        isolation: event.isolation ?? null,
        codeStartedAt: event.codeStartedAt ?? null,
        ...(event.envMs !== undefined ? { envMs: event.envMs } : {}),
      };
    }
    return { states, unsettled, ...patch(context, event.step, facts) };
  };

  const cancelAll = (context: RunContext, event: RunEvent): Partial<RunContext> => {
    const states = { ...context.states };
    for (const step of plan.steps) if (!SETTLED_STATES.has(states[step.name]!)) states[step.name] = 'cancelled';
    return { states, unsettled: 0, cancelReason: (event as { reason: string }).reason };
  };

  return setup({
    types: {
      context: {} as RunContext,
      events: {} as RunEvent,
      input: {} as { runId: string },
    },
    actions: {
      applyStepEvent: assign(({ context, event }) => stepEvent(context, event)),
      cancel: assign(({ context, event }) => cancelAll(context, event)),
    },
  }).createMachine({
    id: 'run',
    context: ({ input }) => ({
      runId: input.runId,
      steps: Object.fromEntries(plan.steps.map((s) => [s.name, emptyFacts()])),
      states: initialStates(),
      unsettled: plan.steps.length,
      cancelReason: null,
    }),
    initial: 'running',
    states: {
      running: {
        on: {
          'step.started': { actions: 'applyStepEvent' },
          'step.succeeded': { actions: 'applyStepEvent' },
          'step.failed': { actions: 'applyStepEvent' },
          'run.cancel': { actions: 'cancel' },
        },
        // Once every step is over: succeeded if all did, cancelled if any was, else failed.
        always: [
          { guard: ({ context }) => context.unsettled === 0 && plan.steps.every((s) => context.states[s.name] === 'succeeded'), target: 'succeeded' },
          { guard: ({ context }) => context.unsettled === 0 && plan.steps.some((s) => context.states[s.name] === 'cancelled'), target: 'cancelled' },
          { guard: ({ context }) => context.unsettled === 0, target: 'failed' },
        ],
      },
      succeeded: { type: 'final' },
      failed: { type: 'final' },
      cancelled: { type: 'final' },
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
  return snapshot.value as RunState;
}

/** Each step's state, read off the snapshot. */
export function stepStatesOf(snapshot: RunSnapshot): Record<string, StepState> {
  return snapshot.context.states;
}

/** What is durably known of a run's steps: completions (`quiver-steps`) and claims (`quiver-claims`). */
export interface RunFacts {
  completions: ReadonlyMap<string, StepSucceeded | StepFailed>;
  claims: ReadonlyMap<string, ClaimRecord>;
}

/**
 * The claim each step runs under: its own, or, for a step a chain's ready message carried
 * (ClaimRecord.chain), the claim of the chain's head once the step before it succeeded: the
 * executor goes down a chain without claiming each step; only a redelivery that takes the chain
 * over claims them one by one.
 */
export function claimsOf(plan: Plan, facts: RunFacts): Map<string, ClaimRecord> {
  const claims = new Map<string, ClaimRecord>();
  const carriedBy = new Map<string, ClaimRecord>();
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
