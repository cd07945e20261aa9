import type { FieldSummary, RunEventPayload, StepError, TableDescriptor } from '../schemas/index.ts';

/** The marker in a step process's command line: `quiver-step <clusterId> <runId> <step>`. gc looks for it. */
export const STEP_PROCESS_MARKER = 'quiver-step';

/**
 * The run id a step process shows while it has no step: a spare that has run nothing yet, or an
 * idle worker between steps. Both belong to a live executor and die with it, so gc leaves them.
 */
export const NO_RUN = '-';

/**
 * Placeholders for a step process's command line: the title it writes later (its run and step)
 * can be no longer than the command line it started with.
 */
export function stepProcessArgs(clusterId: string): string[] {
  return [STEP_PROCESS_MARKER, clusterId, '-'.repeat(26), '-'.repeat(64)];
}

/** The title of a step process running `step` of `runId`, of one with no step now, or of a step zygote (step-zygote.ts). */
export function stepProcessTitle(clusterId: string, job: { runId: string; step: string } | null | 'zygote'): string {
  if (job === 'zygote') return `${STEP_PROCESS_MARKER} ${clusterId} ${NO_RUN} zygote`;
  return job ? `${STEP_PROCESS_MARKER} ${clusterId} ${job.runId} ${job.step}` : `${STEP_PROCESS_MARKER} ${clusterId} ${NO_RUN} idle`;
}

/** What the executor sends a step process for one step: everything it needs, no data. */
export interface RunnerJob {
  codePath: string;
  runId: string;
  step: string;
  params: Record<string, string>;
  event: RunEventPayload | null;
  inputs: { param: string; columns?: string[]; descriptor: TableDescriptor }[];
  shmDir: string;
  outputIdPrefix: string;
  /** Unix socket of the executor's region broker, set when the quiver module (kmod/) is loaded: outputs then go to regions. */
  regionBroker?: string;
  maxSegmentBytes?: number;
  poolMaxBytes?: number;
  /**
   * The secrets the step declared (`env` option), with their values from the executor's
   * environment: in `process.env` while the step function runs, removed when it returns.
   * Travels on the IPC channel only, never in a command line or the process's environment.
   */
  env?: Record<string, string>;
  /**
   * Set for a system step (a scan or a stage, see system-steps.ts): the export of the code's
   * `steps` to call instead of `step`, and what it is to do, given to it as `ctx.system`.
   */
  system?: { entry: string; payload: unknown };
}

/** A branch or tag pointer as the catalog reads it (storage's RefHead): the commit it names and the token a swap hands back. */
export interface CatalogPointer {
  commit: string | null;
  token: number;
}

/**
 * What a system step process asks its executor when the store's catalog is on NATS (S3 without
 * conditional writes), which a step process never reaches: pointer reads and compare-and-swaps,
 * and the pre-branch table heads. Every object (data files, manifests, metadata, catalog
 * commits) the process reads and writes itself. The executor checks each call against the
 * branches the step may move (system-steps.ts).
 */
export type CatalogCall =
  | { op: 'readRef'; kind: 'branch' | 'tag'; name: string }
  | { op: 'swapRef'; kind: 'branch' | 'tag'; name: string; expected: CatalogPointer; commit: string | null }
  | { op: 'listRefs'; kind: 'branch' | 'tag' }
  | { op: 'tableHead'; table: string }
  | { op: 'listTables' };

/** The executor's side of {@link CatalogCall}: the answer, or a throw the process sees as its error. */
export type CatalogHandler = (call: CatalogCall) => Promise<unknown>;

/** What a scan read, reported with its output (a scan's facts in its completion). */
export interface ScanReport {
  table: string;
  snapshotId: string | null;
  bytesFetched: number;
  rowGroupsRead: number;
  rowGroupsSkipped: number;
  cachedChunks: number;
}

/** What a step process answers for one step. */
export type RunnerReply =
  | {
      type: 'result';
      segments: TableDescriptor['segments'];
      byteSize: number;
      rows: number;
      schema: FieldSummary[];
      inputCopiedBytes: number;
      outputCopiedBytes: number;
      /** When the step function was called (epoch ms, Date.now()). */
      codeStartedAt?: number;
      /** A scan's facts (system steps only). */
      scan?: ScanReport;
    }
  | { type: 'error'; error: StepError; codeStartedAt?: number };

/** Executor → step process. */
export type RunnerRequest =
  | {
      type: 'job';
      job: RunnerJob;
      /**
       * Written as the last line on stdout and on stderr once the step is done, so the executor
       * knows every line the step printed has arrived. Random per job: a step cannot forge it.
       */
      endMarker: string;
      /** A worker stays for the next step of its pipeline version; otherwise the process exits after this one. */
      keepAlive: boolean;
    }
  /** A worker answers from its event loop: no answer for a while means it hangs. */
  | { type: 'ping'; seq: number }
  /**
   * To a booted spare: import this pipeline version's code now, so a step of it finds the module
   * compiled. A failing import is left for the step to report.
   */
  | { type: 'preload'; codePath: string }
  /**
   * To a step zygote (executor/step-zygote.ts): fork a step process that connects its stdout,
   * stderr and IPC channel to `socketPath`, each saying `quiver-fork <token> <forkId> <stream>`
   * first, under RLIMIT_AS `addressSpaceBytes` (0: none). Answered with 'forked' or 'fork-failed'.
   */
  | { type: 'fork'; forkId: number; socketPath: string; token: string; addressSpaceBytes: number }
  /**
   * To a step zygote before its first fork: run the warm-up steps of `codePath` (build-runner.ts
   * WARM_UP_STEPS) with their tables in `shmDir`, so forked processes find that code compiled.
   */
  | { type: 'warm-up'; codePath: string; shmDir: string; idPrefix: string }
  /** The answer to a system step's {@link CatalogCall}. */
  | { type: 'catalog-reply'; id: number; ok: true; result: unknown }
  | { type: 'catalog-reply'; id: number; ok: false; error: StepError };

/** Step process → executor. */
export type RunnerMessage =
  | {
      type: 'reply';
      reply: RunnerReply;
      /** The process's peak resident set size so far, after the step. */
      rssBytes: number;
      /**
       * The streams the step printed to (through process.stdout / process.stderr), which carry
       * the job's end marker after its last line. A stream it did not print to gets no marker,
       * saving the write and the executor's wake-up for it.
       */
      markedStreams: ('stdout' | 'stderr')[];
    }
  | { type: 'pong'; seq: number }
  /** A worker's uncaught exception or unhandled rejection: it exits right after sending this. */
  | { type: 'fatal'; error: StepError }
  /** A system step's call on the catalog its executor holds (answered with 'catalog-reply'). */
  | { type: 'catalog'; id: number; call: CatalogCall }
  /** A step zygote forked the process asked for. */
  | { type: 'forked'; forkId: number; pid: number }
  | { type: 'fork-failed'; forkId: number; message: string }
  /** A process a step zygote forked ended (the zygote reaps it). */
  | { type: 'exited'; pid: number; code: number | null; signal: NodeJS.Signals | null };

/** The connections of a forked step process (see RunnerRequest 'fork'). */
export type ForkStream = 'stdout' | 'stderr' | 'ipc';

/** What each connection of a forked step process says first. */
export function forkHello(token: string, forkId: number, stream: ForkStream): string {
  return `quiver-fork ${token} ${forkId} ${stream}`;
}

/** A {@link forkHello} line read back, or null when it is not one. */
export function parseForkHello(line: string): { token: string; forkId: number; stream: ForkStream } | null {
  const [magic, token, forkId, stream] = line.split(' ');
  if (magic !== 'quiver-fork' || !token || !/^\d+$/.test(forkId ?? '') || (stream !== 'stdout' && stream !== 'stderr' && stream !== 'ipc')) return null;
  return { token, forkId: Number(forkId), stream };
}
