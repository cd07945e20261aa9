import { parseArgs } from 'node:util';
import type { Plan, RunView } from '../schemas/index.ts';
import { MAIN_BRANCH } from '../storage/index.ts';
import { UsageError } from './cluster.ts';
import { textTable } from './format.ts';
import { withStore } from './table.ts';

export const BRANCH_USAGE = `  branch list [--json]
                 Branches and tags: the catalog commit each points to, its tables.
  branch create NAME [--from REF]
                 A new branch at REF (a branch, tag or commit; default main). Copies
                 no data.
  branch delete NAME
                 Delete a branch pointer (its files stay until expire + vacuum).
  branch diff A B [--json]
                 Tables whose current snapshot differs between two refs, with rows.
  branch merge SRC [--into BRANCH]
                 Merge SRC into BRANCH (default main), atomically: fast-forward, or
                 by table; tables both sides only appended to get both appends;
                 any other change of one table on both sides is a conflict and
                 BRANCH stays unchanged.
  tag create NAME [--at REF]
                 An immutable name for what REF (default main) points to now.
  tag delete NAME`;


const when = (ms: number) => (ms ? new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z') : '-');
const rows = (n: number) => n.toLocaleString('en-US');

export async function branchCommand(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'list': {
      const { values } = parseArgs({ args: rest, options: { json: { type: 'boolean', default: false } } });
      return withStore(async (store) => {
        const refs = await store.catalog.versions.list();
        if (values.json) {
          process.stdout.write(JSON.stringify(refs) + '\n');
          return 0;
        }
        console.log(textTable(['ref', 'kind', 'commit', 'tables', 'time', 'message'], refs.map((r) => [r.name, r.kind, r.commit.slice(0, 12) || '-', String(r.tables), when(r.timestampMs), r.message])));
        return 0;
      });
    }
    case 'create': {
      const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: { from: { type: 'string', default: MAIN_BRANCH } } });
      if (positionals.length !== 1) throw new UsageError('branch create takes one branch name');
      return withStore(async (store) => {
        const commit = await store.catalog.versions.createBranch(positionals[0]!, values.from);
        console.log(`created branch ${positionals[0]} at ${values.from} (catalog commit ${commit.slice(0, 12)})`);
        return 0;
      });
    }
    case 'delete': {
      if (rest.length !== 1) throw new UsageError('branch delete takes one branch name');
      return withStore(async (store) => {
        await store.catalog.versions.deleteBranch(rest[0]!);
        console.log(`deleted branch ${rest[0]} (its files stay until \`quiver table expire\` and \`quiver table vacuum\`)`);
        return 0;
      });
    }
    case 'diff': {
      const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: { json: { type: 'boolean', default: false } } });
      if (positionals.length !== 2) throw new UsageError('branch diff takes two refs: A B');
      const [a, b] = positionals as [string, string];
      return withStore(async (store) => {
        const diff = await store.catalog.versions.diff(a, b);
        if (values.json) {
          process.stdout.write(JSON.stringify(diff) + '\n');
          return 0;
        }
        if (diff.length === 0) {
          console.log(`${a} and ${b} hold the same tables`);
          return 0;
        }
        const side = (s: { rows: number } | null) => (s ? rows(s.rows) : 'absent');
        console.log(textTable(['table', `rows on ${a}`, `rows on ${b}`, 'change'], diff.map((d) => [d.table, side(d.a), side(d.b), !d.a ? 'added' : !d.b ? 'removed' : `${d.b.rows - d.a.rows >= 0 ? '+' : ''}${rows(d.b.rows - d.a.rows)} rows`])));
        return 0;
      });
    }
    case 'merge': {
      const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: { into: { type: 'string', default: MAIN_BRANCH } } });
      if (positionals.length !== 1) throw new UsageError('branch merge takes one source ref');
      return withStore(async (store) => {
        const result = await store.catalog.versions.merge(positionals[0]!, values.into);
        if (result.kind === 'up-to-date') console.log(`${values.into} already has everything of ${positionals[0]}`);
        else {
          console.log(
            `merged ${positionals[0]} into ${values.into} (${result.kind}): ${result.tables.join(', ') || 'no table'} changed` +
              (result.appended.length ? `; ${result.appended.join(', ')} got both sides' appends` : '') +
              `; ${values.into} is at catalog commit ${result.commit.slice(0, 12)}`,
          );
        }
        return 0;
      });
    }
    default:
      throw new UsageError(sub ? `unknown branch command "${sub}"` : 'branch takes a command: list, create, delete, diff or merge');
  }
}

export async function tagCommand(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'create': {
      const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: { at: { type: 'string', default: MAIN_BRANCH } } });
      if (positionals.length !== 1) throw new UsageError('tag create takes one tag name');
      return withStore(async (store) => {
        const commit = await store.catalog.versions.createTag(positionals[0]!, values.at);
        console.log(`created tag ${positionals[0]} at ${values.at} (catalog commit ${commit.slice(0, 12)})`);
        return 0;
      });
    }
    case 'delete': {
      if (rest.length !== 1) throw new UsageError('tag delete takes one tag name');
      return withStore(async (store) => {
        await store.catalog.versions.deleteTag(rest[0]!);
        console.log(`deleted tag ${rest[0]}`);
        return 0;
      });
    }
    case 'list':
      return branchCommand(['list', ...rest]);
    default:
      throw new UsageError(sub ? `unknown tag command "${sub}"` : 'tag takes a command: create, delete or list');
  }
}

/** Collects expectation results from a run's log lines and failed steps, for `quiver run`. */
export class ExpectationLog {
  private readonly passed = new Map<string, string>();

  log(step: string, line: string): void {
    if (/^expectation \S+ passed/.test(line)) this.passed.set(step, line.replace(/^expectation /, ''));
  }

  report(view: RunView, say: (line: string) => void): void {
    const failed = view.steps.filter((s) => s.state === 'failed' && s.error?.name === 'ExpectationFailedError').map((s) => [s.name, s.error!.message.replace(/^expectation /, '')] as const);
    if (this.passed.size === 0 && failed.length === 0) return;
    say('\nexpectations:');
    for (const [, line] of this.passed) say(`  ✓ ${line}`);
    for (const [, message] of failed) say(`  ✗ ${message}`);
  }
}

/** What `quiver run` prints after a failed transactional run: where its tables are, and how to drop them. */
export function transactionHint(plan: Plan, runId: string, flags: { branch?: string | undefined; transaction?: boolean | undefined }): string {
  const commit = plan.steps.find((s) => s.system?.kind === 'commit')?.system as { transaction?: boolean; branch?: string } | undefined;
  if (!commit) return '';
  const transaction = flags.transaction ?? commit.transaction ?? false;
  if (!transaction) return '';
  const target = flags.branch ?? commit.branch ?? MAIN_BRANCH;
  const branch = `run/${runId}`;
  return (
    `\n${target} is unchanged. What the run wrote (if it got that far) is on branch ${branch}:\n` +
    `  quiver branch diff ${target} ${branch}      what it changed\n` +
    `  quiver table show TABLE --ref ${branch}   a table as the run left it\n` +
    `  quiver branch delete ${branch}            drop it`
  );
}
