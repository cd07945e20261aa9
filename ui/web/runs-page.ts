/** Every run, newest first, filtered by pipeline, state, trigger and time; changes arrive live. */
import type { RunSummary } from '../hub.ts';
import { follow, getJson } from './api.ts';
import { h, perFrame, replace } from './dom.ts';
import { describeTrigger, formatDuration, formatTime } from './format.ts';

const SHOWN = 500;
const SINCE: Record<string, number> = { any: Infinity, '1h': 3_600_000, '24h': 86_400_000, '7d': 7 * 86_400_000 };

export function runsPage(root: HTMLElement): () => void {
  const runs = new Map<string, RunSummary>();
  // The pipelines page links here as #/runs?pipeline=NAME.
  const query = new URLSearchParams(location.hash.split('?')[1] ?? '');
  const filters = { pipeline: query.get('pipeline') ?? '', state: '', trigger: '', since: 'any' };
  const pipelineSelect = h('select', { 'data-filter': 'pipeline', onchange: (e) => set('pipeline', (e.target as HTMLSelectElement).value) });
  const select = (key: keyof typeof filters, options: string[]) =>
    h('select', { 'data-filter': key, onchange: (e) => set(key, (e.target as HTMLSelectElement).value) }, options.map((o) => h('option', { value: o === 'all' ? '' : o }, o)));
  const body = h('tbody');
  const count = h('span', { class: 'muted' });
  replace(
    root,
    h(
      'section',
      {},
      h('h2', {}, 'Runs ', count),
      h(
        'div',
        { class: 'filters' },
        h('label', {}, 'pipeline ', pipelineSelect),
        h('label', {}, 'state ', select('state', ['all', 'queued', 'running', 'succeeded', 'failed', 'cancelled'])),
        h('label', {}, 'trigger ', select('trigger', ['all', 'user', 'event', 'schedule'])),
        h('label', {}, 'submitted ', h('select', { 'data-filter': 'since', onchange: (e) => set('since', (e.target as HTMLSelectElement).value) }, Object.keys(SINCE).map((k) => h('option', { value: k }, k === 'any' ? 'any time' : `last ${k}`)))),
      ),
      h('table', { class: 'runs' }, h('thead', {}, h('tr', {}, ['run', 'pipeline', 'trigger', 'state', 'submitted', 'duration'].map((c) => h('th', {}, c)))), body),
    ),
  );

  function set(key: keyof typeof filters, value: string) {
    filters[key] = value;
    paint();
  }

  const paint = perFrame(() => {
    const pipelines = [...new Set([...runs.values()].map((r) => r.pipeline))].sort();
    if (filters.pipeline && !pipelines.includes(filters.pipeline)) pipelines.push(filters.pipeline);
    if (pipelineSelect.options.length !== pipelines.length + 1) {
      replace(pipelineSelect, h('option', { value: '' }, 'all'), pipelines.map((p) => h('option', { value: p, selected: p === filters.pipeline }, p)));
    }
    const now = Date.now();
    const shown = [...runs.values()]
      .filter((r) => (!filters.pipeline || r.pipeline === filters.pipeline) && (!filters.state || r.state === filters.state) && (!filters.trigger || r.trigger.kind === filters.trigger) && now - r.submittedAt <= SINCE[filters.since]!)
      .sort((a, b) => (a.runId < b.runId ? 1 : -1));
    count.textContent = `(${shown.length} of ${runs.size})`;
    replace(
      body,
      shown.slice(0, SHOWN).map((r) =>
        h(
          'tr',
          { 'data-run': r.runId, 'data-state': r.state },
          h('td', {}, h('a', { href: `#/runs/${r.runId}` }, r.runId)),
          h('td', {}, r.pipeline + (r.version ? ` v${r.version}` : '')),
          h('td', {}, describeTrigger(r.trigger)),
          h('td', {}, h('span', { class: `badge state-${r.state}` }, r.state)),
          h('td', {}, formatTime(r.submittedAt)),
          h('td', { class: 'num' }, formatDuration(r.finishedAt !== null ? r.finishedAt - r.submittedAt : r.state === 'running' ? now - r.submittedAt : null)),
        ),
      ),
    );
  });

  async function load() {
    for (const r of await getJson<RunSummary[]>('/api/runs')) runs.set(r.runId, r);
    paint();
  }
  const stop = follow(
    'topic=runs',
    (m) => {
      if (m.type === 'run') runs.set(m.summary.runId, m.summary);
      else if (m.type === 'run-removed') runs.delete(m.runId);
      paint();
    },
    () => void load(),
  );
  void load();
  const tick = setInterval(paint, 1000);
  return () => {
    stop();
    clearInterval(tick);
  };
}
