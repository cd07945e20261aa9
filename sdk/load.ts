import { execFile } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { isBuiltin } from 'node:module';
import { join, resolve, sep } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { build, type Plugin } from 'esbuild';
import semver from 'semver';
import { PlanError, planPipeline, stepCodeKeys, triggersOf, type TriggerSpec } from '../planner/index.ts';
import { bundleDir, PACKAGE_NAME_PATTERN, quiverHome, type Plan } from '../schemas/index.ts';

const execFileAsync = promisify(execFile);

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
 * imports it and builds its logical plan. Declared npm packages (`packages` of steps and of the
 * pipeline) are resolved to exact versions against the user's npm registry, left out of the
 * bundle, and recorded per step in the plan (docs/packages.md). Throws {@link PlanError} for a
 * bad plan (an unknown package or a range nothing matches among them), `TriggerError` for
 * triggers that cannot work, and {@link PipelineLoadError} for a file that does not build or load.
 */
export async function loadPipeline(file: string): Promise<LoadedPipeline> {
  const entry = resolve(file);
  if (!existsSync(entry)) throw new PipelineLoadError(`pipeline file ${file} does not exist`);
  // First bundled as it would be without packages: a package the repository lacks stays an
  // import, so the definition can be read (with that import stubbed) to learn what is declared.
  const missing = new Set<string>();
  const probe = await bundle(file, entry, ['apache-arrow'], missing);
  // Without missing packages, the probe is the bundle as it always was: imported once, from where it is kept.
  const probePath = missing.size === 0 ? storeBundle(probe) : undefined;
  const probeDefinition = await importDefinition(file, probe, missing, probePath);
  const declared = declaredPackages(probeDefinition);
  const declaredNames = new Set([...Object.keys(declared.pipeline), ...Object.values(declared.steps).flatMap((p) => Object.keys(p))]);
  const undeclared = [...missing].filter((name) => !declaredNames.has(name));
  if (undeclared.length > 0) {
    throw new PipelineLoadError(
      `could not bundle ${file}: ${undeclared.map((n) => `"${n}"`).join(', ')} ${undeclared.length === 1 ? 'is' : 'are'} not installed here; declare ${undeclared.length === 1 ? 'it' : 'them'} (step(..., { packages: { '${undeclared[0]}': '^1.0.0' } }) or pipeline(..., { packages })) or install ${undeclared.length === 1 ? 'it' : 'them'}`,
    );
  }
  if (declaredNames.size === 0) return planned(probe, probePath!, probeDefinition);
  const locked = await resolvePackages(declared);
  const names = [...declaredNames].sort();
  const code = await bundle(file, entry, ['apache-arrow', ...names, ...names.map((n) => `${n}/*`)]);
  const codePath = storeBundle(code);
  const definition = await importDefinition(file, code, declaredNames);
  const loaded = planned(code, codePath, definition);
  const steps = loaded.plan.steps.map((s) => (s.system ? s : { ...s, packages: environmentOf(s.name, locked) }));
  return { ...loaded, plan: { ...loaded.plan, steps } };
}

function planned(code: Uint8Array, codePath: string, definition: unknown): LoadedPipeline {
  const plan = withCodeKeys(planPipeline(definition), code, definition);
  const triggers = triggersOf(plan.pipeline, (definition as { options?: unknown }).options);
  return { plan, triggers, code, codeHash: hashOf(code), codePath };
}

const hashOf = (code: Uint8Array) => createHash('sha256').update(code).digest('hex');

/**
 * esbuild's bundle of the pipeline file, with `external` left as imports. With `missing`, a bare
 * import of the user's own code that resolves nowhere is left as an import too, and its package
 * name added to `missing`.
 */
async function bundle(file: string, entry: string, external: string[], missing?: Set<string>): Promise<Uint8Array> {
  let result;
  try {
    result = await build({
      entryPoints: [entry],
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      write: false,
      external,
      plugins: [definitionsOnly, ...(missing ? [missingAsExternal(missing)] : [])],
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
  return withPortableSourceMap(result.outputFiles);
}

/** Writes the bundle under its hash, where executors on this host find it. */
function storeBundle(code: Uint8Array): string {
  const dir = bundleDir('code');
  const codePath = join(dir, `${hashOf(code)}.mjs`);
  if (!existsSync(codePath)) {
    mkdirSync(dir, { recursive: true });
    const tmp = `${codePath}.${process.pid}.tmp`;
    writeFileSync(tmp, code);
    renameSync(tmp, codePath);
  }
  return codePath;
}

/**
 * The bundle's default export, imported here with the imports of `stubbed` packages replaced by
 * stand-ins: declared packages are installed only where steps run, and the definition (names,
 * options, step functions) does not need them.
 */
async function importDefinition(file: string, code: Uint8Array, stubbed: ReadonlySet<string>, codePath?: string): Promise<unknown> {
  let path = codePath;
  if (!path) {
    const dir = bundleDir('code');
    mkdirSync(dir, { recursive: true });
    path = join(dir, `load-${hashOf(code).slice(0, 32)}-${process.pid}-${randomUUID().slice(0, 8)}.mjs`);
    writeFileSync(path, withStubbedImports(new TextDecoder().decode(code), stubbed));
  }
  try {
    return ((await import(pathToFileURL(path).href)) as { default?: unknown }).default;
  } catch (error) {
    throw new PipelineLoadError(`could not load ${file}: ${(error as Error).message}`, { cause: error });
  } finally {
    if (path !== codePath) rmSync(path, { force: true });
  }
}

/** The package a bare specifier names: `@scope/name` or `name`, without a subpath. */
function packageOf(specifier: string): string {
  const parts = specifier.split('/');
  return specifier.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!;
}

/** Marks bare imports of the user's own files that resolve nowhere as external, and notes their packages. */
const missingAsExternal = (missing: Set<string>): Plugin => ({
  name: 'quiver-missing-packages',
  setup(b) {
    b.onResolve({ filter: /^[^./]/ }, async (args) => {
      if (args.pluginData === PROBING || args.path.startsWith('node:') || isBuiltin(args.path) || args.importer.includes(`${sep}node_modules${sep}`)) return undefined;
      if (args.path === 'apache-arrow' || args.path === 'quiver') return undefined;
      const found = await b.resolve(args.path, { resolveDir: args.resolveDir, kind: args.kind, importer: args.importer, pluginData: PROBING });
      if (found.errors.length === 0) return undefined;
      missing.add(packageOf(args.path));
      return { path: args.path, external: true };
    });
  },
});
const PROBING = Symbol('quiver-probing');

/**
 * The bundle's text with each `import … from "<stubbed package>"` importing a stand-in: a module
 * exporting the names imported, each a proxy any use of which (a call, a property, `new`) is one
 * more proxy. esbuild prints imports of external packages as plain top-level statements.
 */
function withStubbedImports(text: string, stubbed: ReadonlySet<string>): string {
  if (stubbed.size === 0) return text;
  const stub = (names: string[]) =>
    `data:text/javascript,${encodeURIComponent(
      `const h={get:(t,k)=>k===Symbol.toPrimitive?()=>'':k==='then'?undefined:p,apply:()=>p,construct:()=>p};const p=new Proxy(function(){},h);export default p;` +
        names.map((n, i) => `const n${i}=p;export{n${i} as ${JSON.stringify(n)}};`).join(''),
    )}`;
  return text
    .replace(/^import\s*("([^"]+)"|'([^']+)');?$/gm, (all, _q, dq: string | undefined, sq: string | undefined) => (stubbed.has(packageOf(dq ?? sq!)) ? '' : all))
    .replace(/^import\b([^;'"]*?)\bfrom\s*"([^"]+)";?/gm, (all, clause: string, specifier: string) => {
      if (!stubbed.has(packageOf(specifier))) return all;
      const named = /\{([^}]*)\}/.exec(clause)?.[1] ?? '';
      const names = named
        .split(',')
        .map((part) => part.trim().split(/\s+as\s+/)[0]!.trim().replace(/^["']|["']$/g, ''))
        .filter((n) => n && n !== 'default');
      return `import${clause}from ${JSON.stringify(stub(names))};`;
    });
}

/** Declared ranges: the pipeline's, and each step's own. */
interface DeclaredPackages {
  pipeline: Record<string, string>;
  steps: Record<string, Record<string, string>>;
}

function declaredPackages(definition: unknown): DeclaredPackages {
  const def = definition as { kind?: unknown; name?: unknown; options?: { packages?: unknown }; steps?: unknown } | null;
  if (!def || typeof def !== 'object' || def.kind !== 'quiver.pipeline') return { pipeline: {}, steps: {} };
  const steps: Record<string, Record<string, string>> = {};
  for (const [name, raw] of Object.entries((def.steps ?? {}) as Record<string, unknown>)) {
    const options = raw && typeof raw === 'object' ? (raw as { options?: { packages?: unknown } }).options : undefined;
    const packages = rangesOf(options?.packages, `step "${name}"`, name);
    if (Object.keys(packages).length > 0) steps[name] = packages;
  }
  return { pipeline: rangesOf(def.options?.packages, `pipeline "${String(def.name)}"`), steps };
}

/** The `packages` option, checked: npm names to semver ranges (no tags, URLs or paths). */
function rangesOf(value: unknown, what: string, step?: string): Record<string, string> {
  if (value === undefined) return {};
  if (!value || typeof value !== 'object' || Array.isArray(value)) {
    throw new PlanError('ERR_PLAN_BAD_INPUT', `packages of ${what} must be an object of npm package names to version ranges, like { 'is-number': '^7.0.0' }`, step);
  }
  const ranges: Record<string, string> = {};
  for (const [name, range] of Object.entries(value as Record<string, unknown>)) {
    if (name.length > 214 || !PACKAGE_NAME_PATTERN.test(name)) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `package "${name}" of ${what} is not an npm package name (lowercase letters, digits, - . _ ~, optionally @scope/)`, step);
    }
    if (name === 'apache-arrow' || name === 'quiver') {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `package "${name}" of ${what} is Quiver's own: steps always get the runner's copy, so it cannot be declared`, step);
    }
    if (typeof range !== 'string' || semver.validRange(range) === null) {
      throw new PlanError('ERR_PLAN_BAD_INPUT', `the version of package "${name}" of ${what} must be a semver range like '^1.2.0' or '1.2.3'; got ${JSON.stringify(range)}`, step);
    }
    ranges[name] = range;
  }
  return ranges;
}

/** Exact versions: the pipeline's, and each step's own, resolved from the user's npm registry. */
interface LockedPackages {
  pipeline: Record<string, string>;
  steps: Record<string, Record<string, string>>;
}

/** How long `npm view` may take for one package before loading fails. */
const NPM_VIEW_TIMEOUT_MS = 60_000;

async function resolvePackages(declared: DeclaredPackages): Promise<LockedPackages> {
  const resolutions = new Map<string, Promise<string>>();
  const exact = (name: string, range: string, what: string, step?: string) => {
    const key = `${name}@${range}`;
    if (!resolutions.has(key)) resolutions.set(key, resolveVersion(name, range, what, step));
    return resolutions.get(key)!;
  };
  const lock = async (ranges: Record<string, string>, what: string, step?: string) =>
    Object.fromEntries(await Promise.all(Object.entries(ranges).map(async ([n, r]) => [n, await exact(n, r, what, step)] as const)));
  const [pipeline, ...steps] = await Promise.all([
    lock(declared.pipeline, `pipeline`),
    ...Object.entries(declared.steps).map(async ([step, ranges]) => [step, await lock(ranges, `step "${step}"`, step)] as const),
  ]);
  return { pipeline: pipeline as Record<string, string>, steps: Object.fromEntries(steps as (readonly [string, Record<string, string>])[]) };
}

/**
 * How long a range's resolution is reused without asking the registry again
 * (QUIVER_PACKAGE_RESOLVE_TTL_MS): the edit-and-re-run loop should not pay an `npm view` (~0.3 s)
 * every time. A release published meanwhile is picked up once it expires. @default 10 minutes
 */
function resolveTtlMs(): number {
  const raw = process.env.QUIVER_PACKAGE_RESOLVE_TTL_MS;
  const value = raw === undefined || raw === '' ? 10 * 60_000 : Number(raw);
  if (!Number.isFinite(value) || value < 0) throw new PipelineLoadError(`QUIVER_PACKAGE_RESOLVE_TTL_MS must be milliseconds ≥ 0, got "${raw}"`);
  return value;
}

const resolutionsFile = () => join(quiverHome(), 'package-resolutions.json');

type Resolutions = Record<string, { version: string; at: number }>;

function readResolutions(): Resolutions {
  try {
    return JSON.parse(readFileSync(resolutionsFile(), 'utf8')) as Resolutions;
  } catch {
    return {};
  }
}

/** Remembers a resolution; concurrent loads may overwrite each other's, which only costs a lookup. */
function rememberResolution(key: string, version: string): void {
  const all = readResolutions();
  all[key] = { version, at: Date.now() };
  mkdirSync(quiverHome(), { recursive: true });
  const tmp = `${resolutionsFile()}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(all));
  renameSync(tmp, resolutionsFile());
}

/**
 * The highest version of `name` matching `range` on the registry the user's npm is configured for
 * (`npm view`, so .npmrc, scopes, auth and proxies apply), or as resolved within the last
 * {@link resolveTtlMs}.
 */
async function resolveVersion(name: string, range: string, what: string, step?: string): Promise<string> {
  const key = `${name}@${range}`;
  const known = readResolutions()[key];
  if (known && Date.now() - known.at < resolveTtlMs() && semver.satisfies(known.version, range)) return known.version;
  const version = await askRegistry(name, range, what, step);
  rememberResolution(key, version);
  return version;
}

async function askRegistry(name: string, range: string, what: string, step?: string): Promise<string> {
  let stdout: string;
  try {
    ({ stdout } = await execFileAsync('npm', ['view', `${name}@${range}`, 'version', '--json'], { timeout: NPM_VIEW_TIMEOUT_MS, maxBuffer: 16 << 20 }));
  } catch (error) {
    const out = (error as { stdout?: string }).stdout ?? '';
    const npmError = parseJson(out) as { error?: { code?: string; summary?: string } } | undefined;
    if (npmError?.error?.code === 'E404') {
      const summary = npmError.error.summary ?? '';
      const reason = /^No match found/.test(summary) ? `no release of "${name}" matches ${range}` : `package "${name}" is not on the registry`;
      throw new PlanError('ERR_PLAN_BAD_INPUT', `${what} declares package "${name}" (${range}): ${reason} (npm: ${summary})`, step);
    }
    const message = npmError?.error?.summary ?? ((error as { stderr?: string }).stderr?.trim() || (error as Error).message);
    throw new PipelineLoadError(`could not resolve package "${name}@${range}" of ${what} with npm: ${message}`, { cause: error });
  }
  const versions = ([] as unknown[]).concat(parseJson(stdout) ?? []).filter((v): v is string => typeof v === 'string');
  const version = semver.maxSatisfying(versions, range);
  if (!version) throw new PlanError('ERR_PLAN_BAD_INPUT', `${what} declares package "${name}" (${range}): no release of "${name}" matches it`, step);
  return version;
}

function parseJson(text: string): unknown {
  try {
    return text.trim() ? JSON.parse(text) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The packages of a step's environment: every package the pipeline declares (the bundle imports
 * them all at its top), each at this step's own version, else the pipeline's, else the highest
 * another step declares.
 */
function environmentOf(step: string, locked: LockedPackages): Record<string, string> {
  const environment: Record<string, string> = {};
  for (const others of Object.values(locked.steps)) {
    for (const [name, version] of Object.entries(others)) {
      if (!environment[name] || semver.gt(version, environment[name])) environment[name] = version;
    }
  }
  Object.assign(environment, locked.pipeline, locked.steps[step] ?? {});
  return Object.fromEntries(Object.entries(environment).sort(([a], [b]) => (a < b ? -1 : 1)));
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
