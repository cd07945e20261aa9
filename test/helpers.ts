import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RunView } from '../schemas/index.ts';
import { loadPipeline, startLocalCluster, type LocalCluster, type LocalClusterOptions, type RunEvent } from '../sdk/index.ts';

/** Every test's shared memory lives under this root, so the last test can prove nothing leaked. */
/** QUIVER_TEST_SHM_ROOT lets two checkouts run their tests side by side without seeing each other's segments. */
export const TEST_SHM_ROOT = process.env.QUIVER_TEST_SHM_ROOT ?? '/dev/shm/quiver-test';
process.env.QUIVER_SHM_ROOT = TEST_SHM_ROOT;

export const repoRoot = fileURLToPath(new URL('..', import.meta.url));
export const fixture = (name: string) => join(repoRoot, 'test', 'fixtures', name);
export const quiverBin = join(repoRoot, 'bin', 'quiver.mjs');

/** A throwaway Quiver home (code cache, embedded NATS storage) for one test. */
export function tempHome(): { dir: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'quiver-test-'));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Starts a private cluster (own nats-server on a free port) and stops it after `fn`, whatever happens. */
export async function withCluster<T>(fn: (cluster: LocalCluster, home: string) => Promise<T>, options: LocalClusterOptions = {}): Promise<T> {
  const home = tempHome();
  const cluster = await startLocalCluster({ ...options, home: home.dir });
  try {
    return await fn(cluster, home.dir);
  } finally {
    await cluster.stop();
    home.remove();
  }
}

export interface FinishedRun {
  view: RunView;
  events: RunEvent[];
  logs: { step: string; line: string }[];
}

/** Runs a pipeline file on the cluster and collects everything it reported. Releases outputs unless told to keep them. */
export async function runFile(
  cluster: LocalCluster,
  home: string,
  file: string,
  options: { params?: Record<string, string>; release?: boolean } = {},
): Promise<FinishedRun> {
  const loaded = await loadPipeline(file);
  const handle = await cluster.client.run(loaded, { params: options.params ?? {} });
  const events: RunEvent[] = [];
  for await (const e of handle.events()) events.push(e);
  const view = await handle.result();
  if (options.release ?? true) await handle.release();
  const logs = events.flatMap((e) => (e.type === 'log' ? [{ step: e.log.step, line: e.log.line }] : []));
  return { view, events, logs };
}

export function stepOf(view: RunView, name: string) {
  const step = view.steps.find((s) => s.name === name);
  if (!step) throw new Error(`run has no step ${name}`);
  return step;
}

/** Runs the CLI in a child process and collects its output. */
export function runCli(
  args: string[],
  options: { env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [quiverBin, ...args], {
      cwd: repoRoot,
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`quiver ${args.join(' ')} timed out; stderr: ${stderr}`));
    }, options.timeoutMs ?? 120_000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Starts a long-lived `quiver <daemon>` process against a NATS url. */
export function startDaemon(kind: 'orchestrator' | 'executor', natsUrl: string, env: Record<string, string> = {}, args: string[] = []): ChildProcess & { output(): string } {
  const child = spawn(process.execPath, [quiverBin, kind, ...args], {
    cwd: repoRoot,
    env: { ...process.env, QUIVER_NATS_URL: natsUrl, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  return Object.assign(child, { output: () => output });
}

export async function waitFor<T>(what: string, probe: () => Promise<T | null | undefined | false> | T | null | undefined | false, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await probe();
    if (value) return value;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

export async function stopProcess(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/** Sets environment variables for the length of `fn` (an in-process cluster's executor reads its environment), then puts them back. */
export async function withEnv<T>(vars: Record<string, string>, fn: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  Object.assign(process.env, vars);
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}
