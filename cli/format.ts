import type { Table } from 'apache-arrow';
import type { RunView, StepView } from '../schemas/index.ts';

export function formatBytes(bytes: number | null): string {
  if (bytes === null) return '-';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

export function formatDuration(ms: number | null): string {
  if (ms === null) return '-';
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function stepDuration(step: StepView): number | null {
  return step.startedAt !== null && step.finishedAt !== null ? step.finishedAt - step.startedAt : null;
}

/** Renders rows as a left-aligned text table with a header and a rule. */
export function textTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), widths.map((w) => '─'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

export function summaryTable(view: RunView): string {
  return textTable(
    ['step', 'state', 'isolation', 'rows', 'bytes', 'transport', 'copied', 'time'],
    view.steps.map((s) => [
      s.name,
      s.state === 'succeeded' && s.transport === 'cache' ? 'cached' : s.state,
      s.isolation ?? '-',
      s.rows === null ? '-' : s.rows.toLocaleString('en-US'),
      formatBytes(s.bytes),
      s.transport ?? '-',
      formatBytes(s.copiedBytes),
      formatDuration(stepDuration(s)),
    ]),
  );
}

/** The first rows of a table, each value shortened to stay readable. */
export function previewTable(table: Table, rows = 10): string {
  const names = table.schema.fields.map((f) => f.name);
  const shown: string[][] = [];
  const limit = Math.min(rows, table.numRows);
  for (let i = 0; i < limit; i++) {
    const row = table.get(i);
    shown.push(names.map((n) => formatValue(row?.[n as keyof typeof row])));
  }
  const more = table.numRows > limit ? `\n… ${(table.numRows - limit).toLocaleString('en-US')} more rows` : '';
  return textTable(names, shown) + more;
}

function formatValue(value: unknown): string {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : value.toFixed(4).replace(/0+$/, '').replace(/\.$/, '');
  if (typeof value === 'bigint') return value.toString();
  const text = typeof value === 'object' ? JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v)) : String(value);
  return text.length > 40 ? `${text.slice(0, 39)}…` : text;
}
