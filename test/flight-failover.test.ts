import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { startNatsServer, type NatsServer } from '../infra/index.ts';
import { loadPipeline, QuiverClient } from '../sdk/index.ts';
import { listSegments, removeDir } from '../shm/index.ts';
import { fixture, startDaemon, stopProcess, TEST_SHM_ROOT, tempHome, waitFor } from './helpers.ts';

/** Executors of three "hosts" on this machine: own host ids and shared-memory roots, Flight between them. */
describe('a host dying in the middle of a Flight transfer', () => {
  const home = tempHome();
  const tag = randomBytes(3).toString('hex');
  const rootOf = (host: string) => join(TEST_SHM_ROOT, `failover-${tag}-${host}`);
  let server: NatsServer;
  let nc: NatsConnection;
  let client: QuiverClient;
  const daemons: ReturnType<typeof startDaemon>[] = [];
  const secret = randomBytes(32).toString('hex');
  const env = (host: string, label: string) => ({
    QUIVER_HOME: home.dir,
    QUIVER_HOST_ID: `${host}-${tag}`,
    QUIVER_HOST_LABELS: label,
    QUIVER_SHM_ROOT: rootOf(host),
    QUIVER_FLIGHT_ADVERTISE: '127.0.0.1',
    QUIVER_CLUSTER_SECRET: secret,
  });
  const executor = (host: string, label: string) => {
    const d = startDaemon('executor', server.url, env(host, label), ['--concurrency', '1']);
    daemons.push(d);
    return d;
  };
  /** A partial fetch in a host's shared memory: the transfer is under way. */
  const fetching = (host: string) => listSegments(join(rootOf(host), client.topology.clusterId)).some((s) => s.id.endsWith('.part'));

  before(async () => {
    server = await startNatsServer({ dir: join(home.dir, 'nats') });
    nc = await connect({ servers: server.url });
    client = await QuiverClient.connect({ nc });
    daemons.push(startDaemon('orchestrator', server.url, { QUIVER_HOME: home.dir }));
  });
  afterEach(async () => {
    await Promise.all(daemons.splice(1).map((d) => stopProcess(d)));
  });
  after(async () => {
    await Promise.all(daemons.splice(0).map((d) => stopProcess(d)));
    await nc.close();
    await server.stop();
    for (const host of ['src', 'dst1', 'dst2', 'dst3']) removeDir(rootOf(host));
    home.remove();
  });

  /** True once the live hosts are exactly these (a killed executor's entry lingers until it expires). */
  async function liveHostsAre(...names: string[]): Promise<boolean> {
    const live = new Set<string>();
    for await (const key of await client.topology.hosts.keys()) live.add(key.split('.')[0]!);
    return live.size === names.length && names.every((n) => live.has(`${n}-${tag}`));
  }

  it('retries the step on another host when the fetching executor is killed', async () => {
    const dst = { dst1: executor('dst1', 'dst'), dst2: executor('dst2', 'dst') };
    executor('src', 'src');
    await waitFor('the executors to announce themselves', () => liveHostsAre('src', 'dst1', 'dst2'), 60_000);
    const handle = await client.run(await loadPipeline(fixture('flight-big.ts')), { params: { mib: '1024' } });
    const victim = await waitFor('a dst host to be fetching', () => (fetching('dst1') ? 'dst1' : fetching('dst2') ? 'dst2' : null), 120_000);
    dst[victim].kill('SIGKILL');
    const view = await handle.result();
    assert.equal(view.state, 'succeeded', JSON.stringify(view.steps.map((s) => [s.name, s.state, s.error?.message])));
    const copy = view.steps.find((s) => s.name === 'copy')!;
    assert.equal(copy.hostId, `${victim === 'dst1' ? 'dst2' : 'dst1'}-${tag}`);
    assert.equal(copy.transport, 'flight');
    await handle.release();
  });

  it('fails the step clearly when the host holding its input dies mid-transfer', async () => {
    const src = executor('src', 'src');
    executor('dst3', 'dst');
    await waitFor('only the new executors to be announced', () => liveHostsAre('src', 'dst3'), 60_000);
    const handle = await client.run(await loadPipeline(fixture('flight-big.ts')), { params: { mib: '1024' } });
    await waitFor('dst3 to be fetching', () => fetching('dst3'), 120_000);
    src.kill('SIGKILL');
    const view = await handle.result();
    assert.equal(view.state, 'failed');
    const copy = view.steps.find((s) => s.name === 'copy')!;
    assert.equal(copy.state, 'failed');
    assert.equal(copy.error?.code, 'ERR_FLIGHT_FETCH');
    assert.match(copy.error!.message, new RegExp(`could not fetch input "big" .* from host src-${tag} at grpc\\+tcp://127\\.0\\.0\\.1:\\d+: DoGet`));
    await waitFor('the partial copy to be removed', () => !fetching('dst3'));
    await handle.release();
  });
});
