import { readdirSync, readFileSync } from 'node:fs';
import { readRunRecord, type Logger, type RunRecord, type Topology } from '../schemas/index.ts';
import { type RegionBroker, listSegments, releaseRegionIds, releaseSegments, removeSegments } from '../shm/index.ts';
import { cachedSegmentIds, removeOrphanedEntries } from './output-cache.ts';
import { NO_RUN, STEP_PROCESS_MARKER } from './protocol.ts';

export interface GcOptions {
  topology: Pick<Topology, 'runs' | 'clusterId'> & Partial<Pick<Topology, 'cache' | 'hosts'>>;
  /** This host: cached outputs of its executors that died are dropped too (needs topology.cache and .hosts). */
  hostId?: string;
  shmDir: string;
  logger: Logger;
  /** The executor's region broker (quiver module loaded): regions of dead runs are dropped too. */
  regions?: RegionBroker | null;
}

/**
 * Removes what dead runs left on this host: segments of runs that ended (except outputs still
 * waiting to be read, or kept), or that no orchestrator knows; and step processes of such runs.
 * Segment ids start with the run id, and step processes carry `quiver-step <cluster> <run>`.
 */
export async function collectGarbage(options: GcOptions): Promise<{ segments: number; processes: number }> {
  const records = new Map<string, RunRecord | null | 'unreadable'>();
  const recordOf = async (runId: string): Promise<RunRecord | null | 'unreadable'> => {
    if (!records.has(runId)) {
      const record = await readRunRecord(options.topology.runs, runId).catch((error: unknown) => {
        options.logger.warn(`${(error as Error).message}; gc leaves that run's segments alone`);
        return 'unreadable' as const;
      });
      records.set(runId, record);
    }
    return records.get(runId)!;
  };
  const going = (record: RunRecord | null | 'unreadable') => record === 'unreadable' || record?.state === 'running' || record?.state === 'queued';

  const doomed: string[] = [];
  if (options.hostId && options.topology.cache && options.topology.hosts) {
    const liveExecutors = new Set<string>();
    for await (const key of await options.topology.hosts.keys()) liveExecutors.add(key);
    const orphans = await removeOrphanedEntries({ kv: options.topology.cache, shmDir: options.shmDir, hostId: options.hostId, liveExecutors, logger: options.logger });
    // Unlinked, not pooled: a step may still map one, and pooled files are rewritten.
    removeSegments(orphans, { dir: options.shmDir });
    if (options.regions) releaseRegionIds(orphans, { dir: options.shmDir });
  }
  // The output cache owns these, whatever became of the runs that made them.
  const cached = new Set(cachedSegmentIds(options.shmDir));
  // Region ids are segment ids too (files and regions of one output never mix).
  const ids = [...listSegments(options.shmDir).map((s) => s.id), ...(options.regions?.names() ?? [])];
  for (const id of ids) {
    if (cached.has(id)) continue;
    const record = await recordOf(id.split('.')[0]!);
    if (record === 'unreadable' || going(record)) continue;
    // A run no orchestrator knows keeps nothing; an ended one keeps outputs not yet read, or kept.
    const view = record?.view;
    const keptOutput = !!record && (record.submit.keep || !record.outputsReleased) && !!view?.steps.some((s) => view.outputs.includes(s.name) && s.output?.segments.some((x) => x.id === id));
    if (!keptOutput) doomed.push(id);
  }
  if (doomed.length > 0) {
    releaseSegments(doomed, { dir: options.shmDir });
    if (options.regions) releaseRegionIds(doomed, { dir: options.shmDir });
    options.logger.info(`gc: released ${doomed.length} segment(s) of finished or unknown runs`);
  }

  let processes = 0;
  for (const { pid, runId, step } of stepProcesses(options.topology.clusterId)) {
    if (going(await recordOf(runId))) continue;
    // A worker may have finished that step and taken another (of a live run) while we looked.
    const now = stepOfProcess(pid, options.topology.clusterId);
    if (now?.runId !== runId || now.step !== step) continue;
    if (killGroupOrProcess(pid)) processes++;
  }
  if (processes > 0) options.logger.info(`gc: killed ${processes} step process(es) of finished or unknown runs`);
  return { segments: doomed.length, processes };
}

/** Kills `pid`'s process group (a step process leads its own: whatever it started dies too), else `pid` alone. False when it is gone. */
function killGroupOrProcess(pid: number): boolean {
  try {
    process.kill(-pid, 'SIGKILL');
    return true;
  } catch {
    // Not a group leader (started by something else than an executor), or gone.
  }
  try {
    process.kill(pid, 'SIGKILL');
    return true;
  } catch {
    return false;
  }
}

/**
 * Step processes of this cluster on this host running a step now, found by their command line.
 * Spares (no step yet) and idle workers (between steps) belong to a live executor and die with it.
 */
export function stepProcesses(clusterId: string): { pid: number; runId: string; step: string }[] {
  const found: { pid: number; runId: string; step: string }[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const running = stepOfProcess(Number(entry), clusterId);
    if (running) found.push({ pid: Number(entry), ...running });
  }
  return found;
}

/** The step process `pid` of this cluster runs now, or null (not one, or no step now). */
function stepOfProcess(pid: number, clusterId: string): { runId: string; step: string } | null {
  let argv: string[];
  try {
    // A step process rewrites its title (spaces) once it has a job; until then its argv has placeholders.
    argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split(/[\0 ]+/);
  } catch {
    return null; // gone, or not ours to read
  }
  const at = argv.indexOf(STEP_PROCESS_MARKER);
  if (at < 0 || argv[at + 1] !== clusterId) return null;
  const runId = argv[at + 2] ?? '';
  // Placeholders (a spare) or NO_RUN (an idle worker).
  if (runId === NO_RUN || /^-+$/.test(runId)) return null;
  return { runId, step: argv[at + 3] ?? '' };
}
