// The head's running cost: every interval (30 s by default) and on demand it reads the
// chain's latest block and the leases the provisioner holds (Akash), or the nodes' up
// time (local, Kubernetes, priced by the spec's cost.pricePerNodeHour), prices them
// (run-cost.ts) against what the jobs trained, and writes `<state>/cost.json`, which
// `drover status` reads even after the head is gone.

import type { IMetricReport } from "@drover/proto";
import type { CheckpointCoordinator } from "../checkpoint-coordinator.js";
import type { JobController, JobRecord } from "../job-controller.js";
import type { Logger } from "../logger.js";
import type { Provisioner } from "../provisioners/provisioner.js";
import type { StateDirectory } from "../state-store.js";
import type { WorkerRegistry } from "../worker-registry.js";
import { COST_FILE, costReport, type ChainBlock, type CostReport, type NodeUptime, type Price } from "./run-cost.js";

export const DEFAULT_COST_INTERVAL_MS = 30_000;
/** A chain that does not answer within this is tried again at the next interval. */
const CHAIN_READ_TIMEOUT_MS = 20_000;

export type CostTrackerState = "created" | "running" | "stopping" | "stopped";

export interface CostTrackerOptions {
  readonly stateDir: StateDirectory;
  readonly workers: WorkerRegistry;
  readonly jobs: JobController;
  readonly logger: Logger;
  /** The spec's cost.pricePerNodeHour (local and Kubernetes nodes). */
  readonly pricePerNodeHour?: Price;
  readonly intervalMs?: number;
  /**
   * The last report of the head that died before this one over the same state directory
   * (undefined after a clean `down`): its spend and training count on in this head's totals.
   */
  readonly earlier?: CostReport;
  /** Each new report, e.g. for /metrics. */
  readonly onReport?: (report: CostReport) => void;
  readonly now?: () => number;
}

/** Images a job trained, counted from rank 0's img/s reports (see onMetric). */
interface ImageCount {
  images: number;
  attempt: number;
  lastReportMs?: number;
}

export class CostTracker {
  state: CostTrackerState = "created";
  private provisioner: Provisioner | undefined;
  private timer: NodeJS.Timeout | undefined;
  /** The report being computed; the next one waits for it. */
  private inFlight: Promise<unknown> = Promise.resolve();
  /** A report asked for while one is computed: callers in the meantime share it. */
  private queued: Promise<CostReport | undefined> | undefined;
  private readonly controller = new AbortController();
  /** The first block seen: the block time is measured from it to the latest one. */
  private firstBlock: ChainBlock | undefined;
  /** Each registration of a worker (an agent that restarts registers anew), with its newest up time. */
  private readonly uptimes = new Map<string, NodeUptime & { running: boolean }>();
  private readonly images = new Map<string, ImageCount>();
  private readonly committed = new Set<string>();
  private latest: CostReport | undefined;

  private readonly onMetric = (job: JobRecord, metric: IMetricReport) => {
    // A trainer's img/s is the job's throughput when rank 0 reports it (examples/at1 does:
    // its global batch over the interval); ranks' own figures would count images twice.
    // Integrated over the time between rank 0's reports of one attempt: an estimate of
    // batch x steps that needs no knowledge of the trainer's batch size.
    if ((metric.rank ?? 0) !== 0) return;
    const perSecond = metric.values?.images_per_s;
    const timeMs = Number(metric.timeMs ?? 0);
    const count = this.images.get(job.jobId) ?? { images: 0, attempt: job.attempt };
    this.images.set(job.jobId, count);
    if (count.attempt !== job.attempt) {
      count.attempt = job.attempt;
      count.lastReportMs = undefined;
    }
    if (typeof perSecond === "number" && Number.isFinite(perSecond) && perSecond > 0 && count.lastReportMs !== undefined && timeMs > count.lastReportMs) {
      count.images += (perSecond * (timeMs - count.lastReportMs)) / 1000;
    }
    if (timeMs > 0) count.lastReportMs = timeMs;
  };

  private readonly onWorkersChanged = (): void => void this.refresh();

  private constructor(private readonly options: CostTrackerOptions) {}

  static create(options: CostTrackerOptions): CostTracker {
    return new CostTracker(options);
  }

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  private setState(state: CostTrackerState): void {
    this.options.logger.info("cost tracker state", { from: this.state, to: state });
    this.state = state;
  }

  /** Counts committed checkpoints (per head: a run's steps committed while it ran). */
  watchCheckpoints(coordinator: CheckpointCoordinator): void {
    coordinator.on("committed", ({ runId, step }) => this.committed.add(`${runId}/${step}`));
  }

  /** Starts pricing what `provisioner` holds: a first report now, then one per interval. */
  run(provisioner: Provisioner): void {
    if (this.state !== "created") return;
    this.provisioner = provisioner;
    this.options.jobs.on("metric", this.onMetric);
    // Nodes coming and going change what is priced: a report then, not up to 30 s later.
    this.options.workers.on("changed", this.onWorkersChanged);
    this.setState("running");
    void this.refresh();
    this.timer = setInterval(() => void this.refresh(), this.options.intervalMs ?? DEFAULT_COST_INTERVAL_MS);
    this.timer.unref();
  }

  /** The newest report computed. */
  get report(): CostReport | undefined {
    return this.latest;
  }

  /**
   * Computes and writes a report as of now: after the one in progress, whose figures are
   * already old. A chain that cannot be read yields no report (undefined) rather than
   * lease figures guessed; cost.json keeps the previous one.
   */
  refresh(): Promise<CostReport | undefined> {
    this.queued ??= this.inFlight.then(() => {
      this.queued = undefined;
      const computing = this.compute();
      this.inFlight = computing.catch(() => undefined);
      return computing;
    });
    return this.queued;
  }

  private async compute(): Promise<CostReport | undefined> {
    if (this.state !== "running" || this.provisioner === undefined) return undefined;
    const nowMs = this.now();
    let chain: { latest: ChainBlock; earlier?: ChainBlock } | undefined;
    let leases;
    if (this.provisioner.leasesOnChain) {
      try {
        const signal = AbortSignal.any([this.controller.signal, AbortSignal.timeout(CHAIN_READ_TIMEOUT_MS)]);
        const read = await this.provisioner.leasesOnChain(signal);
        this.firstBlock ??= read.latest;
        chain = { latest: read.latest, earlier: this.firstBlock };
        leases = read.leases;
      } catch (error) {
        if (this.controller.signal.aborted) return undefined;
        this.options.logger.warn("could not read the leases from the chain; cost figures wait for the next try", { error: (error as Error).message });
        return undefined;
      }
    }
    for (const worker of this.options.workers.all()) {
      const running = worker.connection === "connected";
      const until = running ? nowMs : worker.lastSeenMs;
      this.uptimes.set(`${worker.workerId}@${worker.registeredAtMs}`, { node: worker.nodeName, group: worker.group, upMs: Math.max(0, until - worker.registeredAtMs), running });
    }
    const report = costReport({
      computedAtMs: nowMs,
      ...(chain === undefined ? {} : { chain, leases }),
      nodes: this.nodeUptimes(),
      ...(this.options.pricePerNodeHour === undefined || this.provisioner.leasesOnChain ? {} : { pricePerNodeHour: this.options.pricePerNodeHour }),
      training: { images: [...this.images.values()].reduce((sum, count) => sum + count.images, 0), committedCheckpoints: this.committed.size },
      // Its totals already hold whatever the heads before it carried.
      ...(this.options.earlier === undefined ? {} : { earlier: { spent: this.options.earlier.totals.map(({ denom, spent }) => ({ denom, spent })), training: this.options.earlier.training } }),
    });
    if (this.state !== "running") return undefined;
    this.latest = report;
    this.options.onReport?.(report);
    await this.options.stateDir.writeJson(COST_FILE, report).catch((error: Error) => this.options.logger.warn("could not write the cost file", { file: COST_FILE, error: error.message }));
    return report;
  }

  /** Up time per node name: a node whose agent registered twice was up for both spans. */
  private nodeUptimes(): Array<NodeUptime & { running: boolean }> {
    const byNode = new Map<string, NodeUptime & { running: boolean }>();
    for (const span of this.uptimes.values()) {
      const seen = byNode.get(span.node);
      byNode.set(span.node, seen === undefined ? { ...span } : { ...seen, upMs: seen.upMs + span.upMs, running: seen.running || span.running });
    }
    return [...byNode.values()].sort((a, b) => a.node.localeCompare(b.node));
  }

  /**
   * A last report while the leases are still held (the provisioner closes them after
   * this), then no more. Idempotent.
   */
  async shutdown(): Promise<void> {
    if (this.state === "stopping" || this.state === "stopped") return;
    clearInterval(this.timer);
    if (this.state === "running") {
      await this.refresh();
    }
    this.setState("stopping");
    this.controller.abort(new Error("the cost tracker is stopping"));
    this.options.jobs.off("metric", this.onMetric);
    this.options.workers.off("changed", this.onWorkersChanged);
    this.setState("stopped");
  }
}
