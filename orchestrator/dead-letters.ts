/**
 * The safety net under max_deliver: a message whose handler died with it (the process crashed or
 * hung on every delivery) never reaches the code that dead-letters a failing message. JetStream
 * says so with a max-deliveries advisory; the leader dead-letters the message from it, so even
 * that input is kept, with the reason.
 */
import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { buckets, deadLetter, streams, type DeadLetterKind, type Logger } from '../schemas/index.ts';

const MAX_DELIVERIES_ADVISORY = '$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>';

/** The streams whose messages Quiver dead-letters, and under which kind. */
const KIND_OF_STREAM: Record<string, DeadLetterKind> = {
  [streams.control]: 'control',
  [streams.events]: 'events',
  [streams.work]: 'work',
  [`KV_${buckets.steps}`]: 'steps',
};

export interface MaxDeliveriesWatchOptions {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  logger: Logger;
  now: () => number;
}

/** Listens to JetStream's max-deliveries advisories while this orchestrator leads. */
export class MaxDeliveriesWatch {
  private subscription: Subscription | null = null;
  /** Advisories handled one at a time: each is a stream read and a publish. */
  private handling: Promise<void> = Promise.resolve();

  constructor(private readonly options: MaxDeliveriesWatchOptions) {}

  start(): void {
    if (this.subscription) return;
    this.subscription = this.options.nc.subscribe(MAX_DELIVERIES_ADVISORY, {
      callback: (error, msg) => {
        if (error) return;
        const data = msg.data;
        this.handling = this.handling.then(() => this.handle(data));
      },
    });
  }

  async stop(): Promise<void> {
    this.subscription?.unsubscribe();
    this.subscription = null;
    await this.handling;
  }

  /** Never throws: an advisory that cannot be acted on is logged. */
  private async handle(data: Uint8Array): Promise<void> {
    let advisory: { stream?: unknown; consumer?: unknown; stream_seq?: unknown; deliveries?: unknown };
    try {
      advisory = JSON.parse(new TextDecoder().decode(data)) as typeof advisory;
    } catch (error) {
      this.options.logger.warn(`ignored a max-deliveries advisory that is not JSON: ${(error as Error).message}`);
      return;
    }
    const { stream, consumer, stream_seq: seq, deliveries } = advisory;
    if (typeof stream !== 'string' || typeof seq !== 'number' || !(stream in KIND_OF_STREAM)) return;
    try {
      const stored = await this.options.jsm.streams.getMessage(stream, { seq }).catch(() => null);
      // Gone already: acked late, or dead-lettered by its handler on the last delivery.
      if (!stored) return;
      const reason = `delivered ${String(deliveries)} times to consumer ${String(consumer)} and never acked: whatever handled it died or hung each time`;
      await deadLetter(this.options.js, KIND_OF_STREAM[stream]!, {
        subject: stream === streams.events ? stored.subject.replace(/^quiver\.events\./, '') : stored.subject,
        id: stored.header?.get('Nats-Msg-Id') || `${stream}-${seq}`,
        reason,
        payload: stored.data,
        at: this.options.now(),
      });
      this.options.logger.error(`dead-lettered ${stored.subject} #${seq}: ${reason}`);
      // A work queue keeps an unacked message for ever: it goes once it is in the dead letters.
      if (stream === streams.work) await this.options.jsm.streams.deleteMessage(stream, seq, false);
    } catch (error) {
      this.options.logger.error(`could not dead-letter ${stream} #${seq} after its last delivery: ${(error as Error).message}`);
    }
  }
}
