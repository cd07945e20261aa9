import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdirSync, readFileSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import { createUser, fromSeed } from '@nats-io/nkeys';
import { nkeyAuthenticator, type ConnectionOptions } from '@nats-io/transport-node';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { QuiverInfraError } from './errors.ts';

/** Options for {@link startNatsServer}. */
export interface NatsServerOptions {
  /** Directory for JetStream storage and the ports file; created if missing. */
  dir: string;
  /** nats-server binary. @default process.env.QUIVER_NATS_SERVER ?? 'nats-server' */
  binary?: string;
  /**
   * Port to listen on, e.g. the port of a server started before on the same `dir` (its clients
   * reconnect to that port). @default -1: a free port picked by the server
   */
  port?: number;
  /** How long to wait for the server to listen. @default 10_000 */
  startTimeoutMs?: number;
  /** Remove `dir` when the server stops. @default true */
  removeDirOnStop?: boolean;
  /**
   * Who may connect. `'nkey'`: one nkey user, generated here unless `seed` (an `SU…` nkey seed)
   * is given; the server's configuration holds only its public key, and clients sign the
   * server's nonce with the seed ({@link NatsServer.connectionOptions}). `'none'`: anyone who
   * reaches the port, as a bare development server (tests and benchmarks use it to stand for an
   * existing NATS). Quiver's own servers (`startLocalCluster`, `quiver up`) always use `'nkey'`.
   * @default 'none'
   */
  auth?: 'none' | 'nkey' | { seed: string };
}

/** What a client needs to connect to a {@link NatsServer} with authorization. */
export interface NatsServerCredentials {
  /** The nkey seed (`SU…`) of the one user the server lets in: the secret. */
  readonly seed: string;
  /** Its public key (`U…`), as the server's configuration names it. */
  readonly publicKey: string;
}

/** A private nats-server with JetStream (file storage under its `dir`), listening on loopback. */
export interface NatsServer {
  readonly url: string;
  readonly port: number;
  /** The credentials the server requires; null when it lets anyone in (`auth: 'none'`). */
  readonly credentials: NatsServerCredentials | null;
  /** Authentication options for nats.js `connect()`: `{}` when the server needs none. */
  readonly connectionOptions: Pick<ConnectionOptions, 'authenticator'>;
  /** The current process; a new one after {@link NatsServer.restart}. */
  readonly pid: number;
  /** Stops the server (SIGTERM, then SIGKILL) and removes its directory unless told not to. */
  stop(): Promise<void>;
  /**
   * Kills the server with SIGKILL, as a crash would (no clean JetStream shutdown), and waits for
   * it to be gone. Its directory stays, for {@link NatsServer.restart}.
   */
  kill(): Promise<void>;
  /**
   * Starts the server again on the same port with the same storage, after {@link NatsServer.kill}
   * (or kills it first). Clients that reconnect find their streams and buckets as last persisted.
   * @throws QuiverInfraError after {@link NatsServer.stop}, or when the port is taken meanwhile.
   */
  restart(): Promise<void>;
}

const INSTALL_HINT = 'Install it with `apt-get install nats-server` (Debian) or set QUIVER_NATS_SERVER to its path.';
/** nats-server's own "pick a free port". */
const ANY_PORT = -1;

/** One nats-server process. */
export interface Launched {
  child: ChildProcess;
  exited: Promise<unknown>;
  port: number;
}

/**
 * Starts nats-server, on port -1 (the server picks a free port) unless given one, and reads the
 * real port back from its ports file: no race between choosing a port and binding it.
 */
export async function startNatsServer(options: NatsServerOptions): Promise<NatsServer> {
  const binary = options.binary ?? process.env.QUIVER_NATS_SERVER ?? 'nats-server';
  const startTimeoutMs = options.startTimeoutMs ?? 10_000;
  const removeDirOnStop = options.removeDirOnStop ?? true;
  const wantedPort = options.port ?? ANY_PORT;
  if (!Number.isInteger(wantedPort) || (wantedPort !== ANY_PORT && (wantedPort < 1 || wantedPort > 65_535))) {
    throw new QuiverInfraError('ERR_NATS_SERVER_START', `port must be a whole number from 1 to 65535, or -1 for a free one; got ${wantedPort}`);
  }
  const storeDir = join(options.dir, 'jetstream');
  const portsDir = join(options.dir, 'ports');
  mkdirSync(options.dir, { recursive: true, mode: 0o700 });
  mkdirSync(storeDir, { recursive: true });
  mkdirSync(portsDir, { recursive: true });
  const credentials = serverCredentials(options.auth ?? 'none');
  const configFile = join(options.dir, 'nats-server.conf');
  if (credentials) {
    // Only the public key: the server's files let nobody in.
    writeFileSync(configFile, `authorization {\n  users = [\n    { nkey: "${credentials.publicKey}" }\n  ]\n}\n`, { mode: 0o600 });
    chmodSync(configFile, 0o600);
  }
  const launch = (port: number) => launchNatsServer(binary, storeDir, portsDir, credentials ? configFile : null, port, startTimeoutMs);

  let current = await launch(wantedPort);
  const port = current.port;
  let stopped = false;
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    credentials,
    connectionOptions: credentials ? { authenticator: nkeyAuthenticator(new TextEncoder().encode(credentials.seed)) } : {},
    get pid() {
      return current.child.pid ?? -1;
    },
    stop: async () => {
      stopped = true;
      await stopChild(current.child, current.exited);
      if (removeDirOnStop) rmSync(options.dir, { recursive: true, force: true });
    },
    kill: async () => {
      await killChild(current.child, current.exited);
    },
    restart: async () => {
      if (stopped) throw new QuiverInfraError('ERR_NATS_SERVER_START', `nats-server on port ${port} was stopped; start a new one instead of restarting it`);
      await killChild(current.child, current.exited);
      current = await launch(port);
    },
  };
}

export function serverCredentials(auth: NonNullable<NatsServerOptions['auth']>): NatsServerCredentials | null {
  if (auth === 'none') return null;
  let pair;
  try {
    pair = auth === 'nkey' ? createUser() : fromSeed(new TextEncoder().encode(auth.seed));
  } catch (error) {
    throw new QuiverInfraError('ERR_NATS_SERVER_START', `the nkey seed given to startNatsServer is not a user seed (SU…): ${(error as Error).message}`, { cause: error });
  }
  const publicKey = pair.getPublicKey();
  if (!publicKey.startsWith('U')) throw new QuiverInfraError('ERR_NATS_SERVER_START', `the nkey seed given to startNatsServer is not a user seed (SU…); its public key is ${publicKey}`);
  return { seed: new TextDecoder().decode(pair.getSeed()), publicKey };
}

/** Where a launched server listens: an address, inside a network namespace or not. */
export interface LaunchNetwork {
  /** @default '127.0.0.1' */
  address?: string;
  /** Run it inside this network namespace (`ip netns exec`, which execs: the child is the server itself). */
  netns?: string;
}

export async function launchNatsServer(
  binary: string,
  storeDir: string,
  portsDir: string,
  configFile: string | null,
  wantedPort: number,
  startTimeoutMs: number,
  network: LaunchNetwork = {},
): Promise<Launched> {
  const configArgs = configFile ? ['-c', configFile] : [];
  const args = [...configArgs, '-a', network.address ?? '127.0.0.1', '-p', String(wantedPort), '-js', '-sd', storeDir, '--ports_file_dir', portsDir];
  const child = network.netns
    ? spawn('ip', ['netns', 'exec', network.netns, binary, ...args], { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(binary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (error) => resolve({ code: null, signal: null, error }));
  });
  let exitInfo: Awaited<typeof exited> | undefined;
  void exited.then((info) => {
    exitInfo = info;
  });

  const portsFile = join(portsDir, `${binaryBaseName(binary)}_${child.pid}.ports`);
  const deadline = Date.now() + startTimeoutMs;
  let port: number | undefined;
  while (Date.now() < deadline) {
    if (exitInfo) {
      const why = exitInfo.error
        ? `${exitInfo.error.message}. ${INSTALL_HINT}`
        : `it exited with ${exitInfo.signal ?? exitInfo.code}: ${stderr.trim() || '(no output)'}`;
      throw new QuiverInfraError('ERR_NATS_SERVER_START', `nats-server could not start${wantedPort === ANY_PORT ? '' : ` on port ${wantedPort}`}: ${why}`);
    }
    if (existsSync(portsFile)) {
      try {
        const ports = JSON.parse(readFileSync(portsFile, 'utf8')) as { nats?: string[] };
        const first = ports.nats?.[0];
        if (first) port = Number(new URL(first).port);
      } catch {
        // The server writes the file non-atomically; a partial read is retried on the next tick.
      }
      if (port) break;
    }
    await sleep(20);
  }
  if (!port) {
    child.kill('SIGKILL');
    throw new QuiverInfraError(
      'ERR_NATS_SERVER_START',
      `nats-server did not report a port within ${startTimeoutMs} ms: ${stderr.trim() || '(no output)'}`,
    );
  }
  return { child, exited, port };
}

function binaryBaseName(binary: string): string {
  return binary.split('/').pop() ?? binary;
}

export async function stopChild(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
  await exited;
  clearTimeout(timer);
}

export async function killChild(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGKILL');
  await exited;
}
