import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { connect, credsAuthenticator, nkeyAuthenticator, type ConnectionOptions, type NatsConnection } from '@nats-io/transport-node';
import { randomBytes } from 'node:crypto';
import type { Logger } from './logger.ts';
import { quiverHome } from './paths.ts';

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

/** The address used when neither an option nor QUIVER_NATS_URL names one. */
export const DEFAULT_NATS_URL = 'nats://127.0.0.1:4222';

/**
 * The servers a QUIVER_NATS_URL names: one url, or several separated by commas (the nodes of a
 * cluster: a connection whose server dies goes on through another).
 */
export function natsServers(urls: string): string[] {
  return urls
    .split(',')
    .map((u) => u.trim())
    .filter(Boolean);
}

/**
 * Environment variables that hold a secret or point at one. A step process must never inherit
 * them: its environment is built from an allowlist that leaves these out.
 */
export const SECRET_ENV_VARS = [
  'QUIVER_NATS_CREDS',
  'QUIVER_NATS_NKEY',
  'QUIVER_NATS_USER',
  'QUIVER_NATS_PASSWORD',
  'QUIVER_NATS_TOKEN',
  'QUIVER_NATS_TLS_KEY',
  'QUIVER_CLUSTER_SECRET',
  'QUIVER_CLUSTER_SECRET_FILE',
] as const;

/** A NATS connection's settings were wrong or unreadable; the message names the variable to fix. */
export class NatsCredentialsError extends Error {
  override readonly name = 'NatsCredentialsError';
  constructor(
    readonly code: 'ERR_NATS_CREDENTIALS_CONFLICT' | 'ERR_NATS_CREDENTIALS_INCOMPLETE' | 'ERR_NATS_CREDENTIALS_UNREADABLE' | 'ERR_CLUSTER_SECRET',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * What a Quiver-started NATS server lets in: one nkey user. The server's configuration holds
 * only the public key, so nothing on the server's disk lets anyone in; clients prove they hold
 * the seed by signing the server's nonce, so the seed never travels either.
 */
export interface StoredNatsCredentials {
  /** The NATS url these credentials open. */
  url: string;
  /** The user's nkey seed (`SU…`): the secret. */
  seed: string;
}

/** Where `quiver up` keeps the credentials of the NATS it started (mode 0600). */
export const storedCredentialsFile = (home: string) => join(home, 'cluster', 'nats-credentials.json');
/** The cluster secret generated for this home when none is configured (mode 0600). */
export const clusterSecretFile = (home: string) => join(home, 'cluster-secret');

/** Writes a file only its owner may read, creating its folder (0700) when missing. */
export function writePrivateFile(path: string, content: string): void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  writeFileSync(path, content, { mode: 0o600 });
  // The mode given to writeFileSync only applies when the file is created.
  chmodSync(path, 0o600);
}

export function writeStoredCredentials(home: string, credentials: StoredNatsCredentials): void {
  writePrivateFile(storedCredentialsFile(home), JSON.stringify(credentials) + '\n');
}

export function readStoredCredentials(home: string): StoredNatsCredentials | null {
  const file = storedCredentialsFile(home);
  if (!existsSync(file)) return null;
  try {
    const parsed = JSON.parse(readFileSync(file, 'utf8')) as Partial<StoredNatsCredentials>;
    if (typeof parsed.url === 'string' && typeof parsed.seed === 'string') return { url: parsed.url, seed: parsed.seed };
  } catch (error) {
    throw new NatsCredentialsError('ERR_NATS_CREDENTIALS_UNREADABLE', `${file} is not the JSON quiver up writes; remove it and restart quiver up`, { cause: error });
  }
  throw new NatsCredentialsError('ERR_NATS_CREDENTIALS_UNREADABLE', `${file} lacks "url" or "seed"; remove it and restart quiver up`);
}

/** Authentication and TLS settings for one NATS connection, as nats.js takes them. */
export type NatsAuthOptions = Pick<ConnectionOptions, 'authenticator' | 'user' | 'pass' | 'token' | 'tls'>;

/** Options for {@link natsConnectionOptions}. */
export interface NatsConnectionSettings {
  /** Variables to read. @default process.env */
  env?: NodeJS.ProcessEnv;
  /** Quiver home, for the credentials `quiver up` stored. @default quiverHome() */
  home?: string;
  /** The server about to be dialled: stored credentials are only offered to the server they were made for. @default QUIVER_NATS_URL */
  url?: string;
}

/**
 * The one place NATS credentials are resolved, for every Quiver process that connects:
 *
 * 1. `QUIVER_NATS_CREDS` (a `.creds` file: JWT and nkey seed), or `QUIVER_NATS_NKEY` (a file
 *    holding an nkey seed), or `QUIVER_NATS_USER` with `QUIVER_NATS_PASSWORD`, or
 *    `QUIVER_NATS_TOKEN`: at most one of these.
 * 2. Otherwise the credentials `quiver up` stored in `<home>/cluster/`, when the url dialled is the
 *    one they were made for.
 * 3. Otherwise none: a NATS without authorization (a local development server) still works.
 *
 * TLS: `QUIVER_NATS_TLS_CA` (trusted CA file), `QUIVER_NATS_TLS_CERT` and `QUIVER_NATS_TLS_KEY`
 * (client certificate, both or neither). Any of them turns TLS on.
 * @throws NatsCredentialsError naming the variables that conflict, are incomplete or unreadable.
 */
export function natsConnectionOptions(settings: NatsConnectionSettings = {}): NatsAuthOptions {
  const env = settings.env ?? process.env;
  const home = settings.home ?? quiverHome();
  const url = settings.url ?? (env.QUIVER_NATS_URL || undefined);
  const given = (name: string) => (env[name] ? name : null);
  const ways = [given('QUIVER_NATS_CREDS'), given('QUIVER_NATS_NKEY'), given('QUIVER_NATS_USER') ?? given('QUIVER_NATS_PASSWORD'), given('QUIVER_NATS_TOKEN')].filter(
    (w): w is string => w !== null,
  );
  if (ways.length > 1) {
    throw new NatsCredentialsError('ERR_NATS_CREDENTIALS_CONFLICT', `${ways.join(' and ')} are both set; NATS takes one way to authenticate: unset all but one`);
  }
  const options: NatsAuthOptions = {};
  if (env.QUIVER_NATS_CREDS) {
    const creds = readSecretFile(env.QUIVER_NATS_CREDS, 'QUIVER_NATS_CREDS');
    options.authenticator = credsAuthenticator(new TextEncoder().encode(creds));
  } else if (env.QUIVER_NATS_NKEY) {
    options.authenticator = nkeyAuthenticator(new TextEncoder().encode(readSecretFile(env.QUIVER_NATS_NKEY, 'QUIVER_NATS_NKEY').trim()));
  } else if (env.QUIVER_NATS_USER || env.QUIVER_NATS_PASSWORD) {
    if (!env.QUIVER_NATS_USER || !env.QUIVER_NATS_PASSWORD) {
      throw new NatsCredentialsError('ERR_NATS_CREDENTIALS_INCOMPLETE', 'QUIVER_NATS_USER and QUIVER_NATS_PASSWORD go together: set both, or neither');
    }
    options.user = env.QUIVER_NATS_USER;
    options.pass = env.QUIVER_NATS_PASSWORD;
  } else if (env.QUIVER_NATS_TOKEN) {
    options.token = env.QUIVER_NATS_TOKEN;
  } else {
    const stored = readStoredCredentials(home);
    // Only to the servers they were made for (a cluster's are stored comma-separated).
    if (stored && (url === undefined || natsServers(url).some((u) => natsServers(stored.url).some((v) => sameServer(u, v))))) options.authenticator = nkeyAuthenticator(new TextEncoder().encode(stored.seed));
  }
  if (Boolean(env.QUIVER_NATS_TLS_CERT) !== Boolean(env.QUIVER_NATS_TLS_KEY)) {
    throw new NatsCredentialsError('ERR_NATS_CREDENTIALS_INCOMPLETE', 'QUIVER_NATS_TLS_CERT and QUIVER_NATS_TLS_KEY go together (the client certificate and its key): set both, or neither');
  }
  if (env.QUIVER_NATS_TLS_CA || env.QUIVER_NATS_TLS_CERT) {
    for (const name of ['QUIVER_NATS_TLS_CA', 'QUIVER_NATS_TLS_CERT', 'QUIVER_NATS_TLS_KEY']) if (env[name]) readSecretFile(env[name], name);
    options.tls = {
      ...(env.QUIVER_NATS_TLS_CA ? { caFile: env.QUIVER_NATS_TLS_CA } : {}),
      ...(env.QUIVER_NATS_TLS_CERT ? { certFile: env.QUIVER_NATS_TLS_CERT, keyFile: env.QUIVER_NATS_TLS_KEY! } : {}),
    };
  }
  return options;
}

function sameServer(a: string, b: string): boolean {
  const norm = (u: string) => {
    try {
      const parsed = new URL(u.includes('://') ? u : `nats://${u}`);
      return `${parsed.hostname}:${parsed.port || '4222'}`;
    } catch {
      return u;
    }
  };
  return norm(a) === norm(b);
}

function readSecretFile(path: string, variable: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (error) {
    throw new NatsCredentialsError('ERR_NATS_CREDENTIALS_UNREADABLE', `${variable}=${path} cannot be read (${(error as NodeJS.ErrnoException).code ?? (error as Error).message}); point it at a readable file`, {
      cause: error,
    });
  }
}

/**
 * The cluster secret (Flight tickets are signed with it): `QUIVER_CLUSTER_SECRET`, else the file
 * `QUIVER_CLUSTER_SECRET_FILE` names, else `<home>/cluster-secret`, generated (mode 0600) by the
 * first process that needs it. Never kept in NATS: anyone allowed to read a bucket could then
 * forge tickets. Hosts of one cluster share it through the variable or a file copied to each.
 */
export function resolveClusterSecret(env: NodeJS.ProcessEnv = process.env, home: string = quiverHome()): string {
  if (env.QUIVER_CLUSTER_SECRET) return env.QUIVER_CLUSTER_SECRET;
  if (env.QUIVER_CLUSTER_SECRET_FILE) {
    let text: string;
    try {
      text = readFileSync(env.QUIVER_CLUSTER_SECRET_FILE, 'utf8').trim();
    } catch (error) {
      throw new NatsCredentialsError('ERR_CLUSTER_SECRET', `QUIVER_CLUSTER_SECRET_FILE=${env.QUIVER_CLUSTER_SECRET_FILE} cannot be read; point it at the file holding the cluster secret`, { cause: error });
    }
    if (!text) throw new NatsCredentialsError('ERR_CLUSTER_SECRET', `QUIVER_CLUSTER_SECRET_FILE=${env.QUIVER_CLUSTER_SECRET_FILE} is empty; write the cluster secret into it`);
    return text;
  }
  const file = clusterSecretFile(home);
  mkdirSync(home, { recursive: true, mode: 0o700 });
  try {
    // 'wx': of two processes starting together, one writes and both read the same secret.
    writeFileSync(file, randomBytes(32).toString('hex') + '\n', { mode: 0o600, flag: 'wx' });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  if ((statSync(file).mode & 0o077) !== 0) {
    throw new NatsCredentialsError('ERR_CLUSTER_SECRET', `${file} may be read by other users (mode ${(statSync(file).mode & 0o777).toString(8)}); run chmod 600 ${file}`);
  }
  const secret = readFileSync(file, 'utf8').trim();
  if (!secret) throw new NatsCredentialsError('ERR_CLUSTER_SECRET', `${file} is empty; remove it and a new secret is generated`);
  return secret;
}

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
  /** Credentials and TLS. @default natsConnectionOptions() for the servers dialled */
  auth?: NatsAuthOptions;
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
    // nats.js captures two stack traces per request for errors that may never happen (a timeout,
    // the caller's context): a tenth of a daemon's CPU per step at queue speed. Quiver's errors
    // name the request that failed, so the traces buy nothing.
    noAsyncTraces: true,
    ...(options.auth ?? natsConnectionOptions({ url: [servers].flat()[0]! })),
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

/**
 * One connection attempt, no reconnects, for short commands (`quiver gc`, finding a cluster):
 * a wrong address or wrong credentials fail at once.
 */
export async function connectOnce(servers: string, options: { timeoutMs?: number; auth?: NatsAuthOptions; name?: string } = {}): Promise<NatsConnection> {
  return connect({
    servers: natsServers(servers),
    maxReconnectAttempts: 0,
    ...(options.timeoutMs ? { timeout: options.timeoutMs } : {}),
    ...(options.name ? { name: options.name } : {}),
    ...(options.auth ?? natsConnectionOptions({ url: servers })),
  });
}
