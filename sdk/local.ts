import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { NatsConnection } from '@nats-io/transport-node';
import { ulid } from 'ulid';
import { Executor, type ExecutorOptions } from '../executor/index.ts';
import { startNatsServer, type NatsServer } from '../infra/index.ts';
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
}

/** A private nats-server with an orchestrator and an executor in this process: the embedded default. */
export interface LocalCluster {
  readonly server: NatsServer;
  readonly client: QuiverClient;
  readonly orchestrator: Orchestrator;
  readonly executor: Executor;
  /** Stops everything and removes the server's storage and this cluster's shared memory. */
  stop(): Promise<void>;
}

export async function startLocalCluster(options: LocalClusterOptions = {}): Promise<LocalCluster> {
  const home = options.home ?? quiverHome();
  const dir = options.persistentDir ?? join(home, 'embedded', ulid());
  const server = await startNatsServer({ dir, removeDirOnStop: !options.persistentDir });
  const logger = options.logger ?? silentLogger;
  const connections: NatsConnection[] = [];
  const open = async () => {
    const nc = await connectForever(server.url, { logger });
    connections.push(nc);
    return nc;
  };
  try {
    const topology = options.topology ?? {};
    const orchestrator = await Orchestrator.start(await open(), { topology, logger });
    // One host: Flight stays on loopback, with a secret of its own.
    const flight = { clusterSecret: randomBytes(32).toString('hex'), flight: { host: '127.0.0.1', advertiseHost: '127.0.0.1' } };
    const executor = await Executor.start(await open(), { ...flight, ...options.executor, topology, logger });
    const client = await QuiverClient.connect({ nc: await open(), topology });
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
