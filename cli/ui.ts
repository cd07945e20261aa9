import { parseArgs } from 'node:util';
import { consoleLogger } from '../schemas/index.ts';
import { QuiverClient } from '../sdk/index.ts';
import { DEFAULT_UI_HOST, DEFAULT_UI_PORT, resolveUiOptions, startUiServer, type UiServer } from '../ui/index.ts';
import { findCluster, NoClusterError, UsageError } from './cluster.ts';

export const UI_USAGE = `  ui [--port P] [--listen ADDR]
                 Serve the web UI (runs, live DAG, logs, previews, pipelines, dead
                 letters, tables) for the cluster the other commands find, on
                 ${DEFAULT_UI_HOST}:${DEFAULT_UI_PORT}. Any other address needs QUIVER_UI_TOKEN.`;

/** `--port` as a number, or a usage error naming what was given. */
export function parsePort(value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const port = Number(value);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`--port takes a port number from 0 to 65535, got "${value}"`);
  return port;
}

/** The line a person reads to open the UI; with a token, how to pass it without printing it. */
export function describeUi(ui: UiServer, token: string | null): string {
  return token ? `quiver UI at ${ui.url}?token=$QUIVER_UI_TOKEN (the token is required)` : `quiver UI at ${ui.url}`;
}

/** `quiver ui`: the web UI against the cluster found like every other command finds it. */
export async function uiCommand(args: string[], untilSignal: () => Promise<unknown>): Promise<number> {
  const { values } = parseArgs({ args, options: { port: { type: 'string' }, listen: { type: 'string' } } });
  const options = { host: values.listen ?? DEFAULT_UI_HOST, port: parsePort(values.port, DEFAULT_UI_PORT) };
  // Checked before connecting: a missing token is the first thing to say.
  const resolved = resolveUiOptions(options);
  const found = await findCluster();
  if (!found) {
    throw new NoClusterError('quiver ui needs a running cluster: start one with `quiver up` (which serves the UI itself) or set QUIVER_NATS_URL');
  }
  const client = await QuiverClient.connect({ nc: found.nc, ownConnection: true });
  try {
    const ui = await startUiServer(client, { ...options, logger: consoleLogger('ui') });
    console.error(`${describeUi(ui, resolved.token)} for the cluster at ${found.url}; Ctrl-C stops it`);
    await untilSignal();
    await ui.close();
  } finally {
    await client.close();
  }
  return 0;
}

/**
 * The UI beside `quiver up`, on loopback: on the usual port, or a free one when that is taken (a
 * busy port must not stop the cluster). Null when turned off or when it could not start: the
 * cluster runs on either way, and the reason is printed.
 */
export async function serveUiBeside(client: QuiverClient, options: { port?: string | undefined; off?: boolean | undefined }): Promise<UiServer | null> {
  if (options.off) return null;
  const port = parsePort(options.port, DEFAULT_UI_PORT);
  const logger = consoleLogger('ui');
  const token = resolveUiOptions({ port }).token;
  try {
    let ui: UiServer;
    try {
      ui = await startUiServer(client, { port, logger });
    } catch (error) {
      if ((error as { code?: string }).code !== 'EADDRINUSE' || options.port !== undefined) throw error;
      ui = await startUiServer(client, { port: 0, logger });
    }
    console.error(describeUi(ui, token));
    return ui;
  } catch (error) {
    console.error(`quiver: the web UI did not start (${(error as Error).message}); the cluster runs without it`);
    return null;
  }
}
