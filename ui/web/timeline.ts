/**
 * Per step, three spans: queued (its inputs were ready, no executor had claimed it), starting
 * (claimed: environment and inputs until its function was called, `codeStartedAt`) and running
 * (its function, until it finished).
 */
import type { Plan, RunView, StepView } from '../../schemas/index.ts';
import { h } from './dom.ts';
import { formatDuration } from './format.ts';

export interface Spans {
  queued: [number, number] | null;
  starting: [number, number] | null;
  running: [number, number] | null;
}

export function spansOf(step: StepView, plan: Plan, view: RunView, now: number): Spans {
  const byName = new Map(view.steps.map((s) => [s.name, s]));
  const planStep = plan.steps.find((p) => p.name === step.name);
  // Ready when the last parent finished (roots: when the run left its queue).
  const parents = (planStep?.inputs ?? []).map((i) => byName.get(i.step)?.finishedAt ?? null);
  const readyAt = parents.length ? (parents.every((p) => p !== null) ? Math.max(...(parents as number[])) : null) : (view.startedAt ?? view.submittedAt);
  const end = step.finishedAt ?? (step.state === 'running' || step.state === 'ready' ? now : null);
  const claimed = step.startedAt;
  const code = step.codeStartedAt;
  return {
    queued: readyAt !== null && (claimed ?? end) !== null ? [readyAt, Math.max(readyAt, claimed ?? end!)] : null,
    starting: claimed !== null ? [claimed, Math.max(claimed, code ?? end ?? claimed)] : null,
    running: code !== null && end !== null ? [code, Math.max(code, end)] : null,
  };
}

export function drawTimeline(plan: Plan, view: RunView, selected: string | null, onSelect: (step: string) => void): HTMLElement {
  const now = Date.now();
  const start = view.submittedAt;
  const end = Math.max(view.finishedAt ?? now, start + 1);
  const pct = (t: number) => `${(((t - start) / (end - start)) * 100).toFixed(3)}%`;
  const width = (a: number, b: number) => `${(((b - a) / (end - start)) * 100).toFixed(3)}%`;
  const bar = (kind: keyof Spans, span: [number, number] | null) => {
    if (!span) return null;
    const el = h('div', { class: `span ${kind}`, title: `${kind} ${formatDuration(span[1] - span[0])}` });
    // Set through the CSSOM: the page's content security policy refuses inline style attributes.
    el.style.left = pct(span[0]);
    el.style.width = width(span[0], span[1]);
    return el;
  };
  const rows = view.steps.map((step) => {
    const spans = spansOf(step, plan, view, now);
    return h(
      'div',
      { class: `tl-row${step.name === selected ? ' selected' : ''}`, 'data-step': step.name, onclick: () => onSelect(step.name) },
      h('div', { class: 'tl-name', title: step.name }, step.name),
      h('div', { class: 'tl-track' }, bar('queued', spans.queued), bar('starting', spans.starting), bar('running', spans.running)),
      h(
        'div',
        { class: 'tl-numbers' },
        spans.queued ? `q ${formatDuration(spans.queued[1] - spans.queued[0])}` : '',
        spans.starting ? ` · s ${formatDuration(spans.starting[1] - spans.starting[0])}` : '',
        spans.running ? ` · r ${formatDuration(spans.running[1] - spans.running[0])}` : '',
      ),
    );
  });
  const admission = view.startedAt !== null && view.startedAt > view.submittedAt ? bar('queued', [view.submittedAt, view.startedAt]) : null;
  return h(
    'div',
    { class: 'timeline' },
    h('div', { class: 'tl-legend' }, h('span', { class: 'key queued' }), 'queued', h('span', { class: 'key starting' }), 'starting (environment, inputs)', h('span', { class: 'key running' }), 'running', h('span', { class: 'tl-total' }, `total ${formatDuration(end - start)}`)),
    admission ? h('div', { class: 'tl-row' }, h('div', { class: 'tl-name' }, '(run queue)'), h('div', { class: 'tl-track' }, admission), h('div', { class: 'tl-numbers' })) : null,
    rows,
  );
}
