import type { NatsConnection } from '@nats-io/transport-node';
import type { Plan, PlanStep, SystemStep } from '../schemas/index.ts';
import { atRef, prepareScan, StorageError, tableStoreFromEnv } from '../storage/index.ts';

/**
 * Checks every stored-table input of a plan against its table before the run is submitted: the
 * table exists, the columns and the filter fit its schema. Each scan is pinned to the snapshot
 * current now (unless it asked for one), so retries and slow steps read the same data.
 * Throws the storage error (TableNotFoundError, UnknownColumnError, ...) naming the input.
 */
export async function prepareSources(plan: Plan, nc: NatsConnection): Promise<Plan> {
  const scans = plan.steps.filter((s): s is PlanStep & { system: SystemStep & { kind: 'scan' } } => s.system?.kind === 'scan');
  if (scans.length === 0) return plan;
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
    return { ...plan, steps: plan.steps.map((s) => pinned.get(s.name) ?? s) };
  } finally {
    await store.close();
  }
}
