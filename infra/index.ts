export { startNatsServer } from './nats-server.ts';
export type { NatsServer, NatsServerCredentials, NatsServerOptions } from './nats-server.ts';
export { QuiverInfraError } from './errors.ts';
export { startS3Server } from './s3-server.ts';
export type { S3Server, S3ServerOptions } from './s3-server.ts';
export { startNatsCluster } from './nats-cluster.ts';
export type { NatsCluster, NatsClusterNode, NatsClusterNodeNetwork, NatsClusterOptions } from './nats-cluster.ts';
