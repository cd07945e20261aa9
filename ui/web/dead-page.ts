/** Events that started nothing, with the reason and the payload as received; new ones arrive live. */
import type { DeadEvent } from '../../schemas/index.ts';
import { follow, getJson } from './api.ts';
import { h, replace } from './dom.ts';
import { formatTime } from './format.ts';

export function deadPage(root: HTMLElement): () => void {
  const body = h('tbody');
  let dead: DeadEvent[] = [];
  replace(root, h('section', {}, h('h2', {}, 'Dead letters'), h('table', {}, h('thead', {}, h('tr', {}, ['at', 'subject', 'event id', 'pipeline', 'reason', 'payload'].map((c) => h('th', {}, c)))), body)));
  const paint = () =>
    replace(
      body,
      dead.length
        ? [...dead].reverse().map((d) => h('tr', { 'data-dead': d.eventId }, h('td', {}, formatTime(d.at)), h('td', {}, d.subject), h('td', {}, d.eventId), h('td', {}, d.pipeline ?? '–'), h('td', {}, d.reason), h('td', {}, h('code', {}, d.payload))))
        : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No dead-lettered events.')),
    );
  const key = (d: DeadEvent) => `${d.at} ${d.eventId}`;
  const load = async () => {
    const read = await getJson<DeadEvent[]>('/api/dead');
    // Letters heard live while the read was on its way stay.
    const known = new Set(read.map(key));
    dead = [...read, ...dead.filter((d) => !known.has(key(d)))].sort((a, b) => a.at - b.at);
    paint();
  };
  const stop = follow(
    'topic=dead',
    (m) => {
      if (m.type !== 'dead') return;
      dead.push(m.dead as DeadEvent);
      paint();
    },
    () => void load(),
  );
  void load().catch((e: Error) => replace(root, h('p', { class: 'error' }, e.message)));
  return stop;
}
