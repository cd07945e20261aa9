/** Trouble starting or reaching the services Quiver runs on. */
export class QuiverInfraError extends Error {
  override readonly name = 'QuiverInfraError';
  constructor(
    readonly code: 'ERR_NATS_SERVER_START' | 'ERR_NATS_CONNECT' | 'ERR_S3_SERVER_START',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}
