import { fileURLToPath } from 'node:url';
import { join } from 'node:path';

/** The folder of the Quiver package: bundles are written beside its node_modules so their imports resolve. */
export const packageRoot = fileURLToPath(new URL('..', import.meta.url));

/** Where Quiver keeps local state (code cache, builds, embedded NATS). @default <package>/.quiver */
export function quiverHome(): string {
  return process.env.QUIVER_HOME ?? join(packageRoot, '.quiver');
}

/** The parent folder of every cluster's shared-memory folder. @default /dev/shm/quiver */
export function shmRoot(): string {
  return process.env.QUIVER_SHM_ROOT ?? '/dev/shm/quiver';
}

/**
 * Bundles (pipeline code, the step runner) import apache-arrow by name, so they must sit inside
 * the Quiver package to resolve it to the one copy the runner uses: never under QUIVER_HOME.
 */
export const bundleDir = (kind: 'code' | 'build') => join(packageRoot, '.quiver', kind);
