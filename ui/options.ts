import type { OpenedTableStore } from '../storage/index.ts';
import { UiOptionError, UiTokenRequiredError } from './errors.ts';

/** Options for {@link startUiServer}. */
export interface UiOptions {
  /** The address to listen on. Anything but loopback needs `token`. @default '127.0.0.1' */
  host?: string;
  /** The port; 0 picks a free one. @default 4280 */
  port?: number;
  /**
   * The secret every request must carry (`Authorization: Bearer`, or `?token=` once, which sets a
   * cookie). Required when `host` is not loopback; optional on loopback.
   * @default QUIVER_UI_TOKEN, else none
   */
  token?: string | null;
  /** Log lines kept per run, for pages opened after the lines were logged (logs are not persisted). @default 5000 */
  logLinesPerRun?: number;
  /** Runs whose log lines are kept; the oldest are dropped first. @default 200 */
  logRuns?: number;
  /** Rows shown in an output or table preview. @default 20 */
  previewRows?: number;
  /** How long a run started from the UI keeps its outputs (for previews) after it ends. @default 600_000 (10 min) */
  releaseAfterMs?: number;
  /** Opens the table store for the Tables page. @default the store QUIVER_STORAGE names */
  openTableStore?: () => Promise<OpenedTableStore>;
}

export const DEFAULT_UI_HOST = '127.0.0.1';
export const DEFAULT_UI_PORT = 4280;
const DEFAULT_LOG_LINES_PER_RUN = 5000;
const DEFAULT_LOG_RUNS = 200;
const DEFAULT_PREVIEW_ROWS = 20;
const DEFAULT_RELEASE_AFTER_MS = 600_000;
/** Shorter tokens are guessable over a network; refuse them rather than pretend. */
const MIN_TOKEN_LENGTH = 16;

/** Hosts that only this machine reaches. 127.0.0.2 and the like count as elsewhere: only the usual names are trusted. */
const LOOPBACK_HOSTS = new Set(['127.0.0.1', '::1', 'localhost']);
export const isLoopback = (host: string) => LOOPBACK_HOSTS.has(host.replace(/^\[|\]$/g, ''));

export type ResolvedUiOptions = Required<Omit<UiOptions, 'token' | 'openTableStore'>> & Pick<UiOptions, 'openTableStore'> & { token: string | null };

/** The one place defaults are applied and options checked. */
export function resolveUiOptions(options: UiOptions = {}, env: NodeJS.ProcessEnv = process.env): ResolvedUiOptions {
  const host = options.host ?? DEFAULT_UI_HOST;
  const port = options.port ?? DEFAULT_UI_PORT;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UiOptionError(`the UI port must be a whole number from 0 to 65535, got ${port}`);
  const token = options.token === undefined ? env.QUIVER_UI_TOKEN || null : options.token || null;
  if (!token && !isLoopback(host)) {
    throw new UiTokenRequiredError(
      `the UI listens on ${host}, beyond this machine's loopback: set QUIVER_UI_TOKEN to a secret of at least ${MIN_TOKEN_LENGTH} characters (e.g. \`openssl rand -hex 24\`), or listen on 127.0.0.1`,
    );
  }
  if (token && token.length < MIN_TOKEN_LENGTH) throw new UiOptionError(`QUIVER_UI_TOKEN must have at least ${MIN_TOKEN_LENGTH} characters, it has ${token.length}`);
  const positive = (name: string, value: number | undefined, fallback: number) => {
    const v = value ?? fallback;
    if (!Number.isInteger(v) || v < 1) throw new UiOptionError(`${name} must be a whole number ≥ 1, got ${v}`);
    return v;
  };
  return {
    host,
    port,
    token,
    logLinesPerRun: positive('logLinesPerRun', options.logLinesPerRun, DEFAULT_LOG_LINES_PER_RUN),
    logRuns: positive('logRuns', options.logRuns, DEFAULT_LOG_RUNS),
    previewRows: positive('previewRows', options.previewRows, DEFAULT_PREVIEW_ROWS),
    releaseAfterMs: positive('releaseAfterMs', options.releaseAfterMs, DEFAULT_RELEASE_AFTER_MS),
    ...(options.openTableStore ? { openTableStore: options.openTableStore } : {}),
  };
}
