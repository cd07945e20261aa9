import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { build, type Plugin } from 'esbuild';

const RUNNER_SOURCE = fileURLToPath(new URL('./runner.ts', import.meta.url));

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

/**
 * Bundles the step runner into one plain ESM file, so a step process starts with `node` alone.
 * apache-arrow stays external: the runner and the user's bundle must share one copy of it for
 * `instanceof Table` to hold. Returns the path; the name is the bundle's hash, so concurrent
 * executors write the same file and never see a half-written one.
 */
export async function buildRunner(outDir: string): Promise<string> {
  const result = await build({
    entryPoints: [RUNNER_SOURCE],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    external: ['apache-arrow'],
    plugins: [pinImportMetaUrl],
    logLevel: 'silent',
  });
  const code = result.outputFiles[0]!.contents;
  const hash = createHash('sha256').update(code).digest('hex').slice(0, 16);
  const path = join(outDir, `runner-${hash}.mjs`);
  if (!existsSync(path)) {
    mkdirSync(outDir, { recursive: true });
    const tmp = `${path}.${process.pid}.tmp`;
    writeFileSync(tmp, code);
    renameSync(tmp, path);
  }
  return path;
}
