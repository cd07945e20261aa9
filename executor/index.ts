export { Executor } from './executor.ts';
export type { ExecutorOptions } from './executor.ts';
export { collectGarbage, stepProcesses } from './gc.ts';
export { InputFetchError, type ExecutorFlightOptions } from './flight-inputs.ts';
export { findLiveHost } from './host-registry.ts';
export { OutputCache, resolveOutputCacheOptions, isCachedSegment, type OutputCacheOptions } from './output-cache.ts';
export { Environments, EnvironmentBuildError, environmentHash, environmentsDir, listEnvironments, pruneEnvironments, type EnvironmentsOptions, type EnvironmentInfo } from './environments.ts';
