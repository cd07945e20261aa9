import { createHash } from 'node:crypto';
import type { KV } from '@nats-io/kv';
import { encodeTime } from 'ulid';
import { decode, encode, leaseRecord, type LeaseRecord, type Logger } from '../schemas/index.ts';


export interface LeaseOptions {
  /** Who asks: shown in the lease and logs. */
  holder: string;
  /** A holder that stops renewing loses the lease this long after its last renewal. */
  ttlMs: number;
  logger: Logger;
  now: () => number;
  /** Called once each time this process becomes the leader. */
  onAcquired: () => Promise<void>;
  /** Called once each time this process stops being the leader (never while onAcquired runs). */
  onLost: () => Promise<void>;
}

/**
 * Leadership through one KV key changed only by compare-and-swap: the holder renews it every
 * third of the ttl; others take it over once its expiry has passed. Expiry compares clocks across
 * hosts, so they must be roughly in sync (well within the ttl).
 */
export class Lease {
  private revision = 0;
  private leader = false;
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;
  private busy: Promise<void> = Promise.resolve();
  /** When the lease this process holds runs out unless renewed. */
  private heldUntil = 0;

  constructor(
    private readonly kv: KV,
    private readonly key: string,
    private readonly options: LeaseOptions,
  ) {}

  get isLeader(): boolean {
    return this.leader;
  }

  /** Tries once at once (so a lone process leads as soon as this resolves), then keeps trying. */
  async start(): Promise<void> {
    await this.step();
    this.schedule();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    await this.busy;
    if (this.leader) {
      this.leader = false;
      await this.options.onLost();
      // Handing over at once: the next candidate need not wait for the expiry.
      await this.kv.delete(this.key, { previousSeq: this.revision }).catch(() => {});
    }
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.busy = this.step().finally(() => this.schedule());
    }, Math.max(50, Math.floor(this.options.ttlMs / 3)));
  }

  private value(): { data: Uint8Array; expiresAt: number } {
    const v: LeaseRecord = { holder: this.options.holder, pid: process.pid, expiresAt: this.options.now() + this.options.ttlMs };
    return { data: encode(leaseRecord, v), expiresAt: v.expiresAt };
  }

  private async step(): Promise<void> {
    if (this.stopped) return;
    try {
      if (this.leader) {
        const next = this.value();
        this.revision = await this.kv.update(this.key, next.data, this.revision);
        this.heldUntil = next.expiresAt;
        return;
      }
      const entry = await this.kv.get(this.key);
      const next = this.value();
      if (!entry || entry.operation !== 'PUT') {
        this.revision = await this.kv.create(this.key, next.data);
      } else {
        let current: LeaseRecord | null = null;
        try {
          current = decode(leaseRecord, `${entry.bucket}/${entry.key}`, entry.value);
        } catch (error) {
          // A malformed lease leads nobody: replace it.
          this.options.logger.warn((error as Error).message);
        }
        if (current && current.expiresAt > this.options.now()) return;
        if (current) this.options.logger.info(`lease ${this.key} of ${current.holder} expired; taking over`);
        this.revision = await this.kv.update(this.key, next.data, entry.revision);
      }
      this.heldUntil = next.expiresAt;
    } catch (error) {
      // NATS away (a restart, a failover) is no reason to let go while the lease still runs:
      // nobody else can take it before it expires. Another holder's write is.
      const takenOver = /wrong last sequence/i.test((error as Error).message);
      if (this.leader && !takenOver && this.options.now() < this.heldUntil) {
        this.options.logger.warn(`renewing the lease ${this.key} failed, still held for ${this.heldUntil - this.options.now()} ms: ${(error as Error).message}`);
        return;
      }
      if (this.leader) {
        this.options.logger.warn(`lost the lease ${this.key}: ${(error as Error).message}`);
        this.leader = false;
        await this.options.onLost();
      }
      // Another candidate won the swap, or NATS is away: try again next round.
      return;
    }
    if (!this.leader) {
      this.leader = true;
      this.options.logger.info(`${this.options.holder} holds the lease ${this.key}`);
      try {
        await this.options.onAcquired();
      } catch (error) {
        this.options.logger.error(`could not take up leadership: ${(error as Error).stack ?? error}`);
        this.leader = false;
        await this.options.onLost();
        await this.kv.delete(this.key, { previousSeq: this.revision }).catch(() => {});
      }
    }
  }
}

const CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

/**
 * A ULID whose time part is `timeMs` and whose random part is derived from `seed`: the same
 * event or schedule tick always gets the same run id, so a second submission of it is a no-op
 * however late it comes.
 */
export function deterministicUlid(timeMs: number, seed: string): string {
  const digest = createHash('sha256').update(seed).digest();
  let random = '';
  for (let i = 0; i < 16; i++) random += CROCKFORD[digest[i]! & 31];
  return encodeTime(timeMs, 10) + random;
}
