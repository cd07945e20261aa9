import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { build, type Plugin } from 'esbuild';
import { PlanError, planPipeline, stepCodeKeys, triggersOf, type TriggerSpec } from '../planner/index.ts';
import { bundleDir, type Plan } from '../schemas/index.ts';

/** A pipeline file, bundled and planned: what a run request needs, without data. */
export interface LoadedPipeline {
  plan: Plan;
  /** How the pipeline starts once deployed: its event triggers, schedule and concurrency. */
  triggers: TriggerSpec;
  /** The bundle (ESM) executors run; apache-arrow stays external. */
  code: Uint8Array;
  /** sha256 of the bundle: its name in the code object store. */
  codeHash: string;
  /** Where the bundle was written on this host. */
  codePath: string;
}

/** The pipeline file could not be bundled or imported. */
export class PipelineLoadError extends Error {
  override readonly name = 'PipelineLoadError';
  readonly code = 'ERR_PIPELINE_LOAD';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

const SDK_INDEX = fileURLToPath(new URL('./index.ts', import.meta.url));
const SDK_DEFINE = fileURLToPath(new URL('./define.ts', import.meta.url));

/** Steps only need the definitions: the client, NATS and esbuild stay out of the bundle. */
const definitionsOnly: Plugin = {
  name: 'quiver-sdk-definitions',
  setup(b) {
    b.onResolve({ filter: /^quiver$/ }, () => ({ path: SDK_DEFINE }));
    b.onResolve({ filter: /sdk[\\/]index(\.ts|\.js)?$/ }, async (args) => {
      const resolved = resolve(args.resolveDir, args.path.endsWith('.ts') ? args.path : args.path.replace(/\.js$/, '') + '.ts');
      return resolved === SDK_INDEX ? { path: SDK_DEFINE } : undefined;
    });
  },
};

/**
 * Bundles a pipeline file (esbuild), stores the bundle content-addressed in the package,
 * imports it and builds its logical plan. Throws {@link PlanError} for a bad plan,
 * `TriggerError` for triggers that cannot work, and {@link PipelineLoadError} for a file that
 * does not build or load.
 */
export async function loadPipeline(file: string): Promise<LoadedPipeline> {
  const entry = resolve(file);
  if (!existsSync(entry)) throw new PipelineLoadError(`pipeline file ${file} does not exist`);
  let result;
  try {
    result = await build({
      entryPoints: [entry],
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      write: false,
      external: ['apache-arrow'],
      plugins: [definitionsOnly],
      logLevel: 'silent',
      sourcemap: 'external',
      sourcesContent: false,
      outfile: join(bundleDir('code'), 'pipeline.mjs'),
    });
  } catch (error) {
    const errors = (error as { errors?: { text: string; location?: { file: string; line: number } | null }[] }).errors ?? [];
    const detail = errors.map((e) => (e.location ? `${e.location.file}:${e.location.line}: ${e.text}` : e.text)).join('; ');
    throw new PipelineLoadError(`could not bundle ${file}: ${detail || (error as Error).message}`, { cause: error });
  }
  for (const warning of result.warnings) {
    const duplicate = /^Duplicate key "([^"]+)" in object literal/.exec(warning.text);
    if (duplicate) {
      throw new PlanError(
        'ERR_PLAN_DUPLICATE_STEP',
        `two steps are named "${duplicate[1]}" (${warning.location?.file}:${warning.location?.line}): step names must be unique`,
        duplicate[1],
      );
    }
  }
  const code = withPortableSourceMap(result.outputFiles);
  const codeHash = createHash('sha256').update(code).digest('hex');
  const dir = bundleDir('code');
  const codePath = join(dir, `${codeHash}.mjs`);
  if (!existsSync(codePath)) {
    mkdirSync(dir, { recursive: true });
    const tmp = `${codePath}.${process.pid}.tmp`;
    writeFileSync(tmp, code);
    renameSync(tmp, codePath);
  }
  let mod: { default?: unknown };
  try {
    mod = (await import(pathToFileURL(codePath).href)) as { default?: unknown };
  } catch (error) {
    throw new PipelineLoadError(`could not load ${file}: ${(error as Error).message}`, { cause: error });
  }
  const plan = withCodeKeys(planPipeline(mod.default), code, mod.default);
  const triggers = triggersOf(plan.pipeline, (mod.default as { options?: unknown }).options);
  return { plan, triggers, code, codeHash, codePath };
}

/** Each user step's code key, from the bundle as the step processes will load it. */
function withCodeKeys(plan: Plan, code: Uint8Array, definition: unknown): Plan {
  const steps = ((definition as { steps?: Record<string, unknown> }).steps ?? {}) as Record<string, unknown>;
  const functions: Record<string, unknown> = {};
  for (const [name, raw] of Object.entries(steps)) {
    functions[name] = raw && typeof raw === 'object' && (raw as { kind?: unknown }).kind === 'quiver.step' ? (raw as { fn?: unknown }).fn : raw;
  }
  const keys = stepCodeKeys(new TextDecoder().decode(code), functions);
  return { ...plan, steps: plan.steps.map((s) => (s.system || !keys[s.name] ? s : { ...s, codeKey: keys[s.name] })) };
}

/**
 * Inlines the source map with absolute file URLs as sources: the bundle is stored, linked and run
 * elsewhere, and step stack traces must still name the user's own files and lines.
 */
function withPortableSourceMap(files: { path: string; contents: Uint8Array; text: string }[]): Uint8Array {
  const js = files.find((f) => f.path.endsWith('.mjs'))!;
  const map = files.find((f) => f.path.endsWith('.map'));
  if (!map) return js.contents;
  const parsed = JSON.parse(map.text) as { sources: string[]; sourceRoot?: string };
  const base = pathToFileURL(map.path).href;
  parsed.sources = parsed.sources.map((source) => new URL(source, base).href);
  delete parsed.sourceRoot;
  const body = js.text.replace(/\n\/\/# sourceMappingURL=.*\n?$/, '\n');
  const inline = Buffer.from(JSON.stringify(parsed)).toString('base64');
  return new TextEncoder().encode(`${body}//# sourceMappingURL=data:application/json;base64,${inline}\n`);
}
