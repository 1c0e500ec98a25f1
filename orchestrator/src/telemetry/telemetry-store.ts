import { readFile } from "node:fs/promises";
import { z } from "zod";
import { writeFileAtomic } from "../state-store.js";
import type { GpuReading, NodeReading, TelemetryBatch } from "./telemetry-report.js";

/** What is kept per GPU and per node: the readings of a Telemetry sample, by name. */
export const GPU_METRICS = [
  "utilizationRatio", "memoryUsedBytes", "memoryTotalBytes", "temperatureCelsius",
  "powerDrawWatts", "powerLimitWatts", "smClockHz", "throttleReasons",
  "eccErrorsUncorrected", "eccErrorsCorrected", "xidErrors", "lastXid",
] as const satisfies ReadonlyArray<keyof GpuReading>;
export const NODE_METRICS = [
  "cpuUtilizationRatio", "memoryUsedBytes", "memoryTotalBytes", "shmUsedBytes", "shmTotalBytes",
  "diskFreeBytes", "diskTotalBytes", "networkReceiveBytes", "networkTransmitBytes",
] as const satisfies ReadonlyArray<keyof NodeReading>;
export type GpuMetric = (typeof GPU_METRICS)[number];
export type NodeMetric = (typeof NODE_METRICS)[number];

/** The file format of `<state>/telemetry.json`; a file of another version is not read. */
export const TELEMETRY_FILE_VERSION = 1;
/** An agent's interval when it did not say (its default). */
const DEFAULT_INTERVAL_MS = 5_000;
/** Points per series whatever the interval: an hour at 500 ms. */
export const MAX_POINTS_PER_SERIES = 7_200;
/** Series kept in all (about 80 nodes of 8 GPUs); the least recently updated go first. */
export const DEFAULT_MAX_SERIES = 6_000;

/** One series' identity: a node reading (no gpu) or one GPU's reading. */
export type SeriesId =
  | { scope: "node"; node: string; metric: NodeMetric }
  | { scope: "gpu"; node: string; gpu: number; metric: GpuMetric };

export type SeriesInfo = SeriesId & {
  /** The node's group as its latest sample's worker registered it. */
  group: string;
  /** A GPU's uuid as its latest sample gave it. */
  uuid?: string;
  intervalMs: number;
};

/**
 * A fixed-size ring of (time, value) points, oldest overwritten first. Times only grow:
 * a point not newer than the last is dropped, so a replayed batch cannot fold back.
 */
export class SeriesRing {
  private times: Float64Array;
  private values: Float64Array;
  private start = 0;
  size = 0;

  constructor(capacity: number) {
    this.times = new Float64Array(capacity);
    this.values = new Float64Array(capacity);
  }

  get capacity(): number {
    return this.times.length;
  }

  push(timeMs: number, value: number): boolean {
    const last = this.last();
    if (last && timeMs <= last.timeMs) return false;
    const at = (this.start + this.size) % this.capacity;
    this.times[at] = timeMs;
    this.values[at] = value;
    if (this.size < this.capacity) this.size += 1;
    else this.start = (this.start + 1) % this.capacity;
    return true;
  }

  last(): { timeMs: number; value: number } | undefined {
    if (this.size === 0) return undefined;
    const at = (this.start + this.size - 1) % this.capacity;
    return { timeMs: this.times[at]!, value: this.values[at]! };
  }

  /** Points at or after `sinceMs`, oldest first. */
  points(sinceMs = -Infinity): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let offset = 0; offset < this.size; offset += 1) {
      const at = (this.start + offset) % this.capacity;
      if (this.times[at]! >= sinceMs) out.push([this.times[at]!, this.values[at]!]);
    }
    return out;
  }

  /** A larger ring with the same points (an agent that now samples faster). */
  grown(capacity: number): SeriesRing {
    const ring = new SeriesRing(capacity);
    for (const [timeMs, value] of this.points()) ring.push(timeMs, value);
    return ring;
  }
}

interface Series {
  info: SeriesInfo;
  ring: SeriesRing;
}

export interface TelemetryStoreOptions {
  /** How far back series reach (the ring holds this much at the series' interval). */
  retentionMs: number;
  maxSeries?: number;
  now?: () => number;
}

const nodeName = z.string().regex(/^[A-Za-z0-9._-]{1,63}$/);
const finite = z.number().refine(Number.isFinite, "is not a finite number");
const fileSchema = z.object({
  formatVersion: z.literal(TELEMETRY_FILE_VERSION),
  series: z.array(z.object({
    node: nodeName,
    group: z.string().max(63),
    gpu: z.number().int().min(0).max(255).optional(),
    uuid: z.string().max(128).optional(),
    metric: z.string(),
    intervalMs: z.number().int().min(1).max(3_600_000),
    /** The first time in ms, then the difference to the previous point (mostly the interval: short). */
    times: z.array(finite).max(MAX_POINTS_PER_SERIES),
    values: z.array(finite).max(MAX_POINTS_PER_SERIES),
  })),
});
export type TelemetryFile = z.input<typeof fileSchema> & { savedAt?: string; retentionMs?: number };

/**
 * The head's bounded time series of node and GPU telemetry: one ring per series (a
 * node's CPU, one GPU's temperature, ...) holding `retentionMs` at the interval its
 * agent samples at, and at most `maxSeries` series, so memory stays bounded however
 * long the head runs and however many nodes come and go. Series are keyed by node name,
 * which survives agent and head restarts. Persisted as one JSON file (`save`, `load`).
 */
export class TelemetryStore {
  private readonly series = new Map<string, Series>();

  constructor(private readonly options: TelemetryStoreOptions) {}

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  get retentionMs(): number {
    return this.options.retentionMs;
  }

  get seriesCount(): number {
    return this.series.size;
  }

  /** Keeps a checked batch of one node (node name and group from the registry, never from the message). */
  record(node: string, group: string, batch: TelemetryBatch): void {
    const intervalMs = batch.intervalMs || DEFAULT_INTERVAL_MS;
    for (const sample of batch.samples) {
      for (const metric of NODE_METRICS) {
        const value = sample.node[metric];
        if (value !== undefined) this.push({ scope: "node", node, metric }, group, undefined, intervalMs, sample.timeMs, value);
      }
      for (const gpu of sample.gpus) {
        for (const metric of GPU_METRICS) {
          const value = gpu[metric];
          if (value !== undefined) this.push({ scope: "gpu", node, gpu: gpu.index, metric }, group, gpu.uuid || undefined, intervalMs, sample.timeMs, value);
        }
      }
    }
  }

  private push(id: SeriesId, group: string, uuid: string | undefined, intervalMs: number, timeMs: number, value: number): void {
    const key = seriesKey(id);
    let series = this.series.get(key);
    const capacity = ringCapacity(this.options.retentionMs, intervalMs);
    if (!series) {
      this.evictFor(1);
      series = { info: { ...id, group, intervalMs }, ring: new SeriesRing(capacity) };
      this.series.set(key, series);
    } else if (series.ring.capacity < capacity) {
      series.ring = series.ring.grown(capacity);
    }
    series.info.group = group;
    series.info.intervalMs = intervalMs;
    if (uuid !== undefined) series.info.uuid = uuid;
    series.ring.push(timeMs, value);
  }

  /** Drops the least recently updated series until `room` more fit. */
  private evictFor(room: number): void {
    const max = this.options.maxSeries ?? DEFAULT_MAX_SERIES;
    while (this.series.size + room > max && this.series.size > 0) {
      let oldestKey: string | undefined;
      let oldestMs = Infinity;
      for (const [key, series] of this.series) {
        const lastMs = series.ring.last()?.timeMs ?? -Infinity;
        if (lastMs < oldestMs) {
          oldestMs = lastMs;
          oldestKey = key;
        }
      }
      this.series.delete(oldestKey!);
    }
  }

  /** The newest point of every series updated within `maxAgeMs(info)` of now. */
  latest(maxAgeMs: (info: SeriesInfo) => number): Array<SeriesInfo & { timeMs: number; value: number }> {
    const now = this.now();
    const out: Array<SeriesInfo & { timeMs: number; value: number }> = [];
    for (const { info, ring } of this.series.values()) {
      const last = ring.last();
      if (last && now - last.timeMs <= maxAgeMs(info)) out.push({ ...info, ...last });
    }
    return out;
  }

  /** Every series with its points within the retention, oldest first; `node` narrows to one node. */
  query(filter: { node?: string } = {}): Array<SeriesInfo & { points: Array<[number, number]> }> {
    const since = this.now() - this.options.retentionMs;
    const out: Array<SeriesInfo & { points: Array<[number, number]> }> = [];
    for (const { info, ring } of this.series.values()) {
      if (filter.node !== undefined && info.node !== filter.node) continue;
      const points = ring.points(since);
      if (points.length > 0) out.push({ ...info, points });
    }
    return out;
  }

  toFile(): TelemetryFile {
    return {
      formatVersion: TELEMETRY_FILE_VERSION,
      savedAt: new Date(this.now()).toISOString(),
      retentionMs: this.options.retentionMs,
      series: this.query().map(({ scope: _scope, points, ...info }) => ({
        ...info,
        times: points.map(([timeMs], index) => (index === 0 ? timeMs : timeMs - points[index - 1]![0])),
        // Integers (bytes, counters) exactly; readings that came as float32 to its precision.
        values: points.map(([, value]) => (Number.isInteger(value) ? value : Number(value.toPrecision(7)))),
      })),
    };
  }

  /**
   * A store holding what a file holds; points older than the retention are left out. A
   * file that does not check out gives an empty store and says why: telemetry is worth
   * keeping, never worth a head that will not start.
   */
  static fromFile(raw: unknown, options: TelemetryStoreOptions): { store: TelemetryStore; problem?: string } {
    const store = new TelemetryStore(options);
    const version = (raw as { formatVersion?: unknown } | null)?.formatVersion;
    if (version !== TELEMETRY_FILE_VERSION) return { store, problem: `format version ${JSON.stringify(version)} is not ${TELEMETRY_FILE_VERSION}` };
    const parsed = fileSchema.safeParse(raw);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      return { store, problem: `${issue.path.join(".")}: ${issue.message}` };
    }
    const since = store.now() - options.retentionMs;
    for (const [index, entry] of parsed.data.series.entries()) {
      const id = entry.gpu === undefined
        ? (NODE_METRICS as readonly string[]).includes(entry.metric) ? { scope: "node" as const, node: entry.node, metric: entry.metric as NodeMetric } : undefined
        : (GPU_METRICS as readonly string[]).includes(entry.metric) ? { scope: "gpu" as const, node: entry.node, gpu: entry.gpu, metric: entry.metric as GpuMetric } : undefined;
      if (!id) return { store: new TelemetryStore(options), problem: `series.${index}.metric: ${JSON.stringify(entry.metric.slice(0, 40))} is not a telemetry metric` };
      if (entry.times.length !== entry.values.length) return { store: new TelemetryStore(options), problem: `series.${index}: ${entry.times.length} times but ${entry.values.length} values` };
      let timeMs = 0;
      for (const [at, delta] of entry.times.entries()) {
        timeMs = at === 0 ? delta : timeMs + delta;
        if (timeMs >= since) store.push(id, entry.group, entry.uuid, entry.intervalMs, timeMs, entry.values[at]!);
      }
    }
    return { store };
  }

  /** Writes the store atomically (temp file, fsync, rename): a crash leaves the old file or the new one. */
  async save(path: string): Promise<void> {
    await writeFileAtomic(path, JSON.stringify(this.toFile()) + "\n");
  }

  /** The store a file holds; no file is an empty store, a bad one an empty store and the problem. */
  static async load(path: string, options: TelemetryStoreOptions & { signal?: AbortSignal }): Promise<{ store: TelemetryStore; problem?: string }> {
    let text: string;
    try {
      text = await readFile(path, { encoding: "utf8", signal: options.signal });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return { store: new TelemetryStore(options) };
      return { store: new TelemetryStore(options), problem: `cannot be read: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}` };
    }
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch (error) {
      return { store: new TelemetryStore(options), problem: `is not valid JSON (${(error as Error).message})` };
    }
    return TelemetryStore.fromFile(raw, options);
  }

  /**
   * The store as the head last saved it, for readers without a head (`drover status`,
   * `drover top`): the clock is stopped at the file's `savedAt` and the retention is the
   * file's, so every saved point is kept however long ago the head stopped, and age is
   * judged as of the save. No file: undefined.
   */
  static async loadSnapshot(path: string, signal?: AbortSignal): Promise<{ store: TelemetryStore; savedAtMs: number; problem?: string } | undefined> {
    let text: string;
    try {
      text = await readFile(path, { encoding: "utf8", signal });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      return { store: new TelemetryStore({ retentionMs: 60_000 }), savedAtMs: NaN, problem: `cannot be read: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}` };
    }
    let raw: { savedAt?: unknown; retentionMs?: unknown } | null;
    try {
      raw = JSON.parse(text) as typeof raw;
    } catch (error) {
      return { store: new TelemetryStore({ retentionMs: 60_000 }), savedAtMs: NaN, problem: `is not valid JSON (${(error as Error).message})` };
    }
    const savedAtMs = typeof raw?.savedAt === "string" ? Date.parse(raw.savedAt) : NaN;
    if (!Number.isFinite(savedAtMs)) return { store: new TelemetryStore({ retentionMs: 60_000 }), savedAtMs, problem: "has no valid savedAt" };
    const retentionMs = typeof raw?.retentionMs === "number" && raw.retentionMs > 0 && raw.retentionMs <= 24 * 3_600_000 ? raw.retentionMs : 3_600_000;
    return { ...TelemetryStore.fromFile(raw, { retentionMs, now: () => savedAtMs }), savedAtMs };
  }
}

function seriesKey(id: SeriesId): string {
  return id.scope === "node" ? `${id.node}\u0000node\u0000${id.metric}` : `${id.node}\u0000gpu${id.gpu}\u0000${id.metric}`;
}

function ringCapacity(retentionMs: number, intervalMs: number): number {
  return Math.min(MAX_POINTS_PER_SERIES, Math.ceil(retentionMs / intervalMs) + 1);
}
