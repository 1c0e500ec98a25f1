import { setTimeout as sleep } from 'node:timers/promises';
import { ObjectStoreRequestError, RetriesExhaustedError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';

export interface RetryPolicy {
  maxAttempts: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
}

export interface RetryOptions {
  policy: RetryPolicy;
  signal?: AbortSignal | undefined;
  logger?: Logger | undefined;
  /** Logged with each retry; keys and paths only. */
  context?: Readonly<Record<string, string | number>>;
  /** Injected in tests for deterministic jitter. */
  random?: () => number;
}

export function isRetryable(error: unknown): boolean {
  return error instanceof ObjectStoreRequestError && error.retryable;
}

/**
 * True when `error` (or an error it wraps) says the store could not be reached or kept
 * failing on its side, so the same work may succeed later: retries that ran out, or a
 * retryable request error. A missing file, refused credentials or a checksum mismatch
 * are not outages.
 */
export function isStoreOutage(error: unknown): boolean {
  for (let current = error, depth = 0; current instanceof Error && depth < 8; current = current.cause, depth++) {
    if (current instanceof RetriesExhaustedError || isRetryable(current)) return true;
  }
  return false;
}

/** "Full jitter" exponential backoff: uniform in [0, min(max, base * 2^(attempt-1))]. */
export function backoffDelayMs(attempt: number, policy: RetryPolicy, random: () => number = Math.random): number {
  const ceiling = Math.min(policy.backoffMaxMs, policy.backoffBaseMs * 2 ** Math.max(0, attempt - 1));
  return Math.floor(random() * ceiling);
}

/**
 * Runs `attempt` until it succeeds, fails with a non-retryable error, or the policy's
 * attempts run out (RetriesExhaustedError with the last error as cause). The caller's
 * abort ends it at once, waits included, with the signal's reason.
 */
export async function withRetry<T>(operation: string, attempt: (attemptNumber: number) => Promise<T>, options: RetryOptions): Promise<T> {
  const { policy, signal } = options;
  const logger = options.logger ?? silentLogger;
  for (let attemptNumber = 1; ; attemptNumber++) {
    signal?.throwIfAborted();
    try {
      return await attempt(attemptNumber);
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      if (!isRetryable(error)) throw error;
      if (attemptNumber >= policy.maxAttempts) {
        throw new RetriesExhaustedError(
          `${operation} failed after ${attemptNumber} attempts: ${(error as Error).message}`,
          { operation, attempts: attemptNumber, ...options.context },
          { cause: error },
        );
      }
      const delayMs = backoffDelayMs(attemptNumber, policy, options.random);
      logger.debug('retrying object store request', {
        operation,
        attempt: attemptNumber,
        delayMs,
        error: (error as Error).message,
        ...options.context,
      });
      // An abort while waiting ends it with the caller's reason, as withRetry does.
      await sleep(delayMs, undefined, signal ? { signal } : undefined).catch(() => {
        throw signal?.reason ?? error;
      });
    }
  }
}

/** How long work that fails on a store outage is tried again, and how far apart. */
export interface OutageRetryPolicy {
  retryForMs: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
}

/**
 * The default for checkpoint uploads and commits: an outage can last minutes, and a
 * checkpoint is worth waiting for (1 s doubling to 30 s, for 15 minutes).
 */
export const STORE_OUTAGE_RETRY: OutageRetryPolicy = Object.freeze({ retryForMs: 15 * 60_000, backoffBaseMs: 1_000, backoffMaxMs: 30_000 });

export interface OutageRetry {
  attempt: number;
  delayMs: number;
  /** Until giving up, counted from now. */
  remainingMs: number;
  error: Error;
}

/**
 * Runs `attempt` again, whole, while it fails with a store outage (`isStoreOutage`),
 * backing off exponentially, until `policy.retryForMs` has passed; any other failure,
 * the last one, or an abort is thrown. withRetry covers one request for seconds; this
 * covers a whole upload or commit through an outage of minutes. `onRetry` is called once
 * per retry, for the one log line a try deserves. Resolves with the value and the number
 * of tries it took.
 */
export async function retryThroughOutage<T>(
  attempt: () => Promise<T>,
  options: { policy: OutageRetryPolicy; signal?: AbortSignal; onRetry?: (retry: OutageRetry) => void },
): Promise<{ value: T; attempts: number }> {
  const { policy, signal } = options;
  const deadline = Date.now() + policy.retryForMs;
  for (let attempts = 1; ; attempts++) {
    try {
      return { value: await attempt(), attempts };
    } catch (error) {
      const delayMs = Math.min(policy.backoffMaxMs, policy.backoffBaseMs * 2 ** (attempts - 1));
      if (signal?.aborted) throw signal.reason;
      if (!isStoreOutage(error) || Date.now() + delayMs > deadline) throw error;
      options.onRetry?.({ attempt: attempts, delayMs, remainingMs: deadline - Date.now(), error: error as Error });
      // An abort while waiting ends it with the caller's reason, as withRetry does.
      await sleep(delayMs, undefined, signal ? { signal } : undefined).catch(() => {
        throw signal?.reason ?? error;
      });
    }
  }
}
