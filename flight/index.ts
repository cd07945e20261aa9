/**
 * Quiver's Arrow Flight data plane: a server that streams tables out of (and uploads into)
 * this host's shared memory, and a client that reads them into Tables or straight into a
 * local segment. Speaks `arrow.flight.protocol.FlightService` as specified by Apache Arrow,
 * so any Flight client can read run outputs. See README.md.
 */
export { FlightServer, flightPath, isComposed, type FlightServerOptions, type StoredTable } from './server.ts';
export { FlightClient, parseLocation, type FetchToShmOptions, type FlightClientOptions, type FlightEndpoint, type FlightInfo } from './client.ts';
export { flightAccessToken, parseListenAddress } from './auth.ts';
export { signTicket, verifyTicket, checkSecret, DEFAULT_TICKET_TTL_MS, MIN_SECRET_BYTES, type TicketClaims } from './tickets.ts';
export { FlightAuthError, FlightError, FlightNotFoundError, FlightProtocolError, FlightTransferError } from './errors.ts';
export { PROTO_PATH, SERVICE_NAME, TRANSFER_CHANNEL_OPTIONS } from './protocol.ts';
