import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createUser } from '@nats-io/nkeys';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { natsConnectionOptions } from '../schemas/index.ts';
import { repoRoot, stopProcess, waitFor } from './helpers.ts';

/**
 * The files of infra/deploy/ for real hosts, kept from rotting: the NATS template, rendered by
 * its script, starts three real nats-servers that form a JetStream cluster over TLS routes and
 * let in only Quiver's nkey user, reached the way the units' environment says.
 */
const deployDir = join(repoRoot, 'infra', 'deploy');
const renderScript = join(deployDir, 'nats', 'render-nats-conf.sh');

function run(command: string, args: string[], options: { env?: NodeJS.ProcessEnv; cwd?: string } = {}): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(command, args, { encoding: 'utf8', ...options });
  return { code: r.status, stdout: r.stdout ?? '', stderr: `${r.stderr ?? ''}${r.error?.message ?? ''}` };
}

async function freePorts(count: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: count }, () => new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
      const server = createServer();
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve(server));
    })),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

const noOpenssl = run('openssl', ['version']).code === 0 ? null : 'openssl is not installed (needed to make test certificates)';
if (noOpenssl) console.log(`# deploy-files: skipped: ${noOpenssl}`);

describe('infra/deploy: the NATS template on three real nodes', { skip: noOpenssl ?? false, timeout: 120_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-deploy-'));
  const tls = join(dir, 'tls');
  const user = createUser();
  const seedFile = join(dir, 'nats.nkey');
  const nodes: { name: string; client: number; route: number; monitor: number; child?: ChildProcess; stderr: string }[] = [];
  let nc: NatsConnection | null = null;

  before(async () => {
    mkdirSync(tls);
    // A CA and one certificate for 127.0.0.1, used by the three nodes as servers and, on routes, as clients.
    const ssl = (...args: string[]) => {
      const r = run('openssl', args, { cwd: tls });
      if (r.code !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
    };
    ssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca.pem', '-days', '1', '-subj', '/CN=quiver-test-ca');
    ssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=127.0.0.1');
    writeFileSync(join(tls, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
    ssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', 'server.pem', '-days', '1', '-extfile', 'ext.cnf');
    writeFileSync(seedFile, new TextDecoder().decode(user.getSeed()) + '\n', { mode: 0o600 });

    const ports = await freePorts(9);
    for (let i = 0; i < 3; i++) nodes.push({ name: `nats${i + 1}`, client: ports[i]!, route: ports[3 + i]!, monitor: ports[6 + i]!, stderr: '' });
    const routes = nodes.map((n) => `nats-route://127.0.0.1:${n.route}`).join(',');
    for (const node of nodes) {
      const nodeDir = join(dir, node.name);
      mkdirSync(join(nodeDir, 'store'), { recursive: true });
      const envFile = join(nodeDir, 'node.env');
      writeFileSync(
        envFile,
        [
          `NATS_NODE_NAME=${node.name}`,
          `NATS_CLIENT_LISTEN=127.0.0.1:${node.client}`,
          `NATS_CLUSTER_LISTEN=127.0.0.1:${node.route}`,
          `NATS_MONITOR_LISTEN=127.0.0.1:${node.monitor}`,
          `NATS_ROUTES=${routes}`,
          `NATS_STORE_DIR=${join(nodeDir, 'store')}`,
          `NATS_TLS_DIR=${tls}`,
          `NATS_USER_NKEY=${user.getPublicKey()}`,
        ].join('\n') + '\n',
      );
      const rendered = run('sh', [renderScript, envFile]);
      assert.equal(rendered.code, 0, rendered.stderr);
      const config = join(nodeDir, 'quiver-nats.conf');
      writeFileSync(config, rendered.stdout);
      // The unit's command line, nothing more.
      node.child = spawn(process.env.QUIVER_NATS_SERVER ?? 'nats-server', ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] });
      node.child.stderr!.setEncoding('utf8').on('data', (d: string) => (node.stderr = (node.stderr + d).slice(-4000)));
    }
  });

  after(async () => {
    await nc?.close().catch(() => {});
    for (const node of nodes) if (node.child) await stopProcess(node.child);
    rmSync(dir, { recursive: true, force: true });
  });

  it('the rendering script refuses a seed where the public key goes, and a missing value', () => {
    const envFile = join(dir, 'bad.env');
    writeFileSync(envFile, `NATS_NODE_NAME=x\nNATS_CLIENT_LISTEN=a\nNATS_CLUSTER_LISTEN=b\nNATS_ROUTES=c\nNATS_STORE_DIR=d\nNATS_TLS_DIR=e\nNATS_USER_NKEY=${new TextDecoder().decode(user.getSeed())}\n`);
    const seed = run('sh', [renderScript, envFile]);
    assert.equal(seed.code, 2);
    assert.match(seed.stderr, /NATS_USER_NKEY must be the user's public nkey/);
    writeFileSync(envFile, 'NATS_NODE_NAME=x\n');
    const missing = run('sh', [renderScript, envFile]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /NATS_CLIENT_LISTEN is not set/);
  });

  it('forms a JetStream cluster over TLS routes, reached with QUIVER_NATS_URL, QUIVER_NATS_NKEY and QUIVER_NATS_TLS_CA', async () => {
    const url = nodes.map((n) => `tls://127.0.0.1:${n.client}`).join(',');
    // As the units set them (quiver.env and LoadCredential=).
    const auth = natsConnectionOptions({ env: { QUIVER_NATS_URL: url, QUIVER_NATS_NKEY: seedFile, QUIVER_NATS_TLS_CA: join(tls, 'ca.pem') }, home: dir });
    nc = await waitFor('a node to let Quiver in', () => connect({ servers: url.split(','), ...auth }).catch(() => null), 20_000);
    // No API check on the way in: JetStream answers only once the nodes elected a meta leader, which the wait below is for.
    const jsm = await jetstreamManager(nc, { checkAPI: false });
    const stream = await waitFor(
      'JetStream to make a stream with three replicas',
      async () => {
        try {
          return await jsm.streams.add({ name: 'DEPLOY_CHECK', subjects: ['deploy.check'], num_replicas: 3 });
        } catch {
          return null;
        }
      },
      60_000,
    ).catch((error: Error) => {
      throw new Error(`${error.message}; nodes said: ${nodes.map((n) => `${n.name}: ${n.stderr.trim().split('\n').slice(-3).join(' | ')}`).join('; ')}`);
    });
    assert.equal(stream.config.num_replicas, 3);
    const info = await waitFor('both other replicas to be current', async () => {
      const i = await jsm.streams.info('DEPLOY_CHECK');
      return i.cluster?.replicas?.length === 2 && i.cluster.replicas.every((r) => r.current) ? i : null;
    }, 30_000);
    assert.deepEqual([info.cluster!.leader!, ...info.cluster!.replicas!.map((r) => r.name)].sort(), ['nats1', 'nats2', 'nats3']);
  });

  it('lets nobody else in: no credentials, or no TLS', async () => {
    const url = `tls://127.0.0.1:${nodes[0]!.client}`;
    await assert.rejects(connect({ servers: url, tls: { caFile: join(tls, 'ca.pem') }, maxReconnectAttempts: 0 }), /Authorization Violation|AUTHORIZATION/i);
    await assert.rejects(connect({ servers: `nats://127.0.0.1:${nodes[0]!.client}`, tls: null, maxReconnectAttempts: 0, timeout: 3000 }));
  });
});

describe('infra/deploy: the units and env files name only settings Quiver reads', () => {
  it('every QUIVER_ variable and quiver command in them exists in the code', () => {
    const files = ['systemd', 'env', 'nats'].flatMap((sub) => readdirSync(join(deployDir, sub)).map((f) => join(deployDir, sub, f)));
    const text = files.map((f) => readFileSync(f, 'utf8')).join('\n');
    const sources = run('grep', ['-rhoE', 'QUIVER_[A-Z0-9_]+', '--include=*.ts', 'cli', 'executor', 'orchestrator', 'sdk', 'schemas', 'storage', 'flight', 'infra'], { cwd: repoRoot });
    const known = new Set(sources.stdout.split('\n').filter(Boolean));
    const named = new Set(text.match(/QUIVER_[A-Z0-9_]+/g) ?? []);
    assert.ok(named.size > 10, `found ${named.size} variables`);
    const unknown = [...named].filter((v) => !known.has(v));
    assert.deepEqual(unknown, [], 'variables no Quiver code reads');
    for (const command of text.match(/quiver\.mjs \w+/g) ?? []) {
      const r = run(process.execPath, [join(repoRoot, 'bin', 'quiver.mjs'), command.split(' ')[1]!, '--help'], { cwd: repoRoot });
      assert.equal(r.code, 0, `${command} --help: ${r.stderr}`);
    }
  });
});
