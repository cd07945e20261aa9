/**
 * A real nats-server cluster, on loopback or on given addresses and network namespaces: N nodes
 * with JetStream (file storage each), joined by routes, for tests, benchmarks and
 * `quiver up --nats-cluster 3`. Each node can be killed and
 * started again on its ports with its storage, as a crashed host would.
 */
import { chmodSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { connect, nkeyAuthenticator, type ConnectionOptions } from '@nats-io/transport-node';
import { QuiverInfraError } from './errors.ts';
import { killChild, launchNatsServer, serverCredentials, stopChild, type Launched, type LaunchNetwork, type NatsServerCredentials } from './nats-server.ts';

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
  /**
   * Where each node listens, one entry per node (missing entries: loopback). A node given a
   * network namespace runs inside it, as on a host of its own. @default every node on 127.0.0.1
   */
  network?: readonly NatsClusterNodeNetwork[];
}

/** Where one node of a {@link NatsCluster} listens. */
export interface NatsClusterNodeNetwork {
  /** The address its client and route ports listen on, and other nodes and clients dial. @default '127.0.0.1' */
  address?: string;
  /**
   * Runs the node inside this network namespace (`ip netns exec`; needs root). Its ports are
   * then the standard ones, 4222 for clients and 6222 for routes: nothing else listens in a
   * namespace made for it. Without one, free ports are picked on `address`.
   */
  netns?: string;
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
/** nats-server's standard ports, used inside a network namespace of a node's own. */
const NAMESPACE_CLIENT_PORT = 4222;
const NAMESPACE_ROUTE_PORT = 6222;

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
  if ((options.network?.length ?? 0) > size) throw new QuiverInfraError('ERR_NATS_SERVER_START', `network names ${options.network!.length} nodes for a cluster of ${size}; give at most one entry per node`);
  const network = Array.from({ length: size }, (_, i): LaunchNetwork & { address: string } => ({
    address: options.network?.[i]?.address ?? '127.0.0.1',
    ...(options.network?.[i]?.netns ? { netns: options.network[i]!.netns! } : {}),
  }));
  // All of one address's ports at once: ports asked for separately could come back twice.
  const freeByAddress = new Map<string, number[]>();
  for (const address of new Set(network.filter((n) => !n.netns).map((n) => n.address))) {
    freeByAddress.set(address, await freePorts(2 * network.filter((n) => !n.netns && n.address === address).length, address));
  }
  const clientPorts: number[] = [];
  const routePorts: number[] = [];
  for (const n of network) {
    const [client, route] = n.netns ? [NAMESPACE_CLIENT_PORT, NAMESPACE_ROUTE_PORT] : freeByAddress.get(n.address)!.splice(0, 2);
    clientPorts.push(client!);
    routePorts.push(route!);
  }
  mkdirSync(options.dir, { recursive: true, mode: 0o700 });

  const nodes = Array.from({ length: size }, (_, i) => {
    const name = `n${i + 1}`;
    const dir = join(options.dir, name);
    mkdirSync(join(dir, 'jetstream'), { recursive: true });
    mkdirSync(join(dir, 'ports'), { recursive: true });
    const configFile = join(dir, 'nats-server.conf');
    const routes = routePorts.flatMap((p, j) => (j === i ? [] : [`nats://${network[j]!.address}:${p}`]));
    writeFileSync(
      configFile,
      [
        `server_name: ${name}`,
        `cluster {\n  name: ${CLUSTER_NAME}\n  listen: ${network[i]!.address}:${routePorts[i]}\n  routes: [${routes.map((r) => `"${r}"`).join(', ')}]\n}`,
        // Only the public key: the files let nobody in.
        credentials ? `authorization {\n  users = [\n    { nkey: "${credentials.publicKey}" }\n  ]\n}` : '',
      ].join('\n') + '\n',
      { mode: 0o600 },
    );
    chmodSync(configFile, 0o600);
    return { name, dir, configFile, port: clientPorts[i]!, network: network[i]!, current: null as Launched | null, down: false };
  });
  const launch = async (node: (typeof nodes)[number]) => {
    node.current = await launchNatsServer(binary, join(node.dir, 'jetstream'), join(node.dir, 'ports'), node.configFile, node.port, startTimeoutMs, node.network);
    node.down = false;
  };
  try {
    await Promise.all(nodes.map(launch));
  } catch (error) {
    await Promise.all(nodes.map((n) => (n.current ? stopChild(n.current.child, n.current.exited) : undefined)));
    throw error;
  }

  try {
    await jetStreamReady(`nats://${nodes[0]!.network.address}:${nodes[0]!.port}`, credentials, startTimeoutMs);
  } catch (error) {
    await Promise.all(nodes.map((n) => (n.current ? stopChild(n.current.child, n.current.exited) : undefined)));
    throw error;
  }

  let stopped = false;
  const faces: NatsClusterNode[] = nodes.map((node) => ({
    name: node.name,
    url: `nats://${node.network.address}:${node.port}`,
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

/** Ports free now on `address` (the OS picks them; they stay free unless another process takes one meanwhile). */
async function freePorts(count: number, address = '127.0.0.1'): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: count },
      () =>
        new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
          const server = createServer();
          server.once('error', reject);
          server.listen(0, address, () => resolve(server));
        }),
    ),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}
