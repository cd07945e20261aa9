/**
 * One error class per condition. Every error thrown by `flight/` is a {@link FlightError};
 * match on `code` (stable) or `instanceof`. Errors a server sends travel as gRPC statuses
 * (UNAUTHENTICATED, NOT_FOUND, ...) and come back to a Quiver client as these classes.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';

export class FlightError extends Error {
  override name = 'FlightError';
  /** Stable, machine-readable code: `ERR_FLIGHT_*`. */
  readonly code: string;
  /** The gRPC status this error is sent as (or arrived as). */
  readonly grpcStatus: GrpcStatus;

  constructor(message: string, code: string, grpcStatus: GrpcStatus, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.grpcStatus = grpcStatus;
  }
}

/** A ticket that is malformed, forged, tampered with, or expired; or a missing access token. */
export class FlightAuthError extends FlightError {
  override name = 'FlightAuthError';
  constructor(message: string, code: 'ERR_FLIGHT_TICKET_MALFORMED' | 'ERR_FLIGHT_TICKET_FORGED' | 'ERR_FLIGHT_TICKET_EXPIRED' | 'ERR_FLIGHT_ACCESS_DENIED') {
    super(message, code, GrpcStatus.UNAUTHENTICATED);
  }
}

/** The output, upload or segment asked for is not on this server. */
export class FlightNotFoundError extends FlightError {
  override name = 'FlightNotFoundError';
  constructor(message: string) {
    super(message, 'ERR_FLIGHT_NOT_FOUND', GrpcStatus.NOT_FOUND);
  }
}

/** The peer sent something that is not the Flight protocol or not an Arrow IPC stream. */
export class FlightProtocolError extends FlightError {
  override name = 'FlightProtocolError';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'ERR_FLIGHT_PROTOCOL', GrpcStatus.INVALID_ARGUMENT, options);
  }
}

/** The server could not be reached, went away mid-stream, or the call was cancelled. */
export class FlightTransferError extends FlightError {
  override name = 'FlightTransferError';
  constructor(message: string, grpcStatus: GrpcStatus, options?: { cause?: unknown }) {
    super(message, grpcStatus === GrpcStatus.CANCELLED ? 'ERR_FLIGHT_CANCELLED' : 'ERR_FLIGHT_UNAVAILABLE', grpcStatus, options);
  }
}

/** A gRPC error from a call, as the FlightError it stands for; the server's message is kept. */
export function fromGrpcError(error: unknown, what: string): FlightError {
  if (error instanceof FlightError) return error;
  const e = error as { code?: number; details?: string; message?: string };
  const detail = e.details || e.message || String(error);
  const message = `${what}: ${detail}`;
  switch (e.code) {
    case GrpcStatus.UNAUTHENTICATED:
      return new FlightAuthError(message, 'ERR_FLIGHT_ACCESS_DENIED');
    case GrpcStatus.NOT_FOUND:
      return new FlightNotFoundError(message);
    case GrpcStatus.INVALID_ARGUMENT:
      return new FlightProtocolError(message, { cause: error });
    default:
      return new FlightTransferError(message, (e.code ?? GrpcStatus.UNKNOWN) as GrpcStatus, { cause: error });
  }
}
