/** Stored tables: schema, the branches and tags holding them, snapshots with row counts, and a preview of any snapshot. */
import { getJson } from './api.ts';
import { h, replace } from './dom.ts';
import { formatBytes, formatCount, formatTime } from './format.ts';
import { previewTable, type Preview } from './preview.ts';

interface TableRow {
  name: string;
  rows: number;
  bytes: number;
  snapshots: number;
  lastChange: number | null;
}
interface TableDetail {
  name: string;
  rows: number;
  bytes: number;
  location: string;
  currentSnapshotId: string | null;
  fields: { name: string; type: string; nullable: boolean }[];
  snapshots: { snapshotId: string; timestampMs: number; operation: string; summary: { addedRows: number; totalRows: number; totalFiles: number } }[];
  /** The branches and tags where the table exists, at their snapshot. */
  refs: { name: string; kind: 'branch' | 'tag'; snapshotId: string | null; rows: number }[];
}

export function tablesPage(root: HTMLElement, name: string | null): () => void {
  if (name) void showTable(root, name);
  else
    void getJson<TableRow[]>('/api/tables').then(
      (tables) =>
        replace(
          root,
          h(
            'section',
            {},
            h('h2', {}, 'Tables'),
            tables.length
              ? h(
                  'table',
                  {},
                  h('thead', {}, h('tr', {}, ['table', 'rows', 'size', 'snapshots', 'last change'].map((c) => h('th', {}, c)))),
                  h('tbody', {}, tables.map((t) => h('tr', { 'data-table': t.name }, h('td', {}, h('a', { href: `#/tables/${t.name}` }, t.name)), h('td', { class: 'num' }, formatCount(t.rows)), h('td', { class: 'num' }, formatBytes(t.bytes)), h('td', { class: 'num' }, String(t.snapshots)), h('td', {}, formatTime(t.lastChange))))),
                )
              : h('p', { class: 'muted' }, 'No stored tables.'),
          ),
        ),
      (e: Error) => replace(root, h('p', { class: 'error' }, e.message)),
    );
  return () => {};
}

async function showTable(root: HTMLElement, name: string) {
  const previewBox = h('div', { class: 'preview' });
  const preview = async (snapshot: string | null) => {
    replace(previewBox, h('p', { class: 'muted' }, 'reading…'));
    try {
      const p = await getJson<Preview>(`/api/tables/${name}/preview${snapshot ? `?snapshot=${encodeURIComponent(snapshot)}` : ''}`);
      replace(previewBox, previewTable(snapshot ? `${name} at ${snapshot}` : `${name} (current)`, p));
    } catch (error) {
      replace(previewBox, h('p', { class: 'error' }, (error as Error).message));
    }
  };
  try {
    const t = await getJson<TableDetail>(`/api/tables/${name}`);
    replace(
      root,
      h(
        'section',
        {},
        h('h2', {}, h('a', { href: '#/tables' }, 'Tables'), ` / ${t.name}`),
        h('p', { class: 'muted' }, `${formatCount(t.rows)} rows, ${formatBytes(t.bytes)}, at ${t.location}`),
        h('h3', {}, 'Schema'),
        h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'column'), h('th', {}, 'type'), h('th', {}, 'nullable'))), h('tbody', {}, t.fields.map((f) => h('tr', {}, h('td', {}, f.name), h('td', {}, f.type), h('td', {}, f.nullable ? 'yes' : 'no'))))),
        h('h3', {}, 'Branches and tags'),
        h(
          'table',
          { 'data-refs': '' },
          h('thead', {}, h('tr', {}, ['ref', 'kind', 'snapshot', 'rows'].map((c) => h('th', {}, c)))),
          h('tbody', {}, t.refs.map((r) => h('tr', { 'data-ref': r.name }, h('td', {}, r.name), h('td', {}, r.kind), h('td', {}, r.snapshotId ?? '–'), h('td', { class: 'num' }, formatCount(r.rows))))),
        ),
        h('h3', {}, 'Snapshots'),
        h(
          'table',
          { 'data-snapshots': '' },
          h('thead', {}, h('tr', {}, ['snapshot', 'time', 'operation', 'added rows', 'rows', 'files', ''].map((c) => h('th', {}, c)))),
          h(
            'tbody',
            {},
            [...t.snapshots].reverse().map((s) =>
              h(
                'tr',
                {},
                h('td', {}, s.snapshotId + (s.snapshotId === t.currentSnapshotId ? ' (current)' : '')),
                h('td', {}, formatTime(s.timestampMs)),
                h('td', {}, s.operation),
                h('td', { class: 'num' }, formatCount(s.summary.addedRows)),
                h('td', { class: 'num' }, formatCount(s.summary.totalRows)),
                h('td', { class: 'num' }, String(s.summary.totalFiles)),
                h('td', {}, h('button', { onclick: () => void preview(s.snapshotId) }, 'Preview')),
              ),
            ),
          ),
        ),
        h('button', { 'data-action': 'preview-table', onclick: () => void preview(null) }, 'Preview current rows'),
        previewBox,
      ),
    );
  } catch (error) {
    replace(root, h('p', { class: 'error' }, (error as Error).message));
  }
}
