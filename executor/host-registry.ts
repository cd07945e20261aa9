/**
 * This executor's entry in the `quiver-hosts` bucket: who it is (host id, executor id), where
 * other hosts fetch its tables (Flight endpoints), which steps it takes (labels) and how busy it
 * is (capacity, running). Heartbeats rewrite the entry; the bucket drops it HOST_TTL_MS after the
 * last one, which is how the orchestrator learns that an executor died.
 */
import type { KV } from '@nats-io/kv';
import { buckets, HOST_TTL_MS, hostRecord, type HostRecord, type Logger, type Topology } from '../schemas/index.ts';

/** What an executor announces about itself; the heartbeat adds `running` and `at`. */
export type HostAnnouncement = Omit<HostRecord, 'running' | 'at'>;

/** Four heartbeats per ttl: an entry survives three lost ones (e.g. a short NATS outage). */
const HEARTBEAT_MS = Math.floor(HOST_TTL_MS / 4);

/** Keeps one executor's entry in `quiver-hosts` alive from {@link HostRegistry.start} to {@link HostRegistry.stop}. */
export class HostRegistry {
  private heartbeat: NodeJS.Timeout | null = null;

  private constructor(
    private readonly hosts: KV,
    readonly announced: HostAnnouncement,
    private readonly running: () => number,
    private readonly logger: Logger,
  ) {}

  /**
   * Writes the entry once (so placement sees this executor as soon as this resolves), then again
   * every HEARTBEAT_MS with the current load. A failed heartbeat is logged and the next one tries again.
   */
  static async start(args: { hosts: KV; announced: HostAnnouncement; running: () => number; logger: Logger }): Promise<HostRegistry> {
    const registry = new HostRegistry(args.hosts, args.announced, args.running, args.logger);
    await registry.announce();
    registry.heartbeat = setInterval(
      () => void registry.announce().catch((e) => registry.logger.warn(`heartbeat failed: ${(e as Error).message}`)),
      HEARTBEAT_MS,
    );
    registry.heartbeat.unref();
    return registry;
  }

  /** Stops the heartbeats and removes the entry, so placement stops sending work here at once. */
  async stop(): Promise<void> {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    await this.hosts.delete(this.announced.executorId).catch((e) => this.logger.warn(`could not remove ${this.announced.executorId} from the hosts bucket: ${(e as Error).message}`));
  }

  private async announce(): Promise<void> {
    const record: HostRecord = { ...this.announced, running: this.running(), at: Date.now() };
    await this.hosts.put(this.announced.executorId, JSON.stringify(hostRecord.parse(record)));
  }
}

/** A live executor of `hostId` (any one: they share the host's segments), or null when none heartbeats. */
export async function findLiveHost(topology: Pick<Topology, 'hosts' | 'keys'>, hostId: string): Promise<HostRecord | null> {
  for (const key of await topology.keys(buckets.hosts)) {
    const entry = await topology.hosts.get(key);
    const parsed = entry?.string() ? hostRecord.safeParse(entry.json()) : null;
    if (parsed?.success && parsed.data.hostId === hostId) return parsed.data;
  }
  return null;
}
