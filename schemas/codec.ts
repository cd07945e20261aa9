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

export function encode<T>(schema: z.ZodType<T>, value: T): Uint8Array {
  // Validating on the way out too keeps a sender's bug from reaching every receiver.
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
