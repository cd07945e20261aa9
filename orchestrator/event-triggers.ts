/**
 * Event triggers: the deployed pipelines (kept in memory from a KV watch), matching each event
 * against their triggers, checking payloads against their schemas, and dead-lettering what
 * starts nothing, with the reason. Matching events are admitted in this process, without a
 * round trip through a stream.
 */
import type { JetStreamClient, JetStreamManager, JsMsg } from '@nats-io/jetstream';
import { KvWatchInclude, type KvEntry } from '@nats-io/kv';
import { buckets, deadEvent, deployment as deploymentSchema, encode, subjects, type Deployment, type Logger, type RunSubmit, type Topology } from '../schemas/index.ts';
import { schemaViolation, subjectMatches } from '../planner/index.ts';
import { deployedRun } from './admission.ts';
import { deterministicUlid } from './lease.ts';

export interface EventTriggersOptions {
  topology: Pick<Topology, 'pipelines'>;
  js: JetStreamClient;
  jsm: JetStreamManager;
  logger: Logger;
  now: () => number;
  admit: (submit: RunSubmit) => Promise<void>;
  /** Told of every deployment and undeployment (the scheduler). */
  onDeployment: (name: string, deployment: Deployment | null) => void;
}

/** How long an event waits for the deployments in memory to catch up before matching anyway. */
const CATCH_UP_TIMEOUT_MS = 5_000;

export class EventTriggers {
  private readonly deployments = new Map<string, Deployment>();
  private watch: { stop(): void } | null = null;
  /** The last revision of the `quiver-pipelines` bucket reflected in `deployments`. */
  private revision = 0;
  /** When the last catch-up asked for the bucket's last revision (`performance.now()`). */
  private caughtUpAsOf = -Infinity;

  constructor(private readonly options: EventTriggersOptions) {}

  /** Watches the deployed pipelines; resolves once the current ones are in memory. */
  async start(): Promise<void> {
    // Watching before reading the current ones: nothing deployed in between is missed. Every key
    // is watched (version keys too) so the revision seen can be compared with the bucket's last.
    const watch = await this.options.topology.pipelines.watch({ key: '>', include: KvWatchInclude.UpdatesOnly });
    this.watch = watch;
    void (async () => {
      for await (const entry of watch) {
        this.revision = Math.max(this.revision, entry.revision);
        if (!entry.key.includes('.')) this.apply(entry);
      }
    })();
    const lastBeforeReading = await this.lastRevision();
    // Only current versions: their keys are the bare names.
    for await (const key of await this.options.topology.pipelines.keys('*')) {
      const entry = await this.options.topology.pipelines.get(key);
      if (entry) this.apply(entry);
    }
    this.revision = Math.max(this.revision, lastBeforeReading);
  }

  stop(): void {
    this.watch?.stop();
    this.watch = null;
    this.deployments.clear();
    this.revision = 0;
    this.caughtUpAsOf = -Infinity;
  }

  /**
   * Starts one run per deployed pipeline whose trigger matches the event; never throws.
   * `arrivedAt` is when this process received it (`performance.now()`: real order, not the
   * injectable business clock).
   */
  async handle(msg: JsMsg, arrivedAt: number): Promise<void> {
    const subject = msg.subject.slice(subjects.eventsPrefix.length);
    const eventId = msg.headers?.get('Nats-Msg-Id') || `seq-${msg.seq}`;
    try {
      await this.catchUp(arrivedAt);
      const matching = [...this.deployments.values()].flatMap((d) => {
        const trigger = d.events.find((t) => subjectMatches(t.subject, subject));
        return trigger ? [{ deployment: d, trigger }] : [];
      });
      if (matching.length === 0) {
        msg.ack();
        return;
      }
      const text = new TextDecoder().decode(msg.data);
      let payload: unknown;
      try {
        payload = text === '' ? null : JSON.parse(text);
      } catch (error) {
        await this.deadLetter(subject, eventId, null, `the payload is not JSON: ${(error as Error).message}`, text);
        msg.ack();
        return;
      }
      const publishedAt = Math.floor(msg.info.timestampNanos / 1_000_000);
      for (const { deployment, trigger } of matching) {
        const violation = trigger.schema ? schemaViolation(trigger.schema, payload) : null;
        if (violation) {
          await this.deadLetter(subject, eventId, deployment.name, `fails the event schema of pipeline ${deployment.name}: ${violation}`, text);
          continue;
        }
        // Derived from the event: a redelivered event never starts a second run.
        const runId = deterministicUlid(publishedAt, `event:${eventId}:${deployment.name}`);
        const event = { subject, id: eventId, payload, publishedAt };
        await this.options.admit(deployedRun(deployment, runId, { kind: 'event', subject, eventId, sequence: msg.seq }, `event ${subject}`, this.options.now(), event));
      }
      msg.ack();
    } catch (error) {
      this.options.logger.error(`could not handle event ${eventId} on ${subject}: ${(error as Error).stack ?? error}`);
      msg.nak(1000);
    }
  }

  private async lastRevision(): Promise<number> {
    return (await this.options.jsm.streams.info(`KV_${buckets.pipelines}`)).state.last_seq;
  }

  /**
   * Waits until the deployments in memory include every deploy made before the event arrived:
   * an event published right after its pipeline was deployed must find it, although the deploy
   * reaches this process on another stream. One look at the bucket covers every event that had
   * arrived before it was asked, so a burst costs one round trip, not one per event.
   */
  private async catchUp(arrivedAt: number): Promise<void> {
    if (arrivedAt < this.caughtUpAsOf) return;
    const askedAt = performance.now();
    const last = await this.lastRevision();
    const deadline = askedAt + CATCH_UP_TIMEOUT_MS;
    while (this.revision < last && performance.now() < deadline) await new Promise((r) => setTimeout(r, 2));
    this.caughtUpAsOf = askedAt;
  }

  private apply(entry: KvEntry): void {
    if (entry.operation !== 'PUT') {
      this.deployments.delete(entry.key);
      this.options.onDeployment(entry.key, null);
      return;
    }
    try {
      const d = deploymentSchema.parse(entry.json());
      // The watch and the initial read may deliver one deployment twice, in either order.
      if ((this.deployments.get(d.name)?.version ?? 0) > d.version) return;
      this.deployments.set(d.name, d);
      this.options.onDeployment(d.name, d);
    } catch (error) {
      this.options.logger.warn(`deployment ${entry.key} is malformed; ignoring it: ${(error as Error).message}`);
    }
  }

  private async deadLetter(subject: string, eventId: string, pipeline: string | null, reason: string, payload: string): Promise<void> {
    this.options.logger.warn(`event ${eventId} on ${subject} dead-lettered: ${reason}`);
    const dead = { subject, eventId, pipeline, reason: reason.slice(0, 4000), payload: payload.slice(0, 65_536), at: this.options.now() };
    await this.options.js.publish(subjects.deadEvent, encode(deadEvent, dead), { msgID: `${eventId}.${pipeline ?? '*'}.dead` });
  }
}
