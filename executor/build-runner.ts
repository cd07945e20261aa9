import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import vm from 'node:vm';
import { build, type Plugin } from 'esbuild';

const RUNNER_SOURCE = fileURLToPath(new URL('./runner.ts', import.meta.url));
const SNAPSHOT_SOURCE = fileURLToPath(new URL('./step-snapshot.ts', import.meta.url));
const SYSTEM_STEPS_SOURCE = fileURLToPath(new URL('./system-steps.ts', import.meta.url));
const BUILTINS = new Set(builtinModules);
const ARROW_ENTRY = fileURLToPath(import.meta.resolve('apache-arrow'));

/**
 * Modules that find files beside themselves (the shm addon) keep their own location once bundled:
 * their `import.meta.url` is pinned to where their source is.
 */
const pinImportMetaUrlIn = (filter: RegExp): Plugin => ({
  name: 'quiver-pin-import-meta-url',
  setup(b) {
    b.onLoad({ filter }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      return { contents: source.replaceAll('import.meta.url', JSON.stringify(pathToFileURL(args.path).href)), loader: 'ts' };
    });
  },
});
const pinImportMetaUrl = pinImportMetaUrlIn(/[\\/]shm[\\/][^\\/]+\.ts$/);

/**
 * Packages stay where they are installed, imported by their resolved file URL: the system-step
 * bundle holds Quiver's own code only, and loads the AWS SDK and the rest from node_modules.
 */
const packagesInPlace: Plugin = {
  name: 'quiver-packages-in-place',
  setup(b) {
    b.onResolve({ filter: /^[^./]/ }, (args) => {
      if (args.path.startsWith('node:') || BUILTINS.has(args.path)) return { path: args.path, external: true };
      return { path: import.meta.resolve(args.path), external: true };
    });
  },
};

/** Options for {@link buildRunner}. */
export interface BuildRunnerOptions {
  /**
   * Start step processes from a V8 startup snapshot holding node, apache-arrow and the runner
   * (`node --build-snapshot`), instead of compiling and running them at every start.
   * @default true unless QUIVER_STEP_SNAPSHOT=0; false on a node that cannot
   */
  snapshot?: boolean;
  /**
   * The V8 heap limit (`--max-old-space-size`) the snapshot is built with: a snapshot only starts
   * a node with the same one, so steps with another limit start without it. @default 1024
   */
  snapshotHeapMb?: number;
}

/** A step-process startup snapshot: started with `--snapshot-blob blobPath` and exactly `--max-old-space-size=heapMb`. */
export interface StepSnapshot {
  blobPath: string;
  heapMb: number;
}

/** The step runner, ready to fork, and how to link pipeline code against its copy of Arrow. */
export interface RunnerBuild {
  /** The script step processes run: from {@link snapshot} when their heap limit is its own, else on its own. */
  runnerPath: string;
  /** The startup snapshot of step processes, when there is one. */
  snapshot: StepSnapshot | null;
  /** Why there is no snapshot although one was wanted (its build failed), for the executor's log. */
  snapshotFailure: string | null;
  /**
   * Quiver's system steps (scans, stages; system-steps.ts) as code a step process imports like a
   * pipeline's: they run in step processes, not in the executor.
   */
  systemCodePath: string;
  /** Linked code of the steps a step zygote warms up with (WARM_UP_STEPS). */
  warmUpCodePath: string;
  /** Names what {@link linkCode} links against: a linked bundle is valid for this key only. */
  linkKey: string;
  /**
   * Rewrites a pipeline bundle's `apache-arrow` imports to the runner's own copy, so both share
   * one module (`instanceof Table` holds) and the step process loads Arrow once. Imports of
   * `packages` (the pipeline's declared ones, and their subpaths) stay as they are: Node resolves
   * them from the environment the linked file is written into.
   */
  linkCode(code: Uint8Array, outfile: string, packages?: readonly string[]): Promise<Uint8Array>;
}

/**
 * Builds the step process's code so it starts with `node` alone: the startup snapshot of the
 * runner and apache-arrow (see buildSnapshot), or without one, plain ESM: apache-arrow as one
 * file (its ~160 modules cost ~80 ms more to load one by one) and the runner importing it.
 * Files are named by their hash, so concurrent executors write the same files and never see a
 * half-written one.
 */
export async function buildRunner(outDir: string, options: BuildRunnerOptions = {}): Promise<RunnerBuild> {
  const snapshot = resolveSnapshotOption(options);
  let snapshotFailure: string | null = null;
  // Without a snapshot step processes only start slower: a failed build must not stop the executor.
  const started = snapshot
    ? await buildSnapshot(outDir, options.snapshotHeapMb ?? 1024).catch((error: unknown) => {
        snapshotFailure = (error as Error).message;
        return null;
      })
    : null;
  // From the snapshot, pipeline code shares its Arrow through a shim; without it, through Arrow's own file.
  const arrowUrl = pathToFileURL(started ? started.shimPath : await buildArrowFile(outDir)).href;
  const toArrow: Plugin = {
    name: 'quiver-arrow',
    setup(b) {
      b.onResolve({ filter: /^apache-arrow$/ }, () => ({ path: arrowUrl, external: true }));
    },
  };
  const runnerPath = started ? started.scriptPath : await buildPlainRunner(outDir, toArrow);
  const system = await build({
    entryPoints: [SYSTEM_STEPS_SOURCE],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    // Arrow first: the runner's own copy, so a scan's table is the runner's Table.
    // Every .ts file it loads is Quiver's own (packages stay outside), and keeps its location.
    plugins: [pinImportMetaUrlIn(/\.ts$/), toArrow, packagesInPlace],
    sourcemap: 'inline',
    logLevel: 'silent',
  });
  const systemCodePath = writeByHash(outDir, 'system', system.outputFiles[0]!.contents);
  const linkCode: RunnerBuild['linkCode'] = async (code, outfile, packages = []) => {
      const linked = await build({
        stdin: { contents: new TextDecoder().decode(code), loader: 'js', resolveDir: outDir, sourcefile: 'pipeline.mjs' },
        bundle: true,
        platform: 'node',
        format: 'esm',
        target: 'node20',
        write: false,
        // Where it will be written: source paths in the map are relative to it.
        outfile,
        plugins: [toArrow],
        external: packages.flatMap((name) => [name, `${name}/*`]),
        // Keeps the user's own file names and lines in step stack traces.
        sourcemap: 'inline',
        logLevel: 'silent',
      });
      return linked.outputFiles[0]!.contents;
  };
  const warmUpCodePath = writeByHash(outDir, 'warm-up', await linkCode(new TextEncoder().encode(WARM_UP_STEPS), join(outDir, 'warm-up.mjs')));
  return {
    runnerPath,
    snapshot: started ? started.snapshot : null,
    snapshotFailure,
    systemCodePath,
    warmUpCodePath,
    linkKey: createHash('sha256').update(arrowUrl).digest('hex').slice(0, 16),
    linkCode,
  };
}

/**
 * What a step zygote runs before it forks (step-zygote.ts): a table made, written, mapped back and
 * turned into another, so the code every step runs (the runner's, Arrow's builders and IPC) is
 * compiled once in the zygote rather than in each forked process.
 */
const WARM_UP_STEPS = `import { tableFromArrays } from 'apache-arrow';
export default { steps: {
  make: { fn: () => tableFromArrays({ id: Int32Array.of(1, 2, 3), x: Float64Array.of(0.5, 1.5, 2.5), name: ['a', 'b', 'c'] }) },
  use: { fn: (inputs) => {
    const table = inputs.made.select(['id', 'x']);
    const ids = table.getChild('id').toArray();
    return tableFromArrays({ id: ids, twice: Float64Array.from(table.getChild('x').toArray(), (x) => 2 * x), rows: [String(table.numRows), 'b', 'c'] });
  } },
} };
`;

/** apache-arrow as one ESM file, for step processes that start without the snapshot. */
async function buildArrowFile(outDir: string): Promise<string> {
  const arrow = await build({
    entryPoints: [ARROW_ENTRY],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    logLevel: 'silent',
  });
  return writeByHash(outDir, 'arrow', arrow.outputFiles[0]!.contents);
}

/** The runner as plain ESM importing the Arrow file, for step processes that start without the snapshot. */
async function buildPlainRunner(outDir: string, toArrow: Plugin): Promise<string> {
  const runner = await build({
    entryPoints: [RUNNER_SOURCE],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    plugins: [pinImportMetaUrl, toArrow],
    logLevel: 'silent',
  });
  return writeByHash(outDir, 'runner', runner.outputFiles[0]!.contents);
}

/** Node >= 20.8 starts from a user snapshot and has the loader a process from it imports pipeline code with (code-import.ts). */
const SNAPSHOT_SUPPORTED = process.allowedNodeEnvironmentFlags.has('--snapshot-blob') && vm.constants?.USE_MAIN_CONTEXT_DEFAULT_LOADER !== undefined;

function resolveSnapshotOption(options: BuildRunnerOptions): boolean {
  return (options.snapshot ?? process.env.QUIVER_STEP_SNAPSHOT !== '0') && SNAPSHOT_SUPPORTED;
}

/**
 * The startup snapshot of a step process: the runner and Arrow bundled into one CommonJS script
 * (what `--build-snapshot` takes), run once by `node --build-snapshot` into a blob. Named by the
 * script's hash and node's version (a blob only starts the node that built it), so it is built
 * once per host and version. Also writes the shim through which linked pipeline code imports
 * the snapshot's Arrow: one module, so `instanceof Table` holds across the two.
 */
async function buildSnapshot(outDir: string, heapMb: number): Promise<{ scriptPath: string; shimPath: string; snapshot: StepSnapshot }> {
  const script = await build({
    entryPoints: [SNAPSHOT_SOURCE],
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    write: false,
    plugins: [pinImportMetaUrl],
    logLevel: 'silent',
  });
  const scriptPath = writeByHash(outDir, 'step-snapshot', script.outputFiles[0]!.contents, '.cjs');
  const blobPath = scriptPath.replace(/\.cjs$/, `-${process.version}-${process.arch}-${heapMb}mb.blob`);
  if (!existsSync(blobPath)) {
    const tmp = `${blobPath}.${process.pid}.tmp`;
    try {
      await new Promise<void>((resolve, reject) => {
        execFile(process.execPath, [`--max-old-space-size=${heapMb}`, '--snapshot-blob', tmp, '--build-snapshot', scriptPath], { env: { PATH: process.env.PATH ?? '' } }, (error, _stdout, stderr) =>
          error ? reject(new Error(`building the step-process snapshot failed: ${stderr.trim() || error.message}`)) : resolve(),
        );
      });
      renameSync(tmp, blobPath);
    } finally {
      rmSync(tmp, { force: true });
    }
  }
  // The names Arrow exports, from the module itself: the shim re-exports every one.
  const names = Object.keys(await import('apache-arrow')).filter((n) => n !== 'default');
  const shim =
    `// The step-process snapshot's apache-arrow (see executor/code-import.ts).\n` +
    `const arrow = globalThis[Symbol.for('quiver.stepSnapshot.arrow')];\n` +
    `if (!arrow) throw new Error('this pipeline code was linked for step processes started from the Quiver step snapshot');\n` +
    `export const { ${names.join(', ')} } = arrow;\n`;
  const shimPath = writeByHash(outDir, 'arrow-shim', new TextEncoder().encode(shim));
  return { scriptPath, shimPath, snapshot: { blobPath, heapMb } };
}

function writeByHash(outDir: string, name: string, contents: Uint8Array, extension = '.mjs'): string {
  const hash = createHash('sha256').update(contents).digest('hex').slice(0, 16);
  const path = join(outDir, `${name}-${hash}${extension}`);
  if (!existsSync(path)) {
    mkdirSync(outDir, { recursive: true });
    const tmp = `${path}.${process.pid}.tmp`;
    writeFileSync(tmp, contents);
    renameSync(tmp, path);
  }
  return path;
}
