import type { z } from 'zod';
import { prettifyError } from 'zod';

/** A message that failed its schema: the reason names the fields that were wrong. */
export class InvalidMessageError extends Error {
  override readonly name = 'InvalidMessageError';
  readonly code = 'ERR_INVALID_MESSAGE';
  constructor(
    readonly subject: string,
    readonly reason: string,
  ) {
    super(`rejected a message on ${subject}: ${reason}`);
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Whether {@link encode} validates what it sends (QUIVER_CHECK_OUTGOING=1; `npm test` sets it).
 * Every receiver validates each message it decodes, so a sender's bug is refused there anyway;
 * checking on the way out as well names the sender in tests, but in a running cluster it
 * validated each message twice (zod was a tenth of the embedded cluster's main thread in a
 * burst of `npm run bench:trigger`).
 */
const CHECK_OUTGOING = process.env.QUIVER_CHECK_OUTGOING === '1';

export function encode<T>(schema: z.ZodType<T>, value: T): Uint8Array {
  return encoder.encode(JSON.stringify(CHECK_OUTGOING ? schema.parse(value) : value));
}

/** {@link encode}, always validating: for what a user hands in (a submission), so a mistake fails at their call. */
export function encodeChecked<T>(schema: z.ZodType<T>, value: T): Uint8Array {
  return encoder.encode(JSON.stringify(schema.parse(value)));
}

/** Parses and validates; throws {@link InvalidMessageError} naming what was wrong. */
export function decode<T>(schema: z.ZodType<T>, subject: string, data: Uint8Array): T {
  let json: unknown;
  try {
    json = JSON.parse(decoder.decode(data));
  } catch (error) {
    throw new InvalidMessageError(subject, `not JSON (${(error as Error).message})`);
  }
  const result = schema.safeParse(json);
  if (!result.success) throw new InvalidMessageError(subject, prettifyError(result.error).replace(/\n/g, '; '));
  return result.data;
}
