export * from './messages.ts';
export * from './records.ts';
export { subjects, streams, consumers, buckets, ensureTopology, ensureHostConsumer, HOST_TTL_MS, DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER } from './topology.ts';
export type { Topology, TopologyOptions } from './topology.ts';
export { encode, decode, InvalidMessageError } from './codec.ts';
export { consoleLogger, silentLogger } from './logger.ts';
export type { Logger } from './logger.ts';
export { bundleDir, packageRoot, quiverHome, shmRoot } from './paths.ts';
export { connectForever, RECONNECT_FOREVER, type ConnectForeverOptions } from './connect.ts';
