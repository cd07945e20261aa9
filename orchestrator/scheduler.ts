import type { KV } from '@nats-io/kv';
import type { Deployment, Logger } from '../schemas/index.ts';
import { nextTick, ticksBetween } from '../planner/index.ts';

/** What the `quiver-schedules` bucket keeps per scheduled pipeline. */
export interface ScheduleState {
  /** The last tick handled (fired, skipped by catch-up, or refused by overlap). */
  lastTick: number;
}

export interface SchedulerOptions {
  /** The `quiver-schedules` bucket. */
  kv: KV;
  logger: Logger;
  now: () => number;
  /**
   * A tick this late still counts as on time: it covers the hand-over between orchestrators.
   * Older ticks were missed while none ran, and the pipeline's `catchUp` decides about them.
   */
  graceMs: number;
  /** Starts the run of one tick. Must be idempotent: a tick may be submitted twice. */
  submit: (deployment: Deployment, tick: number) => Promise<void>;
}

/** At most this many ticks are looked at per pipeline per poll; more are left for the next. */
const TICKS_PER_POLL = 10_000;
/** Deployments may change at any time: wait no longer than this between polls. */
const MAX_SLEEP_MS = 1_000;

/**
 * Fires scheduled pipelines. Only the leading orchestrator runs one. Each pipeline's last tick is
 * kept in KV and moved on by compare-and-swap after its runs are submitted, so a new leader goes
 * on from where the old one stopped; run ids are derived from the tick, so a tick submitted twice
 * starts one run.
 */
export class Scheduler {
  private readonly deployments = new Map<string, Deployment>();
  private timer: NodeJS.Timeout | null = null;
  private polling: Promise<void> | null = null;
  private running = false;

  constructor(private readonly options: SchedulerOptions) {}

  set(deployment: Deployment): void {
    if (deployment.schedule) this.deployments.set(deployment.name, deployment);
    else this.deployments.delete(deployment.name);
    this.wake();
  }

  remove(name: string): void {
    this.deployments.delete(name);
  }

  start(): void {
    this.running = true;
    this.wake();
  }

  async stop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.polling;
  }

  /** Fires every tick that is due now. Exposed so tests can drive it with an injected clock. */
  async poll(): Promise<void> {
    for (const deployment of [...this.deployments.values()]) {
      try {
        await this.pollOne(deployment);
      } catch (error) {
        this.options.logger.error(`schedule of ${deployment.name}: ${(error as Error).stack ?? error}`);
      }
    }
  }

  /** The next time any schedule fires, or null. */
  nextDue(): number | null {
    let next: number | null = null;
    const now = this.options.now();
    for (const d of this.deployments.values()) {
      const t = nextTick(d.schedule!, now);
      if (t !== null && (next === null || t < next)) next = t;
    }
    return next;
  }

  /** Polls now: a deployment changed. */
  private wake(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.pollAfter(0);
  }

  /** Polls at the next tick due, or within a second. */
  private sleep(): void {
    if (this.timer) return;
    const next = this.nextDue();
    this.pollAfter(next === null ? MAX_SLEEP_MS : Math.min(MAX_SLEEP_MS, Math.max(0, next - this.options.now())));
  }

  private pollAfter(delayMs: number): void {
    if (!this.running) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.polling = this.poll().finally(() => {
        this.polling = null;
        this.sleep();
      });
    }, delayMs);
  }

  private async pollOne(deployment: Deployment): Promise<void> {
    const schedule = deployment.schedule!;
    const entry = await this.options.kv.get(deployment.name);
    const stored = entry && entry.operation === 'PUT' ? entry.json<ScheduleState>() : null;
    // A new schedule starts from its deployment: ticks before it were never owed.
    const lastTick = stored?.lastTick ?? deployment.deployedAt;
    const now = this.options.now();
    const due = ticksBetween(schedule, lastTick, now, TICKS_PER_POLL);
    if (due.length === 0) return;

    const onTime = due.filter((t) => now - t <= this.options.graceMs);
    const missed = due.filter((t) => now - t > this.options.graceMs);
    const caughtUp = schedule.catchUp === 'all' ? missed : schedule.catchUp === 'latest' ? missed.slice(-1) : [];
    if (missed.length > 0) {
      this.options.logger.info(
        `${deployment.name}: ${missed.length} tick(s) missed while no orchestrator ran (catchUp: ${schedule.catchUp}); running ${caughtUp.length} of them`,
      );
    }
    for (const tick of [...caughtUp, ...onTime]) await this.options.submit(deployment, tick);

    const state = new TextEncoder().encode(JSON.stringify({ lastTick: due.at(-1)! } satisfies ScheduleState));
    if (entry && entry.operation === 'PUT') await this.options.kv.update(deployment.name, state, entry.revision);
    else await this.options.kv.create(deployment.name, state);
  }
}
