export { Orchestrator } from './orchestrator.ts';
export type { OrchestratorOptions } from './orchestrator.ts';
export { planPipeline, PlanError, outputSteps, childrenOf } from './plan.ts';
export { createRunMachine, runStateOf, stepStatesOf } from './run-machine.ts';
export type { RunMachine, RunSnapshot, RunContext, RunEvent, StepFacts } from './run-machine.ts';
