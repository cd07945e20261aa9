/**
 * A step's code key: what identifies the code one step runs, so that editing one step leaves
 * the others' keys (and cached outputs) alone. Pure: it reads the bundle's text and the
 * functions the bundle defines, nothing else.
 *
 * The key of step S hashes the whole bundle (every module it imports, the pipeline file's helpers
 * and constants) with the source text of each *other* step's function cut out. Editing S's
 * function changes S's key only; editing anything else that is in the bundle changes every key:
 * conservative, never stale. A function is cut out only when nothing else can call it:
 *   - it is anonymous (an arrow or function expression written in the step() call), so no other
 *     code names it, and
 *   - its text occurs exactly once in the bundle, so the cut is unambiguous.
 * A named function (`const clean = (t) => …; step(clean)`) stays in every key, because another
 * step may call it by name.
 */
import { createHash } from 'node:crypto';

/** The source map comment esbuild appends: positions in it move whenever any line moves. */
const SOURCE_MAP_COMMENT = /\n?\/\/# sourceMappingURL=[^\n]*\n?$/;
/**
 * The `// path/to/module.ts` line esbuild writes before each module of a bundle (it drops the
 * user's own comments): a renamed or moved file is the same code.
 */
const MODULE_PATH_COMMENTS = /^\/\/ [^\n]*$/gm;

/**
 * Code keys of a bundle's steps, by step name.
 * @param bundle the pipeline bundle's JavaScript, as the step processes load it
 * @param functions each step's function, as the bundle, once imported, defines it
 */
export function stepCodeKeys(bundle: string, functions: Readonly<Record<string, unknown>>): Record<string, string> {
  let text = bundle.replace(SOURCE_MAP_COMMENT, '\n').replace(MODULE_PATH_COMMENTS, '');
  // esbuild names the entry's default export after its file (`pipeline_default`): not code.
  const entryDefault = /([A-Za-z_$][\w$]*) as default\b/.exec(text.slice(Math.max(0, text.lastIndexOf('export {'))))?.[1];
  if (entryDefault) text = text.replace(new RegExp(`(?<![\\w$])${entryDefault.replace(/\$/g, '\\$')}(?![\\w$])`, 'g'), 'entry_default');
  const cuttable = new Map<string, string>();
  for (const [name, fn] of Object.entries(functions)) {
    const source = cuttableSource(text, fn);
    if (source !== null) cuttable.set(name, source);
  }
  const keys: Record<string, string> = {};
  for (const name of Object.keys(functions)) {
    const own = cuttable.get(name);
    let rest = text;
    // Longest first: one step's text may contain another's (a step defined inside a step).
    const others = [...cuttable].filter(([other, source]) => other !== name && source !== own).sort((a, b) => b[1].length - a[1].length);
    for (const [, source] of others) rest = rest.replace(source, '');
    // The name too: two steps whose texts are both left in would otherwise share a key.
    keys[name] = createHash('sha256').update('quiver.code.v1\0').update(name).update('\0').update(rest).digest('hex');
  }
  return keys;
}

function cuttableSource(text: string, fn: unknown): string | null {
  if (typeof fn !== 'function' || fn.name !== '') return null;
  const source = Function.prototype.toString.call(fn);
  const first = text.indexOf(source);
  if (first < 0 || text.indexOf(source, first + 1) >= 0) return null;
  return source;
}

/** Everything a step's output depends on, as far as Quiver can see. */
export interface StepCacheParts {
  /** The step's code key ({@link stepCodeKeys}); for a system step, absent. */
  codeKey?: string;
  /** A system step (scan, stage, commit) as planned: what it reads and how. */
  system?: unknown;
  /** The stored table's snapshot a scan reads: part of a scan's key, so a new snapshot is a new key. */
  snapshotId?: string;
  /** Exact package versions the step runs with. */
  packages?: Readonly<Record<string, string>>;
  params: Readonly<Record<string, string>>;
  /** The event a run was started by: its subject and payload (not its id, which is new for every event). */
  event?: { subject: string; payload: unknown };
  /** Each input: its name, the columns it takes, and the parent's own cache key. */
  inputs: readonly { param: string; columns?: readonly string[]; key: string }[];
}

/**
 * A step's cache key: two steps with the same key compute the same output, as far as Quiver can
 * see (a step that reads a clock, randomness or the outside world opts out with `cache: false`).
 * Inputs are keyed by their parents' keys, so a change anywhere upstream changes every key below.
 */
export function stepCacheKey(parts: StepCacheParts): string {
  const canonical = {
    codeKey: parts.codeKey ?? null,
    system: parts.system ?? null,
    snapshotId: parts.snapshotId ?? null,
    packages: parts.packages ?? {},
    params: parts.params,
    event: parts.event ?? null,
    inputs: [...parts.inputs].sort((a, b) => (a.param < b.param ? -1 : a.param > b.param ? 1 : 0)).map((i) => [i.param, i.columns ?? null, i.key]),
  };
  return createHash('sha256').update('quiver.cache.v1\0').update(canonicalJson(canonical)).digest('hex');
}

/** JSON with object keys sorted at every level: equal values give equal text. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => {
    if (v && typeof v === 'object' && !Array.isArray(v)) {
      return Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    }
    return v;
  });
}
