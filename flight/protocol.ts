/**
 * The FlightService definition from proto/Flight.proto (@grpc/proto-loader), with FlightData
 * on the DoGet and DoPut streams encoded and decoded by hand (frames.ts) so bodies are not
 * copied by protobufjs. Servers and clients of this folder share it.
 */
import { fileURLToPath } from 'node:url';
import { loadPackageDefinition, type ServiceDefinition } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { decodeFlightData } from './frames.ts';

export const PROTO_PATH = fileURLToPath(new URL('./proto/Flight.proto', import.meta.url));
export const SERVICE_NAME = 'arrow.flight.protocol.FlightService';

/** Messages as proto-loader shapes them (snake_case, bytes as Buffer, int64 as number). */
export interface FlightDescriptorMessage {
  type: 'UNKNOWN' | 'PATH' | 'CMD';
  cmd: Buffer;
  path: string[];
}
export interface TicketMessage {
  ticket: Buffer;
}
export interface LocationMessage {
  uri: string;
}
export interface FlightEndpointMessage {
  ticket: TicketMessage;
  location: LocationMessage[];
  expiration_time?: { seconds: number; nanos: number } | null;
  app_metadata: Buffer;
}
export interface FlightInfoMessage {
  schema: Buffer;
  flight_descriptor: FlightDescriptorMessage;
  endpoint: FlightEndpointMessage[];
  total_records: number;
  total_bytes: number;
  ordered: boolean;
  app_metadata: Buffer;
}
export interface ActionMessage {
  type: string;
  body: Buffer;
}
export interface ActionTypeMessage {
  type: string;
  description: string;
}

let cached: ServiceDefinition | null = null;

/** The service definition; DoGet responses and DoPut requests are already-encoded Buffers on the way out. */
export function flightServiceDefinition(): ServiceDefinition {
  if (cached) return cached;
  const definition = loadSync(PROTO_PATH, { keepCase: true, longs: Number, enums: String, bytes: Buffer, defaults: true, oneofs: true });
  const loaded = loadPackageDefinition(definition) as unknown as {
    arrow: { flight: { protocol: { FlightService: { service: ServiceDefinition } } } };
  };
  const service = { ...loaded.arrow.flight.protocol.FlightService.service } as unknown as Record<string, Record<string, unknown>>;
  const identity = (value: Buffer) => value;
  const decode = (bytes: Buffer) => decodeFlightData(bytes);
  service.DoGet = { ...service.DoGet, responseSerialize: identity, responseDeserialize: decode };
  service.DoPut = { ...service.DoPut, requestSerialize: identity, requestDeserialize: decode };
  service.DoExchange = { ...service.DoExchange, requestSerialize: identity, requestDeserialize: decode, responseSerialize: identity, responseDeserialize: decode };
  cached = service as unknown as ServiceDefinition;
  return cached;
}

/**
 * gRPC channel and server options for bulk transfer: no message size cap (a record batch is
 * one message) and a 64 MiB HTTP/2 flow-control window instead of 64 KiB, so a stream is not
 * throttled by round trips.
 */
export const TRANSFER_CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': -1,
  'grpc-node.flow_control_window': 64 * 1024 * 1024,
} as const;
