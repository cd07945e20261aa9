/**
 * How a step process imports pipeline code. A process started from the step-process snapshot
 * (build-runner.ts) has no loader for `import()` in code that was part of the snapshot, so it
 * imports through a script that uses the main context's loader instead; Arrow is the snapshot's
 * copy, which linked pipeline code reaches through the shim module build-runner.ts writes.
 */
import { pathToFileURL } from 'node:url';
import vm from 'node:vm';

/** Set by the snapshot's entry (step-snapshot.ts), so it holds in every process started from it. */
export const IN_STEP_SNAPSHOT = Symbol.for('quiver.stepSnapshot');
/** The snapshot's apache-arrow module, for the shim linked pipeline code imports. */
export const SNAPSHOT_ARROW = Symbol.for('quiver.stepSnapshot.arrow');

type SnapshotGlobals = { [IN_STEP_SNAPSHOT]?: true };

/** Each module once per process: a worker's later steps take it from here, with its globals. */
const imported = new Map<string, Promise<unknown>>();

export function importCode(path: string): Promise<unknown> {
  let module = imported.get(path);
  if (!module) {
    module = load(path);
    imported.set(path, module);
    // A failed import is tried again by the next step, as import() itself would.
    module.catch(() => imported.delete(path));
  }
  return module;
}

function load(path: string): Promise<unknown> {
  if (!(globalThis as SnapshotGlobals)[IN_STEP_SNAPSHOT]) return import(path);
  // Node 20 calls the loader experimental and says so on stderr, which is the step's log: kept quiet.
  const emitWarning = process.emitWarning;
  process.emitWarning = ((warning: string | Error, ...rest: unknown[]) => {
    if (!String(typeof warning === 'string' ? warning : warning.message).includes('USE_MAIN_CONTEXT_DEFAULT_LOADER')) {
      (emitWarning as (...args: unknown[]) => void).call(process, warning, ...rest);
    }
  }) as typeof process.emitWarning;
  try {
    const script = new vm.Script(`import(${JSON.stringify(pathToFileURL(path).href)})`, {
      importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
    });
    return script.runInThisContext() as Promise<unknown>;
  } finally {
    process.emitWarning = emitWarning;
  }
}
