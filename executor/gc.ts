import { readdirSync, readFileSync } from 'node:fs';
import type { Logger, RunView, Topology } from '../schemas/index.ts';
import { type RegionBroker, listSegments, releaseRegionIds, releaseSegments } from '../shm/index.ts';
import { STEP_PROCESS_MARKER } from './protocol.ts';

export interface GcOptions {
  topology: Pick<Topology, 'runs' | 'clusterId'>;
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
  const views = new Map<string, RunView | null>();
  const viewOf = async (runId: string): Promise<RunView | null> => {
    if (!views.has(runId)) {
      const entry = await options.topology.runs.get(runId);
      views.set(runId, entry?.string() ? (entry.json<{ view: RunView }>().view ?? null) : null);
    }
    return views.get(runId)!;
  };

  const doomed: string[] = [];
  // Region ids are segment ids too (files and regions of one output never mix).
  const ids = [...listSegments(options.shmDir).map((s) => s.id), ...(options.regions?.names() ?? [])];
  for (const id of ids) {
    const runId = id.split('.')[0]!;
    const view = await viewOf(runId);
    if (!view) {
      doomed.push(id);
      continue;
    }
    if (view.state === 'running') continue;
    const keptOutput = view.steps.some(
      (s) => view.outputs.includes(s.name) && s.output?.segments.some((x) => x.id === id) && (view.keep || !view.outputsReleased),
    );
    if (!keptOutput) doomed.push(id);
  }
  if (doomed.length > 0) {
    releaseSegments(doomed, { dir: options.shmDir });
    if (options.regions) releaseRegionIds(doomed, { dir: options.shmDir });
    options.logger.info(`gc: released ${doomed.length} segment(s) of finished or unknown runs`);
  }

  let processes = 0;
  for (const { pid, runId } of stepProcesses(options.topology.clusterId)) {
    const view = await viewOf(runId);
    if (view?.state === 'running') continue;
    try {
      process.kill(pid, 'SIGKILL');
      processes++;
    } catch {
      // Already gone.
    }
  }
  if (processes > 0) options.logger.info(`gc: killed ${processes} step process(es) of finished or unknown runs`);
  return { segments: doomed.length, processes };
}

/** Step processes of this cluster on this host, found by their command line. */
export function stepProcesses(clusterId: string): { pid: number; runId: string; step: string }[] {
  const found: { pid: number; runId: string; step: string }[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let argv: string[];
    try {
      // A step process rewrites its title (spaces) once it has a job; until then its argv has placeholders.
      argv = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split(/[\0 ]+/);
    } catch {
      continue;
    }
    const at = argv.indexOf(STEP_PROCESS_MARKER);
    if (at < 0 || argv[at + 1] !== clusterId) continue;
    const runId = argv[at + 2] ?? '';
    // A spare (no job yet) belongs to a live executor and dies with it.
    if (/^-+$/.test(runId)) continue;
    found.push({ pid: Number(entry), runId, step: argv[at + 3] ?? '' });
  }
  return found;
}
