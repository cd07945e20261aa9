/** The run's DAG, laid out by dagre (a layered layout) and drawn as SVG; states change by attribute, never by relayout. */
import dagre from '@dagrejs/dagre';
import type { Plan, StepView } from '../../schemas/index.ts';
import { s } from './dom.ts';
import { recordState } from './live-marks.ts';

const NODE_HEIGHT = 44;

export interface DagView {
  readonly element: SVGSVGElement;
  update(steps: readonly StepView[]): void;
  select(step: string | null): void;
}

export function drawDag(plan: Plan, onSelect: (step: string) => void): DagView {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: 'LR', nodesep: 14, ranksep: 56, marginx: 12, marginy: 12 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const step of plan.steps) g.setNode(step.name, { width: Math.max(130, step.name.length * 7.4 + 36), height: NODE_HEIGHT });
  for (const step of plan.steps) for (const input of step.inputs) g.setEdge(input.step, step.name);
  dagre.layout(g);
  const { width = 0, height = 0 } = g.graph();

  const edges = s('g', { class: 'edges' });
  for (const e of g.edges()) {
    const points = (g.edge(e) as { points: { x: number; y: number }[] }).points;
    const d = points.map((p, i) => `${i ? 'L' : 'M'}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(' ');
    edges.append(s('path', { d, 'marker-end': 'url(#arrow)', 'data-from': e.v, 'data-to': e.w }));
  }
  const nodes = new Map<string, { group: SVGGElement; label: SVGTextElement }>();
  const nodeLayer = s('g', { class: 'nodes' });
  for (const step of plan.steps) {
    const n = g.node(step.name) as { x: number; y: number; width: number; height: number };
    const label = s('text', { x: 12, y: 32, class: 'node-state' }, 'waiting');
    const group = s(
      'g',
      { class: 'node', 'data-step': step.name, 'data-state': 'waiting', transform: `translate(${n.x - n.width / 2},${n.y - n.height / 2})`, tabindex: 0, role: 'button' },
      s('title', {}, step.name),
      s('rect', { width: n.width, height: n.height, rx: 7 }),
      s('circle', { cx: n.width - 14, cy: 14, r: 5, class: 'dot' }),
      s('text', { x: 12, y: 17, class: 'node-name' }, step.name.startsWith('__') ? step.name.slice(2) : step.name),
      label,
    );
    group.addEventListener('click', () => onSelect(step.name));
    group.addEventListener('keydown', (e) => {
      if ((e as KeyboardEvent).key === 'Enter') onSelect(step.name);
    });
    nodes.set(step.name, { group, label });
    nodeLayer.append(group);
  }
  const element = s(
    'svg',
    { class: 'dag', width: Math.ceil(width), height: Math.ceil(height), viewBox: `0 0 ${Math.ceil(width)} ${Math.ceil(height)}` },
    s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' }, s('path', { d: 'M 0 0 L 10 5 L 0 10 z' }))),
    edges,
    nodeLayer,
  );
  return {
    element,
    update(steps) {
      for (const step of steps) {
        const node = nodes.get(step.name);
        if (!node || node.group.getAttribute('data-state') === step.state) continue;
        node.group.setAttribute('data-state', step.state);
        node.label.textContent = step.state + (step.attempt > 1 ? ` (attempt ${step.attempt})` : '');
        recordState(step.name, step.state);
      }
    },
    select(step) {
      for (const [name, node] of nodes) node.group.classList.toggle('selected', name === step);
    },
  };
}
