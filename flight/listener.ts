/**
 * The TCP listener of both Flight ports. It counts connections, in all and per client address,
 * and closes one over either cap the moment it is accepted, before a byte of it is read (no TLS
 * handshake, no HTTP/2 session): one client cannot take every connection the host serves. An
 * admitted connection is handed to the port's HTTP/2 server (grpc-js through its connection
 * injector, node:http2 for the bulk port), which never listens itself.
 */
import { createServer, type Server, type Socket } from 'node:net';

/** Caps of one port; see {@link listenGated}. */
export interface ConnectionLimits {
  /** Connections held at once, from every client. */
  maxConnections: number;
  /** Connections held at once from one client address. */
  maxConnectionsPerClient: number;
}

export interface GatedListener {
  readonly port: number;
  /** Connections held now. */
  readonly connections: number;
  /** Stops accepting and ends every connection held. */
  close(): void;
}

/** Listens on `host:port` and hands each connection within `limits` to `accept`. */
export async function listenGated(options: { host: string; port: number; limits: ConnectionLimits; accept(socket: Socket): void }): Promise<GatedListener> {
  const { maxConnections, maxConnectionsPerClient } = options.limits;
  for (const [name, value] of Object.entries(options.limits)) {
    if (!Number.isSafeInteger(value) || value < 1) throw new RangeError(`Flight ${name} must be an integer >= 1, got ${value}`);
  }
  const held = new Set<Socket>();
  const perClient = new Map<string, number>();
  const server: Server = createServer({ noDelay: true }, (socket) => {
    const client = socket.remoteAddress ?? '';
    const fromClient = perClient.get(client) ?? 0;
    if (held.size >= maxConnections || fromClient >= maxConnectionsPerClient) {
      socket.destroy();
      return;
    }
    held.add(socket);
    perClient.set(client, fromClient + 1);
    socket.once('close', () => {
      held.delete(socket);
      const left = (perClient.get(client) ?? 1) - 1;
      if (left > 0) perClient.set(client, left);
      else perClient.delete(client);
    });
    options.accept(socket);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => {
      server.removeListener('error', reject);
      resolve();
    });
  });
  // A failed accept (EMFILE) is the kernel's to report: the listener keeps serving.
  server.on('error', () => undefined);
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : 0,
    get connections() {
      return held.size;
    },
    close() {
      server.close();
      for (const socket of held) socket.destroy();
    },
  };
}
