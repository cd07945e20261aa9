// Pipeline files import this module; when a pipeline is bundled it is swapped for ./define.ts,
// so steps carry only the definitions, not the client.
export { expect, ExpectationFailedError, input, pipeline, source, step } from './define.ts';
export type {
  EventTriggerOptions,
  ExpectationFunction,
  ExpectationResult,
  PipelineBranchOptions,
  InputRef,
  PipelineDefinition,
  PipelineOptions,
  ScheduleOptions,
  SourceRef,
  StepContext,
  StepDefinition,
  StepFunction,
  StepOptions,
  TriggerEvent,
} from './define.ts';
export { loadPipeline, PipelineLoadError } from './load.ts';
export type { LoadedPipeline } from './load.ts';
export { QuiverClient, NotDeployedError, DeployConflictError, InvalidEventError, OutputNotFoundError, RerunError, rerunOf } from './client.ts';
export type { ClientOptions, DeployResult, DryRun, OpenedTable, PublishOptions, PublishResult, ReadOutput, RerunOptions, RunEvent, RunHandle, RunOptions } from './client.ts';
export { startLocalCluster } from './local.ts';
export type { LocalCluster, LocalClusterOptions, LocalNats } from './local.ts';
export { PlanError, TriggerError } from '../planner/index.ts';
