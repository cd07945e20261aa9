import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { build, type Plugin } from 'esbuild';

const RUNNER_SOURCE = fileURLToPath(new URL('./runner.ts', import.meta.url));
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

/** The step runner, ready to fork, and how to link pipeline code against its copy of Arrow. */
export interface RunnerBuild {
  runnerPath: string;
  /**
   * Quiver's system steps (scans, stages; system-steps.ts) as code a step process imports like a
   * pipeline's: they run in step processes, not in the executor.
   */
  systemCodePath: string;
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
 * Builds the step process's code into plain ESM, so it starts with `node` alone: apache-arrow as
 * one file (its ~160 modules cost ~80 ms more to load one by one), and the runner importing it.
 * Files are named by their hash, so concurrent executors write the same files and never see a
 * half-written one.
 */
export async function buildRunner(outDir: string): Promise<RunnerBuild> {
  const arrow = await build({
    entryPoints: [ARROW_ENTRY],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    logLevel: 'silent',
  });
  const arrowPath = writeByHash(outDir, 'arrow', arrow.outputFiles[0]!.contents);
  const arrowUrl = pathToFileURL(arrowPath).href;
  const toArrow: Plugin = {
    name: 'quiver-arrow',
    setup(b) {
      b.onResolve({ filter: /^apache-arrow$/ }, () => ({ path: arrowUrl, external: true }));
    },
  };
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
  const runnerPath = writeByHash(outDir, 'runner', runner.outputFiles[0]!.contents);
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
  return {
    runnerPath,
    systemCodePath,
    linkKey: createHash('sha256').update(arrowUrl).digest('hex').slice(0, 16),
    linkCode: async (code, outfile, packages = []) => {
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
    },
  };
}

function writeByHash(outDir: string, name: string, contents: Uint8Array): string {
  const hash = createHash('sha256').update(contents).digest('hex').slice(0, 16);
  const path = join(outDir, `${name}-${hash}.mjs`);
  if (!existsSync(path)) {
    mkdirSync(outDir, { recursive: true });
    const tmp = `${path}.${process.pid}.tmp`;
    writeFileSync(tmp, contents);
    renameSync(tmp, path);
  }
  return path;
}
