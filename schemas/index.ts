export * from './messages.ts';
export * from './records.ts';
export {
  subjects,
  streams,
  consumers,
  buckets,
  ensureTopology,
  ensureHostConsumer,
  resolveTopologyOptions,
  deadLetter,
  retryOrDeadLetter,
  refuse,
  messageId,
  HOST_TTL_MS,
  DEFAULT_ACK_WAIT_MS,
  DEFAULT_MAX_DELIVER,
  MAX_RETRY_DELAY_MS,
  TOPOLOGY_DEFAULTS,
} from './topology.ts';
export type { DeadLetter, DeadLetterKind, Topology, TopologyOptions } from './topology.ts';
export { encode, encodeChecked, decode, InvalidMessageError } from './codec.ts';
export { consoleLogger, silentLogger } from './logger.ts';
export type { Logger } from './logger.ts';
export { bundleDir, packageRoot, quiverHome, shmRoot } from './paths.ts';
export {
  clusterSecretFile,
  connectForever,
  connectOnce,
  DEFAULT_NATS_URL,
  natsConnectionOptions,
  natsServers,
  NatsCredentialsError,
  readStoredCredentials,
  RECONNECT_FOREVER,
  resolveClusterSecret,
  SECRET_ENV_VARS,
  storedCredentialsFile,
  writePrivateFile,
  writeStoredCredentials,
  type ConnectForeverOptions,
  type NatsAuthOptions,
  type NatsConnectionSettings,
  type StoredNatsCredentials,
} from './connect.ts';
// Loaded for its effect too: every process that speaks Quiver's messages writes to NATS once per turn.
export { coalesceNatsWrites, natsWritesCoalesced, natsRequestsPatched } from './nats-patches.ts';
