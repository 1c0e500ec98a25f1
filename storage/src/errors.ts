// Every error this package throws on purpose. Each class has a stable `name` that callers
// may switch on, read-only context, and the underlying `cause` when there is one. No
// message or context field ever carries a credential: context holds keys, paths, sizes
// and digests only.

export type StorageErrorContext = Readonly<Record<string, string | number | boolean | undefined>>;

export abstract class StorageError extends Error {
  abstract override readonly name: string;
  readonly context: StorageErrorContext;

  constructor(message: string, context: StorageErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.context = Object.freeze({ ...context });
  }
}

/** The store config (or an option object) does not validate; `path` names the field. */
export class StorageConfigError extends StorageError {
  override readonly name = 'StorageConfigError';
}

/** An object that must exist does not. */
export class ObjectNotFoundError extends StorageError {
  override readonly name = 'ObjectNotFoundError';
}

/**
 * One request to the object store failed. `retryable` says whether the transfer engine
 * may try again (5xx, throttling, timeouts, connection resets).
 */
export class ObjectStoreRequestError extends StorageError {
  override readonly name = 'ObjectStoreRequestError';
  readonly retryable: boolean;
  readonly statusCode: number | undefined;

  constructor(
    message: string,
    context: StorageErrorContext & { operation: string; retryable: boolean; statusCode?: number },
    options?: { cause?: unknown },
  ) {
    super(message, context, options);
    this.retryable = context.retryable;
    this.statusCode = context.statusCode;
  }
}

/** The store does not implement an optional S3 operation (s3rver lacks ListParts etc.). */
export class OperationNotSupportedError extends StorageError {
  override readonly name = 'OperationNotSupportedError';
}

/** Retries ran out; `cause` is the last attempt's error. */
export class RetriesExhaustedError extends StorageError {
  override readonly name = 'RetriesExhaustedError';
}

/** Bytes read back do not hash (or size) to what was recorded. Names the file. */
export class ChecksumMismatchError extends StorageError {
  override readonly name = 'ChecksumMismatchError';
}

/** A file changed on disk while it was being uploaded. */
export class SourceChangedError extends StorageError {
  override readonly name = 'SourceChangedError';
}

/** Commit refused: a rank report is missing, or an object is absent or differs. */
export class CheckpointIncompleteError extends StorageError {
  override readonly name = 'CheckpointIncompleteError';
  readonly problems: readonly string[];

  constructor(message: string, context: StorageErrorContext, problems: readonly string[]) {
    super(`${message}: ${problems.slice(0, 10).join('; ')}${problems.length > 10 ? ` (+${problems.length - 10} more)` : ''}`, context);
    this.problems = Object.freeze([...problems]);
  }
}

/** No committed checkpoint (MANIFEST.json) at that step. */
export class CheckpointNotFoundError extends StorageError {
  override readonly name = 'CheckpointNotFoundError';
}

/** A working directory too large to ship as a code bundle. */
export class CodeBundleTooLargeError extends StorageError {
  override readonly name = 'CodeBundleTooLargeError';
}

/** A manifest or report does not parse, or names a path that would escape its directory. */
export class InvalidManifestError extends StorageError {
  override readonly name = 'InvalidManifestError';
}

/**
 * A write failed because its file system is full (ENOSPC, EDQUOT). The message names the
 * file and the space left, `disk full: <path> (<free> bytes free)`, so whoever reads it
 * (a job's output, `drover status`, an S3 error answer) knows what to clear.
 */
export class DiskFullError extends StorageError {
  override readonly name = 'DiskFullError';
  readonly path: string;
  /** Bytes an unprivileged writer could still use there; undefined when statfs failed too. */
  readonly freeBytes: number | undefined;

  constructor(path: string, freeBytes: number | undefined, options?: { cause?: unknown }) {
    super(`disk full: ${path} (${freeBytes ?? 'unknown'} bytes free)`, { path, freeBytes }, options);
    this.path = path;
    this.freeBytes = freeBytes;
  }
}

/** The embedded S3 server or the MinIO fixture failed to start or stop. */
export class LocalServerError extends StorageError {
  override readonly name = 'LocalServerError';
}

// Error codes some S3-compatible stores answer for an operation they lack (s3rver has
// no ListParts, ListMultipartUploads or AbortMultipartUpload).
const UNSUPPORTED_CODES = new Set(['NotImplemented', 'MethodNotAllowed']);
const INSUFFICIENT_STORAGE = 507;
const RETRYABLE_CODES = new Set(['RequestTimeout', 'SlowDown', 'InternalError', 'ServiceUnavailable', 'RequestTimeTooSkewed', 'OperationAborted']);

/**
 * The error for an S3 error answer (status and code), the same whichever HTTP client got
 * it: 404 is ObjectNotFoundError; NotImplemented, 405 and 501 are
 * OperationNotSupportedError; 5xx, 408, 429 and throttling codes are retryable.
 */
export function errorOfS3Answer(
  answer: { operation: string; key: string; statusCode: number | undefined; code: string; message?: string | undefined },
  cause?: unknown,
): ObjectNotFoundError | OperationNotSupportedError | ObjectStoreRequestError {
  const { operation, key, statusCode, code, message } = answer;
  const options = cause === undefined ? undefined : { cause };
  if (statusCode === 404 || code === 'NoSuchKey' || code === 'NoSuchUpload') {
    return new ObjectNotFoundError(`${operation}: ${key} not found (${code})`, { operation, key, code }, options);
  }
  if (UNSUPPORTED_CODES.has(code) || statusCode === 501 || statusCode === 405) {
    return new OperationNotSupportedError(`${operation} is not supported by this store`, { operation, key, code }, options);
  }
  // 507 is a store whose disk is full (MinIO's XMinioStorageFull, the embedded server's
  // disk-full answer): it does not empty itself within a retry window, so the upload
  // fails at once and the step is named as not stored instead of waiting 15 minutes.
  const retryable = statusCode !== INSUFFICIENT_STORAGE && (statusCode === undefined || statusCode >= 500 || statusCode === 429 || statusCode === 408 || RETRYABLE_CODES.has(code));
  // The server's own words (s3rver's "disk full: <path> ...") say more than the code; a
  // message that only repeats the code, or is the SDK's placeholder, adds nothing.
  const said = message && message !== code && message !== 'UnknownError' ? `: ${message}` : '';
  return new ObjectStoreRequestError(
    `${operation} ${key} failed: ${code}${statusCode ? ` (HTTP ${statusCode})` : ''}${said}`,
    { operation, key, retryable, code, ...(statusCode !== undefined ? { statusCode } : {}) },
    options,
  );
}
