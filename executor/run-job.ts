/**
 * One step inside a step process, the same for a one-step process and a worker: map the inputs
 * zero-copy, call the step function with a fresh `ctx`, write the output, unmap the inputs.
 */
import { Table } from 'apache-arrow';
import { type BorrowableInput, isViewOf, readInput, unmapSegments, writeOutput } from '../shm/index.ts';
import { importCode } from './code-import.ts';
import type { RunnerJob, RunnerReply, ScanReport } from './protocol.ts';

export interface JobHooks {
  /** Called right before the step function, after the pipeline code was imported and the inputs mapped. */
  beforeCall?: () => void;
}

type StepFunction = (inputs: unknown, ctx: unknown) => unknown;

/** Runs `job` to its reply. Never throws: whatever the step throws becomes an error reply. */
export async function runJob(job: RunnerJob, hooks: JobHooks = {}): Promise<RunnerReply> {
  const mappings: ArrayBuffer[] = [];
  /** Set just before the step function is called: a failure after it says when user code began. */
  let codeStartedAt: number | undefined;
  try {
    // Imported once per process: a worker's later steps find the module (and its globals) in the cache.
    const mod = (await importCode(job.codePath)) as { default?: { steps?: Record<string, { fn?: unknown }> } };
    const fn = mod.default?.steps?.[job.system?.entry ?? job.step]?.fn;
    if (typeof fn !== 'function') {
      return { type: 'error', error: { name: 'StepNotFound', code: 'ERR_STEP_NOT_FOUND', message: `the pipeline code has no step "${job.step}"` } };
    }

    const inputs: Record<string, Table> = {};
    // With regions, output columns passed through unchanged from these are referenced, not rewritten.
    const borrowable: BorrowableInput[] = [];
    let inputCopiedBytes = 0;
    for (const input of job.inputs) {
      const opened = readInput(input.descriptor.segments, { dir: job.shmDir });
      mappings.push(...opened.mappings);
      const have = opened.table.schema.fields.map((f) => f.name);
      const missing = (input.columns ?? []).filter((c) => !have.includes(c));
      if (missing.length > 0) {
        return {
          type: 'error',
          error: {
            name: 'UnknownColumnError',
            code: 'ERR_UNKNOWN_COLUMN',
            message: `input "${input.param}" of step "${job.step}" asks for column(s) ${missing.join(', ')}, which its parent did not produce; its columns are: ${have.join(', ')}`,
          },
        };
      }
      // A projection picks columns; their buffers stay where they are.
      const table = input.columns ? opened.table.select(input.columns) : opened.table;
      // Counted, not assumed: an input that is not a view of the mapping was copied somewhere.
      if (!isViewOf(table, opened.mappings)) inputCopiedBytes += input.descriptor.byteSize;
      inputs[input.param] = table;
      borrowable.push({ table, segments: input.descriptor.segments });
    }

    /** What a system step reports besides its table. */
    let scan: ScanReport | undefined;
    const context = {
      ...(job.system ? { system: job.system.payload, reportScan: (report: ScanReport) => void (scan = report) } : {}),
      runId: job.runId,
      step: job.step,
      params: Object.freeze({ ...job.params }),
      event: job.event ? Object.freeze({ ...job.event }) : null,
      log: (...args: unknown[]) => console.log(...args),
      isZeroCopy: (table: Table) => isViewOf(table, mappings),
    };
    hooks.beforeCall?.();
    // The wall clock now, as every other stamp of the step (startedAt, at): timeOrigin + now() is
    // the wall clock at the process's start plus a monotonic offset, and a worker lives long
    // enough for the two to drift apart (seconds a day on a VM whose wall clock is stepped).
    codeStartedAt = Date.now();
    const result: unknown = await (fn as StepFunction)(Object.freeze(inputs), context);
    if (!(result instanceof Table)) {
      return {
        type: 'error',
        error: {
          name: 'StepResultError',
          code: 'ERR_STEP_RESULT',
          message: `step "${job.step}" returned ${describeValue(result)}; a step must return an Arrow Table (apache-arrow's Table, e.g. from tableFromArrays)`,
        },
        codeStartedAt,
      };
    }
    // Regions when the executor has a broker (the quiver module is loaded), else files: one copy.
    const written = writeOutput(result, {
      dir: job.shmDir,
      idPrefix: job.outputIdPrefix,
      ...(job.regionBroker ? { broker: job.regionBroker, inputs: borrowable } : {}),
      ...(job.maxSegmentBytes ? { maxSegmentBytes: job.maxSegmentBytes } : {}),
      ...(job.poolMaxBytes !== undefined ? { poolMaxBytes: job.poolMaxBytes } : {}),
    });
    return {
      type: 'result',
      segments: written.segments,
      byteSize: written.byteSize,
      rows: written.rows,
      schema: result.schema.fields.map((f) => ({ name: f.name, type: String(f.type), nullable: f.nullable })),
      inputCopiedBytes,
      outputCopiedBytes: written.copiedBytes,
      codeStartedAt,
      ...(scan ? { scan } : {}),
    };
  } catch (error) {
    return { ...serializeError(error), ...(codeStartedAt !== undefined ? { codeStartedAt } : {}) };
  } finally {
    // A worker lives on: its inputs' mappings go now, not when the process ends. Tables over them
    // that the step kept read as empty afterwards, never as another step's data.
    unmapSegments(mappings);
  }
}

export function serializeError(error: unknown): RunnerReply & { type: 'error' } {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return {
      type: 'error',
      error: {
        name: error.name,
        message: error.message,
        ...(error.stack ? { stack: error.stack } : {}),
        ...(typeof code === 'string' ? { code } : {}),
      },
    };
  }
  return { type: 'error', error: { name: 'NonErrorThrown', message: `the step threw a non-Error value: ${describeValue(error)}` } };
}

function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  if (typeof value === 'object') return `an object (${value.constructor?.name ?? 'Object'}) with keys [${Object.keys(value).slice(0, 5).join(', ')}]`;
  if (typeof value === 'function') return 'a function';
  return `${typeof value} ${String(value).slice(0, 80)}`;
}
