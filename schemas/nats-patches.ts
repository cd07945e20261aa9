/**
 * Two patches to @nats-io/nats-core v3, for the cost of the messages Quiver sends by the dozen
 * per run. Each applies only when the method it replaces still looks as expected, so a nats.js
 * release that changes it leaves the library as it is (and test/nats-patches.test.ts fails).
 *
 * One socket write per event-loop turn for every NATS connection in the process, instead of one
 * per microtask checkpoint. nats.js queues outgoing protocol lines and writes them from a
 * microtask, so each message a handler sends between two awaits costs its own write(2), and
 * nats-server wakes to read each one. A Quiver process sends dozens of small messages per run
 * (acks, claims, completions, ready steps, status), mostly from different handlers of the same
 * turn. Flushing once per turn (setImmediate) writes them together: in
 * `npm run bench:trigger -- --routes worker` it took about a tenth off the CPU each run costs
 * this process, and a quarter off nats-server's. Order is kept (one buffer, one writer); a
 * message waits at most for the rest of the current turn. The patch replaces
 * `ProtocolHandler.sendCommand`, whose body it repeats with setImmediate for queueMicrotask.
 *
 * No error for a request that was answered. `RequestOne.resolver` settles the request's promise
 * and then calls `cancel()`, which builds `new RequestError("cancelled")` to reject the promise
 * that is settled already: a stack trace captured and thrown away for every publish to a
 * stream, KV write and pull. It was 3.5% of the embedded cluster's main thread in a burst of
 * `npm run bench:trigger`. The patch marks a request answered and skips the error for it;
 * cancelling an unanswered request still rejects it with that error.
 */
import { createRequire } from 'node:module';

interface Outbound {
  length(): number;
  size(): number;
  fill(buf: Uint8Array, ...payloads: Uint8Array[]): void;
}
interface Request {
  timer?: { cancel(): void };
  mux: { cancel(request: unknown): void };
  resolver(err: Error | null, msg: unknown): void;
  cancel(err?: Error): void;
}
interface Protocol {
  outbound: Outbound;
  pendingLimit: number;
  flushPending(): void;
  sendCommand(cmd: string | Uint8Array, ...payloads: Uint8Array[]): void;
}

const PATCHED = Symbol.for('quiver.nats.writesPerTurn');
const ANSWERED = Symbol.for('quiver.nats.requestAnswered');
const encoder = new TextEncoder();

/** The prototype of a class nats-core keeps internal, or null when this nats.js has no such export. */
function internalPrototype<T>(name: 'ProtocolHandler' | 'RequestOne'): (T & { [PATCHED]?: true }) | null {
  try {
    const internal = createRequire(import.meta.url)('@nats-io/nats-core/internal') as Record<string, { prototype: T } | undefined>;
    return internal[name]?.prototype ?? null;
  } catch {
    return null;
  }
}

/** Applies the patch once per process; returns whether it is in force. QUIVER_NATS_COALESCE=0 leaves nats.js as it is. */
export function coalesceNatsWrites(): boolean {
  if (process.env.QUIVER_NATS_COALESCE === '0') return false;
  const proto = internalPrototype<Protocol>('ProtocolHandler');
  if (!proto) return false;
  if (proto[PATCHED]) return true;
  const source = String(proto.sendCommand);
  if (!source.includes('queueMicrotask') || !source.includes('flushPending') || !source.includes('pendingLimit')) return false;
  proto.sendCommand = function sendCommand(this: Protocol, cmd: string | Uint8Array, ...payloads: Uint8Array[]): void {
    const queued = this.outbound.length();
    this.outbound.fill(typeof cmd === 'string' ? encoder.encode(cmd) : cmd, ...payloads);
    if (queued === 0) setImmediate(() => this.flushPending());
    else if (this.outbound.size() >= this.pendingLimit) this.flushPending();
  };
  proto[PATCHED] = true;
  return true;
}

export const natsWritesCoalesced = coalesceNatsWrites();

/** Applies the answered-request patch once per process; returns whether it is in force. */
export function skipErrorsOfAnsweredRequests(): boolean {
  const proto = internalPrototype<Request>('RequestOne');
  if (!proto) return false;
  if (proto[PATCHED]) return true;
  const resolver = proto.resolver;
  const cancel = proto.cancel;
  if (!String(resolver).includes('this.cancel()') || !String(cancel).includes('mux.cancel(this)') || !String(cancel).includes('RequestError')) return false;
  proto.resolver = function (this: Request & { [ANSWERED]?: boolean }, err, msg) {
    this[ANSWERED] = true;
    resolver.call(this, err, msg);
  };
  proto.cancel = function (this: Request & { [ANSWERED]?: boolean }, err?: Error) {
    if (!this[ANSWERED]) return cancel.call(this, err);
    this.timer?.cancel();
    this.mux.cancel(this);
  };
  proto[PATCHED] = true;
  return true;
}

export const natsRequestsPatched = skipErrorsOfAnsweredRequests();
