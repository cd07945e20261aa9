import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import { startNatsCluster, type NatsCluster } from '../infra/index.ts';
import { findLiveHost } from '../executor/index.ts';
import { connectForever, streams, type RunView } from '../schemas/index.ts';
import { loadPipeline, QuiverClient } from '../sdk/index.ts';
import { removeDir } from '../shm/index.ts';
import { fixture, quiverBin, repoRoot, stepOf, stopProcess, TEST_SHM_ROOT, waitFor } from './helpers.ts';
import { cannotMakeNamespaces, mustSh, sh } from './netns.ts';

/**
 * Quiver outgrowing one machine, for real: two hosts (network namespaces) each run a NATS node,
 * an orchestrator and an executor; a third NATS node runs in this namespace. A bridge joins the
 * three, as a LAN would. Every process is given all three NATS urls.
 */
const tag = randomBytes(3).toString('hex');
const subnet = `10.216.${randomBytes(1)[0]}`;
const hosts = {
  alpha: { ns: `qc-${tag}-a`, ip: `${subnet}.2`, link: `qca${tag}`, concurrency: 2 },
  // More room on beta: steps pinned to the label both carry go there first, so the test knows which host to take down.
  beta: { ns: `qc-${tag}-b`, ip: `${subnet}.3`, link: `qcb${tag}`, concurrency: 4 },
} as const;
type HostName = keyof typeof hosts;
const bridge = { name: `qcbr${tag}`, ip: `${subnet}.1` };
const shmRootOf = (host: HostName) => join(TEST_SHM_ROOT, `cluster-hosts-${tag}-${host}`);

/** Null when namespaces and a bridge can be made here, else why not. */
function cannotMakeHosts(): string | null {
  const namespaces = cannotMakeNamespaces(`qc-${tag}-probe`);
  if (namespaces) return namespaces;
  const b = sh('ip', 'link', 'add', `qcp${tag}`, 'type', 'bridge');
  if (!b.ok) return `cannot create a bridge (${b.err}); needs the bridge module`;
  sh('ip', 'link', 'del', `qcp${tag}`);
  return null;
}

const skip = cannotMakeHosts();
if (skip) console.log(`# cluster-hosts: skipped: ${skip}`);

/** A pipeline file written for this test, importing the SDK by its path. */
function pipelineFile(dir: string, name: string, body: string): string {
  const file = join(dir, `${name}.ts`);
  writeFileSync(
    file,
    `import { appendFileSync } from 'node:fs';
import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from ${JSON.stringify(join(repoRoot, 'sdk', 'index.ts'))};
const mark = (file: string | undefined, name: string) => { if (file) appendFileSync(file, name + '\\n'); };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
void mark; void sleep;
${body}
`,
  );
  return file;
}

const countLines = (file: string) => {
  const counts: Record<string, number> = {};
  if (!existsSync(file)) return counts;
  for (const line of readFileSync(file, 'utf8').split('\n').filter(Boolean)) counts[line] = (counts[line] ?? 0) + 1;
  return counts;
};

describe('three NATS nodes, two orchestrators and executors on two hosts', { skip: skip ?? false, timeout: 240_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-cluster-hosts-'));
  const secret = randomBytes(32).toString('hex');
  const daemons: { host: HostName; kind: 'orchestrator' | 'executor'; child: ChildProcess & { output(): string } }[] = [];
  let cluster: NatsCluster;
  let nc: NatsConnection;
  let jsm: JetStreamManager;
  let client: QuiverClient;
  let namespacesMade = false;

  function daemon(host: HostName, kind: 'orchestrator' | 'executor'): void {
    const h = hosts[host];
    const args = kind === 'executor' ? ['--concurrency', String(h.concurrency)] : [];
    const child = spawn('ip', ['netns', 'exec', h.ns, process.execPath, quiverBin, kind, ...args], {
      cwd: repoRoot,
      env: {
        ...process.env,
        QUIVER_NATS_URL: cluster.urls.join(','),
        QUIVER_NATS_NKEY: join(dir, 'nats.nkey'),
        QUIVER_HOME: join(dir, `home-${host}`),
        QUIVER_HOST_ID: `${host}-${tag}`,
        QUIVER_HOST_LABELS: `${host},shared`,
        QUIVER_FLIGHT_ADVERTISE: h.ip,
        QUIVER_SHM_ROOT: shmRootOf(host),
        QUIVER_CLUSTER_SECRET: secret,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
    daemons.push({ host, kind, child: Object.assign(child, { output: () => output }) });
  }

  const daemonOf = (host: HostName, kind: 'orchestrator' | 'executor') => daemons.find((d) => d.host === host && d.kind === kind)!.child;

  before(async () => {
    mustSh('ip', 'link', 'add', bridge.name, 'type', 'bridge');
    mustSh('ip', 'addr', 'add', `${bridge.ip}/24`, 'dev', bridge.name);
    mustSh('ip', 'link', 'set', bridge.name, 'up');
    namespacesMade = true;
    for (const h of Object.values(hosts)) {
      mustSh('ip', 'netns', 'add', h.ns);
      mustSh('ip', 'link', 'add', `${h.link}r`, 'type', 'veth', 'peer', 'name', `${h.link}n`);
      mustSh('ip', 'link', 'set', `${h.link}n`, 'netns', h.ns);
      mustSh('ip', 'link', 'set', `${h.link}r`, 'master', bridge.name);
      mustSh('ip', 'link', 'set', `${h.link}r`, 'up');
      mustSh('ip', '-n', h.ns, 'addr', 'add', `${h.ip}/24`, 'dev', `${h.link}n`);
      mustSh('ip', '-n', h.ns, 'link', 'set', 'lo', 'up');
      mustSh('ip', '-n', h.ns, 'link', 'set', `${h.link}n`, 'up');
    }

    cluster = await startNatsCluster({
      dir: join(dir, 'nats'),
      auth: 'nkey',
      network: [{ address: bridge.ip }, { address: hosts.alpha.ip, netns: hosts.alpha.ns }, { address: hosts.beta.ip, netns: hosts.beta.ns }],
      startTimeoutMs: 30_000,
    });
    writeFileSync(join(dir, 'nats.nkey'), cluster.credentials!.seed + '\n', { mode: 0o600 });
    nc = await connectForever(cluster.urls, { auth: cluster.connectionOptions });
    jsm = await jetstreamManager(nc);
    client = await QuiverClient.connect({ nc, clusterSecret: secret });
    for (const host of ['alpha', 'beta'] as const) {
      mkdirSync(join(dir, `home-${host}`));
      daemon(host, 'orchestrator');
      daemon(host, 'executor');
    }
    await waitFor('both executors to be ready', () => daemons.filter((d) => d.kind === 'executor').every((d) => /ready/.test(d.child.output())), 60_000);
    await waitFor('both hosts to announce themselves', async () => {
      const ids = new Set<string>();
      for await (const k of await client.topology.hosts.keys()) ids.add(k.split('.')[0]!);
      return ids.size === 2;
    });
    await waitFor('an orchestrator to lead', async () => !!(await client.topology.leases.get('orchestrator'))?.string(), 20_000);
  });

  after(async () => {
    // QUIVER_TEST_DAEMON_LOG=FILE keeps what the orchestrators and executors said, to see why a case failed.
    if (process.env.QUIVER_TEST_DAEMON_LOG) writeFileSync(process.env.QUIVER_TEST_DAEMON_LOG, daemons.map((d) => `==== ${d.host} ${d.kind}\n${d.child.output()}`).join('\n'));
    await Promise.all(daemons.map((d) => stopProcess(d.child)));
    await client?.close();
    await nc?.close().catch(() => {});
    await cluster?.stop();
    if (namespacesMade) {
      for (const h of Object.values(hosts)) sh('ip', 'netns', 'del', h.ns);
      sh('ip', 'link', 'del', bridge.name);
    }
    for (const host of ['alpha', 'beta'] as const) removeDir(shmRootOf(host));
    rmSync(dir, { recursive: true, force: true });
  });

  /** What happened around the kill of the node leading the control, work and events streams, for the cases after it. */
  const kill = { node: '', at: 0, restartedAt: 0, published: [] as string[], publishErrors: [] as string[] };

  /** Asks JetStream to move a stream's leader elsewhere and waits for the new one. */
  async function stepDown(stream: string): Promise<void> {
    const before = (await jsm.streams.info(stream)).cluster?.leader;
    await nc.request(`$JS.API.STREAM.LEADER.STEPDOWN.${stream}`, '', { timeout: 5000 });
    await waitFor(`a new leader of ${stream}`, async () => {
      const leader = (await jsm.streams.info(stream).catch(() => null))?.cluster?.leader;
      return leader && leader !== before;
    }, 20_000);
  }

  it('a run in progress survives killing the node that leads the control, work and events streams, running no step twice', async () => {
    await client.deploy(await loadPipeline(pipelineFile(dir, 'ticks', `
export default pipeline('cluster_ticks', { tick: step(() => tableFromArrays({ v: Int32Array.of(1) })) },
  { isolation: 'worker', schedule: { cron: '* * * * * *', catchUp: 'all', overlap: 'allow' } });`)));
    await client.deploy(await loadPipeline(pipelineFile(dir, 'pings', `
export default pipeline('cluster_pings', { got: step(() => tableFromArrays({ v: Int32Array.of(1) })) },
  { isolation: 'worker', on: { event: 'cluster.ping' } });`)));
    await waitFor('scheduled runs', async () => (await client.listRuns({ pipeline: 'cluster_ticks' })).length >= 2, 20_000);

    // Events all along, from before the kill to after the node is back.
    let publishing = true;
    const publisher = (async () => {
      for (let i = 0; publishing; i++) {
        const id = `ping-${tag}-${i}`;
        try {
          await client.publish('cluster.ping', { i }, { id });
          kill.published.push(id);
        } catch (error) {
          kill.publishErrors.push(`${id}: ${(error as Error).message}`);
        }
        await new Promise((r) => setTimeout(r, 300));
      }
    })();

    const marks = join(dir, 'marks-slow');
    const handle = await client.run(await loadPipeline(fixture('slow.ts')), { params: { marks, sleepMs: '6000' } });
    await waitFor('the slow step to run', () => countLines(marks).slow === 1, 60_000);

    // One node leading the control, work and events streams: step-downs move the others' leaders to the control stream's.
    const leaderOf = async (stream: string) => (await jsm.streams.info(stream)).cluster!.leader!;
    kill.node = await leaderOf(streams.control);
    for (const stream of [streams.work, streams.events]) {
      for (let i = 0; i < 10 && (await leaderOf(stream)) !== kill.node; i++) await stepDown(stream);
      assert.equal(await leaderOf(stream), kill.node, `one node leads the control stream and ${stream}`);
    }
    kill.at = Date.now();
    await cluster.node(kill.node).kill();

    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    assert.deepEqual(countLines(marks), { first: 1, slow: 1, last: 1 }, 'each step ran once');
    await handle.release();

    // Ticks and events go on a little with the node down, then with it back.
    await new Promise((r) => setTimeout(r, 3000));
    await cluster.node(kill.node).restart();
    kill.restartedAt = Date.now();
    await new Promise((r) => setTimeout(r, 3000));
    publishing = false;
    await publisher;
    await client.undeploy('cluster_ticks');
  });

  it('the per-second schedule fires every tick through the kill, none missed or doubled', async () => {
    assert.ok(kill.at > 0, 'the kill happened');
    // Stable: no tick submitted before undeploy is still on its way.
    let runs: RunView[] = [];
    await waitFor('the scheduled runs to settle', async () => {
      const before = runs.length;
      await new Promise((r) => setTimeout(r, 1000));
      runs = await client.listRuns({ pipeline: 'cluster_ticks' });
      return runs.length === before;
    }, 20_000);
    const ticks = runs.map((r) => (r.trigger.kind === 'schedule' ? r.trigger.tick : NaN)).sort((a, b) => a - b);
    assert.ok(ticks.every(Number.isFinite), 'every run of the pipeline came from its schedule');
    assert.equal(new Set(ticks).size, ticks.length, 'no tick ran twice');
    for (let i = 1; i < ticks.length; i++) {
      assert.equal(ticks[i]! - ticks[i - 1]!, 1000, `no tick missed between ${new Date(ticks[i - 1]!).toISOString()} and ${new Date(ticks[i]!).toISOString()}`);
    }
    assert.ok(ticks[0]! < kill.at && ticks.at(-1)! > kill.restartedAt, `the ticks span the kill (${ticks.length} ticks)`);
    const lateness = runs.map((r) => (r.startedAt ?? r.finishedAt ?? 0) - (r.trigger as { tick: number }).tick);
    console.log(`# ${ticks.length} ticks, the latest started ${Math.max(...lateness)} ms after its tick`);
  });

  it('every event published through the kill starts exactly one run', async () => {
    assert.deepEqual(kill.publishErrors, [], 'publishes retried through the leader election');
    assert.ok(kill.published.length >= 10, `published ${kill.published.length} events`);
    const eventIds = await waitFor('a run for every event', async () => {
      const ids = (await client.listRuns({ pipeline: 'cluster_pings' })).map((r) => (r.trigger.kind === 'event' ? r.trigger.eventId : ''));
      return ids.length >= kill.published.length ? ids : null;
    }, 30_000);
    assert.deepEqual([...eventIds].sort(), [...kill.published].sort(), 'one run per event, no more, no less');
    // Only now: an event is matched against the deployments when the orchestrator reads it.
    await client.undeploy('cluster_pings');
  });

  it('once the node is back, every stream is in sync again: replicas current, lag 0', async () => {
    await waitFor('every replica of every stream to catch up', async () => {
      for await (const info of jsm.streams.list()) {
        const peers = info.cluster?.replicas ?? [];
        if (!info.cluster?.leader || peers.length !== 2 || !peers.every((p) => p.current && !p.offline && !p.lag)) return false;
      }
      return true;
    }, 60_000);
    const names: string[] = [];
    for await (const info of jsm.streams.list()) names.push(info.config.name);
    assert.ok(names.includes(streams.work) && names.includes(streams.control), `checked ${names.join(', ')}`);
  });

  it('losing a whole host re-places its steps on the other host; a step whose input lived only there fails naming it', async () => {
    const marks = join(dir, 'marks-host');
    // Placement goes by the load each host last reported (heartbeats every 2.5 s): the last runs
    // of the tests before must not tip it, so both hosts report nothing running first.
    await waitFor('both hosts to report no steps running', async () => {
      const reported = await Promise.all((['alpha', 'beta'] as const).map((h) => findLiveHost(client.topology, `${h}-${tag}`)));
      return reported.every((r) => r?.running === 0);
    }, 30_000);
    // Pinned to the label both hosts carry: beta, with more room, gets them.
    const lone = await client.run(await loadPipeline(pipelineFile(dir, 'lone', `
export default pipeline('lone', {
  lone: step(async (_i, ctx) => { mark(ctx.params.marks, 'lone'); await sleep(8000); return tableFromArrays({ v: Int32Array.of(1, 2) }); }, { host: 'shared' }),
  after: step({ l: 'lone' }, ({ l }, ctx) => { mark(ctx.params.marks, 'after'); return l; }),
});`)), { params: { marks } });
    const derived = await client.run(await loadPipeline(pipelineFile(dir, 'derived', `
export default pipeline('derived', {
  base: step(() => tableFromArrays({ v: Int32Array.of(1, 2, 3) }), { host: 'shared' }),
  derived: step({ b: 'base' }, async ({ b }, ctx) => { mark(ctx.params.marks, 'derived'); await sleep(8000); return b; }),
});`)), { params: { marks } });
    await waitFor('both slow steps to run', () => countLines(marks).lone === 1 && countLines(marks).derived === 1, 60_000);
    const hostOf = async (runId: string, step: string) => stepOf((await client.getRun(runId))!, step).hostId;
    assert.equal(await hostOf(lone.id, 'lone'), `beta-${tag}`, 'lone runs on beta');
    assert.equal(await hostOf(derived.id, 'derived'), `beta-${tag}`, 'derived runs on beta, beside its input');

    // The whole host: its NATS node, its executor (with the steps it runs) and its orchestrator.
    const natsOfBeta = cluster.nodes.find((n) => n.url.includes(hosts.beta.ip))!;
    await Promise.all([natsOfBeta.kill(), stopProcess(daemonOf('beta', 'executor'), 'SIGKILL'), stopProcess(daemonOf('beta', 'orchestrator'), 'SIGKILL')]);

    const loneView = await lone.result();
    assert.equal(loneView.state, 'succeeded', JSON.stringify(loneView.steps.map((s) => [s.name, s.state, s.hostId, s.error?.message])));
    assert.equal(stepOf(loneView, 'lone').hostId, `alpha-${tag}`, 'placed again on the host left');
    assert.equal(stepOf(loneView, 'after').hostId, `alpha-${tag}`);
    await lone.release();

    const derivedView = await derived.result();
    assert.equal(derivedView.state, 'failed');
    const failed = stepOf(derivedView, 'derived');
    assert.equal(failed.state, 'failed');
    assert.equal(failed.hostId, `alpha-${tag}`, 'placed again on the host left');
    assert.equal(failed.error?.code, 'ERR_FLIGHT_FETCH');
    assert.match(failed.error!.message, new RegExp(`beta-${tag}`), 'the error names the lost host');
    await derived.release();

    const counts = countLines(marks);
    assert.equal(counts.lone, 2, 'lone started again on alpha, after beta was lost mid-step');
    assert.equal(counts.after, 1);
  });
});
