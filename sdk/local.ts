import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { NatsConnection } from '@nats-io/transport-node';
import { ulid } from 'ulid';
import { Executor, type ExecutorOptions } from '../executor/index.ts';
import { startNatsCluster, startNatsServer, type NatsCluster, type NatsServer, type NatsServerCredentials } from '../infra/index.ts';
import { Orchestrator } from '../orchestrator/index.ts';
import { connectForever, quiverHome, silentLogger, type Logger, type TopologyOptions } from '../schemas/index.ts';
import { removeDir } from '../shm/index.ts';
import { QuiverClient } from './client.ts';

/** Options for {@link startLocalCluster}. */
export interface LocalClusterOptions {
  /** Quiver home: the private server's storage goes under `<home>/embedded/`. @default QUIVER_HOME, else <package>/.quiver */
  home?: string;
  topology?: TopologyOptions;
  executor?: Omit<ExecutorOptions, 'topology' | 'logger'>;
  /** Daemon messages. @default silent */
  logger?: Logger;
  /**
   * Keep the server's storage at this directory across restarts (deployments, runs, events),
   * as `quiver up` does. @default a fresh directory, removed on stop
   */
  persistentDir?: string;
  /**
   * The nkey seed (`SU…`) of the one NATS user the private server lets in. Connections of this
   * cluster use it; nothing else gets in. @default one generated for this start, kept in memory
   */
  natsSeed?: string;
  /** Nodes of the private NATS: more than one starts a cluster of them on loopback (R3 streams with 3). @default 1 */
  natsNodes?: number;
}

/** The private NATS of a local cluster: one server, or the nodes of a cluster. */
export interface LocalNats {
  /** Its url; a cluster's are comma-separated (as QUIVER_NATS_URL takes them). */
  readonly url: string;
  readonly urls: string[];
  readonly credentials: NatsServerCredentials | null;
  /** Credentials for nats.js `connect()`. */
  readonly connectionOptions: NatsServer['connectionOptions'];
  /** The cluster's nodes, to kill or restart one; null for one server. */
  readonly cluster: NatsCluster | null;
  stop(): Promise<void>;
}

/** A private nats-server with an orchestrator and an executor in this process: the embedded default. */
export interface LocalCluster {
  /** Requires credentials: connect with `server.connectionOptions`. */
  readonly server: LocalNats;
  readonly client: QuiverClient;
  readonly orchestrator: Orchestrator;
  readonly executor: Executor;
  /** Stops everything and removes the server's storage and this cluster's shared memory. */
  stop(): Promise<void>;
}

export async function startLocalCluster(options: LocalClusterOptions = {}): Promise<LocalCluster> {
  const home = options.home ?? quiverHome();
  const dir = options.persistentDir ?? join(home, 'embedded', ulid());
  // Credentials always: whoever reaches the port could otherwise deploy code that executors run.
  const server = await startNats(dir, options);
  const logger = options.logger ?? silentLogger;
  const connections: NatsConnection[] = [];
  // One connection for the orchestrator, the executor and the client: what they send in one
  // event-loop turn leaves in one write, and nats-server wakes once for it (schemas/nats-writes.ts).
  let shared: Promise<NatsConnection> | null = null;
  const open = async () => {
    shared ??= connectForever(server.urls, { logger, auth: server.connectionOptions }).then((nc) => {
      connections.push(nc);
      return nc;
    });
    return shared;
  };
  try {
    const topology = options.topology ?? {};
    const orchestrator = await Orchestrator.start(await open(), { topology, logger });
    // One host: Flight stays on loopback, with a secret of its own.
    // QUIVER_FLIGHT_LISTEN opens it to other machines (every call still needs the cluster token).
    const listen = process.env.QUIVER_FLIGHT_LISTEN ? {} : { host: '127.0.0.1', advertiseHost: '127.0.0.1' };
    const flight = { clusterSecret: randomBytes(32).toString('hex'), flight: listen };
    const executor = await Executor.start(await open(), { ...flight, ...options.executor, topology, logger });
    // The client reads outputs over Flight with the token of the secret the executor was given.
    const client = await QuiverClient.connect({ nc: await open(), topology, clusterSecret: options.executor?.clusterSecret ?? flight.clusterSecret });
    return {
      server,
      client,
      orchestrator,
      executor,
      stop: async () => {
        await executor.stop();
        await orchestrator.stop();
        await Promise.all(connections.map((c) => c.close()));
        removeDir(executor.shmDir);
        await server.stop();
      },
    };
  } catch (error) {
    await Promise.all(connections.map((c) => c.close().catch(() => {})));
    // Stopping the server also removes its storage.
    await server.stop();
    throw error;
  }
}

/** One nats-server, or `natsNodes` of them in a cluster; credentials always. */
async function startNats(dir: string, options: LocalClusterOptions): Promise<LocalNats> {
  const auth = options.natsSeed ? { seed: options.natsSeed } : ('nkey' as const);
  const removeDirOnStop = !options.persistentDir;
  if ((options.natsNodes ?? 1) > 1) {
    const cluster = await startNatsCluster({ dir, size: options.natsNodes!, auth, removeDirOnStop });
    return { url: cluster.urls.join(','), urls: cluster.urls, credentials: cluster.credentials, connectionOptions: cluster.connectionOptions, cluster, stop: () => cluster.stop() };
  }
  const server = await startNatsServer({ dir, removeDirOnStop, auth });
  return { url: server.url, urls: [server.url], credentials: server.credentials, connectionOptions: server.connectionOptions, cluster: null, stop: () => server.stop() };
}
