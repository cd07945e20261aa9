export { Executor } from './executor.ts';
export type { ExecutorOptions } from './executor.ts';
export { collectGarbage, stepProcesses } from './gc.ts';
export { InputFetchError, type ExecutorFlightOptions } from './flight-inputs.ts';
export { findLiveHost } from './host-registry.ts';
export { OutputCache, resolveOutputCacheOptions, isCachedSegment, persistedOutputKey, type OutputCacheOptions } from './output-cache.ts';
export {
  Environments,
  EnvironmentBuildError,
  environmentHash,
  environmentsDir,
  listClusterEnvironments,
  listEnvironments,
  pruneClusterEnvironments,
  pruneEnvironments,
  type ClusterEnvironmentInfo,
  type EnvironmentsOptions,
  type EnvironmentInfo,
} from './environments.ts';
