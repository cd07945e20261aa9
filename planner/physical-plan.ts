/**
 * The physical plan: the logical plan plus the system steps the executor runs itself (see
 * `systemStep` in schemas/messages.ts). A `source()` input becomes a scan step the reading step
 * depends on; a `materialize` option adds a stage step after the step and one commit step that
 * waits for every step of the run, so a snapshot is committed only when the whole run succeeded.
 */
import { NAME_PATTERN, type Plan, type PlanStep, type SystemStep } from '../schemas/index.ts';
import { FilterSyntaxError, parseFilter, REF_NAME_PATTERN } from '../storage/index.ts';
import { PlanError } from './errors.ts';

/** System step names start with this; user steps may not. */
export const SYSTEM_STEP_PREFIX = '__';
const COMMIT_STEP = '__commit';

export class PhysicalPlanner {
  /** Scan steps by what they read: two inputs reading the same thing share one scan. */
  private readonly scans = new Map<string, PlanStep>();
  private readonly materialized: { step: string; mode: 'append' | 'replace' }[] = [];
  private readonly taken = new Set<string>();

  /**
   * The scan step a `source()` input reads from, or null when `ref` is not a source. Checks what
   * can be checked without the table: its name, the columns' shape, the filter's syntax.
   */
  source(stepName: string, param: string, ref: unknown): string | null {
    const r = ref as { kind?: unknown; table?: unknown; columns?: unknown; filter?: unknown; snapshot?: unknown; asOf?: unknown; ref?: unknown } | null;
    if (!r || typeof r !== 'object' || r.kind !== 'quiver.source') return null;
    const where = `input "${param}" of step "${stepName}"`;
    if (typeof r.table !== 'string' || !NAME_PATTERN.test(r.table)) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `${where} reads table ${JSON.stringify(r.table)}: table names are identifiers`, stepName);
    }
    if (r.columns !== undefined && (!Array.isArray(r.columns) || r.columns.length === 0 || !r.columns.every((c) => typeof c === 'string'))) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `columns of ${where} must be a non-empty list of column names`, stepName);
    }
    if (r.filter !== undefined) {
      if (typeof r.filter !== 'string') throw new PlanError('ERR_PLAN_BAD_INPUT', `the filter of ${where} must be a string`, stepName);
      try {
        parseFilter(r.filter);
      } catch (error) {
        if (error instanceof FilterSyntaxError) throw new PlanError('ERR_PLAN_BAD_INPUT', `${where}: ${error.message}`, stepName);
        throw error;
      }
    }
    if (r.snapshot !== undefined && typeof r.snapshot !== 'string') throw new PlanError('ERR_PLAN_BAD_INPUT', `the snapshot of ${where} must be a snapshot id (a string)`, stepName);
    if (r.asOf !== undefined && (typeof r.asOf !== 'number' || !Number.isInteger(r.asOf) || r.asOf < 0)) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `asOf of ${where} must be a time (a Date, epoch milliseconds or an ISO string)`, stepName);
    }
    if (r.snapshot !== undefined && r.asOf !== undefined) throw new PlanError('ERR_PLAN_BAD_INPUT', `${where} gives both snapshot and asOf: choose one`, stepName);
    if (r.ref !== undefined && (typeof r.ref !== 'string' || !(REF_NAME_PATTERN.test(r.ref) || /^[0-9a-f]{64}$/.test(r.ref)))) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `the ref of ${where} must be a branch or tag name (e.g. 'dev', 'run/01J...') or a catalog commit id; got ${JSON.stringify(r.ref)}`, stepName);
    }
    const system: SystemStep = {
      kind: 'scan',
      table: r.table,
      ...(r.columns ? { columns: r.columns as string[] } : {}),
      ...(r.filter !== undefined && r.filter.trim() !== '' ? { filter: r.filter } : {}),
      ...(r.snapshot !== undefined ? { snapshot: r.snapshot } : {}),
      ...(r.asOf !== undefined ? { asOf: r.asOf as number } : {}),
      ...(r.ref !== undefined ? { ref: r.ref } : {}),
    };
    const key = JSON.stringify(system);
    const known = this.scans.get(key);
    if (known) return known.name;
    const scan: PlanStep = { name: this.name(`__scan_${r.table}`), inputs: [], system };
    this.scans.set(key, scan);
    return scan.name;
  }

  /** Records a step's `materialize` option (true, or { mode }). */
  materialize(stepName: string, option: unknown): void {
    if (option === undefined || option === false) return;
    const mode = option === true ? 'replace' : (option as { mode?: unknown } | null)?.mode ?? 'replace';
    if ((option !== true && (typeof option !== 'object' || option === null)) || (mode !== 'replace' && mode !== 'append')) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `materialize of step "${stepName}" must be true or { mode: 'replace' | 'append' }; got ${JSON.stringify(option)}`, stepName);
    }
    this.materialized.push({ step: stepName, mode });
  }

  /** Adds the system steps to the user's steps (in place). */
  addSystemSteps(steps: Map<string, PlanStep>): void {
    for (const name of steps.keys()) {
      if (name.startsWith(SYSTEM_STEP_PREFIX)) {
        throw new PlanError('ERR_PLAN_BAD_NAME', `step name "${name}" starts with "${SYSTEM_STEP_PREFIX}", which is kept for Quiver's own steps`, name);
      }
    }
    const userSteps = [...steps.values()];
    for (const scan of this.scans.values()) steps.set(scan.name, scan);
    if (this.materialized.length === 0) return;
    const stages = this.materialized.map(({ step, mode }): PlanStep => ({
      name: this.name(`__stage_${step}`),
      inputs: [{ param: 'data', step }],
      system: { kind: 'stage', table: step, mode },
    }));
    for (const stage of stages) steps.set(stage.name, stage);
    // Waits for the leaves too: every user step is one or an ancestor of one, so the commit
    // runs only once the whole run has succeeded.
    const read = new Set(userSteps.flatMap((s) => s.inputs.map((i) => i.step)));
    const leaves = userSteps.filter((s) => !read.has(s.name));
    steps.set(COMMIT_STEP, {
      name: this.name(COMMIT_STEP),
      inputs: [...stages.map((s, i) => ({ param: `staged${i}`, step: s.name })), ...leaves.map((s, i) => ({ param: `after${i}`, step: s.name }))],
      system: { kind: 'commit' },
    });
  }

  private name(wanted: string): string {
    const base = wanted.slice(0, 60);
    let name = base;
    for (let n = 2; this.taken.has(name); n++) name = `${base}_${n}`;
    this.taken.add(name);
    return name;
  }
}

/** Where a run's tables go: see {@link planOnBranch}. */
export interface BranchOptions {
  /** The branch the run reads its sources from (unless a source names a ref) and writes. @default 'main' */
  branch?: string;
  /**
   * Write to a temporary branch `run/<runId>` and merge it into `branch` only when every step
   * and expectation passed; otherwise `branch` is untouched and `run/<runId>` stays. @default false
   */
  transaction?: boolean;
}

/**
 * The plan with its sources and materialized tables on a branch: scans without a ref of their
 * own read it, and the stage and commit steps write it (through `run/<runId>` for a
 * transaction). Applied again, the later options win.
 */
export function planOnBranch(plan: Plan, options: BranchOptions): Plan {
  const { branch, transaction } = options;
  if (branch === undefined && transaction === undefined) return plan;
  if (branch !== undefined && (typeof branch !== 'string' || !REF_NAME_PATTERN.test(branch))) {
    throw new PlanError('ERR_PLAN_BAD_INPUT', `branch ${JSON.stringify(branch)} must be up to four /-separated parts of letters, digits, _ or - (e.g. dev)`);
  }
  if (transaction !== undefined && typeof transaction !== 'boolean') throw new PlanError('ERR_PLAN_BAD_INPUT', `transaction must be true or false; got ${JSON.stringify(transaction)}`);
  const previous = plan.steps.find((s) => s.system?.kind === 'commit')?.system as (SystemStep & { kind: 'commit' }) | undefined;
  const steps = plan.steps.map((step): PlanStep => {
    const system = step.system;
    if (!system) return step;
    if (system.kind === 'scan') {
      if (branch === undefined || (system.ref !== undefined && system.ref !== previous?.branch)) return step;
      return { ...step, system: { ...system, ref: branch } };
    }
    return { ...step, system: { ...system, ...(branch !== undefined ? { branch } : {}), ...(transaction !== undefined ? { transaction } : {}) } };
  });
  return { ...plan, steps };
}
