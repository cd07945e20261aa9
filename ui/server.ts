/**
 * The UI's HTTP server (node:http): the page, its bundle, a JSON API and one Server-Sent Events
 * stream per open page, all fed by one {@link LiveHub}.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { silentLogger, type Logger } from '../schemas/index.ts';
import type { QuiverClient } from '../sdk/index.ts';
import { openTableStore, storageConfigFromEnv, type OpenedTableStore } from '../storage/index.ts';
import * as api from './api.ts';
import { hostHeaderIsLoopback, sameOrigin, sameSecret, TOKEN_COOKIE, tokenOf } from './auth.ts';
import { INDEX_HTML, uiBundle } from './bundle.ts';
import { HttpError } from './errors.ts';
import { LiveHub, type LiveMessage } from './hub.ts';
import { resolveUiOptions, type UiOptions } from './options.ts';

/** A running UI server. */
export interface UiServer {
  /** Where a browser opens it, e.g. http://127.0.0.1:4280/ (without the token). */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  /** Stops listening, ends every open stream, stops following the cluster and releases the outputs of runs it started. */
  close(): Promise<void>;
}

/** How often an idle event stream says it is alive, so proxies and browsers keep it open. */
const HEARTBEAT_MS = 15_000;
/** The largest request body the API reads (a test event's JSON). */
const MAX_BODY_BYTES = 1_000_000;

export async function startUiServer(client: QuiverClient, options: UiOptions & { logger?: Logger } = {}): Promise<UiServer> {
  const resolved = resolveUiOptions(options);
  const logger = options.logger ?? silentLogger;
  // Bundled before listening: a broken bundle fails the start, not the first page.
  await uiBundle();
  const hub = await LiveHub.start(client.nc, client.topology, { logLinesPerRun: resolved.logLinesPerRun, logRuns: resolved.logRuns, logger });
  let store: Promise<OpenedTableStore> | null = null;
  const startedHere = new Set<string>();
  const ctx: api.ApiContext = {
    client,
    hub,
    options: resolved,
    startedHere,
    tableStore: () => (store ??= (resolved.openTableStore ?? (() => openTableStore(storageConfigFromEnv(process.env, client.nc))))()),
  };
  // Nobody else reads the result of a run started here: its outputs go once previews had their time.
  const releaseTimers = new Map<string, NodeJS.Timeout>();
  const stopReleases = hub.onRunFinished((summary) => {
    if (!startedHere.has(summary.runId)) return;
    const timer = setTimeout(() => {
      releaseTimers.delete(summary.runId);
      startedHere.delete(summary.runId);
      client.release(summary.runId).catch((e: Error) => logger.warn(`ui: could not release run ${summary.runId}: ${e.message}`));
    }, resolved.releaseAfterMs);
    timer.unref();
    releaseTimers.set(summary.runId, timer);
  });

  const streams = new Set<ServerResponse>();
  const sockets = new Set<Socket>();
  const server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      const status = error instanceof HttpError ? error.status : 500;
      if (status === 500) logger.warn(`ui: ${req.method} ${req.url}: ${(error as Error).stack ?? error}`);
      if (res.headersSent) res.end();
      else sendJson(res, status, { error: (error as Error).message });
    });
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://ui.invalid');
    if (resolved.token) {
      const given = tokenOf(req, url);
      if (!given || !sameSecret(given, resolved.token)) {
        res.writeHead(401, { 'content-type': 'text/plain; charset=utf-8', 'www-authenticate': 'Bearer realm="quiver"' });
        res.end('401: this Quiver UI needs its token (QUIVER_UI_TOKEN): open it as /?token=… once, or send Authorization: Bearer …\n');
        return;
      }
      if (url.searchParams.has('token') && req.method === 'GET' && !url.pathname.startsWith('/api/')) {
        // Kept in a cookie the page's scripts cannot read, and out of the address bar and history.
        url.searchParams.delete('token');
        res.writeHead(303, {
          location: url.pathname + url.search,
          'set-cookie': `${TOKEN_COOKIE}=${encodeURIComponent(given)}; HttpOnly; SameSite=Strict; Path=/`,
        });
        res.end();
        return;
      }
    } else if (!hostHeaderIsLoopback(req)) {
      throw new HttpError(403, 'this UI answers only to localhost and 127.0.0.1 (set QUIVER_UI_TOKEN to serve other names)');
    }
    if (req.method === 'POST' && (!sameOrigin(req) || !(req.headers['content-type'] ?? '').startsWith('application/json'))) {
      throw new HttpError(403, 'actions must come from the UI itself, as JSON');
    }
    const path = url.pathname;
    let m: RegExpMatchArray | null;
    if (req.method === 'GET') {
      if (path === '/' || path === '/index.html') return send(res, 200, 'text/html; charset=utf-8', INDEX_HTML);
      if (path === '/app.js') return send(res, 200, 'text/javascript; charset=utf-8', (await uiBundle()).js);
      if (path === '/app.css') return send(res, 200, 'text/css; charset=utf-8', (await uiBundle()).css);
      if (path === '/favicon.ico') return send(res, 204, 'image/x-icon', '');
      if (path === '/api/events') return openStream(req, res, url);
      if (path === '/api/runs') return sendJson(res, 200, hub.runs());
      if ((m = path.match(/^\/api\/runs\/([0-9A-Z]{26})$/))) return sendJson(res, 200, await api.getRun(ctx, m[1]!));
      if ((m = path.match(/^\/api\/runs\/([0-9A-Z]{26})\/steps\/(\w+)\/output$/))) return sendJson(res, 200, await api.previewOutput(ctx, m[1]!, m[2]!));
      if (path === '/api/pipelines') return sendJson(res, 200, await api.listPipelines(ctx));
      if (path === '/api/dead') return sendJson(res, 200, await client.deadEvents({ limit: 500 }));
      if (path === '/api/tables') return sendJson(res, 200, await api.listTablesApi(ctx));
      if ((m = path.match(/^\/api\/tables\/(\w+)$/))) return sendJson(res, 200, await api.showTable(ctx, m[1]!));
      if ((m = path.match(/^\/api\/tables\/(\w+)\/preview$/))) return sendJson(res, 200, await api.previewTable(ctx, m[1]!, url.searchParams.get('snapshot')));
    } else if (req.method === 'POST') {
      if ((m = path.match(/^\/api\/runs\/([0-9A-Z]{26})\/cancel$/))) return sendJson(res, 200, await api.cancelRun(ctx, m[1]!));
      if ((m = path.match(/^\/api\/runs\/([0-9A-Z]{26})\/rerun$/))) return sendJson(res, 200, await api.rerunRun(ctx, m[1]!, url.searchParams.get('from')));
      if ((m = path.match(/^\/api\/pipelines\/(\w+)\/check$/))) return sendJson(res, 200, await api.checkEvent(ctx, m[1]!, await readJson(req)));
      if ((m = path.match(/^\/api\/pipelines\/(\w+)\/publish$/))) return sendJson(res, 200, await api.publishEvent(ctx, m[1]!, await readJson(req)));
    }
    throw new HttpError(404, `no ${req.method} ${path} here`);
  }

  /** One stream per page: `?run=ID` follows a run, `?topic=runs` or `?topic=dead` the lists. */
  function openStream(req: IncomingMessage, res: ServerResponse, url: URL): void {
    const run = url.searchParams.get('run');
    const named = url.searchParams.get('topic');
    const topic = run !== null ? (/^[0-9A-Z]{26}$/.test(run) ? `run:${run}` : null) : named === 'runs' || named === 'dead' ? named : null;
    if (!topic) throw new HttpError(400, 'follow ?run=ID, ?topic=runs or ?topic=dead');
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', connection: 'keep-alive', 'x-accel-buffering': 'no' });
    res.write(': following ' + topic + '\n\n');
    streams.add(res);
    const unlisten = hub.listen(topic, (message: LiveMessage) => res.write(`data: ${JSON.stringify(message)}\n\n`));
    const heartbeat = setInterval(() => res.write(': alive\n\n'), HEARTBEAT_MS);
    heartbeat.unref();
    req.socket.setNoDelay(true);
    res.once('close', () => {
      clearInterval(heartbeat);
      unlisten();
      streams.delete(res);
    });
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(resolved.port, resolved.host, () => {
      server.off('error', reject);
      resolve();
    });
  }).catch((error: unknown) => {
    hub.stop();
    stopReleases();
    throw error;
  });
  const address = server.address() as AddressInfo;
  const hostInUrl = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return {
    url: `http://${hostInUrl}:${address.port}/`,
    host: address.address,
    port: address.port,
    close: async () => {
      stopReleases();
      hub.stop();
      for (const res of streams) res.end();
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of sockets) socket.destroy();
      await closed;
      const pending = [...releaseTimers.keys()];
      for (const t of releaseTimers.values()) clearTimeout(t);
      releaseTimers.clear();
      await Promise.all(pending.map((id) => client.release(id).catch(() => {})));
      if (store) await (await store.catch(() => null))?.close();
    },
  };
}

function send(res: ServerResponse, status: number, type: string, body: string): void {
  res.writeHead(status, {
    'content-type': type,
    'cache-control': 'no-store',
    // Everything is served from here: nothing else may run or load in the page.
    'content-security-policy': "default-src 'self'; img-src 'self' data:; style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    'x-content-type-options': 'nosniff',
  });
  res.end(body);
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  send(res, status, 'application/json; charset=utf-8', JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new HttpError(413, `the request body is over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (error) {
    throw new HttpError(400, `the request body is not JSON: ${(error as Error).message}`);
  }
}
