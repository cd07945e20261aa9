/**
 * The web UI in a real browser: Debian's chromium driven by playwright-core, against a real
 * cluster (own nats-server, orchestrator, executor). Delays and page-open times are printed,
 * never asserted.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { jetstreamManager } from '@nats-io/jetstream';
import { tableFromArrays } from 'apache-arrow';
import { readRunRecord } from '../schemas/index.ts';
import { loadPipeline, startLocalCluster, type LocalCluster } from '../sdk/index.ts';
import { openTableStore, writeTable, type StorageConfig } from '../storage/index.ts';
import { resolveUiOptions, startUiServer, UiTokenRequiredError, type UiServer } from '../ui/index.ts';
import { fixture, repoRoot, runCli, tempHome, waitFor } from './helpers.ts';

const CHROMIUM = '/usr/bin/chromium';
const OUTPUT = join(repoRoot, 'test-output', 'ui');
const TOKEN = 'test-token-0123456789abcdef';

/** What the page records on window.__quiver (ui/web/live-marks.ts). */
interface Marks {
  loadedAt: number;
  states: { step: string; state: string; at: number }[];
}
const marksOf = (p: Page) => p.evaluate(() => (window as unknown as { __quiver: Marks }).__quiver);

/** On failure, what the page showed: a screenshot beside the others, and the states it recorded. */
async function diagnosed(p: Page, name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    await p.screenshot({ path: join(OUTPUT, `failed-${name}.png`), fullPage: true }).catch(() => {});
    console.error(`page at ${p.url()} recorded: ${JSON.stringify(await marksOf(p).catch(() => null))}`);
    throw error;
  }
}

describe('web UI', () => {
  let cluster: LocalCluster;
  let stopCluster: () => Promise<void>;
  let ui: UiServer;
  let context: BrowserContext;
  let page: Page;
  let profile: string;
  let storage: StorageConfig;

  before(async () => {
    assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: install Debian's browser with \`apt-get install -y chromium\``);
    mkdirSync(OUTPUT, { recursive: true });
    const home = tempHome();
    cluster = await startLocalCluster({ home: home.dir });
    stopCluster = async () => {
      await cluster.stop();
      home.remove();
    };
    storage = { kind: 'local', root: join(home.dir, 'storage') };
    ui = await startUiServer(cluster.client, { port: 0, openTableStore: () => openTableStore(storage) });
    profile = mkdtempSync(join(tmpdir(), 'quiver-ui-chromium-'));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1280, height: 900 },
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.on('pageerror', (e) => console.error(`browser error: ${e.message}`));
  });

  after(async () => {
    await context?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
    await ui?.close();
    await stopCluster?.();
  });

  it('shows a run going running → succeeded live, its logs, and a preview of its final table', async () => {
    await page.goto(ui.url);
    await page.getByRole('heading', { name: /^Runs/ }).waitFor();
    const loadedAt = (await marksOf(page)).loadedAt;

    // The step runs until the test opens the gate: the page sees it running however slow the machine is.
    const gate = join(profile, 'gate');
    const handle = await cluster.client.run(await loadPipeline(fixture('ui-slow.ts')), { params: { sleepMs: '120000', gate } });
    try {
      await diagnosed(page, 'run', async () => {
        // The runs list learns of the run live, then the run page follows it.
        await page.locator(`tr[data-run="${handle.id}"] a`).click();
        await page.locator('g.node[data-step="slow"][data-state="running"]').waitFor({ timeout: 60_000 });
        writeFileSync(gate, '');
        await page.locator('g.node[data-step="report"][data-state="succeeded"]').waitFor({ timeout: 60_000 });
        const view = await handle.result();
        assert.equal(view.state, 'succeeded');
        await page.locator('[data-run-state="succeeded"]').waitFor();
        // No reload: the same page saw every transition.
        const marks = await marksOf(page);
        assert.equal(marks.loadedAt, loadedAt);
        const slowStates = marks.states.filter((m) => m.step === 'slow').map((m) => m.state);
        assert.ok(slowStates.includes('running') && slowStates.indexOf('running') < slowStates.indexOf('succeeded'), `slow went ${slowStates.join(' → ')}`);

        // When each state reached the page, against when it happened in the cluster (same clock).
        const delays: string[] = [];
        for (const m of marks.states) {
          const step = view.steps.find((s) => s.name === m.step)!;
          const happened = m.state === 'running' ? step.startedAt : m.state === 'succeeded' ? step.finishedAt : null;
          if (happened !== null) delays.push(`${m.step} ${m.state}: ${m.at - happened} ms`);
        }
        console.log(`state change → browser: ${delays.join(', ')}`);

        await page.locator('g.node[data-step="slow"]').click();
        await page.locator('pre.logs', { hasText: 'slow step started' }).waitFor();
        assert.match(await page.locator('pre.logs').innerText(), /slow step done with 5 rows/);
        await page.locator('dd[data-fact="rows"]', { hasText: '5' }).waitFor();
        await page.screenshot({ path: join(OUTPUT, 'run.png'), fullPage: true });

        await page.locator('g.node[data-step="report"]').click();
        await page.locator('button[data-action="preview"]').click();
        const firstRow = page.locator('[data-preview] tbody tr').first();
        await firstRow.waitFor();
        const shown = await firstRow.locator('td').allInnerTexts();
        const { table } = await cluster.client.readOutput(handle.id, 'report');
        const expected = table.schema.fields.map((f) => String(table.getChild(f.name)!.get(0)));
        assert.deepEqual(shown, expected);
        assert.deepEqual(await page.locator('[data-preview] thead th').evaluateAll((ths) => ths.map((th) => th.childNodes[0]!.textContent)), ['id', 'city', 'doubled']);
        await page.locator('[data-preview]').screenshot({ path: join(OUTPUT, 'preview.png') });

        // Rerun: the same code, version and params again, as a new run the page moves to.
        await page.locator('button[data-action="rerun"]').click();
        await page.waitForFunction((old) => /^#\/runs\/[0-9A-Z]{26}$/.test(location.hash) && !location.hash.endsWith(old), handle.id);
        const rerunId = (await page.evaluate(() => location.hash)).split('/').pop()!;
        await page.locator('[data-run-state="succeeded"]').waitFor({ timeout: 30_000 });
        const [first, again] = await Promise.all([readRunRecord(cluster.client.topology.runs, handle.id), readRunRecord(cluster.client.topology.runs, rerunId)]);
        assert.equal(again!.submit.codeHash, first!.submit.codeHash);
        assert.deepEqual(again!.submit.params, first!.submit.params);
        assert.deepEqual(again!.submit.plan, first!.submit.plan);
        assert.deepEqual(again!.submit.trigger, { kind: 'user', by: `web UI (rerun of ${handle.id})` });

        // Rerun from a step: that step and the ones after it are computed again.
        await page.locator('g.node[data-step="report"]').click();
        await page.locator('button[data-action="rerun-from"]').click();
        await page.waitForFunction((old) => /^#\/runs\/[0-9A-Z]{26}$/.test(location.hash) && !location.hash.endsWith(old), rerunId);
        const fromId = (await page.evaluate(() => location.hash)).split('/').pop()!;
        await page.locator('[data-run-state="succeeded"]').waitFor({ timeout: 30_000 });
        const fromReport = await readRunRecord(cluster.client.topology.runs, fromId);
        assert.deepEqual(fromReport!.submit.recompute, ['report']);
        assert.equal(fromReport!.submit.cache, 'readwrite');
      });
    } finally {
      await handle.release();
    }
  });

  it('cancels a running run from the UI', async () => {
    const handle = await cluster.client.run(await loadPipeline(fixture('ui-slow.ts')), { params: { sleepMs: '60000' } });
    try {
      await page.goto(`${ui.url}#/runs/${handle.id}`);
      await page.locator('g.node[data-step="slow"][data-state="running"]').waitFor({ timeout: 30_000 });
      page.once('dialog', (d) => void d.accept());
      await page.locator('button[data-action="cancel"]').click();
      await page.locator('[data-run-state="cancelled"]').waitFor({ timeout: 30_000 });
      assert.equal((await handle.result()).state, 'cancelled');
      assert.ok(await page.locator('button[data-action="cancel"]').isDisabled());
    } finally {
      await handle.release();
    }
  });

  it('opens the run page of a 100-step pipeline', async () => {
    const handle = await cluster.client.run(await loadPipeline(fixture('ui-wide.ts')));
    try {
      assert.equal((await handle.result()).state, 'succeeded');
      await page.goto('about:blank');
      const started = Date.now();
      await page.goto(`${ui.url}#/runs/${handle.id}`);
      await page.waitForFunction(() => document.querySelectorAll('g.node[data-state="succeeded"]').length === 100);
      console.log(`100-step run page: opened with every step drawn in ${Date.now() - started} ms`);
      assert.equal(await page.locator('svg.dag path[data-from]').count(), 180);
    } finally {
      await handle.release();
    }
  });

  it('publishes a test event checked against the trigger schema, and shows dead letters live', async () => {
    await cluster.client.deploy(await loadPipeline(fixture('orders.ts')));
    await page.goto(`${ui.url}#/pipelines`);
    const card = page.locator('[data-pipeline="orders"]');
    await card.locator('textarea[data-field="payload"]').fill('{"count": "many"}');
    await card.locator('.verdict.bad', { hasText: 'must be integer' }).waitFor();
    assert.ok(await card.locator('button[data-action="publish"]').isDisabled());
    await card.locator('textarea[data-field="payload"]').fill('{"count": 4}');
    await card.locator('.verdict.good').waitFor();
    await card.locator('button[data-action="publish"]').click();
    await card.locator('.verdict', { hasText: 'published event' }).waitFor();
    const run = await waitFor('the run of the published event', async () => (await cluster.client.listRuns({ pipeline: 'orders' })).find((r) => r.state === 'succeeded'));
    assert.equal(run.trigger.kind, 'event');
    assert.equal(run.steps.find((s) => s.name === 'orders')!.rows, 4);

    await page.goto(`${ui.url}#/dead`);
    await page.getByRole('heading', { name: 'Dead letters' }).waitFor();
    await cluster.client.publish('orders.uploaded', { count: -1 }, { id: 'ui-dead-1' });
    await page.locator('tr[data-dead="ui-dead-1"]', { hasText: 'must be >= 0' }).waitFor();
  });

  it('shows a stored table: schema, branches, snapshots and a preview', async () => {
    const store = await openTableStore(storage);
    try {
      await writeTable(store, 'cities', tableFromArrays({ id: Int32Array.of(7, 8), city: ['Lima', 'Bern'] }), { mode: 'replace' });
      await writeTable(store, 'cities', tableFromArrays({ id: Int32Array.of(9), city: ['Riga'] }), { mode: 'append' });
      await store.catalog.versions.createBranch('dev');
    } finally {
      await store.close();
    }
    await page.goto(`${ui.url}#/tables`);
    await page.locator('tr[data-table="cities"]', { hasText: '3' }).locator('a').click();
    await page.getByRole('heading', { name: 'Snapshots' }).waitFor();
    assert.equal(await page.locator('table[data-snapshots] tbody tr').count(), 2);
    // The branches holding it: main, and dev made from it.
    assert.deepEqual((await page.locator('table[data-refs] tbody tr td:first-child').allInnerTexts()).sort(), ['dev', 'main']);
    await page.locator('button[data-action="preview-table"]').click();
    const firstRow = page.locator('[data-preview] tbody tr').first();
    await firstRow.waitFor();
    assert.deepEqual(await firstRow.locator('td').allInnerTexts(), ['7', 'Lima']);
    await page.screenshot({ path: join(OUTPUT, 'table.png'), fullPage: true });
  });

  it('follows the cluster with one set of watches, however many pages are open', async () => {
    const jsm = await jetstreamManager(cluster.client.nc);
    const consumers = async () => (await jsm.consumers.list('KV_quiver-runs').next()).length + (await jsm.consumers.list('KV_quiver-steps').next()).length;
    const before = await consumers();
    const pages = await Promise.all(Array.from({ length: 4 }, () => context.newPage()));
    try {
      await Promise.all(pages.map((p) => p.goto(ui.url)));
      await Promise.all(pages.map((p) => p.locator('tr[data-run]').first().waitFor()));
      assert.equal(await consumers(), before);
    } finally {
      await Promise.all(pages.map((p) => p.close()));
    }
  });

  it('refuses every request without the token when it listens beyond loopback', async () => {
    assert.throws(() => resolveUiOptions({ host: '0.0.0.0', token: null }), UiTokenRequiredError);
    const cli = await runCli(['ui', '--listen', '127.0.0.2'], { env: { QUIVER_UI_TOKEN: '' }, timeoutMs: 30_000 });
    assert.equal(cli.code, 2);
    assert.match(cli.stderr, /QUIVER_UI_TOKEN/);

    const guarded = await startUiServer(cluster.client, { host: '127.0.0.2', port: 0, token: TOKEN });
    try {
      assert.equal(guarded.host, '127.0.0.2');
      for (const path of ['', 'app.js', 'api/runs', 'api/events?topic=runs']) {
        assert.equal((await fetch(guarded.url + path)).status, 401, `/${path} without a token`);
        assert.equal((await fetch(guarded.url + path, { headers: { authorization: 'Bearer wrong-token-0123456789' } })).status, 401, `/${path} with a wrong token`);
      }
      assert.equal((await fetch(`${guarded.url}api/runs/00000000000000000000000000/cancel`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' })).status, 401);
      const ok = await fetch(`${guarded.url}api/runs`, { headers: { authorization: `Bearer ${TOKEN}` } });
      assert.equal(ok.status, 200);
      assert.ok(Array.isArray(await ok.json()));

      // A person opens it once with ?token=: a cookie carries it from then on.
      const other = await context.newPage();
      try {
        await other.goto(`${guarded.url}?token=${TOKEN}`);
        assert.ok(!other.url().includes('token='), 'the token leaves the address bar');
        await other.locator('tr[data-run]').first().waitFor();
      } finally {
        await other.close();
      }
    } finally {
      await guarded.close();
    }
  });
});
