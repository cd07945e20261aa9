/**
 * Who may talk to a Flight server: anyone presenting the cluster's access token. The token is
 * derived from the cluster secret (HMAC-SHA256 of a fixed label), so every member computes
 * the same one without it being stored or sent anywhere, and it reveals nothing of the secret:
 * a token that leaks can be revoked by changing the secret, and it cannot mint tickets.
 *
 * It travels the way standard Flight clients send credentials:
 * - `authorization: Bearer <token>` on any call (what Handshake hands back, and what Quiver's client sends);
 * - `authorization: Basic base64(<any user>:<token>)`, which pyarrow's `authenticate_basic_token`
 *   sends on Handshake and exchanges for the bearer header;
 * - the token as the payload of a HandshakeRequest (the older Flight auth-handler flow).
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { FlightAuthError } from './errors.ts';
import { checkSecret } from './tickets.ts';

/** What the token is an HMAC of: changing it (a new version) voids every token at once. */
const ACCESS_TOKEN_LABEL = 'quiver/flight/access-token/v1';

/** The access token of a cluster whose secret is `secret` (at least MIN_SECRET_BYTES). */
export function flightAccessToken(secret: string | Uint8Array): string {
  const key = checkSecret(secret, 'flightAccessToken');
  return createHmac('sha256', key).update(ACCESS_TOKEN_LABEL).digest('base64url');
}

/**
 * Compares in constant time whatever their lengths: both sides are hashed first, so neither
 * the position of the first difference nor the token's length shows in the timing.
 */
export function sameToken(given: string, expected: string): boolean {
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b);
}

/** The token an `authorization` header carries (Bearer, or the password of Basic), or null. */
export function tokenFromAuthorization(header: string | undefined | null): string | null {
  if (!header) return null;
  const match = /^(Bearer|Basic)\s+(\S+)\s*$/i.exec(header);
  if (!match) return null;
  if (match[1]!.toLowerCase() === 'bearer') return match[2]!;
  const decoded = Buffer.from(match[2]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon >= 0 ? decoded.slice(colon + 1) : null;
}

/** The header value a client sends, and a server hands back from Handshake. */
export function bearer(token: string): string {
  return `Bearer ${token}`;
}

const DENIED =
  'this Flight server needs the cluster access token: send "authorization: Bearer <token>" ' +
  '(or Handshake with basic auth, password = the token); the token is derived from the cluster secret ' +
  '(QUIVER_CLUSTER_SECRET), see docs/security-flight.md';

/**
 * Checks an `authorization` header against the expected token.
 * @throws FlightAuthError (UNAUTHENTICATED) when it is missing or wrong.
 */
export function authorize(header: string | undefined | null, expected: string): void {
  const given = tokenFromAuthorization(header);
  if (given === null) throw new FlightAuthError(`no credentials: ${DENIED}`, 'ERR_FLIGHT_ACCESS_DENIED');
  if (!sameToken(given, expected)) throw new FlightAuthError(`wrong credentials: ${DENIED}`, 'ERR_FLIGHT_ACCESS_DENIED');
}

/**
 * A listen address as QUIVER_FLIGHT_LISTEN gives it: `host`, `host:port`, `[v6]:port` or
 * `:port` (every address). Port 0 or none picks a free one.
 * @throws TypeError naming `variable` when it is not one of those.
 */
export function parseListenAddress(text: string, variable = 'QUIVER_FLIGHT_LISTEN'): { host: string; port: number | null } {
  const value = text.trim();
  const match = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]\s]*))(?::(\d{1,5}))?$/.exec(value) ?? /^([0-9A-Fa-f:]+:[0-9A-Fa-f:]*)()$/.exec(value);
  const host = match ? (match[1] ?? match[2] ?? '') : '';
  const port = match?.[3] !== undefined ? Number(match[3]) : null;
  if (!match || (port !== null && port > 65_535) || (host === '' && port === null)) {
    throw new TypeError(`${variable}=${JSON.stringify(text)} is not a listen address: write 127.0.0.1, 0.0.0.0:8815, [::1]:8815 or :8815`);
  }
  return { host: host === '' ? '0.0.0.0' : host, port };
}
