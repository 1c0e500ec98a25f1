import { TELEMETRY_MAX_GPUS, TELEMETRY_MAX_SAMPLES_PER_BATCH, type ITelemetry } from "@drover/proto";
import { z } from "zod";

// A Telemetry batch is checked field by field before the head keeps any of it, as
// Register is (register-request.ts): a worker holds a valid session, but a rented
// machine's agent may still send nonsense (a 10^300 W GPU, a sample from 1970, a
// 100,000-GPU node), and those numbers reach the time-series store, /metrics and the
// dashboard.

const TiB = 2 ** 40;
/** Largest memory, shm or GPU memory a node may report (as at Register). */
const MAX_MEMORY_BYTES = 64 * TiB;
const MAX_COUNTER = 2 ** 53 - 1;
/** ECC errors since the driver loaded: a dying GPU counts millions of corrected ones, never 2^40. */
const MAX_ECC_ERRORS = 2 ** 40;
/** A sample older than this at sending is refused: the agent keeps minutes, not days. */
const MAX_SAMPLE_AGE_MS = 7 * 24 * 3_600_000;
/** Clocks step back a little (NTP); further than this, the sample times are not believed. */
const MAX_SAMPLE_FUTURE_MS = 60_000;

/** protobufjs hands 64-bit fields over as number, string or Long; all become numbers here. */
const int64 = z.unknown().transform((value) => (typeof value === "number" ? value : Number(String(value)))).pipe(z.number({ error: "is not a number" }).int("is not an integer"));

// zod's numbers are finite: NaN and Infinity fail the type check, with this message.
const bounded = (min: number, max: number, what: string) =>
  z.number({ error: "is not a finite number" }).min(min, `is less than ${min}`).max(max, `is more than ${what}`).optional();

const gpuSchema = z.object({
  index: z.number().int().min(0).max(255),
  uuid: z.string().max(128, "is longer than 128 characters").regex(/^[A-Za-z0-9._:-]*$/, "has characters that are not allowed"),
  utilizationRatio: bounded(0, 1, "1"),
  memoryUsedBytes: bounded(0, MAX_MEMORY_BYTES, "64 TiB"),
  memoryTotalBytes: bounded(0, MAX_MEMORY_BYTES, "64 TiB"),
  temperatureCelsius: bounded(-50, 200, "200 °C"),
  powerDrawWatts: bounded(0, 10_000, "10 kW"),
  powerLimitWatts: bounded(0, 10_000, "10 kW"),
  smClockHz: bounded(0, 10e9, "10 GHz"),
  throttleReasons: int64.pipe(z.number().min(0).max(MAX_COUNTER)).optional(),
  eccErrorsUncorrected: int64.pipe(z.number().min(0, "is less than 0").max(MAX_ECC_ERRORS, "is more than 2^40")).optional(),
  eccErrorsCorrected: int64.pipe(z.number().min(0, "is less than 0").max(MAX_ECC_ERRORS, "is more than 2^40")).optional(),
  // Xid lines in the kernel log buffer (a few MiB): a million is already not a log.
  xidErrors: z.number().int("is not an integer").min(0, "is less than 0").max(1_000_000, "is more than 1000000").optional(),
  // NVIDIA's Xid codes are below 200 today; the room is for new ones.
  lastXid: z.number().int("is not an integer").min(0, "is less than 0").max(1_023, "is more than 1023").optional(),
});

const nodeSchema = z.object({
  cpuUtilizationRatio: bounded(0, 1, "1"),
  memoryUsedBytes: bounded(0, MAX_MEMORY_BYTES, "64 TiB"),
  memoryTotalBytes: bounded(0, MAX_MEMORY_BYTES, "64 TiB"),
  shmUsedBytes: bounded(0, MAX_MEMORY_BYTES, "64 TiB"),
  shmTotalBytes: bounded(0, MAX_MEMORY_BYTES, "64 TiB"),
  diskFreeBytes: bounded(0, MAX_COUNTER, "2^53 bytes"),
  diskTotalBytes: bounded(0, MAX_COUNTER, "2^53 bytes"),
  networkReceiveBytes: bounded(0, MAX_COUNTER, "2^53 bytes"),
  networkTransmitBytes: bounded(0, MAX_COUNTER, "2^53 bytes"),
});

const telemetrySchema = z.object({
  sentTimeMs: int64,
  intervalMs: z.number().int().min(0).max(3_600_000, "is more than an hour").default(0),
  samples: z.array(z.object({
    timeMs: int64,
    node: nodeSchema.default({}),
    gpus: z.array(gpuSchema).max(TELEMETRY_MAX_GPUS, `lists more than ${TELEMETRY_MAX_GPUS} GPUs`).default([]),
  })).min(1, "is empty").max(TELEMETRY_MAX_SAMPLES_PER_BATCH, `holds more than ${TELEMETRY_MAX_SAMPLES_PER_BATCH} samples`),
});

export type GpuReading = z.output<typeof gpuSchema>;
export type NodeReading = z.output<typeof nodeSchema>;

export interface TelemetrySample {
  /** On the head's clock: the head's receive time less the sample's age at sending. */
  timeMs: number;
  node: NodeReading;
  gpus: GpuReading[];
}

export interface TelemetryBatch {
  /** How often the agent samples; 0 when it did not say. */
  intervalMs: number;
  samples: TelemetrySample[];
}

/**
 * Checks a Telemetry message and places its samples on the head's clock (an agent's
 * clock may be off by minutes; the age of a sample at sending is what it measured
 * itself). The error names the field as the proto spells it
 * (`samples[0].gpus[1].temperature_celsius: is more than 200 °C`).
 */
export function checkTelemetry(message: ITelemetry, receivedAtMs: number): { ok: true; value: TelemetryBatch } | { ok: false; error: string } {
  const parsed = telemetrySchema.safeParse(withoutNulls(message));
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const path = issue.path.map((part) => (typeof part === "number" ? `[${part}]` : snakeCase(String(part)))).join(".").replace(/\.\[/g, "[");
    return { ok: false, error: `${path || "(message)"}: ${issue.message}` };
  }
  const { sentTimeMs, intervalMs, samples } = parsed.data;
  const placed: TelemetrySample[] = [];
  for (const [index, sample] of samples.entries()) {
    const ageMs = sentTimeMs - sample.timeMs;
    if (ageMs > MAX_SAMPLE_AGE_MS) return { ok: false, error: `samples[${index}].time_ms: is more than 7 days before sent_time_ms` };
    if (ageMs < -MAX_SAMPLE_FUTURE_MS) return { ok: false, error: `samples[${index}].time_ms: is after sent_time_ms` };
    const gpuIndexes = new Set(sample.gpus.map((gpu) => gpu.index));
    if (gpuIndexes.size !== sample.gpus.length) return { ok: false, error: `samples[${index}].gpus: lists a GPU index twice` };
    placed.push({ timeMs: receivedAtMs - Math.max(0, ageMs), node: sample.node, gpus: sample.gpus });
  }
  return { ok: true, value: { intervalMs, samples: placed } };
}

function snakeCase(name: string): string {
  return name.replace(/[A-Z]/g, (letter) => `_${letter.toLowerCase()}`);
}

/** Decoded messages carry unset optional fields as null (proto3 `optional`); zod reads them as absent. */
function withoutNulls(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutNulls);
  if (value === null || typeof value !== "object") return value;
  // A 64-bit field decodes as a Long: a number for zod, never an object to walk.
  if (typeof (value as { toNumber?: unknown }).toNumber === "function") return (value as { toNumber(): number }).toNumber();
  const entries: Array<[string, unknown]> = [];
  // Decoded messages keep their defaults on the prototype: every key is read, not only own ones.
  for (const key in value) {
    const field = (value as Record<string, unknown>)[key];
    if (field !== null && field !== undefined && typeof field !== "function" && !key.startsWith("$") && !key.startsWith("_")) entries.push([key, withoutNulls(field)]);
  }
  return Object.fromEntries(entries);
}
