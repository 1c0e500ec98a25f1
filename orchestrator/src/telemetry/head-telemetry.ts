import { rm } from "node:fs/promises";
import type { IMetricReport, ITelemetry } from "@drover/proto";
import type { CheckpointCoordinator } from "../checkpoint-coordinator.js";
import type { CostReport } from "../cost/run-cost.js";
import type { JobController, JobRecord } from "../job-controller.js";
import type { Logger } from "../logger.js";
import type { StateDirectory } from "../state-store.js";
import type { WorkerRegistry } from "../worker-registry.js";
import { MetricsServer, type MountedHandler } from "./metrics-server.js";
import { HeadMetrics } from "./prometheus-metrics.js";
import { alertTransitions, DEFAULT_ALERT_THRESHOLDS, evaluateAlerts, errorCountRises, latestByNode, type Alert, type AlertThresholds } from "./telemetry-alerts.js";
import { checkTelemetry } from "./telemetry-report.js";
import { TelemetryStore } from "./telemetry-store.js";

/** `<state>/telemetry.json`: the store, rewritten this often while it changes. */
export const TELEMETRY_FILE = "telemetry.json";
export const DEFAULT_TELEMETRY_SAVE_INTERVAL_MS = 30_000;
/** `<state>/metrics.json`: where /metrics is served ({ formatVersion, url }), while the head runs. */
export const METRICS_FILE = "metrics.json";
/** A worker sending bad telemetry is told about at most this often (it would be every sample). */
const REFUSAL_LOG_INTERVAL_MS = 60_000;
/** How often the head evaluates the alert rules (a node samples every 5 s by default). */
export const DEFAULT_ALERT_CHECK_INTERVAL_MS = 5_000;

export type HeadTelemetryState = "created" | "starting" | "running" | "stopping" | "stopped";

export interface HeadTelemetryOptions {
  metricsHost: string;
  metricsPort: number;
  retentionMs: number;
  stateDir: StateDirectory;
  workers: WorkerRegistry;
  jobs: JobController;
  logger: Logger;
  saveIntervalMs?: number;
  /** `head.alerts` of the spec; the defaults without. */
  alerts?: AlertThresholds;
  alertCheckIntervalMs?: number;
  now?: () => number;
}

/**
 * The head's view of its nodes and runs over time: keeps checked Telemetry batches in
 * the time-series store (persisted to the state directory, so a restarted head, or a
 * reader of the file after a crash, still has the last hour), and serves it with the
 * training and checkpoint metrics on /metrics.
 */
export class HeadTelemetry {
  state: HeadTelemetryState = "created";
  private store: TelemetryStore;
  private metrics: HeadMetrics | undefined;
  private server: MetricsServer | undefined;
  private saveTimer: NodeJS.Timeout | undefined;
  private alertTimer: NodeJS.Timeout | undefined;
  /** The alerts of the last check, by key: a change is logged once, not every check. */
  private activeAlerts = new Map<string, Alert>();
  /** The cost tracker's newest report: its leases' escrow left is judged with the telemetry. */
  private latestCost: CostReport | undefined;

  /** The alerts of the newest check (what the dashboard shows). */
  get alerts(): Alert[] {
    return [...this.activeAlerts.values()];
  }
  /** Per node: each GPU's last uncorrected ECC and Xid counts, and how often they rose since the node joined. */
  private readonly gpuErrorsByNode = new Map<string, { ecc: Map<number, number>; xid: Map<number, number>; rises: number }>();
  private saving: Promise<void> | undefined;
  private changedSinceSave = false;
  private readonly refusals = new Map<string, { lastLoggedMs: number; since: number }>();
  private readonly onMetric = (job: JobRecord, metric: IMetricReport) => {
    this.metrics?.observeTrainMetric(job.runId, metric.rank ?? 0, Number(metric.step ?? 0), metric.values ?? {});
  };

  private constructor(private readonly options: HeadTelemetryOptions) {
    this.store = new TelemetryStore({ retentionMs: options.retentionMs, now: options.now });
  }

  static create(options: HeadTelemetryOptions): HeadTelemetry {
    return new HeadTelemetry(options);
  }

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  private setState(state: HeadTelemetryState): void {
    this.options.logger.info("telemetry state", { from: this.state, to: state });
    this.state = state;
  }

  /** http://host:port/metrics once started. */
  get metricsUrl(): string | undefined {
    return this.server?.url;
  }

  /** Serves `prefix` from the /metrics server (the dashboard); once started. */
  mount(prefix: string, handler: MountedHandler): void {
    this.server?.mount(prefix, handler);
  }

  /** http://host:port of the /metrics server once started. */
  get serverOrigin(): string | undefined {
    return this.server?.origin;
  }

  /** The series kept so far (read-only use: status, dashboard). */
  get series(): TelemetryStore {
    return this.store;
  }

  /** Loads the persisted series, serves /metrics and writes metrics.json. Before any worker can connect. */
  async start(signal?: AbortSignal): Promise<void> {
    this.setState("starting");
    const path = this.options.stateDir.path(TELEMETRY_FILE);
    const loaded = await TelemetryStore.load(path, { retentionMs: this.options.retentionMs, now: this.options.now, signal });
    if (loaded.problem) this.options.logger.warn("telemetry file not read; starting with no history", { file: path, problem: loaded.problem });
    else if (loaded.store.seriesCount > 0) this.options.logger.info("telemetry history loaded", { file: path, series: loaded.store.seriesCount });
    this.store = loaded.store;
    const metrics = new HeadMetrics({ store: this.store, workers: this.options.workers });
    this.metrics = metrics;
    this.options.jobs.on("metric", this.onMetric);
    this.server = await MetricsServer.listen({
      host: this.options.metricsHost,
      port: this.options.metricsPort,
      render: async () => ({ contentType: metrics.contentType, body: await metrics.text() }),
      logger: this.options.logger,
    });
    await this.options.stateDir.writeJson(METRICS_FILE, { formatVersion: 1, url: this.server.url });
    this.options.logger.info("serving Prometheus metrics", { url: this.server.url });
    this.saveTimer = setInterval(() => void this.save(), this.options.saveIntervalMs ?? DEFAULT_TELEMETRY_SAVE_INTERVAL_MS);
    this.saveTimer.unref();
    this.alertTimer = setInterval(() => this.checkAlerts(), this.options.alertCheckIntervalMs ?? DEFAULT_ALERT_CHECK_INTERVAL_MS);
    this.alertTimer.unref();
    this.setState("running");
  }

  /** A Telemetry message on a worker's Session: checked, then kept under the node's registered name and group. */
  onTelemetry(workerId: string, message: ITelemetry): void {
    if (this.state !== "running") return;
    const worker = this.options.workers.get(workerId);
    if (!worker) return;
    const checked = checkTelemetry(message, this.now());
    if (!checked.ok) {
      this.refused(worker.nodeName, checked.error);
      return;
    }
    this.store.record(worker.nodeName, worker.group, checked.value);
    this.changedSinceSave = true;
    this.watchGpuErrors(workerId, worker.nodeName, checked.value.samples);
  }

  /**
   * Logs every rise of a GPU's uncorrected ECC or Xid count and, with
   * `head.alerts.replaceNodeOnGpuErrors`, declares the node lost once its counts rose
   * `gpuErrorsToReplace` times: a GPU whose memory fails or that falls off the bus
   * crashes the job again and again, and restarting from a checkpoint on a new node is cheaper.
   */
  private watchGpuErrors(workerId: string, node: string, samples: ReadonlyArray<{ gpus: ReadonlyArray<{ index: number; eccErrorsUncorrected?: number; xidErrors?: number }> }>): void {
    const thresholds = this.options.alerts ?? DEFAULT_ALERT_THRESHOLDS;
    let seen = this.gpuErrorsByNode.get(node);
    for (const sample of samples) {
      if (!sample.gpus.some((gpu) => gpu.eccErrorsUncorrected !== undefined || gpu.xidErrors !== undefined)) continue;
      if (!seen) {
        seen = { ecc: new Map(), xid: new Map(), rises: 0 };
        this.gpuErrorsByNode.set(node, seen);
      }
      const rises = [
        ...errorCountRises(seen.ecc, sample.gpus, (gpu) => gpu.eccErrorsUncorrected, true).map((rise) => ({ ...rise, what: "uncorrected ECC errors" })),
        ...errorCountRises(seen.xid, sample.gpus, (gpu) => gpu.xidErrors, false).map((rise) => ({ ...rise, what: "Xid errors" })),
      ];
      for (const rise of rises) {
        seen.rises += 1;
        this.options.logger.warn(`GPU ${rise.what} rose`, { node, gpu: rise.gpu, from: rise.from, to: rise.to, rises: seen.rises, ...(thresholds.replaceNodeOnGpuErrors ? { replaceAfter: thresholds.gpuErrorsToReplace } : {}) });
      }
    }
    if (!seen || !thresholds.replaceNodeOnGpuErrors || seen.rises < thresholds.gpuErrorsToReplace) return;
    const reason = `its GPUs' uncorrected ECC or Xid errors rose ${seen.rises} times (head.alerts.gpuErrorsToReplace ${thresholds.gpuErrorsToReplace})`;
    // A replacement of the same name starts counting afresh.
    this.gpuErrorsByNode.delete(node);
    if (this.options.workers.declareLost(workerId, reason)) this.options.logger.error("node declared lost for its GPU errors; it is replaced and its job restarts from its checkpoint", { node, reason });
  }

  private refused(node: string, error: string): void {
    const now = this.now();
    const seen = this.refusals.get(node) ?? { lastLoggedMs: -Infinity, since: 0 };
    seen.since += 1;
    if (now - seen.lastLoggedMs >= REFUSAL_LOG_INTERVAL_MS) {
      this.options.logger.warn("telemetry refused", { node, error, refusedSinceLastWarning: seen.since });
      seen.lastLoggedMs = now;
      seen.since = 0;
    }
    this.refusals.set(node, seen);
  }

  /**
   * Evaluates the alert rules over the connected nodes' newest samples, the running jobs
   * and the newest cost report's leases, and logs each alert once when it is raised and once when it clears.
   */
  checkAlerts(): Alert[] {
    const connected = new Set(this.options.workers.connected().map((worker) => worker.nodeName));
    const nodes = latestByNode(this.store.latest(() => Infinity)).filter((node) => connected.has(node.node));
    const current = evaluateAlerts({ nodes, jobs: this.options.jobs.all(), nowMs: this.now(), thresholds: this.options.alerts ?? DEFAULT_ALERT_THRESHOLDS, ...(this.latestCost ? { cost: this.latestCost } : {}) });
    const { raised, cleared } = alertTransitions(this.activeAlerts, current);
    for (const alert of raised) this.options.logger.warn(`alert: ${alert.message}`, { alert: alert.key, node: alert.node });
    for (const alert of cleared) this.options.logger.info(`alert cleared: ${alert.message}`, { alert: alert.key, node: alert.node });
    this.activeAlerts = new Map(current.map((alert) => [alert.key, alert]));
    return current;
  }

  /** The cost tracker's newest report, for drover_lease_spend_total and drover_lease_price_per_block, and the escrow alert. */
  observeCost(report: CostReport): void {
    this.latestCost = report;
    this.metrics?.observeCost(report);
  }

  /** Times every checkpoint commit into drover_checkpoint_commit_seconds. */
  watchCheckpoints(coordinator: CheckpointCoordinator): void {
    coordinator.on("committed", ({ seconds }) => this.metrics?.observeCheckpointCommit(seconds));
  }

  /** Writes the store when it changed since the last write; one write at a time. */
  async save(): Promise<void> {
    if (this.saving || !this.changedSinceSave) return this.saving;
    this.changedSinceSave = false;
    const path = this.options.stateDir.path(TELEMETRY_FILE);
    this.saving = this.store.save(path)
      .catch((error: Error) => {
        this.changedSinceSave = true;
        this.options.logger.warn("could not write the telemetry file", { file: path, error: error.message });
      })
      .finally(() => (this.saving = undefined));
    return this.saving;
  }

  /** Saves what is kept, stops serving /metrics and removes metrics.json. Idempotent. */
  async shutdown(): Promise<void> {
    if (this.state === "stopped" || this.state === "stopping") return;
    const started = this.state !== "created";
    this.setState("stopping");
    clearInterval(this.saveTimer);
    clearInterval(this.alertTimer);
    this.options.jobs.off("metric", this.onMetric);
    if (started) {
      await this.saving;
      await this.save();
    }
    await this.server?.close();
    if (this.server) await rm(this.options.stateDir.path(METRICS_FILE), { force: true });
    this.setState("stopped");
  }
}
