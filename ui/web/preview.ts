import { h } from './dom.ts';
import { formatCount } from './format.ts';

/** First rows of a table as the server sends them: its schema, and values made JSON-safe. */
export interface Preview {
  schema: { name: string; type: string; nullable: boolean }[];
  rows: unknown[][];
  numRows: number;
  transport?: 'shm' | 'flight';
}

export function previewTable(title: string, p: Preview): HTMLElement {
  return h(
    'div',
    { class: 'preview-table', 'data-preview': '' },
    h('h4', {}, title, h('span', { class: 'muted' }, ` — first ${p.rows.length} of ${formatCount(p.numRows)} rows${p.transport ? `, read over ${p.transport === 'shm' ? 'shared memory (no copy)' : 'Arrow Flight'}` : ''}`)),
    h(
      'table',
      {},
      h('thead', {}, h('tr', {}, p.schema.map((f) => h('th', { title: `${f.type}${f.nullable ? ', nullable' : ''}` }, f.name, h('div', { class: 'type' }, f.type))))),
      h('tbody', {}, p.rows.map((r) => h('tr', {}, r.map((v) => h('td', {}, v === null ? 'null' : typeof v === 'object' ? JSON.stringify(v) : String(v)))))),
    ),
  );
}
