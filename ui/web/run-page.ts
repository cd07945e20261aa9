/** One run: its DAG, timeline, step facts, live logs, output previews, cancel and rerun. */
import type { LiveMessage } from '../hub.ts';
import type { LogLine, Plan, RunView, StepView } from '../../schemas/index.ts';
import { ApiError, follow, getJson, postJson } from './api.ts';
import { drawDag, type DagView } from './dag.ts';
import { h, perFrame, replace } from './dom.ts';
import { describeTrigger, formatBytes, formatCount, formatDuration, formatTime } from './format.ts';
import { previewTable, type Preview } from './preview.ts';
import { drawTimeline } from './timeline.ts';

interface RunPageData {
  view: RunView;
  plan: Plan;
  params: Record<string, string>;
  event: { subject: string; id: string; payload: unknown } | null;
  logs: LogLine[];
}

const FINISHED_STEP = new Set(['succeeded', 'failed', 'skipped', 'cancelled']);
/** How far a step has gone: within one attempt it only moves forward. */
const stepRank = (state: string) => (FINISHED_STEP.has(state) ? 3 : state === 'running' ? 2 : state === 'ready' ? 1 : 0);
const FINISHED_RUN = new Set(['succeeded', 'failed', 'cancelled']);
/** How long a run page waits for a just-submitted run's record: 40 looks, 250 ms apart. */
const RECORD_LOOKUPS = 40;
const RECORD_LOOKUP_MS = 250;

/** A view may arrive after a fresher fact (they travel separately): a step never goes back within its attempt, a finished run never goes back. */
export function mergeView(current: RunView, next: RunView): RunView {
  if (FINISHED_RUN.has(current.state) && !FINISHED_RUN.has(next.state)) return current;
  const before = new Map(current.steps.map((s) => [s.name, s]));
  const steps = next.steps.map((n) => {
    const c = before.get(n.name);
    return c && stepRank(c.state) > stepRank(n.state) && c.attempt >= n.attempt ? c : n;
  });
  return { ...next, steps };
}

function patchStep(view: RunView, name: string, patch: (s: StepView) => StepView | null): RunView {
  let changed = false;
  const steps = view.steps.map((s) => {
    if (s.name !== name) return s;
    const next = patch(s);
    if (!next) return s;
    changed = true;
    return next;
  });
  return changed ? { ...view, steps } : view;
}

export function runPage(root: HTMLElement, runId: string): () => void {
  let data: RunPageData | null = null;
  let dag: DagView | null = null;
  let selected: string | null = null;
  const previews = new Map<string, Preview | string>();
  const header = h('div', { class: 'run-header' });
  const actions = h('div', { class: 'actions' });
  const message = h('div', { class: 'message', role: 'status' });
  const graph = h('div', { class: 'graph' });
  const timeline = h('div', { class: 'timeline-box' });
  const stepsTable = h('div', { class: 'steps' });
  const detail = h('div', { class: 'step-detail' });
  replace(
    root,
    h('section', { class: 'run-page' }, header, actions, message, h('h3', {}, 'Graph'), graph, h('h3', {}, 'Timeline'), timeline, h('h3', {}, 'Steps'), stepsTable, detail),
  );

  const select = (step: string) => {
    selected = step;
    dag?.select(step);
    paint();
    paintDetail();
  };

  const paint = perFrame(() => {
    if (!data) return;
    const v = data.view;
    const total = v.finishedAt ? v.finishedAt - v.submittedAt : Date.now() - v.submittedAt;
    replace(
      header,
      h('h2', {}, v.pipeline, v.version ? h('span', { class: 'muted' }, ` v${v.version}`) : null, ' ', h('span', { class: `badge state-${v.state}`, 'data-run-state': v.state }, v.state)),
      h(
        'div',
        { class: 'muted' },
        `run ${v.runId} · ${describeTrigger(v.trigger)} · submitted ${formatTime(v.submittedAt)} · ${formatDuration(total)}`,
        Object.keys(data.params).length ? ` · params ${Object.entries(data.params).map(([k, x]) => `${k}=${x}`).join(' ')}` : '',
      ),
    );
    const cancellable = v.state === 'running' || v.state === 'queued';
    const cancelButton = h('button', { class: 'danger', 'data-action': 'cancel', disabled: !cancellable, onclick: () => void act('cancel') }, 'Cancel run');
    const rerunButton = h('button', { 'data-action': 'rerun', title: 'Submit the same pipeline version with the same params (and event) again', onclick: () => void act('rerun') }, 'Rerun');
    replace(actions, cancelButton, rerunButton);
    dag?.update(v.steps);
    replace(timeline, drawTimeline(data.plan, v, selected, select));
    replace(stepsTable, stepsTableOf(v, selected, select));
    paintFacts();
  });

  async function act(action: 'cancel' | 'rerun', from?: string) {
    if (action === 'cancel' && !confirm(`Cancel run ${runId}? Its running steps are stopped.`)) return;
    try {
      const answer = await postJson<{ runId: string }>(`/api/runs/${runId}/${action}${from ? `?from=${encodeURIComponent(from)}` : ''}`);
      if (action === 'rerun') location.hash = `#/runs/${answer.runId}`;
      else message.textContent = 'cancelling…';
    } catch (error) {
      message.textContent = (error as Error).message;
    }
  }

  const factsBox = h('div', { class: 'facts' });
  const logBox = h('pre', { class: 'logs', 'data-logs': '' });
  const previewBox = h('div', { class: 'preview' });

  function paintFacts() {
    if (!data || !selected) return;
    const step = data.view.steps.find((s) => s.name === selected);
    if (!step) return;
    const rows: [string, string][] = [
      ['state', step.state + (step.attempt > 1 ? ` (attempt ${step.attempt})` : '')],
      ['rows', formatCount(step.rows)],
      ['bytes', formatBytes(step.bytes)],
      ['transport', step.transport ?? '–'],
      ['copied', formatBytes(step.copiedBytes)],
      ['isolation', step.isolation ?? '–'],
      ['host', step.hostId ?? '–'],
      ['claimed', formatTime(step.startedAt)],
      ['finished', formatTime(step.finishedAt)],
    ];
    if (step.scan) rows.push(['scan', `${step.scan.table} @ ${step.scan.snapshotId ?? '–'}: ${step.scan.rowGroupsRead} row groups read, ${step.scan.rowGroupsSkipped} skipped, ${formatBytes(step.scan.bytesFetched)} fetched`]);
    replace(
      factsBox,
      h('dl', {}, rows.flatMap(([k, x]) => [h('dt', {}, k), h('dd', { 'data-fact': k }, x)])),
      step.error ? h('div', { class: 'error' }, h('strong', {}, `${step.error.name}: ${step.error.message}`), step.error.stack ? h('pre', { class: 'stack' }, step.error.stack) : null) : null,
      h('button', { 'data-action': 'rerun-from', title: 'Run again from this step: it and the steps after it are computed, the ones before come from the output cache', onclick: () => void act('rerun', step.name) }, 'Rerun from here'),
      step.output && !(data.view.outputsReleased && !data.view.keep)
        ? h('button', { 'data-action': 'preview', onclick: () => void loadPreview(step.name) }, 'Preview output')
        : step.output
          ? h('p', { class: 'muted' }, 'The outputs of this run were released: there is nothing to preview.')
          : null,
    );
  }

  function paintDetail() {
    if (!data || !selected) {
      replace(detail);
      return;
    }
    const name = selected;
    replace(detail, h('h3', {}, `Step ${name}`), factsBox, h('h4', {}, 'Logs'), logBox, previewBox);
    paintFacts();
    const lines = data.logs.filter((l) => l.step === name);
    replace(logBox, ...lines.map(logLineOf));
    if (lines.length === 0) logBox.append(h('span', { class: 'muted' }, '(no log lines seen since the UI started)\n'));
    const cached = previews.get(name);
    replace(previewBox, cached === undefined ? null : typeof cached === 'string' ? h('p', { class: 'error' }, cached) : previewTable(`Output of ${name}`, cached));
  }

  async function loadPreview(step: string) {
    replace(previewBox, h('p', { class: 'muted' }, 'reading…'));
    try {
      previews.set(step, await getJson<Preview>(`/api/runs/${runId}/steps/${step}/output`));
    } catch (error) {
      previews.set(step, (error as ApiError).message);
    }
    if (selected === step) paintDetail();
  }

  /** Heard before the first read answered: applied once it has. */
  const early: LiveMessage[] = [];
  function onMessage(m: LiveMessage) {
    if (!data) {
      early.push(m);
      return;
    }
    if (m.type === 'view') data.view = mergeView(data.view, m.view as RunView);
    else if (m.type === 'started') {
      data.view = patchStep(data.view, m.step, (s) => (FINISHED_STEP.has(s.state) ? null : { ...s, state: 'running', startedAt: m.at, hostId: m.hostId, attempt: m.attempt }));
    } else if (m.type === 'completion') {
      const c = m.completion as import('../../schemas/index.ts').StepCompletion;
      data.view = patchStep(data.view, c.step, (s) =>
        c.type === 'step.succeeded'
          ? {
              ...s,
              state: 'succeeded',
              attempt: c.attempt,
              rows: c.output.rows,
              bytes: c.output.byteSize,
              transport: c.transport,
              copiedBytes: c.inputCopiedBytes + c.outputCopiedBytes,
              output: c.output,
              startedAt: c.startedAt,
              codeStartedAt: c.codeStartedAt ?? s.codeStartedAt,
              finishedAt: c.at,
              isolation: c.isolation ?? null,
              scan: c.scan ?? null,
            }
          : { ...s, state: 'failed', attempt: c.attempt, error: c.error, startedAt: c.startedAt ?? s.startedAt, codeStartedAt: c.codeStartedAt ?? s.codeStartedAt, finishedAt: c.at },
      );
    } else if (m.type === 'log') {
      data.logs.push(m.log);
      if (m.log.step === selected) {
        logBox.querySelector('.muted')?.remove();
        logBox.append(logLineOf(m.log));
      }
      return;
    }
    paint();
  }

  let left = false;
  let lookups = 0;
  async function load() {
    try {
      const fresh = await getJson<RunPageData>(`/api/runs/${runId}`);
      if (left) return;
      const firstLoad = !data;
      // Lines heard live since an earlier read stay: a read may have been answered before they came.
      data = data ? { ...fresh, view: mergeView(data.view, fresh.view), logs: mergeLogs(data.logs, fresh.logs) } : fresh;
      for (const m of early.splice(0)) {
        if (m.type === 'log') data.logs = mergeLogs([m.log], data.logs);
        else onMessage(m);
      }
      if (firstLoad) {
        dag = drawDag(data.plan, select);
        replace(graph, dag.element);
      }
      paint();
      paintDetail();
    } catch (error) {
      if (left) return;
      // A run submitted a moment ago may not be recorded yet (its page opened from a link the
      // submitter printed): look again for a few seconds before saying there is none.
      if (!data && error instanceof ApiError && error.status === 404 && lookups++ < RECORD_LOOKUPS) {
        setTimeout(() => void load(), RECORD_LOOKUP_MS);
        return;
      }
      replace(root, h('p', { class: 'error' }, (error as Error).message));
    }
  }

  // Following before reading: whatever happens in between arrives after the read, and merges.
  const stop = follow(`run=${runId}`, onMessage, () => void load());
  void load();
  // Running spans grow with the clock.
  const tick = setInterval(() => {
    if (data && !FINISHED_RUN.has(data.view.state)) paint();
  }, 1000);
  return () => {
    left = true;
    stop();
    clearInterval(tick);
  };
}

/** Both lists' lines once each, in time order. */
function mergeLogs(heard: LogLine[], read: LogLine[]): LogLine[] {
  const key = (l: LogLine) => `${l.at} ${l.step} ${l.stream} ${l.line}`;
  const seen = new Set(read.map(key));
  return [...read, ...heard.filter((l) => !seen.has(key(l)))].sort((a, b) => a.at - b.at);
}

function logLineOf(l: LogLine): HTMLElement {
  return h('span', { class: `log ${l.stream}` }, `${formatTime(l.at).slice(11)} ${l.line}\n`);
}

function stepsTableOf(view: RunView, selected: string | null, select: (s: string) => void): HTMLElement {
  return h(
    'table',
    {},
    h('thead', {}, h('tr', {}, ['step', 'state', 'rows', 'bytes', 'transport', 'copied', 'isolation', 'host', 'duration'].map((c) => h('th', {}, c)))),
    h(
      'tbody',
      {},
      view.steps.map((s) =>
        h(
          'tr',
          { class: s.name === selected ? 'selected' : '', 'data-step-row': s.name, onclick: () => select(s.name) },
          h('td', {}, s.name),
          h('td', {}, h('span', { class: `badge state-${s.state}` }, s.state)),
          h('td', { class: 'num' }, formatCount(s.rows)),
          h('td', { class: 'num' }, formatBytes(s.bytes)),
          h('td', {}, s.transport ?? '–'),
          h('td', { class: 'num' }, formatBytes(s.copiedBytes)),
          h('td', {}, s.isolation ?? '–'),
          h('td', {}, s.hostId ?? '–'),
          h('td', { class: 'num' }, formatDuration(s.startedAt !== null && s.finishedAt !== null ? s.finishedAt - s.startedAt : null)),
        ),
      ),
    ),
  );
}
