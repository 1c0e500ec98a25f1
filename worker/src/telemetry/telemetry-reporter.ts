import { TELEMETRY_MAX_SAMPLES_PER_BATCH, type ITelemetry, type ITelemetrySample } from "@drover/proto";
import { WorkerConfigError } from "../errors.js";
import type { Logger } from "../logger.js";
import { DEFAULT_GPU_QUERY_TIMEOUT_MS, GpuSampler } from "./gpu-sampler.js";
import { NodeSampler } from "./node-sampler.js";

export const DEFAULT_TELEMETRY_INTERVAL_MS = 5_000;
/** Faster than this, nvidia-smi's own cost starts to show next to a trainer. */
export const MIN_TELEMETRY_INTERVAL_MS = 500;
/**
 * Samples kept while the head is unreachable (10 minutes at the default interval); the
 * oldest go first. The head keeps an hour, but a backlog that large would crowd the
 * outbox that log lines and exits share after a reconnect.
 */
const MAX_PENDING_SAMPLES = 2 * TELEMETRY_MAX_SAMPLES_PER_BATCH;

/**
 * DROVER_TELEMETRY_INTERVAL / --telemetry-interval: "5s", "500ms", "1m", or a bare
 * number of seconds; "0" turns telemetry off.
 */
export function parseTelemetryInterval(text: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(text.trim());
  if (!match) throw new WorkerConfigError(`telemetry interval ${JSON.stringify(text)}: expected a duration like 5s, 500ms or 1m (0 = off)`);
  const ms = Math.round(Number(match[1]) * { ms: 1, s: 1_000, m: 60_000 }[(match[2] ?? "s") as "ms" | "s" | "m"]);
  if (ms !== 0 && ms < MIN_TELEMETRY_INTERVAL_MS) throw new WorkerConfigError(`telemetry interval ${text}: at least ${MIN_TELEMETRY_INTERVAL_MS}ms, or 0 for off`);
  return ms;
}

export type TelemetryReporterState = "created" | "running" | "stopping" | "stopped";

export interface TelemetryReporterOptions {
  intervalMs: number;
  /** The directory whose disk's free space is reported (the agent's state directory). */
  workDir: string;
  logger: Logger;
  /**
   * Hands a batch to the Session stream; false when there is none right now (the head
   * is unreachable), and the samples are kept for the next try.
   */
  send: (telemetry: ITelemetry) => boolean;
  gpuSampler?: { sample(signal?: AbortSignal): Promise<ITelemetrySample["gpus"]> };
  nodeSampler?: { sample(signal?: AbortSignal): Promise<NonNullable<ITelemetrySample["node"]>> };
  now?: () => number;
}

/**
 * The agent's telemetry loop: every interval one sample of the node and its GPUs, sent
 * to the head with any backlog in one Telemetry message. Sampling runs on its own
 * timer, apart from trainers and the Session stream; a slow nvidia-smi delays only its
 * own samples.
 */
export class TelemetryReporter {
  state: TelemetryReporterState = "created";
  private readonly pending: ITelemetrySample[] = [];
  private readonly stopController = new AbortController();
  private running: Promise<void> | undefined;
  private readonly gpus: NonNullable<TelemetryReporterOptions["gpuSampler"]>;
  private readonly node: NonNullable<TelemetryReporterOptions["nodeSampler"]>;

  private constructor(private readonly options: TelemetryReporterOptions) {
    // A hanging nvidia-smi holds back the node's own readings of that sample too: it gets
    // about one interval (at least 2 s, which a busy 8-GPU driver needs), not 10 s.
    const gpuTimeoutMs = Math.min(DEFAULT_GPU_QUERY_TIMEOUT_MS, Math.max(2_000, options.intervalMs));
    this.gpus = options.gpuSampler ?? new GpuSampler({ logger: options.logger, timeoutMs: gpuTimeoutMs });
    this.node = options.nodeSampler ?? new NodeSampler({ workDir: options.workDir });
  }

  static create(options: TelemetryReporterOptions): TelemetryReporter {
    if (options.intervalMs !== 0 && options.intervalMs < MIN_TELEMETRY_INTERVAL_MS) {
      throw new WorkerConfigError(`telemetry interval ${options.intervalMs}ms: at least ${MIN_TELEMETRY_INTERVAL_MS}ms, or 0 for off`);
    }
    return new TelemetryReporter(options);
  }

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  private setState(state: TelemetryReporterState): void {
    if (this.state === state) return;
    this.options.logger.info("telemetry state", { from: this.state, to: state, intervalMs: this.options.intervalMs });
    this.state = state;
  }

  /** Samples until shutdown(); returns at once when the interval is 0 (telemetry off). */
  run(): Promise<void> {
    if (this.options.intervalMs === 0 || this.state !== "created") return this.running ?? Promise.resolve();
    this.setState("running");
    this.running = this.loop().finally(() => this.setState("stopped"));
    return this.running;
  }

  private async loop(): Promise<void> {
    const signal = this.stopController.signal;
    const interval = this.options.intervalMs;
    let next = this.now();
    while (!signal.aborted) {
      await this.sampleOnce(signal).catch((error: Error) => this.options.logger.warn("telemetry sample failed", { error: error.message }));
      // Ticks stay on a fixed grid; a sample that overran skips the ticks it missed.
      next += interval;
      const now = this.now();
      if (next < now) next = now + interval - ((now - next) % interval);
      await sleep(next - now, signal);
    }
  }

  /** One sample, then a flush of everything pending. */
  async sampleOnce(signal?: AbortSignal): Promise<void> {
    const timeMs = this.now();
    const [gpus, node] = await Promise.all([this.gpus.sample(signal), this.node.sample(signal)]);
    if (signal?.aborted) return;
    this.pending.push({ timeMs, node, gpus: gpus ?? [] });
    if (this.pending.length > MAX_PENDING_SAMPLES) this.pending.splice(0, this.pending.length - MAX_PENDING_SAMPLES);
    this.flush();
  }

  private flush(): void {
    while (this.pending.length > 0) {
      const samples = this.pending.slice(0, TELEMETRY_MAX_SAMPLES_PER_BATCH);
      if (!this.options.send({ samples, sentTimeMs: this.now(), intervalMs: this.options.intervalMs })) return;
      this.pending.splice(0, samples.length);
    }
  }

  /** Samples waiting for the head (what a reconnect sends first). */
  get pendingSamples(): number {
    return this.pending.length;
  }

  async shutdown(): Promise<void> {
    if (this.state === "created") {
      this.state = "stopped";
      return;
    }
    if (this.state === "stopped") return;
    this.setState("stopping");
    this.stopController.abort();
    await this.running;
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}
