import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { CostReport } from "../cost/run-cost.js";
import type { WorkerRegistry } from "../worker-registry.js";
import type { GpuMetric, NodeMetric, SeriesInfo, TelemetryStore } from "./telemetry-store.js";

/** The driver's counters since it loaded (mirrored as counters: a driver reload starts them at 0 again, which Prometheus reads as a reset). */
const ECC_EXPORTS = {
  eccErrorsUncorrected: { name: "drover_gpu_ecc_errors_uncorrected_total", help: "Uncorrected (double-bit) ECC errors since the driver loaded (nvidia-smi ecc.errors.uncorrected.volatile.total); absent on GPUs without ECC." },
  eccErrorsCorrected: { name: "drover_gpu_ecc_errors_corrected_total", help: "Corrected (single-bit) ECC errors since the driver loaded (nvidia-smi ecc.errors.corrected.volatile.total); absent on GPUs without ECC." },
} as const;
/** What /metrics says about each telemetry series, by Prometheus naming (base units, `_total` counters). */
const GPU_EXPORTS: Record<Exclude<GpuMetric, keyof typeof ECC_EXPORTS>, { name: string; help: string }> = {
  utilizationRatio: { name: "drover_gpu_utilization_ratio", help: "Share of time the GPU was busy (nvidia-smi utilization.gpu / 100)." },
  memoryUsedBytes: { name: "drover_gpu_memory_used_bytes", help: "GPU memory in use." },
  memoryTotalBytes: { name: "drover_gpu_memory_total_bytes", help: "GPU memory in all." },
  temperatureCelsius: { name: "drover_gpu_temperature_celsius", help: "GPU core temperature." },
  powerDrawWatts: { name: "drover_gpu_power_watts", help: "GPU power draw." },
  powerLimitWatts: { name: "drover_gpu_power_limit_watts", help: "GPU power limit." },
  smClockHz: { name: "drover_gpu_sm_clock_hertz", help: "GPU SM clock." },
  throttleReasons: { name: "drover_gpu_throttle_reasons", help: "NVML clocks throttle reasons bitmask (0 = not throttled; 4 = software power cap, 32/64 = thermal)." },
  // A gauge: the kernel log buffer rotates, so the count can fall.
  xidErrors: { name: "drover_gpu_xid_errors", help: "NVIDIA Xid error lines of the GPU in the node's kernel log buffer; absent where the agent may not read the kernel log." },
  lastXid: { name: "drover_gpu_last_xid", help: "Code of the GPU's newest Xid error in the kernel log (79 = fallen off the bus, 48 = double-bit ECC, ...)." },
};
const NODE_EXPORTS: Record<Exclude<NodeMetric, "networkReceiveBytes" | "networkTransmitBytes">, { name: string; help: string }> = {
  cpuUtilizationRatio: { name: "drover_node_cpu_utilization_ratio", help: "Share of CPU time the node spent busy since its previous sample." },
  memoryUsedBytes: { name: "drover_node_memory_used_bytes", help: "Node memory in use (total less available)." },
  memoryTotalBytes: { name: "drover_node_memory_total_bytes", help: "Node memory in all." },
  shmUsedBytes: { name: "drover_node_shm_used_bytes", help: "/dev/shm in use." },
  shmTotalBytes: { name: "drover_node_shm_total_bytes", help: "/dev/shm size." },
  diskFreeBytes: { name: "drover_node_disk_free_bytes", help: "Free disk space of the agent's work directory." },
  diskTotalBytes: { name: "drover_node_disk_total_bytes", help: "Disk size of the agent's work directory." },
};
const NETWORK_EXPORTS = {
  networkReceiveBytes: { name: "drover_node_network_receive_bytes_total", help: "Bytes received on every interface but loopback (the kernel's counter)." },
  networkTransmitBytes: { name: "drover_node_network_transmit_bytes_total", help: "Bytes sent on every interface but loopback (the kernel's counter)." },
} as const;

/** Runs whose training series are exported; older runs' series are dropped so labels stay bounded. */
const MAX_RUNS_EXPORTED = 8;
/** Commits check every object of a step: seconds for small steps, minutes for large ones. */
const COMMIT_BUCKETS_SECONDS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

/**
 * A telemetry series is exported while its newest point is fresh: three intervals, and
 * at least 15 s. A node that stopped reporting drops out of /metrics (Prometheus marks
 * the series stale) instead of showing its last reading forever; drover_node_up says why.
 */
function freshFor(info: SeriesInfo): number {
  return Math.max(3 * info.intervalMs, 15_000);
}

/**
 * The head's Prometheus metrics, in one prom-client registry of its own (nothing global,
 * so tests and two heads in a process do not share). Telemetry and node state are read
 * from the store and the worker registry at scrape time; training and checkpoint
 * metrics are pushed in as they happen.
 */
export class HeadMetrics {
  readonly registry = new Registry();
  private readonly trainLoss: Gauge<"run" | "rank">;
  private readonly trainStep: Gauge<"run" | "rank">;
  private readonly trainImagesPerSecond: Gauge<"run" | "rank">;
  private readonly checkpointCommit: Histogram;
  /** The cost tracker's newest report; the lease series are read from it at scrape time. */
  private cost: CostReport | undefined;
  /** Run -> ranks exported for it, oldest run first. */
  private readonly exportedRuns = new Map<string, Set<string>>();

  constructor(private readonly sources: { store: TelemetryStore; workers: WorkerRegistry }) {
    const registers = [this.registry];
    const latest = () => sources.store.latest(freshFor);
    for (const [metric, { name, help }] of Object.entries(GPU_EXPORTS)) {
      new Gauge({
        name, help, labelNames: ["node", "group", "gpu"], registers,
        collect() {
          this.reset();
          for (const point of latest()) {
            if (point.scope === "gpu" && point.metric === metric) this.set({ node: point.node, group: point.group, gpu: String(point.gpu) }, point.value);
          }
        },
      });
    }
    new Gauge({
      name: "drover_gpu_info", help: "Always 1; labels each GPU with its uuid.", labelNames: ["node", "group", "gpu", "uuid"], registers,
      collect() {
        this.reset();
        // Any fresh reading of a GPU will do: a driver may leave any one of them out.
        for (const point of latest()) {
          if (point.scope === "gpu") this.set({ node: point.node, group: point.group, gpu: String(point.gpu), uuid: point.uuid ?? "" }, 1);
        }
      },
    });
    for (const [metric, { name, help }] of Object.entries(NODE_EXPORTS)) {
      new Gauge({
        name, help, labelNames: ["node", "group"], registers,
        collect() {
          this.reset();
          for (const point of latest()) {
            if (point.scope === "node" && point.metric === metric) this.set({ node: point.node, group: point.group }, point.value);
          }
        },
      });
    }
    for (const [metric, { name, help }] of Object.entries(ECC_EXPORTS)) {
      new Counter({
        name, help, labelNames: ["node", "group", "gpu"], registers,
        collect() {
          this.reset();
          for (const point of latest()) {
            if (point.scope === "gpu" && point.metric === metric) this.inc({ node: point.node, group: point.group, gpu: String(point.gpu) }, point.value);
          }
        },
      });
    }
    for (const [metric, { name, help }] of Object.entries(NETWORK_EXPORTS)) {
      // The agent sends the kernel's counter; it is mirrored, never summed here.
      new Counter({
        name, help, labelNames: ["node", "group"], registers,
        collect() {
          this.reset();
          for (const point of latest()) {
            if (point.scope === "node" && point.metric === metric) this.inc({ node: point.node, group: point.group }, point.value);
          }
        },
      });
    }
    new Gauge({
      name: "drover_node_up", help: "1 while the node's agent holds its Session with the head, else 0.", labelNames: ["node", "group"], registers,
      collect() {
        this.reset();
        for (const worker of sources.workers.all()) this.set({ node: worker.nodeName, group: worker.group }, worker.connection === "connected" ? 1 : 0);
      },
    });
    // Money is exact in cost.json; a Prometheus sample is a float64, plenty for a graph.
    const leases = () => this.cost?.leases ?? [];
    new Counter({
      name: "drover_lease_spend_total", help: "What a lease has drawn so far: its price per block x blocks since it was created, in its denomination's unit (uakt, uact).",
      labelNames: ["provider", "dseq", "denom"], registers,
      collect() {
        this.reset();
        for (const lease of leases()) this.inc({ provider: lease.provider, dseq: lease.dseq, denom: lease.denom }, Number(lease.spent));
      },
    });
    new Gauge({
      name: "drover_lease_price_per_block", help: "A lease's price per block, in its denomination's unit.",
      labelNames: ["provider", "dseq", "denom"], registers,
      collect() {
        this.reset();
        for (const lease of leases()) this.set({ provider: lease.provider, dseq: lease.dseq, denom: lease.denom }, Number(lease.pricePerBlock));
      },
    });
    this.trainLoss = new Gauge({ name: "drover_train_loss", help: "The newest loss a rank reported.", labelNames: ["run", "rank"], registers });
    this.trainStep = new Gauge({ name: "drover_train_step", help: "The newest step a rank reported.", labelNames: ["run", "rank"], registers });
    this.trainImagesPerSecond = new Gauge({ name: "drover_train_images_per_second", help: "The newest throughput a rank reported (its images_per_s value).", labelNames: ["run", "rank"], registers });
    this.checkpointCommit = new Histogram({
      name: "drover_checkpoint_commit_seconds",
      help: "From the last rank's report of a checkpoint step to its MANIFEST.json written, retries included.",
      buckets: COMMIT_BUCKETS_SECONDS, registers,
    });
  }

  /** A rank's metric report (global rank): its step, and its loss and images_per_s when it reported them. */
  observeTrainMetric(run: string, rank: number, step: number, values: Record<string, number>): void {
    const labels = { run, rank: String(rank) };
    this.rememberRun(run, labels.rank);
    this.trainStep.set(labels, step);
    if (typeof values.loss === "number") this.trainLoss.set(labels, values.loss);
    if (typeof values.images_per_s === "number") this.trainImagesPerSecond.set(labels, values.images_per_s);
  }

  observeCost(report: CostReport): void {
    this.cost = report;
  }

  observeCheckpointCommit(seconds: number): void {
    this.checkpointCommit.observe(seconds);
  }

  private rememberRun(run: string, rank: string): void {
    const ranks = this.exportedRuns.get(run);
    if (ranks) {
      ranks.add(rank);
      return;
    }
    this.exportedRuns.set(run, new Set([rank]));
    while (this.exportedRuns.size > MAX_RUNS_EXPORTED) {
      const [oldest, oldRanks] = this.exportedRuns.entries().next().value!;
      for (const oldRank of oldRanks) {
        this.trainLoss.remove({ run: oldest, rank: oldRank });
        this.trainStep.remove({ run: oldest, rank: oldRank });
        this.trainImagesPerSecond.remove({ run: oldest, rank: oldRank });
      }
      this.exportedRuns.delete(oldest);
    }
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The exposition text (Prometheus text format 0.0.4). */
  text(): Promise<string> {
    return this.registry.metrics();
  }
}
