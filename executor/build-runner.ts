import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { build, type Plugin } from 'esbuild';
import { ARROW_GLOBAL, stepProcessArgs } from './protocol.ts';

const RUNNER_SOURCE = fileURLToPath(new URL('./runner.ts', import.meta.url));
const ARROW_ENTRY = fileURLToPath(import.meta.resolve('apache-arrow'));

/**
 * Modules that find files beside themselves (the shm addon) keep their own location once bundled:
 * their `import.meta.url` is pinned to where their source is.
 */
const pinImportMetaUrl: Plugin = {
  name: 'quiver-pin-import-meta-url',
  setup(b) {
    b.onLoad({ filter: /[\\/]shm[\\/][^\\/]+\.ts$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      return { contents: source.replaceAll('import.meta.url', JSON.stringify(pathToFileURL(args.path).href)), loader: 'ts' };
    });
  },
};

/** Options for {@link buildRunner}. */
export interface BuildRunnerOptions {
  /**
   * Start step processes from a V8 startup snapshot holding the runner and Arrow, when one can be
   * built and passes its check; otherwise (or with false) they start plainly.
   * @default true, unless QUIVER_STEP_SNAPSHOT=0
   */
  snapshot?: boolean;
}

/** Whether step processes start from a snapshot, and if not, why not. */
export type RunnerSnapshot = { used: true; blobPath: string } | { used: false; reason: string };

/** The step runner, ready to fork, and how to link pipeline code against its copy of Arrow. */
export interface RunnerBuild {
  runnerPath: string;
  /** Node arguments step processes start with: `--snapshot-blob` when the snapshot is used, else none. */
  execArgv: string[];
  snapshot: RunnerSnapshot;
  /** Names what {@link linkCode} links against: a linked bundle is valid for this key only. */
  linkKey: string;
  /**
   * Rewrites a pipeline bundle's `apache-arrow` imports to the runner's own copy (through a link
   * module that takes the Arrow the runner registered), so both share one module (`instanceof
   * Table` holds) and the step process loads Arrow once, from its file or from the snapshot.
   */
  linkCode(code: Uint8Array, outfile: string): Promise<Uint8Array>;
}

/**
 * Builds the step process's code into plain ESM, so it starts with `node` alone: apache-arrow as
 * one file (its ~160 modules cost ~80 ms more to load one by one), and the runner importing it.
 * Files are named by their hash, so concurrent executors write the same files and never see a
 * half-written one.
 */
export async function buildRunner(outDir: string, options: BuildRunnerOptions = {}): Promise<RunnerBuild> {
  const arrow = await build({
    entryPoints: [ARROW_ENTRY],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    metafile: true,
    outfile: join(outDir, 'arrow.mjs'),
    logLevel: 'silent',
  });
  const arrowPath = writeByHash(outDir, 'arrow', arrow.outputFiles[0]!.contents);
  const arrowUrl = pathToFileURL(arrowPath).href;
  const names = Object.values(arrow.metafile.outputs)[0]!.exports;
  // Pipeline code imports Arrow from here: the runner's own (registered before any step code
  // loads), else the file, so a process has one Arrow whether or not it came from a snapshot.
  const link = [
    `const arrow = globalThis[Symbol.for(${JSON.stringify(ARROW_GLOBAL)})] ?? (await import(${JSON.stringify(arrowUrl)}));`,
    `export const { ${names.join(', ')} } = arrow;`,
    '',
  ].join('\n');
  const linkUrl = pathToFileURL(writeByHash(outDir, 'arrow-link', new TextEncoder().encode(link))).href;
  const toArrow = (url: string): Plugin => ({
    name: 'quiver-arrow',
    setup(b) {
      b.onResolve({ filter: /^apache-arrow$/ }, () => ({ path: url, external: true }));
    },
  });
  const runner = await build({
    entryPoints: [RUNNER_SOURCE],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    plugins: [pinImportMetaUrl, toArrow(arrowUrl)],
    logLevel: 'silent',
  });
  const runnerPath = writeByHash(outDir, 'runner', runner.outputFiles[0]!.contents);
  const wanted = options.snapshot ?? process.env.QUIVER_STEP_SNAPSHOT !== '0';
  const snapshot: RunnerSnapshot = wanted ? await buildSnapshot(outDir, runnerPath, linkUrl) : { used: false, reason: 'turned off' };
  return {
    runnerPath,
    execArgv: snapshot.used ? ['--snapshot-blob', snapshot.blobPath] : [],
    snapshot,
    linkKey: createHash('sha256').update(linkUrl).digest('hex').slice(0, 16),
    linkCode: async (code, outfile) => {
      const linked = await build({
        stdin: { contents: new TextDecoder().decode(code), loader: 'js', resolveDir: outDir, sourcefile: 'pipeline.mjs' },
        bundle: true,
        platform: 'node',
        format: 'esm',
        target: 'node20',
        write: false,
        // Where it will be written: source paths in the map are relative to it.
        outfile,
        plugins: [toArrow(linkUrl)],
        // Keeps the user's own file names and lines in step stack traces.
        sourcemap: 'inline',
        logLevel: 'silent',
      });
      return linked.outputFiles[0]!.contents;
    },
  };
}

const run = promisify(execFile);

/**
 * A V8 startup snapshot of the runner with Arrow in its heap (one CommonJS script, which is what
 * Node 20 can snapshot; the shm addon loads on first use, after deserialization). Named by its
 * script and this Node, built once per host, and checked once: a step process started from it
 * must import pipeline code linked against its Arrow. Any failure means plain start, with why.
 */
async function buildSnapshot(outDir: string, runnerPath: string, linkUrl: string): Promise<RunnerSnapshot> {
  try {
    const script = await build({
      entryPoints: [RUNNER_SOURCE],
      bundle: true,
      platform: 'node',
      format: 'cjs',
      target: 'node20',
      write: false,
      plugins: [pinImportMetaUrl],
      logLevel: 'silent',
    });
    const scriptPath = writeByHash(outDir, 'runner-snapshot', script.outputFiles[0]!.contents, '.cjs');
    const key = createHash('sha256').update(readFileSync(scriptPath)).update(`${process.version} ${process.arch} ${linkUrl}`).digest('hex').slice(0, 16);
    const blobPath = join(outDir, `runner-${key}.blob`);
    const checked = `${blobPath}.checked`;
    if (existsSync(checked)) return { used: true, blobPath };
    if (!existsSync(blobPath)) {
      const tmp = `${blobPath}.${process.pid}.tmp`;
      try {
        await run(process.execPath, ['--snapshot-blob', tmp, '--build-snapshot', scriptPath], { timeout: 120_000 });
        renameSync(tmp, blobPath);
      } finally {
        rmSync(tmp, { force: true });
      }
    }
    const probe = writeByHash(outDir, 'runner-check', new TextEncoder().encode(`import { Table } from ${JSON.stringify(linkUrl)};\nexport default Table;\n`));
    const { stdout } = await run(process.execPath, ['--snapshot-blob', blobPath, runnerPath, ...stepProcessArgs('check')], {
      env: { ...process.env, QUIVER_RUNNER_SELF_CHECK: probe, QUIVER_EXECUTOR_PID: '' },
      timeout: 60_000,
    });
    if (!stdout.includes('quiver-runner ok snapshot')) return { used: false, reason: `a step process from the snapshot said: ${stdout.trim() || '(nothing)'}` };
    writeFileSync(checked, '');
    return { used: true, blobPath };
  } catch (error) {
    const stderr = (error as { stderr?: string }).stderr;
    return { used: false, reason: `${(error as Error).message.split('\n')[0]}${stderr ? `: ${stderr.trim().split('\n').slice(-3).join(' | ')}` : ''}` };
  }
}

function writeByHash(outDir: string, name: string, contents: Uint8Array, ext = '.mjs'): string {
  const hash = createHash('sha256').update(contents).digest('hex').slice(0, 16);
  const path = join(outDir, `${name}-${hash}${ext}`);
  if (!existsSync(path)) {
    mkdirSync(outDir, { recursive: true });
    const tmp = `${path}.${process.pid}.tmp`;
    writeFileSync(tmp, contents);
    renameSync(tmp, path);
  }
  return path;
}
