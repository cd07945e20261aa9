// Pipeline files import this module; when a pipeline is bundled it is swapped for ./define.ts,
// so steps carry only the definitions, not the client.
export { input, pipeline, step } from './define.ts';
export type { InputRef, PipelineDefinition, StepContext, StepDefinition, StepFunction, StepOptions } from './define.ts';
export { loadPipeline, PipelineLoadError } from './load.ts';
export type { LoadedPipeline } from './load.ts';
export { QuiverClient } from './client.ts';
export type { ClientOptions, OpenedTable, RunEvent, RunHandle, RunOptions } from './client.ts';
export { startLocalCluster } from './local.ts';
export type { LocalCluster, LocalClusterOptions } from './local.ts';
export { PlanError } from '../orchestrator/index.ts';
