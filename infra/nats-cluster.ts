/**
 * A real nats-server cluster on loopback: N nodes with JetStream (file storage each), joined by
 * routes, for tests, benchmarks and `quiver up --nats-cluster 3`. Each node can be killed and
 * started again on its ports with its storage, as a crashed host would.
 */
import { chmodSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { connect, nkeyAuthenticator, type ConnectionOptions } from '@nats-io/transport-node';
import { QuiverInfraError } from './errors.ts';
import { killChild, launchNatsServer, serverCredentials, stopChild, type Launched, type NatsServerCredentials } from './nats-server.ts';

/** Options for {@link startNatsCluster}. */
export interface NatsClusterOptions {
  /** Each node's storage, config and ports file go in `<dir>/<node>`; created if missing. */
  dir: string;
  /** Nodes. @default 3 */
  size?: number;
  /** nats-server binary. @default process.env.QUIVER_NATS_SERVER ?? 'nats-server' */
  binary?: string;
  /** Who may connect (see NatsServerOptions.auth): one nkey user on every node, or anyone. @default 'none' */
  auth?: 'none' | 'nkey' | { seed: string };
  /** How long to wait for each node to listen, and for JetStream to elect its leaders. @default 20_000 */
  startTimeoutMs?: number;
  /** Remove `dir` when the cluster stops. @default true */
  removeDirOnStop?: boolean;
}

/** One node of a {@link NatsCluster}. */
export interface NatsClusterNode {
  /** Its server name (`n1`, `n2`, ...), as JetStream names stream leaders. */
  readonly name: string;
  readonly url: string;
  readonly pid: number;
  /** True between a kill and the next restart. */
  readonly down: boolean;
  /** SIGKILL, as a crash; storage stays for {@link NatsClusterNode.restart}. */
  kill(): Promise<void>;
  /** Starts it again on its ports with its storage. */
  restart(): Promise<void>;
}

export interface NatsCluster {
  readonly nodes: readonly NatsClusterNode[];
  /** Every node's client url: give them all to a client, so it reconnects to another when its node dies. */
  readonly urls: string[];
  readonly credentials: NatsServerCredentials | null;
  readonly connectionOptions: Pick<ConnectionOptions, 'authenticator'>;
  /** The node named `name` (a stream leader's name, say). */
  node(name: string): NatsClusterNode;
  stop(): Promise<void>;
}

const CLUSTER_NAME = 'quiver';

/**
 * Starts `size` nodes, waits for each to listen, and returns. Route and client ports are chosen
 * free beforehand (routes must name each other's ports), so another process taking one in
 * between makes the start fail with the port named; starting again picks others.
 */
export async function startNatsCluster(options: NatsClusterOptions): Promise<NatsCluster> {
  const size = options.size ?? 3;
  if (!Number.isInteger(size) || size < 1 || size > 7) throw new QuiverInfraError('ERR_NATS_SERVER_START', `a cluster has 1 to 7 nodes; got ${size}`);
  const binary = options.binary ?? process.env.QUIVER_NATS_SERVER ?? 'nats-server';
  const startTimeoutMs = options.startTimeoutMs ?? 20_000;
  const credentials = serverCredentials(options.auth ?? 'none');
  const clientPorts = await freePorts(size);
  const routePorts = await freePorts(size);
  mkdirSync(options.dir, { recursive: true, mode: 0o700 });

  const nodes = Array.from({ length: size }, (_, i) => {
    const name = `n${i + 1}`;
    const dir = join(options.dir, name);
    mkdirSync(join(dir, 'jetstream'), { recursive: true });
    mkdirSync(join(dir, 'ports'), { recursive: true });
    const configFile = join(dir, 'nats-server.conf');
    const routes = routePorts.filter((_, j) => j !== i).map((p) => `nats://127.0.0.1:${p}`);
    writeFileSync(
      configFile,
      [
        `server_name: ${name}`,
        `cluster {\n  name: ${CLUSTER_NAME}\n  listen: 127.0.0.1:${routePorts[i]}\n  routes: [${routes.map((r) => `"${r}"`).join(', ')}]\n}`,
        // Only the public key: the files let nobody in.
        credentials ? `authorization {\n  users = [\n    { nkey: "${credentials.publicKey}" }\n  ]\n}` : '',
      ].join('\n') + '\n',
      { mode: 0o600 },
    );
    chmodSync(configFile, 0o600);
    return { name, dir, configFile, port: clientPorts[i]!, current: null as Launched | null, down: false };
  });
  const launch = async (node: (typeof nodes)[number]) => {
    node.current = await launchNatsServer(binary, join(node.dir, 'jetstream'), join(node.dir, 'ports'), node.configFile, node.port, startTimeoutMs);
    node.down = false;
  };
  try {
    await Promise.all(nodes.map(launch));
  } catch (error) {
    await Promise.all(nodes.map((n) => (n.current ? stopChild(n.current.child, n.current.exited) : undefined)));
    throw error;
  }

  try {
    await jetStreamReady(`nats://127.0.0.1:${nodes[0]!.port}`, credentials, startTimeoutMs);
  } catch (error) {
    await Promise.all(nodes.map((n) => (n.current ? stopChild(n.current.child, n.current.exited) : undefined)));
    throw error;
  }

  let stopped = false;
  const faces: NatsClusterNode[] = nodes.map((node) => ({
    name: node.name,
    url: `nats://127.0.0.1:${node.port}`,
    get pid() {
      return node.current?.child.pid ?? -1;
    },
    get down() {
      return node.down;
    },
    kill: async () => {
      if (!node.current) return;
      await killChild(node.current.child, node.current.exited);
      node.down = true;
    },
    restart: async () => {
      if (stopped) throw new QuiverInfraError('ERR_NATS_SERVER_START', `the cluster was stopped; start a new one instead of restarting node ${node.name}`);
      if (node.current) await killChild(node.current.child, node.current.exited);
      await launch(node);
    },
  }));
  return {
    nodes: faces,
    urls: faces.map((f) => f.url),
    credentials,
    connectionOptions: credentials ? { authenticator: nkeyAuthenticator(new TextEncoder().encode(credentials.seed)) } : {},
    node: (name) => {
      const found = faces.find((f) => f.name === name);
      if (!found) throw new QuiverInfraError('ERR_NATS_SERVER_START', `the cluster has no node ${name}; its nodes are ${faces.map((f) => f.name).join(', ')}`);
      return found;
    },
    stop: async () => {
      stopped = true;
      await Promise.all(nodes.map((n) => (n.current ? stopChild(n.current.child, n.current.exited) : undefined)));
      if (options.removeDirOnStop ?? true) rmSync(options.dir, { recursive: true, force: true });
    },
  };
}

/** Waits until the cluster's JetStream answers (its meta leader is elected): before that every JetStream request times out. */
async function jetStreamReady(url: string, credentials: NatsServerCredentials | null, timeoutMs: number): Promise<void> {
  const nc = await connect({ servers: url, ...(credentials ? { authenticator: nkeyAuthenticator(new TextEncoder().encode(credentials.seed)) } : {}) });
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  try {
    while (Date.now() < deadline) {
      try {
        const reply = (await nc.request('$JS.API.INFO', '', { timeout: 1000 })).json<{ error?: { description: string } }>();
        if (!reply.error) return;
        last = new Error(reply.error.description);
      } catch (error) {
        last = error;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    await nc.close();
  }
  throw new QuiverInfraError('ERR_NATS_SERVER_START', `the cluster's JetStream did not elect a leader within ${timeoutMs} ms: ${(last as Error)?.message ?? 'no answer'}`);
}

/** Ports free now on loopback (the OS picks them; they stay free unless another process takes one meanwhile). */
async function freePorts(count: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: count },
      () =>
        new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
          const server = createServer();
          server.once('error', reject);
          server.listen(0, '127.0.0.1', () => resolve(server));
        }),
    ),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}
