/**
 * Message size limits of the control plane, set explicitly on both ends. Control
 * messages are small (heartbeats, metrics, log lines); bulk data never crosses the
 * head, so anything near these limits is a bug or an attack and is refused.
 */
export const CONTROL_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;

/** A single trainer log line forwarded to the head is cut to this many characters. */
export const LOG_LINE_MAX_CHARS = 8 * 1024;

export const PROTOCOL_VERSION = 1;

/** grpc-js channel/server options carrying the limits above. */
export const controlChannelOptions = {
  "grpc.max_receive_message_length": CONTROL_MAX_MESSAGE_BYTES,
  "grpc.max_send_message_length": CONTROL_MAX_MESSAGE_BYTES,
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 5_000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.http2.min_ping_interval_without_data_ms": 5_000,
} as const;

/**
 * Bounds of one Telemetry message: samples in one batch (an agent that was cut off from
 * the head sends its backlog in several) and GPUs in one sample (as at Register). The
 * head refuses a batch beyond them.
 */
export const TELEMETRY_MAX_SAMPLES_PER_BATCH = 60;
export const TELEMETRY_MAX_GPUS = 64;

/**
 * Bounds of one Presign call: requests per call (a worker batches the parts it sends
 * together) and the characters of one key. The head refuses a call beyond them.
 */
export const PRESIGN_MAX_ITEMS = 64;
export const PRESIGN_KEY_MAX_CHARS = 1024;

/**
 * Bounds of the Admin service's replies (Status, WatchJob): a job record as JSON, the
 * jobs one Status lists (the newest), one node's telemetry as JSON. Together they stay
 * well under CONTROL_MAX_MESSAGE_BYTES whatever the cluster holds.
 */
export const JOB_RECORD_MAX_JSON_BYTES = 256 * 1024;
export const STATUS_MAX_JOBS = 8;
export const STATUS_NODE_TELEMETRY_MAX_BYTES = 16 * 1024;
