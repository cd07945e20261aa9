/**
 * One error class per condition. Every error thrown by `shm/` is a
 * {@link ShmError}; match on `code` (stable) or `instanceof`.
 */

/** Where an error came from, when a system call was involved. */
export interface ShmErrorDetails {
  /** Stable code; subclasses fix it. */
  code?: string;
  /** errno of the failed system call, or null. */
  errno?: number | null;
  /** Name of the failed system call (`open`, `mmap`, `renameat2`...), or null. */
  syscall?: string | null;
  /** File the error is about, or null. */
  path?: string | null;
  cause?: unknown;
}

/** Base class of every error thrown by the shared-memory layer. */
export class ShmError extends Error {
  override name = 'ShmError';
  /** Stable, machine-readable code: `ERR_SHM_*` or an errno name such as `EEXIST`. */
  readonly code: string;
  readonly errno: number | null;
  readonly syscall: string | null;
  readonly path: string | null;

  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = details.code ?? 'ERR_SHM';
    this.errno = details.errno ?? null;
    this.syscall = details.syscall ?? null;
    this.path = details.path ?? null;
  }
}

/** An argument or option is missing, of the wrong type, or out of range. */
export class ShmArgumentError extends ShmError {
  override name = 'ShmArgumentError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ERR_SHM_ARG' });
  }
}

/** A segment, mapping or single record batch would exceed the size limit. */
export class ShmTooLargeError extends ShmError {
  override name = 'ShmTooLargeError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ERR_SHM_TOO_LARGE' });
  }
}

/** The segment to create already exists (`EEXIST`). */
export class ShmSegmentExistsError extends ShmError {
  override name = 'ShmSegmentExistsError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'EEXIST' });
  }
}

/** The segment (or its directory) does not exist (`ENOENT`). */
export class ShmSegmentNotFoundError extends ShmError {
  override name = 'ShmSegmentNotFoundError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ENOENT' });
  }
}

/** The shared-memory filesystem is full (`ENOSPC`). */
export class ShmNoSpaceError extends ShmError {
  override name = 'ShmNoSpaceError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ENOSPC' });
  }
}

/** A segment's bytes are not the Arrow IPC stream its reference describes. */
export class ShmCorruptSegmentError extends ShmError {
  override name = 'ShmCorruptSegmentError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ERR_SHM_CORRUPT' });
  }
}

/** The native addon is missing or failed to load. */
export class ShmAddonError extends ShmError {
  override name = 'ShmAddonError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ERR_SHM_ADDON' });
  }
}

/**
 * A segment directory, or a file in it, that someone else could have planted or can change:
 * owned by another user, writable by group or others, or a symbolic link. Nothing is read from
 * or written to it; the message names the path and what to do.
 */
export class ShmUnsafePathError extends ShmError {
  override name = 'ShmUnsafePathError';
  constructor(message: string, details: ShmErrorDetails = {}) {
    super(message, { ...details, code: 'ERR_SHM_UNSAFE_PATH' });
  }
}

/** Any other failed system call; `code` is the errno name (e.g. `EACCES`). */
export class ShmSystemError extends ShmError {
  override name = 'ShmSystemError';
}

/** Shape of errors thrown by the addon (see addon/binding.c). */
interface NativeErrorLike {
  code: string;
  message: string;
  errno?: number;
  syscall?: string;
  path?: string;
}

function isNativeError(e: unknown): e is NativeErrorLike {
  return e instanceof Error && typeof (e as { code?: unknown }).code === 'string';
}

function fromCoded(e: NativeErrorLike, message: string): ShmError {
  const details: ShmErrorDetails = {
    // node:fs reports negative errnos, the addon positive ones.
    errno: e.errno === undefined ? null : Math.abs(e.errno),
    syscall: e.syscall ?? null,
    path: e.path ?? null,
    cause: e,
  };
  switch (e.code) {
    case 'ERR_SHM_ARG':
      return new ShmArgumentError(message, details);
    case 'ERR_SHM_TOO_LARGE':
      return new ShmTooLargeError(message, details);
    case 'EEXIST':
      return new ShmSegmentExistsError(message, details);
    case 'ENOENT':
      return new ShmSegmentNotFoundError(message, details);
    case 'ENOSPC':
      return new ShmNoSpaceError(message, details);
    case 'ELOOP':
      // Opened with O_NOFOLLOW: the segment path is a symlink.
      return new ShmUnsafePathError(message, details);
    default:
      return new ShmSystemError(message, { ...details, code: e.code });
  }
}

/** Turns an error thrown by the addon into the matching {@link ShmError}. */
export function fromNativeError(e: unknown): unknown {
  if (e instanceof ShmError || !isNativeError(e)) return e;
  return fromCoded(e, e.message);
}

/** Turns a node:fs error into the matching {@link ShmError}, its message prefixed by `context`. */
export function fromFsError(e: unknown, context: string): unknown {
  if (e instanceof ShmError || !isNativeError(e)) return e;
  return fromCoded(e, `${context}: ${e.message}`);
}

/** The errno name of a node:fs or addon error, or null. */
export function errorCode(e: unknown): string | null {
  return isNativeError(e) ? e.code : null;
}
