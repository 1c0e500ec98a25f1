/** Errors of the head and the CLI. Each has a stable `name` and read-only context. */
export class DroverError extends Error {
  override readonly name: string = "DroverError";
  constructor(message: string, readonly context: Readonly<Record<string, unknown>> = {}, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** A cluster spec that does not parse or validate; the message names file and field. */
export class SpecError extends DroverError {
  override readonly name = "SpecError";
}

/** The state directory is missing, held by a live head, or unreadable. */
export class StateError extends DroverError {
  override readonly name = "StateError";
}

/** A provisioner failed one attempt; `retryable` says whether trying again may help. */
export class ProvisionError extends DroverError {
  override readonly name = "ProvisionError";
  constructor(message: string, readonly retryable: boolean, context: Readonly<Record<string, unknown>> = {}, options?: { cause?: unknown }) {
    super(message, context, options);
  }
}

/** A job request the head cannot run (empty command, more nodes than the cluster has). */
export class JobRequestError extends DroverError {
  override readonly name = "JobRequestError";
}

/** Cost inputs that cannot be priced (a height that is not an integer, a negative up time). */
export class CostInputError extends DroverError {
  override readonly name = "CostInputError";
}

/** The CLI cannot reach a running head. */
export class HeadUnreachableError extends DroverError {
  override readonly name = "HeadUnreachableError";
}

/** A reap that stopped what it found but could not read all of its records. */
export class PartialReapError extends StateError {
  constructor(message: string, readonly stopped: readonly string[], options?: { cause?: unknown }) {
    super(message, { stopped: stopped.length }, options);
  }
}

/** A worker asked the head to sign an S3 request outside what its jobs may touch (or a malformed one). */
export class PresignRefusedError extends DroverError {
  override readonly name = "PresignRefusedError";
}
