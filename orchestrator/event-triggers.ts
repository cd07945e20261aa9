/**
 * Event triggers: the deployed pipelines (kept in memory from a KV watch), matching each event
 * against their triggers, checking payloads against their schemas, and dead-lettering what
 * starts nothing, with the reason. Matching events are admitted in this process, without a
 * round trip through a stream. No event is lost: each one starts its runs, or goes to the dead
 * letters (no trigger matches, not JSON, fails a schema, a bad id, a run record too large, or
 * handling it kept failing), and is acked either way.
 */
import type { JetStreamClient, JetStreamManager, JsMsg } from '@nats-io/jetstream';
import { KvWatchInclude, type KvEntry } from '@nats-io/kv';
import { buckets, deadLetter, deployment as deploymentSchema, retryOrDeadLetter, subjects, type Deployment, type Logger, type RunSubmit, type Topology } from '../schemas/index.ts';
import { schemaViolation, subjectMatches } from '../planner/index.ts';
import { deployedRun } from './admission.ts';
import { NO_LANE, type Lane } from './lane.ts';
import { deterministicUlid } from './lease.ts';

export interface EventTriggersOptions {
  topology: Pick<Topology, 'pipelines' | 'messageMaxDeliver' | 'keys'>;
  js: JetStreamClient;
  jsm: JetStreamManager;
  logger: Logger;
  now: () => number;
  admit: (submit: RunSubmit, lane: Lane) => Promise<void>;
  /** Told of every deployment and undeployment (the scheduler). */
  onDeployment: (name: string, deployment: Deployment | null) => void;
}

/** How long an event waits for the deployments in memory to catch up before matching anyway. */
const CATCH_UP_TIMEOUT_MS = 5_000;
/** The longest event id a run's trigger can carry (RunTrigger's eventId). */
export const MAX_EVENT_ID_LENGTH = 200;

export class EventTriggers {
  private readonly deployments = new Map<string, Deployment>();
  private watch: { stop(): void } | null = null;
  /** Between start and stop: a watch opened later is kept only then. */
  private running = false;
  /** The last revision of the `quiver-pipelines` bucket reflected in `deployments`. */
  private revision = 0;
  /** When the last catch-up asked for the bucket's last revision (`performance.now()`). */
  private caughtUpAsOf = -Infinity;

  constructor(private readonly options: EventTriggersOptions) {}

  /** Watches the deployed pipelines; resolves once the current ones are in memory. */
  async start(): Promise<void> {
    this.running = true;
    // Watching before reading the current ones: nothing deployed in between is missed. Every key
    // is watched (version keys too) so the revision seen can be compared with the bucket's last.
    await this.openWatch();
    const lastBeforeReading = await this.lastRevision();
    await this.readDeployments();
    this.revision = Math.max(this.revision, lastBeforeReading);
  }

  /**
   * Opens the watch, or leaves it closed when its consumer cannot be made now (nats-server 2.9
   * may place it on a cluster node that is down): events then read the bucket (catchUp), and
   * the next catch-up tries the watch again. Failing leadership over it would only hand the same
   * trouble to the next orchestrator.
   */
  private async openWatch(): Promise<void> {
    if (this.watch) return;
    let watch;
    try {
      watch = await this.options.topology.pipelines.watch({ key: '>', include: KvWatchInclude.UpdatesOnly });
    } catch (error) {
      this.options.logger.warn(`cannot watch ${buckets.pipelines} (${(error as Error).message}); reading it per event until the watch opens`);
      return;
    }
    // Stopped (or opened by another caller) meanwhile.
    if (!this.running || this.watch) {
      watch.stop();
      return;
    }
    this.watch = watch;
    void (async () => {
      for await (const entry of watch) {
        this.revision = Math.max(this.revision, entry.revision);
        if (!entry.key.includes('.')) this.apply(entry);
      }
      if (this.watch === watch) this.watch = null;
    })();
  }

  /** The current versions (their keys are the bare names), read from the bucket. */
  private async readDeployments(): Promise<void> {
    for (const key of await this.options.topology.keys(buckets.pipelines, '*')) {
      const entry = await this.options.topology.pipelines.get(key);
      if (entry) this.apply(entry);
    }
  }

  stop(): void {
    this.running = false;
    this.watch?.stop();
    this.watch = null;
    this.deployments.clear();
    this.revision = 0;
    this.caughtUpAsOf = -Infinity;
  }

  /**
   * Starts one run per deployed pipeline whose trigger matches the event; never throws. An
   * event that can start nothing is dead-lettered with the reason and acked; one whose handling
   * keeps failing is retried, then dead-lettered after its last delivery.
   * `arrivedAt` is when this process received it (`performance.now()`: real order, not the
   * injectable business clock). The admission of its last run may let go of `lane` (lane.ts).
   */
  async handle(msg: JsMsg, arrivedAt: number, lane: Lane = NO_LANE): Promise<void> {
    const subject = msg.subject.slice(subjects.eventsPrefix.length);
    const eventId = msg.headers?.get('Nats-Msg-Id') || `seq-${msg.seq}`;
    const text = new TextDecoder().decode(msg.data);
    try {
      if (eventId.length > MAX_EVENT_ID_LENGTH) {
        await this.deadLetter(subject, eventId, null, `the event id is ${eventId.length} characters long; at most ${MAX_EVENT_ID_LENGTH} are allowed (publish it with a shorter id)`, text);
        msg.ack();
        return;
      }
      // A deploy or undeploy returns once this leader reflects it (reflect), so the deployments in
      // memory hold every one made before the event was published. The bucket is asked only
      // where they cannot vouch for that: an event nothing matches (deployed while no leader
      // answered, or moments before this one took the lead), and any event while the watch is down.
      let matching = this.matching(subject);
      if (matching.length === 0 || !this.watch) {
        await this.catchUp(arrivedAt);
        matching = this.matching(subject);
      }
      if (matching.length === 0) {
        await this.deadLetter(subject, eventId, null, `no deployed pipeline has a trigger matching "${subject}" (deploy one with on: { event: '${subject}' })`, text);
        msg.ack();
        return;
      }
      let payload: unknown;
      try {
        payload = text === '' ? null : JSON.parse(text);
      } catch (error) {
        await this.deadLetter(subject, eventId, null, `the payload is not JSON: ${(error as Error).message}`, text);
        msg.ack();
        return;
      }
      const publishedAt = Math.floor(msg.info.timestampNanos / 1_000_000);
      for (const [index, { deployment, trigger }] of matching.entries()) {
        const violation = trigger.schema ? schemaViolation(trigger.schema, payload) : null;
        if (violation) {
          await this.deadLetter(subject, eventId, deployment.name, `fails the event schema of pipeline ${deployment.name}: ${violation}`, text);
          continue;
        }
        // Derived from the event: a redelivered event never starts a second run.
        const runId = deterministicUlid(publishedAt, `event:${eventId}:${deployment.name}`);
        const event = { subject, id: eventId, payload, publishedAt };
        // Only the last admission may let go of the lane: what follows a release runs beside later
        // messages, and another pipeline's admission must not.
        const last = index === matching.length - 1;
        try {
          await this.options.admit(deployedRun(deployment, runId, { kind: 'event', subject, eventId, sequence: msg.seq }, `event ${subject}`, this.options.now(), event), last ? lane : NO_LANE);
        } catch (error) {
          const reason = permanentFailure(error);
          // Trouble that may pass (NATS away, a timeout): the whole event is tried again.
          if (!reason) throw error;
          await this.deadLetter(subject, eventId, deployment.name, `cannot start a run of pipeline ${deployment.name}: ${reason}`, text);
        }
      }
      msg.ack();
    } catch (error) {
      this.options.logger.error(`could not handle event ${eventId} on ${subject} (delivery ${msg.info.deliveryCount}): ${(error as Error).stack ?? error}`);
      await retryOrDeadLetter(msg, {
        js: this.options.js,
        kind: 'events',
        maxDeliver: this.options.topology.messageMaxDeliver,
        error,
        logger: this.options.logger,
        now: this.options.now(),
        what: `event ${eventId.slice(0, MAX_EVENT_ID_LENGTH)} on ${subject}`,
      });
    }
  }

  /**
   * Resolves with the revision of `quiver-pipelines` the deployments in memory reflect, once they
   * hold every deploy and undeploy made before it was called (a client asks after its own),
   * reading the bucket when the watch does not get there within CATCH_UP_TIMEOUT_MS. The bucket's
   * last revision is the target, not one a client names: a wrong one could only stall or mislead.
   */
  async reflect(): Promise<number> {
    const askedAt = performance.now();
    await this.reach(await this.lastRevision(), askedAt);
    return this.revision;
  }

  private matching(subject: string): { deployment: Deployment; trigger: Deployment['events'][number] }[] {
    return [...this.deployments.values()].flatMap((deployment) => {
      const trigger = deployment.events.find((t) => subjectMatches(t.subject, subject));
      return trigger ? [{ deployment, trigger }] : [];
    });
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
    await this.reach(await this.lastRevision(), askedAt);
    this.caughtUpAsOf = askedAt;
  }

  /** Waits for the watch to deliver revision `last`; without a watch, or one that does not deliver it in time, reads the bucket. */
  private async reach(last: number, askedAt: number): Promise<void> {
    const deadline = askedAt + CATCH_UP_TIMEOUT_MS;
    while (this.watch && this.revision < last && performance.now() < deadline) await new Promise((r) => setTimeout(r, 2));
    if (this.revision < last) {
      // No watch, or one that stopped delivering: the bucket itself is the truth.
      if (this.watch) {
        this.watch.stop();
        this.watch = null;
      }
      await this.readDeployments();
      this.revision = Math.max(this.revision, last);
      void this.openWatch();
    }
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
    this.options.logger.warn(`event ${eventId.slice(0, MAX_EVENT_ID_LENGTH)} on ${subject} dead-lettered: ${reason}`);
    await deadLetter(this.options.js, 'events', { subject, id: eventId, pipeline, reason, payload, at: this.options.now() });
  }
}

/**
 * Why admitting a run failed for good, or null for trouble that may pass. For good: the run
 * would be malformed (what the event carries breaks a schema) or its record too large for NATS.
 */
export function permanentFailure(error: unknown): string | null {
  const e = error as { name?: string; message?: string; code?: unknown } | null;
  if (!e || typeof e !== 'object') return null;
  const message = String(e.message ?? '');
  if (e.name === 'ZodError' || e.name === 'InvalidMessageError') return `the run it would start is malformed: ${message.replace(/\s+/g, ' ').slice(0, 1000)}`;
  if (/max_payload|maximum payload|message size exceeds|maximum message size/i.test(message)) {
    return `its run record is larger than NATS takes (${message}); send a smaller payload, e.g. a reference to the data instead of the data`;
  }
  return null;
}
