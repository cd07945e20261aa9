/** Deployed pipelines: versions, triggers, next fire times, admission; publish a test event checked against the trigger's schema. */
import type { EventTrigger, ScheduleSpec } from '../../schemas/index.ts';
import { getJson, postJson } from './api.ts';
import { h, replace } from './dom.ts';
import { formatTime } from './format.ts';

interface PipelineRow {
  name: string;
  version: number;
  versions: { version: number; deployedAt: number; codeHash: string }[];
  deployedAt: number;
  deployedBy: string;
  steps: number;
  events: EventTrigger[];
  schedule: ScheduleSpec | null;
  nextFire: number | null;
  maxConcurrentRuns: number | null;
}

export function pipelinesPage(root: HTMLElement): () => void {
  replace(root, h('section', {}, h('h2', {}, 'Pipelines'), h('p', { class: 'muted' }, 'loading…')));
  void getJson<PipelineRow[]>('/api/pipelines').then(
    (rows) => replace(root, h('section', {}, h('h2', {}, 'Pipelines'), rows.length ? rows.map(card) : h('p', { class: 'muted' }, 'No pipeline is deployed (quiver deploy FILE).'))),
    (error: Error) => replace(root, h('p', { class: 'error' }, error.message)),
  );
  return () => {};
}

function card(p: PipelineRow): HTMLElement {
  return h(
    'div',
    { class: 'card', 'data-pipeline': p.name },
    h('h3', {}, p.name, h('span', { class: 'muted' }, ` v${p.version} · ${p.steps} steps · deployed ${formatTime(p.deployedAt)} by ${p.deployedBy}`)),
    h(
      'dl',
      {},
      h('dt', {}, 'events'),
      h('dd', {}, p.events.length ? p.events.map((e) => `${e.subject}${e.schema ? ' (with schema)' : ''}`).join(', ') : '–'),
      h('dt', {}, 'schedule'),
      h('dd', {}, p.schedule ? `${p.schedule.cron} (${p.schedule.timezone}), catch-up ${p.schedule.catchUp}, overlap ${p.schedule.overlap}` : '–'),
      h('dt', {}, 'next fire'),
      h('dd', {}, p.nextFire ? formatTime(p.nextFire) : '–'),
      h('dt', {}, 'max concurrent runs'),
      h('dd', {}, p.maxConcurrentRuns === null ? 'unlimited' : String(p.maxConcurrentRuns)),
      h('dt', {}, 'versions'),
      h('dd', {}, p.versions.map((v) => `v${v.version} ${formatTime(v.deployedAt)} ${v.codeHash.slice(0, 8)}`).join(' · ')),
      h('dt', {}, 'runs'),
      h('dd', {}, h('a', { href: `#/runs?pipeline=${p.name}` }, 'see its runs')),
    ),
    p.events.length ? publisher(p) : null,
  );
}

function publisher(p: PipelineRow): HTMLElement {
  const first = p.events[0]!;
  const subject = h('input', { value: first.subject.includes('*') || first.subject.includes('>') ? '' : first.subject, placeholder: first.subject, 'data-field': 'subject' });
  const example = first.schema ? exampleOf(first.schema) : {};
  const payload = h('textarea', { rows: 5, spellcheck: false, 'data-field': 'payload' }, JSON.stringify(example, null, 2));
  const verdict = h('div', { class: 'verdict', role: 'status' });
  const button = h('button', { 'data-action': 'publish', disabled: true }, 'Publish test event');
  const schema = first.schema ? h('details', {}, h('summary', {}, 'trigger schema'), h('pre', {}, JSON.stringify(first.schema, null, 2))) : null;
  let checking = 0;
  const body = (): { subject: string; payload: unknown } | string => {
    try {
      return { subject: subject.value.trim(), payload: JSON.parse(payload.value) as unknown };
    } catch (error) {
      return `not JSON: ${(error as Error).message}`;
    }
  };
  async function check() {
    const n = ++checking;
    const b = body();
    if (typeof b === 'string') {
      verdict.textContent = b;
      verdict.className = 'verdict bad';
      button.disabled = true;
      return;
    }
    try {
      const answer = await postJson<{ ok: boolean; problem: string | null }>(`/api/pipelines/${p.name}/check`, b);
      if (n !== checking) return;
      verdict.textContent = answer.ok ? 'fits the trigger' : (answer.problem ?? 'does not fit');
      verdict.className = `verdict ${answer.ok ? 'good' : 'bad'}`;
      button.disabled = !answer.ok;
    } catch (error) {
      verdict.textContent = (error as Error).message;
      verdict.className = 'verdict bad';
    }
  }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const later = () => {
    clearTimeout(timer);
    timer = setTimeout(() => void check(), 250);
  };
  subject.addEventListener('input', later);
  payload.addEventListener('input', later);
  button.addEventListener('click', async () => {
    const b = body();
    if (typeof b === 'string') return;
    try {
      const r = await postJson<{ id: string; sequence: number; duplicate: boolean }>(`/api/pipelines/${p.name}/publish`, b);
      verdict.textContent = r.duplicate ? `event ${r.id} was published before: dropped` : `published event ${r.id} (sequence ${r.sequence}): see Runs`;
      verdict.className = 'verdict good';
    } catch (error) {
      verdict.textContent = (error as Error).message;
      verdict.className = 'verdict bad';
    }
  });
  void check();
  return h('div', { class: 'publisher' }, h('h4', {}, 'Publish a test event'), h('label', {}, 'subject ', subject), payload, schema, h('div', { class: 'row' }, button, verdict));
}

/** A starting point for the editor: the schema's required properties with values of their type. */
function exampleOf(schema: Record<string, unknown>): unknown {
  const props = (schema.properties ?? {}) as Record<string, { type?: string; minimum?: number }>;
  const required = (schema.required ?? []) as string[];
  const out: Record<string, unknown> = {};
  for (const key of required) {
    const t = props[key]?.type;
    out[key] = t === 'integer' || t === 'number' ? (props[key]?.minimum ?? 0) : t === 'boolean' ? false : t === 'array' ? [] : t === 'object' ? {} : '';
  }
  return out;
}
