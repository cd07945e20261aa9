export { Orchestrator } from './orchestrator.ts';
export type { OrchestratorOptions } from './orchestrator.ts';
export { createRunMachine, runStateOf, stepStatesOf } from './run-machine.ts';
export type { RunMachine, RunSnapshot, RunContext, RunEvent, StepFacts } from './run-machine.ts';
export { Scheduler } from './scheduler.ts';
export type { ScheduleState, SchedulerOptions } from './scheduler.ts';
export { DEFAULT_LEASE_TTL_MS } from './orchestrator.ts';
export { readRunView } from './run-store.ts';
export { replayRun, type RunFacts } from './run-machine.ts';
