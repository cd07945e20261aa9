import { ENV_NAME_PATTERN, ISOLATION_LEVELS, NAME_PATTERN, STEP_LIMIT_BOUNDS, type Isolation, type Plan, type PlanStep, type StepLimits } from '../schemas/index.ts';
import { PlanError } from './errors.ts';
import { PhysicalPlanner, planOnBranch, type BranchOptions } from './physical-plan.ts';

/** The shape a pipeline definition has once loaded (see sdk `pipeline()`); checked, not trusted. */
export interface PipelineShape {
  kind?: unknown;
  name?: unknown;
  steps?: unknown;
}

/**
 * Builds the logical plan: the steps and their inputs in a topological order. Rejects a bad
 * pipeline with a {@link PlanError} naming the step: bad names, a step that is not a function,
 * an input naming no step, a cycle.
 *
 * `declaredNames` lets a loader report two steps with one name that an object literal would
 * have silently merged.
 */
export function planPipeline(definition: unknown, declaredNames?: readonly string[]): Plan {
  const def = definition as PipelineShape | null;
  if (!def || typeof def !== 'object' || def.kind !== 'quiver.pipeline') {
    throw new PlanError(
      'ERR_PLAN_NOT_A_PIPELINE',
      'the pipeline file must `export default pipeline(name, { ...steps })` (imported from quiver); its default export is ' +
        describe(definition),
    );
  }
  if (typeof def.name !== 'string' || !NAME_PATTERN.test(def.name)) {
    throw new PlanError('ERR_PLAN_BAD_NAME', `pipeline name ${JSON.stringify(def.name)} must be an identifier (letters, digits, _)`);
  }
  if (declaredNames) {
    const seen = new Set<string>();
    for (const n of declaredNames) {
      if (seen.has(n)) throw new PlanError('ERR_PLAN_DUPLICATE_STEP', `two steps are named "${n}": step names must be unique`, n);
      seen.add(n);
    }
  }
  const steps = (def.steps ?? {}) as Record<string, unknown>;
  if (typeof steps !== 'object' || Object.keys(steps).length === 0) {
    throw new PlanError('ERR_PLAN_EMPTY', `pipeline "${def.name}" has no steps`);
  }
  const pipelineIsolation = isolationOf((def as { options?: { isolation?: unknown } }).options?.isolation, `pipeline "${def.name}"`) ?? 'process';
  const pipelineOptions = (def as { options?: Record<string, unknown> }).options ?? {};
  const pipelineLimits = limitsOf(pipelineOptions, `pipeline "${def.name}"`);
  const pipelineEnv = envOf(pipelineOptions.env, `pipeline "${def.name}"`);
  const planSteps = new Map<string, PlanStep>();
  const physical = new PhysicalPlanner();
  for (const [stepName, raw] of Object.entries(steps)) {
    if (!NAME_PATTERN.test(stepName)) {
      throw new PlanError('ERR_PLAN_BAD_NAME', `step name "${stepName}" must be an identifier (a letter or _, then letters, digits or _; at most 64)`, stepName);
    }
    const stepDef = raw as { kind?: unknown; fn?: unknown; inputs?: unknown } | null;
    const fn = stepDef && typeof stepDef === 'object' && stepDef.kind === 'quiver.step' ? stepDef.fn : raw;
    if (typeof fn !== 'function') {
      throw new PlanError(
        'ERR_PLAN_NOT_A_FUNCTION',
        `step "${stepName}" is not a function: got ${describe(fn)}. Declare it with step((inputs, ctx) => table)`,
        stepName,
      );
    }
    const inputs: PlanStep['inputs'] = [];
    const rawInputs = (stepDef as { inputs?: unknown }).inputs ?? {};
    for (const [param, ref] of Object.entries(rawInputs as Record<string, unknown>)) {
      const scan = physical.source(stepName, param, ref);
      if (scan) {
        inputs.push({ param, step: scan });
        continue;
      }
      const r = ref as { step?: unknown; columns?: unknown } | null;
      if (!r || typeof r !== 'object' || typeof r.step !== 'string') {
        throw new PlanError('ERR_PLAN_BAD_INPUT', `input "${param}" of step "${stepName}" must name a step (a string or input('step')); got ${describe(ref)}`, stepName);
      }
      if (!NAME_PATTERN.test(param)) {
        throw new PlanError('ERR_PLAN_BAD_INPUT', `input name "${param}" of step "${stepName}" must be an identifier`, stepName);
      }
      if (r.columns !== undefined && (!Array.isArray(r.columns) || r.columns.length === 0 || !r.columns.every((c) => typeof c === 'string'))) {
        throw new PlanError('ERR_PLAN_BAD_INPUT', `columns of input "${param}" of step "${stepName}" must be a non-empty list of column names`, stepName);
      }
      inputs.push(r.columns ? { param, step: r.step, columns: r.columns as string[] } : { param, step: r.step });
    }
    const host = (stepDef as { options?: { host?: unknown } }).options?.host;
    if (host !== undefined && (typeof host !== 'string' || !/^[A-Za-z0-9._-]{1,128}$/.test(host))) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `the host label of step "${stepName}" must be 1-128 letters, digits, . _ or -; got ${describe(host)}`, stepName);
    }
    physical.materialize(stepName, (stepDef as { options?: { materialize?: unknown } }).options?.materialize);
    const isolation = isolationOf((stepDef as { options?: { isolation?: unknown } }).options?.isolation, `step "${stepName}"`, stepName) ?? pipelineIsolation;
    const stepOptions = (stepDef as { options?: Record<string, unknown> }).options ?? {};
    // A step's own limit replaces the pipeline's; its env adds to the pipeline's.
    const limits = { ...pipelineLimits, ...limitsOf(stepOptions, `step "${stepName}"`, stepName) };
    const env = [...new Set([...pipelineEnv, ...envOf(stepOptions.env, `step "${stepName}"`, stepName)])];
    if (env.length > MAX_STEP_ENV) throw new PlanError('ERR_PLAN_BAD_INPUT', `step "${stepName}" is given ${env.length} environment variables (its env and its pipeline's); at most ${MAX_STEP_ENV}`, stepName);
    planSteps.set(stepName, {
      name: stepName,
      inputs,
      isolation,
      ...(host ? { host } : {}),
      ...(Object.keys(limits).length > 0 ? { limits } : {}),
      ...(env.length > 0 ? { env } : {}),
      ...(cacheOptionOf(stepOptions.cache, `step "${stepName}"`, stepName) === false ? { cache: false as const } : {}),
    });
  }
  physical.addSystemSteps(planSteps);
  for (const s of planSteps.values()) {
    for (const i of s.inputs) {
      if (!planSteps.has(i.step)) {
        throw new PlanError(
          'ERR_PLAN_UNKNOWN_INPUT',
          `input "${i.param}" of step "${s.name}" names step "${i.step}", which does not exist; the steps are: ${[...planSteps.keys()].join(', ')}`,
          s.name,
        );
      }
    }
  }
  // A pipeline's own `branch` / `transaction` options (deployed pipelines run with them).
  const { branch, transaction } = (def as { options?: BranchOptions }).options ?? {};
  const cache = cacheOptionOf(pipelineOptions.cache, `pipeline "${def.name}"`);
  return planOnBranch({ pipeline: def.name, steps: topologicalOrder(planSteps), ...(cache ? { cache } : {}) }, { ...(branch !== undefined ? { branch } : {}), ...(transaction !== undefined ? { transaction } : {}) });
}

function isolationOf(value: unknown, what: string, step?: string): Isolation | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'string' && (ISOLATION_LEVELS as readonly string[]).includes(value)) return value as Isolation;
  throw new PlanError('ERR_PLAN_BAD_INPUT', `isolation of ${what} must be ${ISOLATION_LEVELS.map((l) => `'${l}'`).join(' or ')}; got ${describe(value)}`, step);
}

/** Environment variables one step may be given (the wire's limit, schemas/messages.ts stepEnv). */
const MAX_STEP_ENV = 64;

/** `timeoutMs` and `memoryMb` of a pipeline's or step's options, checked; absent ones stay absent (the executor has the defaults). */
function limitsOf(options: Record<string, unknown>, what: string, step?: string): StepLimits {
  const limits: StepLimits = {};
  for (const key of ['timeoutMs', 'memoryMb'] as const) {
    const value = options[key];
    if (value === undefined) continue;
    const { min, max } = STEP_LIMIT_BOUNDS[key];
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `${key} of ${what} must be an integer from ${min} to ${max}; got ${describe(value)}`, step);
    }
    limits[key] = value;
  }
  return limits;
}

/** The `cache` option: a boolean, checked. */
function cacheOptionOf(value: unknown, what: string, step?: string): boolean | undefined {
  if (value === undefined || typeof value === 'boolean') return value;
  throw new PlanError('ERR_PLAN_BAD_INPUT', `cache of ${what} must be true or false; got ${describe(value)}`, step);
}

/** The `env` option: names of environment variables, checked. */
function envOf(value: unknown, what: string, step?: string): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string' && ENV_NAME_PATTERN.test(v))) {
    throw new PlanError('ERR_PLAN_BAD_INPUT', `env of ${what} must be a list of environment variable names (letters, digits, _); got ${describe(value)}`, step);
  }
  return value as string[];
}

/** Kahn's algorithm, keeping declaration order among ready steps so plans are stable. */
function topologicalOrder(steps: Map<string, PlanStep>): PlanStep[] {
  const remainingParents = new Map<string, number>();
  const children = new Map<string, string[]>();
  for (const s of steps.values()) {
    const parents = new Set(s.inputs.map((i) => i.step));
    remainingParents.set(s.name, parents.size);
    for (const p of parents) children.set(p, [...(children.get(p) ?? []), s.name]);
  }
  const order: PlanStep[] = [];
  const queue = [...steps.keys()].filter((n) => remainingParents.get(n) === 0);
  while (queue.length > 0) {
    const next = queue.shift()!;
    order.push(steps.get(next)!);
    for (const c of children.get(next) ?? []) {
      const left = remainingParents.get(c)! - 1;
      remainingParents.set(c, left);
      if (left === 0) queue.push(c);
    }
  }
  if (order.length < steps.size) {
    const inCycle = [...steps.keys()].filter((n) => !order.some((s) => s.name === n));
    throw new PlanError('ERR_PLAN_CYCLE', `steps ${inCycle.map((n) => `"${n}"`).join(', ')} form a cycle through their inputs`, inCycle[0]);
  }
  return order;
}

/** The steps whose outputs are the run's result: those no other step reads. */
export function outputSteps(plan: Plan): string[] {
  // System steps (scans, staging, the commit) are neither outputs nor make their parents not one.
  const read = new Set(plan.steps.filter((s) => !s.system).flatMap((s) => s.inputs.map((i) => i.step)));
  return plan.steps.filter((s) => !s.system && !read.has(s.name)).map((s) => s.name);
}

/**
 * The steps that follow `step` in a chain, in order: each the only child of the step before it
 * and reading nothing else, all user steps run alike (same isolation, limits, secrets and
 * packages, none pinned to a host). The executor that runs `step` runs them right after it, each
 * claimed and recorded as any step is, without a ready message of their own: one trip through
 * the orchestrator and the work queue for the whole chain instead of one per step.
 */
export function chainAfter(plan: Plan, step: string): PlanStep[] {
  const chain: PlanStep[] = [];
  let current = plan.steps.find((s) => s.name === step);
  while (current && !current.system && current.host === undefined) {
    const children = childrenOf(plan, current.name);
    if (children.length !== 1) break;
    const child = plan.steps.find((s) => s.name === children[0])!;
    if (!child.inputs.every((i) => i.step === current!.name) || !runsAlike(current, child)) break;
    chain.push(child);
    current = child;
  }
  return chain;
}

/** Whether two user steps run in the same kind of process: one may follow the other in a chain. */
function runsAlike(a: PlanStep, b: PlanStep): boolean {
  const how = (s: PlanStep) => JSON.stringify([s.isolation ?? 'process', s.limits ?? null, s.env ?? null, s.packages ?? null]);
  return !b.system && b.host === undefined && how(a) === how(b);
}

export function childrenOf(plan: Plan, step: string): string[] {
  return plan.steps.filter((s) => s.inputs.some((i) => i.step === step)).map((s) => s.name);
}

/** A plan's edges (each step's distinct parents, and its children as {@link childrenOf} gives them) and its outputs ({@link outputSteps}). */
export interface PlanTopology {
  parents: ReadonlyMap<string, readonly string[]>;
  children: ReadonlyMap<string, readonly string[]>;
  outputs: ReadonlySet<string>;
}

const topologies = new WeakMap<Plan, PlanTopology>();

/**
 * {@link PlanTopology}, computed once per plan object, for a plan that no longer changes (a
 * submitted run's): the orchestrator asks it after every transition of a run, and asking
 * childrenOf for each step costs O(steps²) each time.
 */
export function topologyOf(plan: Plan): PlanTopology {
  let topology = topologies.get(plan);
  if (!topology) {
    const parents = new Map(plan.steps.map((s) => [s.name, [...new Set(s.inputs.map((i) => i.step))]]));
    const children = new Map<string, string[]>(plan.steps.map((s) => [s.name, []]));
    for (const [step, its] of parents) for (const parent of its) children.get(parent)?.push(step);
    topology = { parents, children, outputs: new Set(outputSteps(plan)) };
    topologies.set(plan, topology);
  }
  return topology;
}

/** Every step that reads `step`'s output, directly or further down. */
export function descendantsOf(plan: Plan, step: string): string[] {
  const found = new Set<string>();
  const next = [step];
  while (next.length > 0) {
    for (const child of childrenOf(plan, next.pop()!)) {
      if (!found.has(child)) {
        found.add(child);
        next.push(child);
      }
    }
  }
  return [...found];
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (typeof value === 'function') return 'a function';
  if (typeof value === 'object') return `an object with keys [${Object.keys(value).slice(0, 5).join(', ')}]`;
  return `${typeof value} ${JSON.stringify(value)}`;
}
