/**
 * Pure planning, no I/O: the logical plan of a pipeline file, its physical plan (the system
 * steps Quiver runs itself), and the checked trigger specs of a deployment. The SDK plans with
 * this before anything is submitted; the orchestrator only reads plans.
 */
export { PlanError } from './errors.ts';
export { planPipeline, outputSteps, childrenOf, chainAfter, descendantsOf, topologyOf, type PipelineShape, type PlanTopology } from './plan.ts';
export { SYSTEM_STEP_PREFIX, planOnBranch, type BranchOptions } from './physical-plan.ts';
export { triggersOf, TriggerError, subjectMatches, schemaViolation, ticksBetween, nextTick, type TriggerSpec } from './triggers.ts';
export { stepCodeKeys, stepCacheKey, canonicalJson, type StepCacheParts } from './cache-keys.ts';
