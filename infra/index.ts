export { startNatsServer } from './nats-server.ts';
export type { NatsServer, NatsServerOptions } from './nats-server.ts';
export { QuiverInfraError } from './errors.ts';
