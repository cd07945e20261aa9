import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { QuiverInfraError } from './errors.ts';

/** Options for {@link startNatsServer}. */
export interface NatsServerOptions {
  /** Directory for JetStream storage and the ports file; created if missing. */
  dir: string;
  /** nats-server binary. @default process.env.QUIVER_NATS_SERVER ?? 'nats-server' */
  binary?: string;
  /** How long to wait for the server to listen. @default 10_000 */
  startTimeoutMs?: number;
  /** Remove `dir` when the server stops. @default true */
  removeDirOnStop?: boolean;
}

/** A private nats-server with JetStream, listening on a free loopback port. */
export interface NatsServer {
  readonly url: string;
  readonly port: number;
  readonly pid: number;
  /** Stops the server (SIGTERM, then SIGKILL) and removes its directory unless told not to. */
  stop(): Promise<void>;
}

const INSTALL_HINT = 'Install it with `apt-get install nats-server` (Debian) or set QUIVER_NATS_SERVER to its path.';

/**
 * Starts nats-server on port -1 (the server picks a free port) and reads the real port back from
 * its ports file: no race between choosing a port and binding it.
 */
export async function startNatsServer(options: NatsServerOptions): Promise<NatsServer> {
  const binary = options.binary ?? process.env.QUIVER_NATS_SERVER ?? 'nats-server';
  const startTimeoutMs = options.startTimeoutMs ?? 10_000;
  const removeDirOnStop = options.removeDirOnStop ?? true;
  const storeDir = join(options.dir, 'jetstream');
  const portsDir = join(options.dir, 'ports');
  mkdirSync(storeDir, { recursive: true });
  mkdirSync(portsDir, { recursive: true });

  const child = spawn(binary, ['-a', '127.0.0.1', '-p', '-1', '-js', '-sd', storeDir, '--ports_file_dir', portsDir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
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
      throw new QuiverInfraError('ERR_NATS_SERVER_START', `nats-server could not start: ${why}`);
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

  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    pid: child.pid ?? -1,
    stop: async () => {
      await stopChild(child, exited);
      if (removeDirOnStop) rmSync(options.dir, { recursive: true, force: true });
    },
  };
}

function binaryBaseName(binary: string): string {
  return binary.split('/').pop() ?? binary;
}

async function stopChild(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
  await exited;
  clearTimeout(timer);
}
