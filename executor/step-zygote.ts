/**
 * The step zygote: one booted runner per executor that forks step processes on request. A forked
 * process starts from the zygote's memory (node, apache-arrow and the runner booted) instead of
 * booting node: `npm run bench:trigger -- --routes process` measured the boot at most of a step
 * process's CPU, and the spawn at most of the executor's.
 *
 * The zygote runs with V8's --single-threaded (a forked child has none of its parent's threads,
 * so V8 must hand them no work): garbage collection and optimization run on the step's own thread.
 * Each child connects its stdout, stderr and IPC channel to this executor's unix socket, leads its
 * own process group and dies with the zygote, which dies with the executor. The zygote reaps its
 * children and reports how each ended.
 */
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { processAlive } from '../shm/index.ts';
import { parseForkHello, type ForkStream, type RunnerMessage, type RunnerRequest } from './protocol.ts';

/** What StepProcess needs of its process: a ChildProcess, or a {@link ForkedChild}. */
export interface StepChild {
  readonly pid?: number | undefined;
  readonly stdout: NodeJS.ReadableStream | null;
  readonly stderr: NodeJS.ReadableStream | null;
  readonly connected: boolean;
  send(message: RunnerRequest, callback?: (error: Error | null) => void): boolean;
  kill(signal?: NodeJS.Signals): boolean;
  on(event: string, listener: (...args: any[]) => void): this;
  once(event: string, listener: (...args: any[]) => void): this;
  emit(event: string, ...args: unknown[]): boolean;
}

/** Zygotes that may die in a row before forking anything: past it, processes are booted instead. */
const MAX_DEATHS_BEFORE_A_FORK = 3;

/** How long a child's connections may lag behind its end before its streams count as closed. */
const LATE_CONNECTION_MS = 2_000;

/**
 * A process forked by the zygote, shaped like the ChildProcess of a spawned one. Its pid comes a
 * moment after it is made (the zygote answers); messages sent before its channel connects wait.
 */
export class ForkedChild extends EventEmitter {
  pid: number | undefined = undefined;
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  connected = true;
  private channel: Socket | null = null;
  private readonly waiting: { line: string; callback?: (error: Error | null) => void }[] = [];
  private received = '';
  private pendingSignal: NodeJS.Signals | null = null;
  private ended = false;
  private readonly attached = new Set<ForkStream>();

  constructor(readonly forkId: number) {
    super();
  }

  send(message: RunnerRequest, callback?: (error: Error | null) => void): boolean {
    if (!this.connected) {
      if (callback) process.nextTick(callback, new Error('the step process is gone'));
      return false;
    }
    const line = `${JSON.stringify(message)}\n`;
    if (!this.channel) this.waiting.push({ line, ...(callback ? { callback } : {}) });
    else this.channel.write(line, (error) => callback?.(error ?? null));
    return true;
  }

  kill(signal: NodeJS.Signals = 'SIGTERM'): boolean {
    if (this.ended) return false;
    if (this.pid === undefined) {
      this.pendingSignal = signal;
      return true;
    }
    try {
      process.kill(this.pid, signal);
      return true;
    } catch {
      return false;
    }
  }

  /** The zygote forked it. */
  forked(pid: number): void {
    this.pid = pid;
    this.emit('spawn');
    if (this.pendingSignal) this.kill(this.pendingSignal);
  }

  /** The zygote could not fork it (or died first): it never ran. */
  failed(error: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.connected = false;
    this.closeStreams();
    for (const { callback } of this.waiting.splice(0)) callback?.(error);
    this.emit('error', error);
  }

  /** One of its connections arrived, past its hello line. */
  attach(stream: ForkStream, socket: Socket, rest: Buffer): void {
    if (this.attached.has(stream) || (this.ended && this.pid === undefined)) {
      socket.destroy();
      return;
    }
    this.attached.add(stream);
    if (stream !== 'ipc') {
      const target = stream === 'stdout' ? this.stdout : this.stderr;
      if (rest.length > 0) target.write(rest);
      socket.pipe(target);
      socket.on('error', () => target.end());
      return;
    }
    this.channel = socket;
    socket.setEncoding('utf8');
    // Back into the stream, so a character split between the hello's chunk and the next decodes whole.
    if (rest.length > 0) socket.unshift(rest);
    socket.on('data', (chunk: string) => this.onChannelData(chunk));
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.disconnect());
    for (const { line, callback } of this.waiting.splice(0)) socket.write(line, (error) => callback?.(error ?? null));
  }

  /** The zygote reaped it. Connections it made before it ended may still be on their way. */
  exited(code: number | null, signal: NodeJS.Signals | null): void {
    if (this.ended) return;
    this.ended = true;
    this.emit('exit', code, signal);
    if (this.attached.size < 3) setTimeout(() => this.closeStreams(), LATE_CONNECTION_MS).unref();
  }

  private onChannelData(chunk: string): void {
    this.received += chunk;
    let newline: number;
    while ((newline = this.received.indexOf('\n')) >= 0) {
      const line = this.received.slice(0, newline);
      this.received = this.received.slice(newline + 1);
      if (!line) continue;
      let message: RunnerMessage;
      try {
        message = JSON.parse(line) as RunnerMessage;
      } catch {
        // Not the runner's: the process is broken, and its exit will say how.
        this.kill('SIGKILL');
        return;
      }
      this.emit('message', message);
    }
  }

  private disconnect(): void {
    if (!this.connected) return;
    this.connected = false;
    this.emit('disconnect');
  }

  private closeStreams(): void {
    if (!this.attached.has('stdout')) this.stdout.end();
    if (!this.attached.has('stderr')) this.stderr.end();
    if (!this.attached.has('ipc')) this.disconnect();
  }
}

/**
 * Forks step processes from one zygote, started on first need and again after it dies. Forks go
 * one at a time: the zygote must have nothing else in flight on its channel when it forks.
 */
export class StepZygote {
  private zygote: ChildProcess | null = null;
  private readonly dir = makeSocketDir();
  private readonly socketPath = join(this.dir, 'steps.sock');
  private readonly token = randomBytes(16).toString('hex');
  private readonly server: Server;
  private readonly listening: Promise<void>;
  private forkSequence = 0;
  /** Forked or being forked, by fork id: their connections and reports find them here. */
  private readonly children = new Map<number, ForkedChild>();
  private readonly byPid = new Map<number, ForkedChild>();
  private readonly queue: { child: ForkedChild; addressSpaceBytes: number }[] = [];
  private inFlight: ForkedChild | null = null;
  private stopped = false;
  /** Zygotes that died before forking anything, in a row: past a few, forking is given up. */
  private deathsBeforeAFork = 0;
  private forkedAny = false;
  private broken = false;
  /** Names each zygote's warm-up tables apart from the last one's. */
  private zygotesStarted = 0;

  /**
   * `spawnZygote` starts a runner with --single-threaded, stdout and stderr piped, an IPC channel.
   * `warmUpCodePath` (RunnerBuild.warmUpCodePath): the steps each zygote runs before it forks.
   */
  constructor(
    private readonly spawnZygote: () => ChildProcess,
    private readonly warmUpCodePath: string | null = null,
  ) {
    this.server = createServer((socket) => this.onConnection(socket));
    this.listening = new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.socketPath, () => resolve());
    });
    // Reported when a fork is asked for: the caller's step fails with it.
    this.listening.catch(() => undefined);
  }

  /** False once forking proved impossible here (StepProcesses then boots each process). */
  get usable(): boolean {
    return !this.broken && !this.stopped;
  }

  /** A process forked for one step (or as a spare), under RLIMIT_AS `addressSpaceBytes` (0: none). */
  fork(addressSpaceBytes: number): ForkedChild {
    const child = new ForkedChild(++this.forkSequence);
    child.once('exit', () => this.forget(child));
    child.once('error', () => this.forget(child));
    if (this.stopped) {
      process.nextTick(() => child.failed(new Error('the executor is stopping')));
      return child;
    }
    this.children.set(child.forkId, child);
    this.queue.push({ child, addressSpaceBytes });
    void this.listening.then(
      () => this.next(),
      (error: Error) => child.failed(new Error(`step processes cannot be forked: listening on ${this.socketPath} failed: ${error.message}`)),
    );
    return child;
  }

  /** Kills the zygote (its children die with it, and report so) and removes the socket; forks not made yet fail. */
  stop(): void {
    this.stopped = true;
    this.queue.splice(0);
    for (const child of [...this.children.values()]) if (child.pid === undefined) child.failed(new Error('the executor is stopping'));
    this.zygote?.kill('SIGKILL');
    this.server.close();
    rmSync(this.dir, { recursive: true, force: true });
  }

  private next(): void {
    if (this.inFlight || this.stopped) return;
    const item = this.queue.shift();
    if (!item) return;
    const zygote = this.zygote ?? this.startZygote();
    this.inFlight = item.child;
    const request: RunnerRequest = { type: 'fork', forkId: item.child.forkId, socketPath: this.socketPath, token: this.token, addressSpaceBytes: item.addressSpaceBytes };
    zygote.send(request, (error) => {
      if (error) this.zygoteDied(`could not ask the step zygote to fork: ${error.message}`);
    });
  }

  private startZygote(): ChildProcess {
    const zygote = this.spawnZygote();
    this.zygote = zygote;
    zygote.on('message', (message: RunnerMessage) => this.onZygoteMessage(message));
    // Its own lines (a warning while booting) go to the executor's stderr: no step is running there.
    zygote.stdout?.on('data', (chunk: Buffer) => process.stderr.write(`step zygote: ${chunk}`));
    zygote.stderr?.on('data', (chunk: Buffer) => process.stderr.write(`step zygote: ${chunk}`));
    zygote.once('exit', (code, signal) => {
      if (this.zygote === zygote) this.zygoteDied(`the step zygote exited (${signal ?? `code ${code}`})`);
    });
    zygote.on('error', () => undefined);
    if (this.warmUpCodePath) {
      const shmDir = join(this.dir, 'warm-up');
      mkdirSync(shmDir, { recursive: true });
      const request: RunnerRequest = { type: 'warm-up', codePath: this.warmUpCodePath, shmDir, idPrefix: `warm-up-${++this.zygotesStarted}` };
      zygote.send(request, () => undefined);
    }
    return zygote;
  }

  private onZygoteMessage(message: RunnerMessage): void {
    if (message.type === 'forked') {
      const child = this.children.get(message.forkId);
      if (this.inFlight?.forkId === message.forkId) this.inFlight = null;
      this.forkedAny = true;
      this.deathsBeforeAFork = 0;
      if (child) {
        this.byPid.set(message.pid, child);
        child.forked(message.pid);
      } else {
        // Given up on meanwhile (the executor is stopping): not wanted.
        try {
          process.kill(message.pid, 'SIGKILL');
        } catch {
          // Gone already.
        }
      }
      this.next();
    } else if (message.type === 'fork-failed') {
      if (this.inFlight?.forkId === message.forkId) this.inFlight = null;
      // This node or machine cannot fork a runner: every later one would fail the same way.
      this.broken = true;
      process.stderr.write(`step processes are booted, not forked: ${message.message}\n`);
      this.children.get(message.forkId)?.failed(new Error(`the step zygote could not fork: ${message.message}`));
      this.next();
    } else if (message.type === 'exited') {
      this.byPid.get(message.pid)?.exited(message.code, message.signal);
    }
  }

  /** Its children died with it (parent-death signal): each ends as killed; the next fork starts a new zygote. */
  private zygoteDied(why: string): void {
    const zygote = this.zygote;
    this.zygote = null;
    zygote?.kill('SIGKILL');
    const inFlight = this.inFlight;
    this.inFlight = null;
    if (!this.forkedAny && ++this.deathsBeforeAFork >= MAX_DEATHS_BEFORE_A_FORK) {
      this.broken = true;
      process.stderr.write(`step processes are booted, not forked: ${why}, ${this.deathsBeforeAFork} times in a row\n`);
    }
    this.forkedAny = false;
    // Forked ones died with it; the one being forked may have; queued ones wait for the next zygote.
    for (const child of [...this.children.values()]) {
      if (child.pid !== undefined) child.exited(null, 'SIGKILL');
      else if (child === inFlight || this.broken) child.failed(new Error(why));
    }
    if (this.broken) this.queue.splice(0);
    else this.next();
  }

  private forget(child: ForkedChild): void {
    this.children.delete(child.forkId);
    if (child.pid !== undefined && this.byPid.get(child.pid) === child) this.byPid.delete(child.pid);
  }

  /** A child's connection: its hello line says whose and which stream it is. */
  private onConnection(socket: Socket): void {
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      const newline = head.indexOf(10);
      if (newline < 0) {
        if (head.length > 256) socket.destroy();
        return;
      }
      socket.off('data', onData);
      socket.pause();
      const hello = parseForkHello(head.subarray(0, newline).toString('utf8'));
      const child = hello && hello.token === this.token ? this.children.get(hello.forkId) : undefined;
      if (!hello || !child) {
        socket.destroy();
        return;
      }
      child.attach(hello.stream, socket, head.subarray(newline + 1));
      socket.resume();
    };
    socket.on('data', onData);
    socket.on('error', () => socket.destroy());
  }
}

/** Socket folders are named `quiver-fork-<executor pid>-<random>` (mkdtemp: mode 0700). */
const SOCKET_DIR = /^quiver-fork-(\d+)-/;

/**
 * A private folder for this executor's socket. Folders an executor left when it died without
 * stopping (SIGKILL) go first: their owner's pid no longer runs.
 */
function makeSocketDir(): string {
  for (const name of readdirSync(tmpdir())) {
    const owner = SOCKET_DIR.exec(name)?.[1];
    if (owner && !processAlive(Number(owner))) rmSync(join(tmpdir(), name), { recursive: true, force: true });
  }
  return mkdtempSync(join(tmpdir(), `quiver-fork-${process.pid}-`));
}
