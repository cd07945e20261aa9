/**
 * The executor's side of the Flight data plane. Each executor serves its host's segments with
 * a Flight server and announces it in the `quiver-hosts` bucket (host-registry.ts). Before a
 * step runs, every input whose segments live on another host is fetched with DoGet straight
 * into a local segment, once per host: a second child here maps the same copy. Copies are
 * released when their run ends.
 */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { ulid } from 'ulid';
import { FlightClient, FlightServer, checkSecret, flightAccessToken, isComposed, parseListenAddress, signTicket, type StoredTable } from '../flight/index.ts';
import {
  readStepCompletion,
  resolveClusterSecret,
  decode,
  runView,
  subjects,
  type HostRecord,
  type Logger,
  type StepReady,
  type TableDescriptor,
  type Topology,
} from '../schemas/index.ts';
import { type SegmentRef, listSegments, releaseSegments, removeSegments, renameSegment } from '../shm/index.ts';
import { findLiveHost, HostRegistry } from './host-registry.ts';

/** Flight settings of an executor. */
export interface ExecutorFlightOptions {
  /** Address the Flight server listens on. @default QUIVER_FLIGHT_LISTEN's host, else QUIVER_FLIGHT_HOST, else '0.0.0.0' (every call needs the cluster token) */
  host?: string;
  /** @default QUIVER_FLIGHT_LISTEN's port, else QUIVER_FLIGHT_PORT, else a free port */
  port?: number;
  /** Host name or address other hosts reach this one by. @default QUIVER_FLIGHT_ADVERTISE, else the hostname */
  advertiseHost?: string;
  /** PEM certificate and key: serve Flight over TLS. @default plaintext */
  tls?: { cert: Buffer; key: Buffer };
  /** Root certificates to trust when fetching from TLS peers. */
  rootCerts?: Buffer;
}

/**
 * TLS from QUIVER_FLIGHT_TLS_CERT and QUIVER_FLIGHT_TLS_KEY (PEM files: serve TLS) and
 * QUIVER_FLIGHT_TLS_CA (PEM file: trust it when fetching from peers).
 */
function tlsFromEnv(): ExecutorFlightOptions {
  const { QUIVER_FLIGHT_TLS_CERT: cert, QUIVER_FLIGHT_TLS_KEY: key, QUIVER_FLIGHT_TLS_CA: ca } = process.env;
  if (Boolean(cert) !== Boolean(key)) throw new Error('QUIVER_FLIGHT_TLS_CERT and QUIVER_FLIGHT_TLS_KEY go together: set both or neither');
  return {
    ...(cert && key ? { tls: { cert: readFileSync(cert), key: readFileSync(key) } } : {}),
    ...(ca ? { rootCerts: readFileSync(ca) } : {}),
  };
}

/** Why an input could not be brought to this host. */
export class InputFetchError extends Error {
  override readonly name = 'InputFetchError';
  readonly code = 'ERR_FLIGHT_FETCH';
}

const TICKET_TTL_MS = 5 * 60_000;

/**
 * QUIVER_FLIGHT_BULK_PORT: the DoGet-only bulk port on a fixed port, so a firewall between hosts
 * can name it; without it the bulk port is a free one.
 */
function bulkPortFromEnv(): { bulk: { port: number } } | Record<string, never> {
  const text = process.env.QUIVER_FLIGHT_BULK_PORT;
  if (!text) return {};
  const port = Number(text);
  if (!Number.isInteger(port) || port < 1 || port > 65_535) throw new Error(`QUIVER_FLIGHT_BULK_PORT must be a port from 1 to 65535, got "${text}"`);
  return { bulk: { port } };
}

/**
 * The cluster secret tickets are signed with: the option, else QUIVER_CLUSTER_SECRET, else
 * QUIVER_CLUSTER_SECRET_FILE, else `<QUIVER_HOME>/cluster-secret` (resolveClusterSecret). Never
 * kept in NATS, where anyone allowed to read a bucket could take it.
 */
export async function clusterSecret(option: string | undefined, _meta?: Topology['meta']): Promise<string> {
  const given = option ?? resolveClusterSecret();
  checkSecret(given, option ? 'the clusterSecret option' : 'QUIVER_CLUSTER_SECRET');
  return given;
}

export class FlightInputs {
  private readonly clients = new Map<string, FlightClient>();
  /** Local copies being made or made, by local segment id: a second child awaits the same copy. */
  private readonly copies = new Map<string, Promise<SegmentRef>>();
  private readonly copiesOfRun = new Map<string, { ids: Set<string>; watch: Subscription }>();

  private constructor(
    private readonly nc: NatsConnection,
    private readonly topology: Topology,
    readonly server: FlightServer,
    private readonly secret: string,
    private readonly hostId: string,
    private readonly registry: HostRegistry,
    private readonly shmDir: string,
    private readonly options: ExecutorFlightOptions,
    private readonly logger: Logger,
  ) {}

  static async start(args: {
    nc: NatsConnection;
    topology: Topology;
    hostId: string;
    executorId: string;
    labels: string[];
    capacity: number;
    running: () => number;
    shmDir: string;
    secret?: string;
    options?: ExecutorFlightOptions;
    logger: Logger;
  }): Promise<FlightInputs> {
    const options = { ...tlsFromEnv(), ...args.options };
    const secret = await clusterSecret(args.secret, args.topology.meta);
    const envPort = Number(process.env.QUIVER_FLIGHT_PORT);
    const listen = process.env.QUIVER_FLIGHT_LISTEN ? parseListenAddress(process.env.QUIVER_FLIGHT_LISTEN) : null;
    const server = await FlightServer.start({
      shmDir: args.shmDir,
      secret,
      host: options.host ?? listen?.host ?? process.env.QUIVER_FLIGHT_HOST ?? '0.0.0.0',
      port: options.port ?? listen?.port ?? (Number.isInteger(envPort) ? envPort : 0),
      advertiseHost: options.advertiseHost ?? process.env.QUIVER_FLIGHT_ADVERTISE ?? hostname(),
      ...(options.tls ? { tls: options.tls } : {}),
      ...bulkPortFromEnv(),
      logger: args.logger,
      resolveOutput: (runId, step) => resolveOutput(args.topology, args.hostId, args.shmDir, runId, step),
    });
    let registry: HostRegistry;
    try {
      registry = await HostRegistry.start({
        hosts: args.topology.hosts,
        announced: {
          hostId: args.hostId,
          executorId: args.executorId,
          flightEndpoint: server.location,
          ...(server.bulkLocation ? { bulkEndpoint: server.bulkLocation } : {}),
          labels: args.labels,
          capacity: args.capacity,
        },
        running: args.running,
        logger: args.logger,
      });
    } catch (error) {
      await server.stop();
      throw error;
    }
    return new FlightInputs(args.nc, args.topology, server, secret, args.hostId, registry, args.shmDir, options, args.logger);
  }

  async stop(): Promise<void> {
    await this.registry.stop();
    for (const c of this.clients.values()) c.close();
    for (const { watch } of this.copiesOfRun.values()) watch.unsubscribe();
    await this.server.stop();
  }

  /**
   * Brings every input of `ready` to this host. Returns the inputs as the step process must see
   * them, and the bytes this call received over the network.
   * @throws InputFetchError naming the input, the host and what went wrong.
   */
  async localize(ready: StepReady): Promise<{ inputs: StepReady['inputs']; fetchedBytes: number }> {
    let fetchedBytes = 0;
    // Every stream of every remote input at once: one HTTP/2 stream each, sharing a connection per host.
    const inputs = await Promise.all(
      ready.inputs.map(async (input) => {
        if (input.descriptor.hostId === this.hostId) return input;
        // An assembled table comes as one stream; a plain one as one stream per segment, each the same bytes as there.
        const streams = isComposed(input.descriptor) ? input.descriptor.segments.slice(0, 1) : input.descriptor.segments;
        const segments = await Promise.all(
          streams.map(async (segment, index): Promise<SegmentRef> => {
            const localId = `${segment.id}.fetched`;
            let copy = this.copies.get(localId);
            const fetchedHere = !copy;
            if (!copy) {
              copy = this.fetchSegment(ready.runId, input.step, input.descriptor, index, localId);
              this.copies.set(localId, copy);
              copy.catch(() => this.copies.delete(localId));
            }
            const ref = await copy;
            if (fetchedHere) fetchedBytes += ref.byteSize;
            return ref;
          }),
        );
        return { ...input, descriptor: { ...input.descriptor, hostId: this.hostId, segments } };
      }),
    );
    return { inputs, fetchedBytes };
  }


  private async fetchSegment(runId: string, step: string, descriptor: TableDescriptor, index: number, localId: string): Promise<SegmentRef> {
    const composed = isComposed(descriptor);
    const wanted = composed ? null : descriptor.segments[index]!.byteSize;
    // Another executor of this host may have made the copy already: it is published whole, by rename.
    const existing = listSegments(this.shmDir).find((s) => s.id === localId);
    if (existing && wanted !== null) {
      this.trackCopy(runId, localId);
      return { id: localId, byteSize: wanted };
    }
    const host = await this.endpointOf(descriptor.hostId);
    const endpoint = host.bulkEndpoint ?? host.flightEndpoint;
    const ticket = signTicket({ path: `runs/${runId}/${step}`, segment: index, expiresAt: Date.now() + TICKET_TTL_MS }, checkSecret(this.secret, 'ticket'));
    const partId = `${runId}.${ulid().toLowerCase()}.part`;
    try {
      const fetched = await this.client(host).fetchToShm(ticket, { dir: this.shmDir, id: partId, byteSize: wanted });
      if (wanted !== null && fetched.segment.byteSize !== wanted) {
        throw new Error(`received ${fetched.segment.byteSize} bytes, the descriptor says ${wanted}`);
      }
      // An assembled table's copy is private to this fetch: its size is only known here.
      const finalId = composed ? `${localId}.${ulid().toLowerCase()}` : localId;
      try {
        renameSegment(partId, finalId, { dir: this.shmDir });
      } catch (error) {
        if ((error as { code?: string }).code !== 'EEXIST') throw error;
        removeSegments([partId], { dir: this.shmDir });
      }
      this.trackCopy(runId, finalId);
      return { id: finalId, byteSize: fetched.segment.byteSize };
    } catch (error) {
      removeSegments([partId], { dir: this.shmDir });
      throw new InputFetchError(
        `could not fetch input "${step}" (stream ${index + 1} of ${composed ? 1 : descriptor.segments.length}, ${descriptor.byteSize} bytes in all) from host ${descriptor.hostId} at ${endpoint}: ${(error as Error).message}`,
        { cause: error },
      );
    }
  }

  private async endpointOf(hostId: string): Promise<HostRecord> {
    const host = await findLiveHost(this.topology, hostId);
    if (host) return host;
    throw new InputFetchError(`host ${hostId}, which holds the input, has no live executor (it stopped heartbeating): its shared memory is out of reach`);
  }

  private client(host: HostRecord): FlightClient {
    let client = this.clients.get(host.flightEndpoint);
    if (!client) {
      client = new FlightClient(host.flightEndpoint, {
        ...(this.options.rootCerts ? { rootCerts: this.options.rootCerts } : {}),
        ...(host.bulkEndpoint ? { bulkLocation: host.bulkEndpoint } : {}),
        accessToken: flightAccessToken(this.secret),
      });
      this.clients.set(host.flightEndpoint, client);
    }
    return client;
  }

  /** Copies go when their run ends (gc removes them too, should this executor miss it). */
  private trackCopy(runId: string, id: string): void {
    let tracked = this.copiesOfRun.get(runId);
    if (!tracked) {
      const watch = this.nc.subscribe(subjects.status(runId), {
        callback: (error, msg) => {
          if (error) return;
          try {
            const view = decode(runView, msg.subject, msg.data);
            if (view.state !== 'running' && view.state !== 'queued') this.releaseRun(runId);
          } catch (e) {
            this.logger.warn((e as Error).message);
          }
        },
      });
      tracked = { ids: new Set(), watch };
      this.copiesOfRun.set(runId, tracked);
    }
    tracked.ids.add(id);
  }

  private releaseRun(runId: string): void {
    const tracked = this.copiesOfRun.get(runId);
    if (!tracked) return;
    this.copiesOfRun.delete(runId);
    tracked.watch.unsubscribe();
    for (const id of tracked.ids) this.copies.delete(id);
    releaseSegments([...tracked.ids], { dir: this.shmDir });
  }
}

/** A run output held on this host, from its recorded completion; null once released. */
async function resolveOutput(topology: Topology, hostId: string, shmDir: string, runId: string, step: string): Promise<StoredTable | null> {
  if (!/^[A-Za-z0-9_]+$/.test(runId) || !/^[A-Za-z0-9_]+$/.test(step)) return null;
  const completion = await readStepCompletion(topology.steps, runId, step).catch(() => null);
  if (completion?.type !== 'step.succeeded') return null;
  const output = completion.output;
  if (output.hostId !== hostId) return null;
  // A released segment file has left its id (pooled or unlinked): answer NOT_FOUND rather than fail mapping it.
  const present = new Set(listSegments(shmDir).map((s) => s.id));
  if (!output.segments.every((s) => s.kind === 'region' || present.has(s.id))) return null;
  return { segments: output.segments, rows: output.rows, byteSize: output.byteSize };
}
