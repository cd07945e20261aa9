import type { FieldSummary, RunEventPayload, StepError, TableDescriptor } from '../schemas/index.ts';

/** The marker in a step process's command line: `quiver-step <clusterId> <runId> <step>`. gc looks for it. */
export const STEP_PROCESS_MARKER = 'quiver-step';

/** What the executor sends a fresh step process: everything it needs, no data. */
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
}

/** What a step process answers once, before it exits. */
export type RunnerReply =
  | {
      type: 'result';
      segments: TableDescriptor['segments'];
      byteSize: number;
      rows: number;
      schema: FieldSummary[];
      inputCopiedBytes: number;
      outputCopiedBytes: number;
      /** When the step function was called (epoch ms, sub-millisecond). */
      codeStartedAt?: number;
    }
  | { type: 'error'; error: StepError; codeStartedAt?: number };
