import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import { createUser } from '@nats-io/nkeys';
import { connect, nkeyAuthenticator, type NatsConnection } from '@nats-io/transport-node';
import { buckets, natsConnectionOptions, NatsCredentialsError } from '../schemas/index.ts';
import { quiverBin, repoRoot, runCli, startDaemon, stopProcess, tempHome, waitFor, withCluster } from './helpers.ts';

/** Why a connection attempt failed, or null when it succeeded (and was closed). */
async function refusal(options: Parameters<typeof connect>[0]): Promise<string | null> {
  try {
    const nc = await connect({ maxReconnectAttempts: 0, timeout: 3000, ...options });
    await nc.close();
    return null;
  } catch (error) {
    const e = error as Error & { cause?: Error };
    return `${e.message} ${e.cause?.message ?? ''}`;
  }
}

/** Every message of every stream (KV buckets and object stores are streams too), as text. */
async function everythingStored(nc: NatsConnection): Promise<string> {
  const jsm = await jetstreamManager(nc);
  let all = '';
  for await (const info of jsm.streams.list()) {
    for (let seq = info.state.first_seq; seq <= info.state.last_seq && info.state.messages > 0; seq++) {
      const msg = await jsm.streams.getMessage(info.config.name, { seq }).catch(() => null);
      if (msg) all += `${msg.subject} ${new TextDecoder().decode(msg.data)}\n`;
    }
  }
  return all;
}

describe('NATS credentials', () => {
  it('the embedded cluster refuses connections without credentials and with wrong ones', async () => {
    await withCluster(async (cluster, home) => {
      const servers = cluster.server.url;
      assert.match((await refusal({ servers })) ?? 'connected', /authorization/i, 'an anonymous client got in');
      const stranger = new TextEncoder().encode(new TextDecoder().decode(createUser().getSeed()));
      assert.match((await refusal({ servers, authenticator: nkeyAuthenticator(stranger) })) ?? 'connected', /authorization/i, 'a wrong nkey got in');
      assert.match((await refusal({ servers, user: 'quiver', pass: 'guess' })) ?? 'connected', /authorization/i, 'a guessed password got in');
      assert.equal(await refusal({ servers, ...cluster.server.connectionOptions }), null);
      // The server's configuration names only the public key: nothing on its disk lets anyone in.
      const [serverDir] = readdirSync(join(home, 'embedded'));
      const configFile = join(home, 'embedded', serverDir!, 'nats-server.conf');
      assert.equal(statSync(configFile).mode & 0o777, 0o600);
      const config = readFileSync(configFile, 'utf8');
      assert.ok(config.includes(cluster.server.credentials!.publicKey));
      assert.ok(!config.includes(cluster.server.credentials!.seed));
    });
  });

  it('quiver up stores its credentials 0600; the CLI and daemons use them; the cluster secret is in no stream', async () => {
    const home = tempHome();
    const { QUIVER_NATS_URL: _ignored, QUIVER_CLUSTER_SECRET: _secret, ...inherited } = process.env;
    const up = spawn(process.execPath, [quiverBin, 'up'], { cwd: repoRoot, env: { ...inherited, QUIVER_HOME: home.dir }, stdio: ['ignore', 'pipe', 'pipe'] });
    let upOutput = '';
    up.stdout.setEncoding('utf8').on('data', (d: string) => (upOutput += d));
    up.stderr.setEncoding('utf8').on('data', (d: string) => (upOutput += d));
    const daemons: ReturnType<typeof startDaemon>[] = [];
    let nc: NatsConnection | null = null;
    try {
      const urlFile = join(home.dir, 'cluster', 'url');
      await waitFor(`quiver up to write ${urlFile} (output: ${upOutput})`, () => existsSync(urlFile), 30_000);
      const url = readFileSync(urlFile, 'utf8').trim();
      const credentialsFile = join(home.dir, 'cluster', 'nats-credentials.json');
      assert.equal(statSync(credentialsFile).mode & 0o777, 0o600);
      assert.equal(statSync(join(home.dir, 'cluster-secret')).mode & 0o777, 0o600);
      assert.equal(statSync(join(home.dir, 'cluster', 'nats', 'nats-server.conf')).mode & 0o777, 0o600);

      assert.match((await refusal({ servers: url })) ?? 'connected', /authorization/i);
      const listed = await runCli(['runs'], { env: { QUIVER_HOME: home.dir, QUIVER_NATS_URL: '' } });
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stdout, /no runs yet/);
      // Without the stored credentials, the CLI is refused, and says so.
      const elsewhere = tempHome();
      try {
        const refused = await runCli(['runs'], { env: { QUIVER_HOME: elsewhere.dir, QUIVER_NATS_URL: url } });
        assert.notEqual(refused.code, 0);
        assert.match(refused.stderr, /authorization/i);
      } finally {
        elsewhere.remove();
      }

      // A daemon beside `quiver up` (same home) finds the credentials and joins.
      nc = await connect({ servers: url, ...natsConnectionOptions({ env: {}, home: home.dir, url }) });
      daemons.push(startDaemon('executor', url, { QUIVER_HOME: home.dir, QUIVER_CLUSTER_SECRET: '' }, ['--host-id', 'second-host']));
      const hosts = await new Kvm(nc).open(buckets.hosts);
      const announced = async () => {
        for await (const key of await hosts.keys()) if ((await hosts.get(key))?.json<{ hostId: string }>().hostId === 'second-host') return true;
        return false;
      };
      await waitFor(`the daemon executor to announce itself (output: ${daemons[0]!.output()})`, announced, 30_000);

      const secret = readFileSync(join(home.dir, 'cluster-secret'), 'utf8').trim();
      assert.ok(secret.length >= 32);
      const stored = await everythingStored(nc);
      assert.ok(stored.length > 0);
      assert.ok(!stored.includes(secret), 'the cluster secret is readable from a stream or bucket');
      assert.ok(!stored.includes(JSON.parse(readFileSync(credentialsFile, 'utf8')).seed), 'the NATS seed is readable from a stream or bucket');
    } finally {
      await nc?.close();
      for (const d of daemons) await stopProcess(d);
      await stopProcess(up, 'SIGINT');
      home.remove();
    }
    assert.equal(up.exitCode, 0, upOutput);
  });

  it('resolves credentials from the variables, and rejects conflicting or incomplete ones', () => {
    const home = tempHome();
    try {
      assert.deepEqual(natsConnectionOptions({ env: {}, home: home.dir }), {});
      assert.deepEqual(natsConnectionOptions({ env: { QUIVER_NATS_USER: 'u', QUIVER_NATS_PASSWORD: 'p' }, home: home.dir }), { user: 'u', pass: 'p' });
      assert.deepEqual(natsConnectionOptions({ env: { QUIVER_NATS_TOKEN: 't' }, home: home.dir }), { token: 't' });
      assert.throws(() => natsConnectionOptions({ env: { QUIVER_NATS_TOKEN: 't', QUIVER_NATS_USER: 'u', QUIVER_NATS_PASSWORD: 'p' }, home: home.dir }), (e: unknown) => e instanceof NatsCredentialsError && e.code === 'ERR_NATS_CREDENTIALS_CONFLICT' && /QUIVER_NATS_USER and QUIVER_NATS_TOKEN/.test(e.message));
      assert.throws(() => natsConnectionOptions({ env: { QUIVER_NATS_USER: 'u' }, home: home.dir }), /QUIVER_NATS_USER and QUIVER_NATS_PASSWORD go together/);
      assert.throws(() => natsConnectionOptions({ env: { QUIVER_NATS_CREDS: join(home.dir, 'missing.creds') }, home: home.dir }), /QUIVER_NATS_CREDS=.*cannot be read/);
      assert.throws(() => natsConnectionOptions({ env: { QUIVER_NATS_TLS_CERT: '/x' }, home: home.dir }), /QUIVER_NATS_TLS_CERT and QUIVER_NATS_TLS_KEY go together/);
    } finally {
      home.remove();
    }
  });
});
