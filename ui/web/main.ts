/** The UI's entry: a hash router over the pages. Bundled by esbuild at server start (ui/bundle.ts). */
import './style.css';
import { deadPage } from './dead-page.ts';
import { h, replace } from './dom.ts';
import { marks } from './live-marks.ts';
import { pipelinesPage } from './pipelines-page.ts';
import { runPage } from './run-page.ts';
import { runsPage } from './runs-page.ts';
import { tablesPage } from './tables-page.ts';

marks();
const main = h('main');
const nav = h(
  'nav',
  {},
  h('span', { class: 'brand' }, 'Quiver'),
  h('a', { href: '#/runs', 'data-nav': 'runs' }, 'Runs'),
  h('a', { href: '#/pipelines', 'data-nav': 'pipelines' }, 'Pipelines'),
  h('a', { href: '#/dead', 'data-nav': 'dead' }, 'Dead letters'),
  h('a', { href: '#/tables', 'data-nav': 'tables' }, 'Tables'),
);
replace(document.getElementById('app')!, nav, main);

let leave: () => void = () => {};
function route() {
  leave();
  const path = location.hash.replace(/^#/, '').split('?')[0] || '/runs';
  const [, page, id] = path.split('/');
  for (const a of nav.querySelectorAll('a')) a.classList.toggle('active', a.dataset.nav === page);
  if (page === 'runs' && id) leave = runPage(main, id);
  else if (page === 'pipelines') leave = pipelinesPage(main);
  else if (page === 'dead') leave = deadPage(main);
  else if (page === 'tables') leave = tablesPage(main, id ?? null);
  else leave = runsPage(main);
}
window.addEventListener('hashchange', route);
route();
