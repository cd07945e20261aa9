import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import { Cron } from 'croner';
import { z } from 'zod';
import { eventPattern, type EventTrigger, type ScheduleSpec } from '../schemas/index.ts';

/** How a deployed pipeline is started, as checked at deploy time. */
export interface TriggerSpec {
  events: EventTrigger[];
  schedule: ScheduleSpec | null;
  maxConcurrentRuns: number | null;
}

/** A trigger declaration that cannot work. Found at deploy time, before anything is stored. */
export class TriggerError extends Error {
  override readonly name = 'TriggerError';
  constructor(
    readonly code: 'ERR_TRIGGER_EVENT' | 'ERR_TRIGGER_SCHEMA' | 'ERR_TRIGGER_SCHEDULE' | 'ERR_TRIGGER_CONCURRENCY' | 'ERR_TRIGGER_OPTIONS',
    message: string,
  ) {
    super(message);
  }
}

interface OptionsShape {
  on?: unknown;
  schedule?: unknown;
  maxConcurrentRuns?: unknown;
}

const ajv = new Ajv2020({ allErrors: true, strict: false });

/**
 * Reads the triggers of a pipeline definition (`pipeline(name, steps, options)`) into their wire
 * form: patterns checked, schemas compiled, cron and time zone parsed. A zod schema is turned
 * into JSON Schema here, so the orchestrator never runs user code.
 */
export function triggersOf(pipelineName: string, options: unknown): TriggerSpec {
  const o = (options ?? {}) as OptionsShape;
  if (typeof o !== 'object') throw new TriggerError('ERR_TRIGGER_OPTIONS', `the options of pipeline "${pipelineName}" must be an object`);
  const on = o.on === undefined ? [] : Array.isArray(o.on) ? o.on : [o.on];
  const events = on.map((t, i) => eventTriggerOf(pipelineName, t, i));
  const schedule = o.schedule === undefined ? null : scheduleOf(pipelineName, o.schedule);
  let maxConcurrentRuns: number | null = null;
  if (o.maxConcurrentRuns !== undefined) {
    if (!Number.isInteger(o.maxConcurrentRuns) || (o.maxConcurrentRuns as number) < 1) {
      throw new TriggerError('ERR_TRIGGER_CONCURRENCY', `maxConcurrentRuns of pipeline "${pipelineName}" must be a whole number ≥ 1, got ${String(o.maxConcurrentRuns)}`);
    }
    maxConcurrentRuns = o.maxConcurrentRuns as number;
  }
  return { events, schedule, maxConcurrentRuns };
}

function eventTriggerOf(pipelineName: string, raw: unknown, index: number): EventTrigger {
  const t = raw as { event?: unknown; schema?: unknown } | null;
  const where = `trigger on[${index}] of pipeline "${pipelineName}"`;
  if (!t || typeof t !== 'object' || typeof t.event !== 'string') {
    throw new TriggerError('ERR_TRIGGER_EVENT', `${where} must be { event: 'subject', schema? }`);
  }
  const subject = eventPattern.safeParse(t.event);
  if (!subject.success) throw new TriggerError('ERR_TRIGGER_EVENT', `${where}: event "${t.event}" ${subject.error.issues[0]!.message}`);
  if (t.schema === undefined || t.schema === null) return { subject: subject.data, schema: null };
  const schema = jsonSchemaOf(t.schema, where);
  try {
    ajv.compile(schema);
  } catch (error) {
    throw new TriggerError('ERR_TRIGGER_SCHEMA', `${where}: its schema is not valid JSON Schema: ${(error as Error).message}`);
  }
  return { subject: subject.data, schema };
}

function jsonSchemaOf(schema: unknown, where: string): Record<string, unknown> {
  if (typeof schema !== 'object' || schema === null || Array.isArray(schema)) {
    throw new TriggerError('ERR_TRIGGER_SCHEMA', `${where}: schema must be a JSON Schema object or a zod schema`);
  }
  if ('_zod' in schema) {
    try {
      return z.toJSONSchema(schema as z.ZodType) as Record<string, unknown>;
    } catch (error) {
      throw new TriggerError('ERR_TRIGGER_SCHEMA', `${where}: this zod schema has no JSON Schema form: ${(error as Error).message}`);
    }
  }
  // A plain object must survive the trip through JSON unchanged to be stored.
  return JSON.parse(JSON.stringify(schema)) as Record<string, unknown>;
}

function scheduleOf(pipelineName: string, raw: unknown): ScheduleSpec {
  const s = raw as { cron?: unknown; timezone?: unknown; catchUp?: unknown; overlap?: unknown } | null;
  const where = `schedule of pipeline "${pipelineName}"`;
  if (!s || typeof s !== 'object' || typeof s.cron !== 'string') {
    throw new TriggerError('ERR_TRIGGER_SCHEDULE', `${where} must be { cron: '0 * * * *', timezone?, catchUp?, overlap? }`);
  }
  const timezone = s.timezone ?? 'UTC';
  if (typeof timezone !== 'string' || !isTimeZone(timezone)) {
    throw new TriggerError('ERR_TRIGGER_SCHEDULE', `${where}: timezone "${String(timezone)}" is not an IANA time zone (e.g. Europe/Rome, UTC)`);
  }
  try {
    new Cron(s.cron, { timezone, paused: true });
  } catch (error) {
    throw new TriggerError('ERR_TRIGGER_SCHEDULE', `${where}: cron "${s.cron}" does not parse: ${(error as Error).message}`);
  }
  const catchUp = s.catchUp ?? 'latest';
  if (!['none', 'latest', 'all'].includes(catchUp as string)) {
    throw new TriggerError('ERR_TRIGGER_SCHEDULE', `${where}: catchUp must be 'none', 'latest' or 'all', got ${JSON.stringify(catchUp)}`);
  }
  const overlap = s.overlap ?? 'skip';
  if (!['skip', 'queue', 'allow'].includes(overlap as string)) {
    throw new TriggerError('ERR_TRIGGER_SCHEDULE', `${where}: overlap must be 'skip', 'queue' or 'allow', got ${JSON.stringify(overlap)}`);
  }
  return { cron: s.cron, timezone, catchUp: catchUp as ScheduleSpec['catchUp'], overlap: overlap as ScheduleSpec['overlap'] };
}

function isTimeZone(zone: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: zone });
    return true;
  } catch {
    return false;
  }
}

/** NATS subject matching: `*` is one token, a final `>` is one or more. */
export function subjectMatches(pattern: string, subject: string): boolean {
  const p = pattern.split('.');
  const s = subject.split('.');
  for (let i = 0; i < p.length; i++) {
    if (p[i] === '>') return s.length > i;
    if (i >= s.length) return false;
    if (p[i] !== '*' && p[i] !== s[i]) return false;
  }
  return p.length === s.length;
}

const validators = new Map<string, ValidateFunction>();

/** Null when the payload satisfies the schema, else why not, in words a publisher can act on. */
export function schemaViolation(schema: Record<string, unknown>, payload: unknown): string | null {
  const key = JSON.stringify(schema);
  let validate = validators.get(key);
  if (!validate) {
    validate = ajv.compile(schema);
    validators.set(key, validate);
  }
  if (validate(payload)) return null;
  return (validate.errors ?? []).map((e) => `${e.instancePath || '(payload)'} ${e.message ?? 'is invalid'}`).join('; ');
}

/**
 * Cron ticks in (afterMs, untilMs], oldest first, at most `limit`. croner resolves daylight-saving
 * changes: a wall-clock time that does not exist fires once at the next valid time, one that
 * occurs twice fires once.
 */
export function ticksBetween(spec: Pick<ScheduleSpec, 'cron' | 'timezone'>, afterMs: number, untilMs: number, limit = 10_000): number[] {
  const cron = new Cron(spec.cron, { timezone: spec.timezone, paused: true });
  const ticks: number[] = [];
  let cursor = new Date(afterMs);
  while (ticks.length < limit) {
    const next = cron.nextRun(cursor);
    if (!next || next.getTime() > untilMs) break;
    ticks.push(next.getTime());
    cursor = next;
  }
  return ticks;
}

/** The next tick after `afterMs`, or null when the cron never fires again. */
export function nextTick(spec: Pick<ScheduleSpec, 'cron' | 'timezone'>, afterMs: number): number | null {
  return new Cron(spec.cron, { timezone: spec.timezone, paused: true }).nextRun(new Date(afterMs))?.getTime() ?? null;
}
