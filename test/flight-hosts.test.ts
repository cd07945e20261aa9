import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { Orchestrator } from '../orchestrator/index.ts';
import { silentLogger, type RunView } from '../schemas/index.ts';
import { QuiverClient, loadPipeline } from '../sdk/index.ts';
import { listSegments, readTableFromShm, removeDir, unmapSegments } from '../shm/index.ts';
import { TEST_SHM_ROOT, quiverBin, repoRoot, fixture, stepOf, stopProcess, waitFor } from './helpers.ts';
import { cannotMakeNamespaces, mustSh, sh } from './netns.ts';

/**
 * Two hosts for real: two network namespaces joined by a veth pair (the data plane), each with
 * its own executor and its own shared-memory root. NATS runs in the first namespace; a third
 * veth lets this process (orchestrator and client) reach it from the root namespace.
 */
const tag = randomBytes(3).toString('hex');
const ns = { a: `qv-${tag}-a`, b: `qv-${tag}-b` };
const ip = { a: '10.213.0.1', b: '10.213.0.2', root: '10.214.0.1', nats: '10.214.0.2' };
const hostRoots = { alpha: join(TEST_SHM_ROOT, `host-alpha-${tag}`), beta: join(TEST_SHM_ROOT, `host-beta-${tag}`) };

const skip = cannotMakeNamespaces(`qv-${tag}-probe`);
if (skip) console.log(`# flight-hosts: skipped: ${skip}`);

describe('two hosts joined by a veth pair', { skip: skip ?? false }, () => {
  const processes: ChildProcess[] = [];
  const secret = randomBytes(32).toString('hex');
  let natsDir = '';
  let nc: NatsConnection;
  let orchestrator: Orchestrator;
  let client: QuiverClient;

  function executor(name: 'alpha' | 'beta', namespace: string, address: string, natsUrl: string): ChildProcess & { output(): string } {
    const child = spawn('ip', ['netns', 'exec', namespace, process.execPath, quiverBin, 'executor', '--concurrency', '2'], {
      cwd: repoRoot,
      env: {
        ...process.env,
        QUIVER_NATS_URL: natsUrl,
        QUIVER_HOST_ID: `${name}-${tag}`,
        QUIVER_HOST_LABELS: name,
        QUIVER_FLIGHT_ADVERTISE: address,
        QUIVER_SHM_ROOT: hostRoots[name],
        QUIVER_CLUSTER_SECRET: secret,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
    processes.push(child);
    return Object.assign(child, { output: () => output });
  }

  before(async () => {
    mustSh('ip', 'netns', 'add', ns.a);
    mustSh('ip', 'netns', 'add', ns.b);
    // The data plane: A <-> B.
    mustSh('ip', 'link', 'add', `qva${tag}`, 'type', 'veth', 'peer', 'name', `qvb${tag}`);
    mustSh('ip', 'link', 'set', `qva${tag}`, 'netns', ns.a);
    mustSh('ip', 'link', 'set', `qvb${tag}`, 'netns', ns.b);
    mustSh('ip', '-n', ns.a, 'addr', 'add', `${ip.a}/24`, 'dev', `qva${tag}`);
    mustSh('ip', '-n', ns.b, 'addr', 'add', `${ip.b}/24`, 'dev', `qvb${tag}`);
    // This process reaches NATS in A through a third veth.
    mustSh('ip', 'link', 'add', `qvr${tag}`, 'type', 'veth', 'peer', 'name', `qvn${tag}`);
    mustSh('ip', 'link', 'set', `qvn${tag}`, 'netns', ns.a);
    mustSh('ip', 'addr', 'add', `${ip.root}/24`, 'dev', `qvr${tag}`);
    mustSh('ip', '-n', ns.a, 'addr', 'add', `${ip.nats}/24`, 'dev', `qvn${tag}`);
    for (const [namespace, links] of [[ns.a, ['lo', `qva${tag}`, `qvn${tag}`]], [ns.b, ['lo', `qvb${tag}`]]] as const) {
      for (const link of links) mustSh('ip', '-n', namespace, 'link', 'set', link, 'up');
    }
    mustSh('ip', 'link', 'set', `qvr${tag}`, 'up');

    natsDir = mkdtempSync(join(tmpdir(), 'quiver-flight-hosts-'));
    // A private namespace has no one else on its ports: a fixed one is safe here.
    const nats = spawn('ip', ['netns', 'exec', ns.a, 'nats-server', '-a', '0.0.0.0', '-p', '4222', '-js', '-sd', natsDir], { stdio: 'ignore' });
    processes.push(nats);
    nc = await waitFor('nats-server in the first namespace', async () => connect({ servers: `nats://${ip.nats}:4222` }).catch(() => null), 20_000);
    orchestrator = await Orchestrator.start(nc, { logger: silentLogger });
    client = await QuiverClient.connect({ nc });
    const alpha = executor('alpha', ns.a, ip.a, `nats://${ip.nats}:4222`);
    const beta = executor('beta', ns.b, ip.b, `nats://${ip.a}:4222`);
    await waitFor('both executors to be ready', () => [alpha, beta].every((e) => /ready/.test(e.output())), 60_000);
    await waitFor('both hosts to announce themselves', async () => {
      const keys: string[] = [];
      for await (const k of await client.topology.hosts.keys()) keys.push(k);
      return keys.length >= 2;
    });
  });

  after(async () => {
    for (const child of processes.slice(1).reverse()) await stopProcess(child);
    await orchestrator?.stop();
    await nc?.close();
    if (processes[0]) await stopProcess(processes[0]);
    sh('ip', 'netns', 'del', ns.a);
    sh('ip', 'netns', 'del', ns.b);
    sh('ip', 'link', 'del', `qvr${tag}`);
    for (const root of Object.values(hostRoots)) removeDir(root);
    if (natsDir) rmSync(natsDir, { recursive: true, force: true });
  });

  async function run(file: string, rows: number): Promise<{ view: RunView; totals: unknown[] }> {
    const handle = await client.run(await loadPipeline(file), { params: { rows: String(rows), seed: '11' } });
    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.hostId, s.error?.message])));
    const output = stepOf(view, 'usd_by_country').output!;
    const host = output.hostId.startsWith('alpha') ? 'alpha' : 'beta';
    const opened = readTableFromShm(output.segments, { dir: join(hostRoots[host], client.topology.clusterId) });
    const totals = opened.table.toArray().map((r) => r.toJSON());
    unmapSegments(opened.mappings);
    await handle.release();
    return { view, totals };
  }

  it('runs the example pinned across both hosts with the single-host result, moving tables over Flight', async () => {
    const rows = 200_000;
    const single = await run(fixture('transactions-generated.ts'), rows);
    assert.equal(new Set(single.view.steps.map((s) => s.hostId)).size, 1, 'unpinned, every step follows its data to one host');
    assert.ok(single.view.steps.every((s) => s.transport !== 'flight'));

    const split = await run(fixture('transactions-two-hosts.ts'), rows);
    assert.deepEqual(split.totals, single.totals);
    const step = (name: string) => stepOf(split.view, name);
    assert.equal(step('transactions').hostId, `alpha-${tag}`);
    assert.equal(step('euro_selection').hostId, `beta-${tag}`);
    assert.equal(step('usd_by_country').hostId, `alpha-${tag}`);
    for (const [moved, parent] of [['euro_selection', 'transactions'], ['usd_by_country', 'euro_selection']] as const) {
      assert.equal(step(moved).transport, 'flight', `${moved} got its input over Flight`);
      assert.ok(step(moved).copiedBytes! >= step(parent).bytes!, `${moved} counts the ${step(parent).bytes} bytes it fetched, got ${step(moved).copiedBytes}`);
    }
  });

  it('fetches a parent once per host for two children there, and releases the copy with the run', async () => {
    const handle = await client.run(await loadPipeline(fixture('remote-fanout.ts')));
    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.hostId, s.error?.message])));
    const children = ['left', 'right'].map((name) => stepOf(view, name));
    assert.ok(children.every((c) => c.hostId === `beta-${tag}`));
    assert.deepEqual(children.map((c) => c.transport).sort(), ['flight', 'shm'], 'one child fetched the parent, the other mapped its copy');
    const reuser = children.find((c) => c.transport === 'shm')!;
    assert.equal(reuser.copiedBytes, reuser.bytes, 'the second child copied nothing but its own output');
    const betaDir = join(hostRoots.beta, client.topology.clusterId);
    await handle.release();
    await waitFor('the fetched copy to be released with the run', () => !listSegments(betaDir).some((s) => s.id.endsWith('.fetched')));
  });
});
