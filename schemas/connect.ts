import { connect, type ConnectionOptions, type NatsConnection } from '@nats-io/transport-node';
import type { Logger } from './logger.ts';

/**
 * Reconnect settings of every long-lived Quiver connection (the daemons, the embedded cluster, the
 * client): never give up, and try again every quarter second, so a NATS restart is an outage the
 * processes ride out rather than the end of them. nats.js gives up after 10 attempts 2 s apart by
 * default, i.e. a NATS away for 20 s would silently leave every daemon closed.
 */
export const RECONNECT_FOREVER = {
  /** @default 10 in nats.js; -1 never gives up. */
  maxReconnectAttempts: -1,
  /** @default 2000 in nats.js */
  reconnectTimeWait: 250,
  /** @default 100 in nats.js */
  reconnectJitter: 100,
} as const satisfies Partial<ConnectionOptions>;

/** Options for {@link connectForever}. */
export interface ConnectForeverOptions {
  /** Shown by the server's monitoring pages. */
  name?: string;
  /**
   * Keep trying until the first connection succeeds too, as for every later one: a daemon may
   * start before its NATS does. Otherwise a first connection that fails rejects at once (a command
   * line tool pointed at the wrong address should say so, not hang). @default false
   */
  waitOnFirstConnect?: boolean;
  /** Told when the connection drops and when it is back. @default silent */
  logger?: Logger;
}

/**
 * Connects with {@link RECONNECT_FOREVER}. The connection only ends when closed; while NATS is
 * away, requests fail (time out), so callers retry, and plain publishes are lost: nats.js drops
 * what it buffered each time it dials again.
 */
export async function connectForever(servers: string | string[], options: ConnectForeverOptions = {}): Promise<NatsConnection> {
  const nc = await connect({
    servers,
    ...RECONNECT_FOREVER,
    ...(options.name ? { name: options.name } : {}),
    ...(options.waitOnFirstConnect ? { waitOnFirstConnect: true } : {}),
  });
  const logger = options.logger;
  if (logger) {
    void (async () => {
      for await (const status of nc.status()) {
        if (status.type === 'disconnect') logger.warn(`lost NATS at ${status.server}; reconnecting every ${RECONNECT_FOREVER.reconnectTimeWait} ms`);
        else if (status.type === 'reconnect') logger.info(`reconnected to NATS at ${status.server}`);
      }
    })();
  }
  return nc;
}
