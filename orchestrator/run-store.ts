/**
 * The run store: the only writer of run records (`quiver-runs`), and the one place that reads a
 * run back whole. A record is written when the run is admitted, when it leaves its queue, and
 * once when it ends (with its final view); in between, each step's progress is the executor's
 * own small record in `quiver-steps`, so no transition rewrites the run.
 */
import {
  buckets,
  encode,
  readClaim,
  readRunRecord,
  readStepCompletion,
  runRecord,
  type ClaimRecord,
  type Logger,
  type Plan,
  type RunRecord,
  type RunView,
  type StepCompletion,
  type Topology,
} from '../schemas/index.ts';
import { replayRun, type RunFacts } from './run-machine.ts';
import { machineView, unstartedView } from './views.ts';

export class RunStore {
  constructor(
    private readonly topology: Pick<Topology, 'runs' | 'steps' | 'claims' | 'keys'>,
    private readonly logger: Logger,
  ) {}

  /**
   * Records a newly admitted run. False when a run of that id exists already: a submission may
   * come twice (a redelivered event, a tick fired by two leaders), and only the first one counts.
   */
  async create(record: RunRecord): Promise<boolean> {
    try {
      await this.topology.runs.create(record.submit.runId, encode(runRecord, record));
      return true;
    } catch (error) {
      const stored = await this.read(record.submit.runId).catch(() => null);
      if (!stored) throw error;
      // A create whose answer was lost (NATS restarting) may have stored this very record.
      return stored.sequence === record.sequence && stored.submit.submittedAt === record.submit.submittedAt;
    }
  }

  async put(record: RunRecord): Promise<void> {
    await this.topology.runs.put(record.submit.runId, encode(runRecord, record));
  }

  read(runId: string): Promise<RunRecord | null> {
    return readRunRecord(this.topology.runs, runId);
  }

  /** Runs still going or waiting, for a new leader to take up; malformed records are reported and left alone. */
  async unfinished(): Promise<RunRecord[]> {
    const keys = await this.topology.keys(buckets.runs);
    const records: RunRecord[] = [];
    for (const key of keys) {
      try {
        const record = await this.read(key);
        if (record && (record.state === 'running' || record.state === 'queued')) records.push(record);
      } catch (error) {
        this.logger.warn(`${(error as Error).message}; leaving that run alone`);
      }
    }
    return records;
  }

  /** What executors have recorded of a run's steps. */
  facts(plan: Plan, runId: string): Promise<RunFacts> {
    return readFacts(this.topology, plan, runId, this.logger);
  }
}

async function readFacts(topology: Pick<Topology, 'steps' | 'claims'>, plan: Plan, runId: string, logger?: Logger): Promise<RunFacts> {
  const completions = new Map<string, StepCompletion>();
  const claims = new Map<string, ClaimRecord>();
  const warn = (error: unknown) => {
    logger?.warn(`${(error as Error).message}; ignoring that record`);
    return null;
  };
  await Promise.all(
    plan.steps.map(async (s) => {
      const [completion, claim] = await Promise.all([
        readStepCompletion(topology.steps, runId, s.name).catch(warn),
        readClaim(topology.claims, runId, s.name).catch(warn),
      ]);
      if (completion) completions.set(s.name, completion);
      if (claim) claims.set(s.name, claim);
    }),
  );
  return { completions, claims };
}

/**
 * A run as clients see it, or null for an unknown run: a finished run's kept view, else its
 * record with its steps' facts replayed through the run machine.
 */
export async function readRunView(topology: Pick<Topology, 'runs' | 'steps' | 'claims'>, runId: string): Promise<RunView | null> {
  const record = await readRunRecord(topology.runs, runId);
  if (!record) return null;
  if (record.view) return { ...record.view, outputsReleased: record.outputsReleased };
  if (record.state !== 'running') return unstartedView(record);
  const actor = replayRun(record.submit.plan, runId, await readFacts(topology, record.submit.plan, runId));
  const view = machineView(record, actor.getSnapshot());
  actor.stop();
  // Every step may have finished while the orchestrator has not yet said so: still running.
  return { ...view, state: 'running' };
}
