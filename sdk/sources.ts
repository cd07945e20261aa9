import type { NatsConnection } from '@nats-io/transport-node';
import type { Plan, PlanStep, SystemStep } from '../schemas/index.ts';
import { atRef, currentSnapshot, MAIN_BRANCH, prepareScan, StorageError, tableStoreFromEnv, type TableStore } from '../storage/index.ts';

type StageStep = PlanStep & { system: SystemStep & { kind: 'stage' } };

/**
 * Checks every stored-table input of a plan against its table before the run is submitted: the
 * table exists, the columns and the filter fit its schema. Each scan is pinned to the snapshot
 * current now (unless it asked for one), so retries and slow steps read the same data; each
 * materialized table to its current snapshot and the cache key that snapshot was written with
 * (see {@link pinTableHeads}).
 * Throws the storage error (TableNotFoundError, UnknownColumnError, ...) naming the input.
 */
export async function prepareSources(plan: Plan, nc: NatsConnection): Promise<Plan> {
  const scans = plan.steps.filter((s): s is PlanStep & { system: SystemStep & { kind: 'scan' } } => s.system?.kind === 'scan');
  if (scans.length === 0 && !plan.steps.some(isCacheableStage)) return plan;
  const store = await tableStoreFromEnv({ nc });
  try {
    const pinned = new Map<string, PlanStep>();
    for (const step of scans) {
      const scan = step.system;
      let prepared;
      try {
        prepared = await prepareScan(atRef(store, scan.ref), scan.table, {
          ...(scan.columns ? { columns: scan.columns } : {}),
          ...(scan.filter !== undefined ? { filter: scan.filter } : {}),
          ...(scan.snapshot !== undefined ? { snapshot: scan.snapshot } : {}),
          ...(scan.asOf !== undefined ? { asOf: scan.asOf } : {}),
        });
      } catch (error) {
        if (error instanceof StorageError) {
          const readers = plan.steps.flatMap((s) => s.inputs.filter((i) => i.step === step.name).map((i) => `input "${i.param}" of step "${s.name}"`));
          error.message = `${readers.join(', ')} (source('${scan.table}')): ${error.message}`;
        }
        throw error;
      }
      if (prepared.snapshot && scan.snapshot === undefined && scan.asOf === undefined) {
        pinned.set(step.name, { ...step, system: { ...scan, snapshot: prepared.snapshot.snapshotId } });
      }
    }
    return pinTableHeads({ ...plan, steps: plan.steps.map((s) => pinned.get(s.name) ?? s) }, store);
  } finally {
    await store.close();
  }
}

/**
 * Pins each stage step that replaces a table to the table's current snapshot on the run's branch
 * and the cache key of the commit that wrote it (stage `current`), so the orchestrator can tell
 * whether the run would write what the table holds already. A table with no snapshot, or whose
 * snapshot has no key (written by hand, merged, appended), gets no pin: the run writes it.
 */
export async function pinTableHeads(plan: Plan, store: TableStore): Promise<Plan> {
  const steps: PlanStep[] = [];
  for (const step of withoutTableHeads(plan).steps) {
    if (!isCacheableStage(step)) {
      steps.push(step);
      continue;
    }
    const snapshot = await currentSnapshot(atRef(store, step.system.branch ?? MAIN_BRANCH), step.system.table);
    steps.push(snapshot?.cacheKey ? { ...step, system: { ...step.system, current: { snapshotId: snapshot.snapshotId, cacheKey: snapshot.cacheKey } } } : step);
  }
  return { ...plan, steps };
}

/** The plan without the pins of {@link pinTableHeads}: what storage held then says nothing about now. */
export function withoutTableHeads(plan: Plan): Plan {
  if (!plan.steps.some((s) => s.system?.kind === 'stage' && s.system.current)) return plan;
  return {
    ...plan,
    steps: plan.steps.map((step) => {
      if (step.system?.kind !== 'stage' || !step.system.current) return step;
      const { current: _dropped, ...system } = step.system;
      return { ...step, system };
    }),
  };
}

/** Only a table replaced outside a transaction can be left as it is (orchestrator `unchangedTables`). */
function isCacheableStage(step: PlanStep): step is StageStep {
  return step.system?.kind === 'stage' && step.system.mode === 'replace' && !step.system.transaction;
}
