/**
 * The entry point of a step process: one step, then exit. Bundled by the executor (esbuild) so a
 * step starts with plain `node`, no TypeScript loader on the hot path.
 */
import { Table } from 'apache-arrow';
import { type BorrowableInput, isViewOf, parentPid, readInput, setParentDeathSignal, writeOutput } from '../shm/index.ts';
import { STEP_PROCESS_MARKER, type RunnerJob, type RunnerReply } from './protocol.ts';

const expectedParent = Number(process.env.QUIVER_EXECUTOR_PID);
// Die with the executor, even when it is SIGKILLed: no orphaned step keeps running.
setParentDeathSignal('SIGKILL');
if (expectedParent && parentPid() !== expectedParent) process.exit(70);

function reply(message: RunnerReply): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send) return resolve();
    process.send(message, undefined, {}, () => resolve());
  });
}

function serializeError(error: unknown): RunnerReply & { type: 'error' } {
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

/** Set just before the step function is called: a failure after it says when user code began. */
let codeStartedAt: number | undefined;

async function runJob(job: RunnerJob): Promise<RunnerReply> {
  const mod = (await import(job.codePath)) as { default?: { steps?: Record<string, { fn?: unknown }> } };
  const fn = mod.default?.steps?.[job.step]?.fn;
  if (typeof fn !== 'function') {
    return { type: 'error', error: { name: 'StepNotFound', code: 'ERR_STEP_NOT_FOUND', message: `the pipeline code has no step "${job.step}"` } };
  }

  const mappings: ArrayBuffer[] = [];
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

  const context = {
    runId: job.runId,
    step: job.step,
    params: Object.freeze({ ...job.params }),
    event: job.event ? Object.freeze({ ...job.event }) : null,
    log: (...args: unknown[]) => console.log(...args),
    isZeroCopy: (table: Table) => isViewOf(table, mappings),
  };
  codeStartedAt = performance.timeOrigin + performance.now();
  const result: unknown = await (fn as (i: unknown, c: unknown) => unknown)(Object.freeze(inputs), context);
  if (!(result instanceof Table)) {
    return {
      type: 'error',
      error: {
        name: 'StepResultError',
        code: 'ERR_STEP_RESULT',
        message: `step "${job.step}" returned ${describeValue(result)}; a step must return an Arrow Table (apache-arrow's Table, e.g. from tableFromArrays)`,
      },
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
  };
}

process.once('message', (job: RunnerJob) => {
  // gc finds step processes of dead runs by this title (`quiver-step <cluster> <run> <step>`).
  const cluster = process.argv[process.argv.indexOf(STEP_PROCESS_MARKER) + 1];
  process.title = `${STEP_PROCESS_MARKER} ${cluster} ${job.runId} ${job.step}`;
  runJob(job)
    .catch((error: unknown) => ({ ...serializeError(error), ...(codeStartedAt !== undefined ? { codeStartedAt } : {}) }))
    .then(reply)
    .then(() => process.exit(0), () => process.exit(1));
});
process.on('disconnect', () => process.exit(71));
