/**
 * Tickets: what a DoGet presents. A ticket names one stream (one segment of a run output or
 * an upload), says until when it is valid, and carries an HMAC-SHA256 over both, keyed with
 * the cluster secret: only a cluster member can mint one, and changing any byte voids it.
 *
 * Format (ASCII): `qf1.<base64url(JSON claims)>.<base64url(HMAC)>`.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { FlightAuthError } from './errors.ts';

/** What a ticket grants. */
export interface TicketClaims {
  /** The flight: `runs/<runId>/<step>` or `uploads/<name>`. */
  path: string;
  /** Which of its segments (one stream each). */
  segment: number;
  /** Milliseconds since the epoch after which the ticket is refused. */
  expiresAt: number;
}

const PREFIX = 'qf1';
/** @default ten minutes: long enough to start a transfer, short enough that a leaked ticket soon dies. */
export const DEFAULT_TICKET_TTL_MS = 10 * 60_000;

/** A cluster secret must be this long, so HMACs cannot be brute-forced. */
export const MIN_SECRET_BYTES = 16;

export function checkSecret(secret: string | Uint8Array, where: string): Uint8Array {
  const bytes = typeof secret === 'string' ? new TextEncoder().encode(secret) : secret;
  if (!(bytes instanceof Uint8Array) || bytes.byteLength < MIN_SECRET_BYTES) {
    throw new TypeError(`${where}: the cluster secret must be at least ${MIN_SECRET_BYTES} bytes (set QUIVER_CLUSTER_SECRET)`);
  }
  return bytes;
}

const mac = (secret: Uint8Array, payload: string) => createHmac('sha256', secret).update(payload).digest();

export function signTicket(claims: TicketClaims, secret: Uint8Array): Uint8Array {
  const payload = Buffer.from(JSON.stringify({ p: claims.path, s: claims.segment, e: claims.expiresAt })).toString('base64url');
  return Buffer.from(`${PREFIX}.${payload}.${mac(secret, payload).toString('base64url')}`);
}

/**
 * Checks a ticket's signature, then its expiry, and returns what it grants.
 * @throws FlightAuthError (UNAUTHENTICATED): malformed, forged/tampered, or expired.
 */
export function verifyTicket(ticket: Uint8Array, secret: Uint8Array, now: number): TicketClaims {
  const text = Buffer.from(ticket.buffer, ticket.byteOffset, ticket.byteLength).toString('latin1');
  const parts = text.split('.');
  if (parts.length !== 3 || parts[0] !== PREFIX) {
    throw new FlightAuthError('ticket is not a Quiver ticket (expected qf1.<claims>.<signature>); get one from GetFlightInfo', 'ERR_FLIGHT_TICKET_MALFORMED');
  }
  const [, payload, signature] = parts as [string, string, string];
  const expected = mac(secret, payload);
  const given = Buffer.from(signature, 'base64url');
  if (given.byteLength !== expected.byteLength || !timingSafeEqual(given, expected)) {
    throw new FlightAuthError('ticket signature does not match: it was forged, altered, or signed with another cluster secret', 'ERR_FLIGHT_TICKET_FORGED');
  }
  let claims: { p?: unknown; s?: unknown; e?: unknown };
  try {
    claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
  } catch {
    throw new FlightAuthError('ticket claims are not JSON', 'ERR_FLIGHT_TICKET_MALFORMED');
  }
  if (typeof claims.p !== 'string' || !Number.isSafeInteger(claims.s) || !Number.isSafeInteger(claims.e)) {
    throw new FlightAuthError('ticket claims lack path, segment or expiry', 'ERR_FLIGHT_TICKET_MALFORMED');
  }
  if ((claims.e as number) <= now) {
    throw new FlightAuthError(
      `ticket for ${claims.p} expired ${new Date(claims.e as number).toISOString()} (now ${new Date(now).toISOString()}); ask GetFlightInfo for a fresh one`,
      'ERR_FLIGHT_TICKET_EXPIRED',
    );
  }
  return { path: claims.p, segment: claims.s as number, expiresAt: claims.e as number };
}
