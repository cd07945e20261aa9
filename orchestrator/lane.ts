import type { RunSubmit } from '../schemas/index.ts';

/**
 * The orchestrator handles one message at a time (Orchestrator.serially), so that what it decides
 * from its state (which runs go, what is queued) is decided in arrival order. Two of its steps wait
 * for a run record's write: admitting a run (create) and ending one (put). In a burst those waits
 * were seven tenths of the time the handling took (`npm run bench:trigger`): one write at a time.
 *
 * A handler lets go of its lane before such a write when nothing a later message decides depends
 * on the write's outcome: the state the next message reads (runs starting, going, ending) is
 * updated first, and what the handler does once the write is in (start the run, publish its end,
 * ack its message) concerns that run alone. The write still comes before everything that depends
 * on it, so a crash in between leaves what it left before: nothing acked, nothing published.
 */
export interface Lane {
  /** Lets the next message be handled while this one waits; calling it again does nothing. */
  release(): void;
}

/** For work that must not let go (outside the handling, or not the last part of it): nothing to let go. */
export const NO_LANE: Lane = { release: () => {} };

/**
 * True for a run no admission rule limits: no maxConcurrentRuns, not a schedule tick (overlap).
 * Only such a run's admission and end let go of the lane: the others decide from the queues and
 * the runs going, and those change one message at a time.
 */
export function unlimitedRun(submit: RunSubmit): boolean {
  return !submit.admission?.maxConcurrentRuns && submit.trigger?.kind !== 'schedule';
}
