/** Errors of the worker agent. Each has a stable `name` and read-only context. */
export class WorkerError extends Error {
  override readonly name: string = "WorkerError";
  constructor(message: string, readonly context: Readonly<Record<string, unknown>> = {}, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** The head refused our join token. Not retryable: a new token is needed. */
export class JoinRefusedError extends WorkerError {
  override readonly name = "JoinRefusedError";
}

/** A trainer could not be launched (bad command, missing working dir). */
export class TrainerLaunchError extends WorkerError {
  override readonly name = "TrainerLaunchError";
}

/** A line on the agent socket that is not a valid message; the connection is dropped. */
export class AgentMessageError extends WorkerError {
  override readonly name = "AgentMessageError";
}

/** Invalid command-line options or environment for drover-worker. */
export class WorkerConfigError extends WorkerError {
  override readonly name = "WorkerConfigError";
}

/**
 * A cross-provider bridge frame that cannot be used: damaged (checksum), malformed, out of
 * bounds, or not the tensor, step or shape expected. Names the tensor and chunk.
 */
export class BridgeFrameError extends WorkerError {
  override readonly name = "BridgeFrameError";
}

/** A bridge peer that could not authenticate (wrong job secret), or refused us. Never carries key material. */
export class BridgeAuthError extends WorkerError {
  override readonly name = "BridgeAuthError";
}

/** An outer-step exchange that could not complete (a peer gone, silent or inconsistent). */
export class BridgeExchangeError extends WorkerError {
  override readonly name = "BridgeExchangeError";
}

/** A trainer's checkpoint report names files outside its rank's checkpoint directory, or none that exist. */
export class CheckpointReportError extends WorkerError {
  override readonly name = "CheckpointReportError";
}

/** A trainer's outer-step request on DROVER_OUTER_SOCKET that breaks the protocol; names the field. */
export class OuterSyncRequestError extends WorkerError {
  override readonly name = "OuterSyncRequestError";
}

/** The head did not prove it is ours: its chain lacks the pinned CA, or it speaks no TLS. */
export class HeadTrustError extends WorkerError {
  override readonly name = "HeadTrustError";
}
