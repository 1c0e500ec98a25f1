import type { CostReport } from "../cost/run-cost.js";
import type { GpuMetric, NodeMetric, SeriesInfo } from "./telemetry-store.js";

// Pure rules, no package imports: `drover status` and `drover top` evaluate them over
// the state directory's files without loading the head (or zod), and the head over its
// live store, so both say the same thing.

/** The thresholds of `head.alerts` in the cluster spec, compiled. */
export interface AlertThresholds {
  /** A GPU hotter than this (Celsius) is reported. */
  gpuTemperatureCelsius: number;
  /** A node whose newest sample is older than this many of its sampling intervals is reported as silent. */
  silentIntervals: number;
  /** A rank whose images_per_s is below this fraction of its group's median is a straggler. */
  stragglerRatio: number;
  /** A lease whose deployment's escrow runs out within this many minutes is reported. */
  escrowMinutes: number;
  /** Whether the head treats a node as lost once its GPUs' error counts rose gpuErrorsToReplace times. */
  replaceNodeOnGpuErrors: boolean;
  /** Rises of a node's uncorrected ECC or Xid counts (any of its GPUs) that condemn it, with replaceNodeOnGpuErrors. */
  gpuErrorsToReplace: number;
}

export const DEFAULT_ALERT_THRESHOLDS: Readonly<AlertThresholds> = { gpuTemperatureCelsius: 85, silentIntervals: 3, stragglerRatio: 0.5, escrowMinutes: 60, replaceNodeOnGpuErrors: false, gpuErrorsToReplace: 3 };

/**
 * The bits of nvidia-smi's `clocks_throttle_reasons.active` (NVML's
 * nvmlClocksThrottleReasons) that mean the GPU runs slower than it should for a reason
 * outside the job: too hot, or the board or system cutting power. Not alerted:
 * 0x1 GpuIdle, 0x2 ApplicationsClocksSetting, 0x10 SyncBoost, 0x100 DisplayClockSetting
 * (settings, not trouble) and 0x4 SwPowerCap, which a fully busy GPU sets whenever it
 * runs at its power limit: that is the normal state of a training GPU, not a fault.
 */
export const SLOWDOWN_THROTTLE_REASONS: ReadonlyArray<{ bit: number; reason: string }> = [
  { bit: 0x8, reason: "hardware slowdown" },
  { bit: 0x20, reason: "software thermal slowdown" },
  { bit: 0x40, reason: "hardware thermal slowdown" },
  { bit: 0x80, reason: "hardware power brake" },
];

/** The slowdown reasons a throttle bitmask reports, in bit order; none for 0 or only benign bits. */
export function slowdownReasons(mask: number): string[] {
  // Bits above 2^31 do not survive `&` on a number; the ones read here are all low.
  return SLOWDOWN_THROTTLE_REASONS.filter(({ bit }) => (mask & bit) !== 0).map(({ reason }) => reason);
}

/** One node's newest sample: only the readings of that sample (a reading missing from it is absent, not an older value). */
export interface NodeTelemetry {
  node: string;
  group: string;
  intervalMs: number;
  /** Time of the node's newest sample. */
  sampleTimeMs: number;
  readings: Partial<Record<NodeMetric, number>>;
  gpus: Array<{ index: number; uuid?: string; readings: Partial<Record<GpuMetric, number>> }>;
}

type LatestPoint = SeriesInfo & { timeMs: number; value: number };

/**
 * Groups a store's newest points (TelemetryStore.latest) by node. A series whose last
 * point is older than the node's newest sample stopped being reported (nvidia-smi
 * now prints [N/A] for it, say): it is left out rather than shown as current.
 */
export function latestByNode(points: readonly LatestPoint[]): NodeTelemetry[] {
  const newest = new Map<string, number>();
  for (const point of points) newest.set(point.node, Math.max(newest.get(point.node) ?? -Infinity, point.timeMs));
  const nodes = new Map<string, NodeTelemetry>();
  for (const point of points) {
    const sampleTimeMs = newest.get(point.node)!;
    let node = nodes.get(point.node);
    if (!node) {
      node = { node: point.node, group: point.group, intervalMs: point.intervalMs, sampleTimeMs, readings: {}, gpus: [] };
      nodes.set(point.node, node);
    }
    if (point.timeMs === sampleTimeMs) node.group = point.group;
    // Samples of one batch share their time; an older point is from an earlier sample.
    if (sampleTimeMs - point.timeMs >= point.intervalMs) continue;
    if (point.scope === "node") {
      node.readings[point.metric] = point.value;
      continue;
    }
    let gpu = node.gpus.find((candidate) => candidate.index === point.gpu);
    if (!gpu) {
      gpu = { index: point.gpu, ...(point.uuid === undefined ? {} : { uuid: point.uuid }), readings: {} };
      node.gpus.push(gpu);
    }
    gpu.readings[point.metric] = point.value;
  }
  for (const node of nodes.values()) node.gpus.sort((a, b) => a.index - b.index);
  return [...nodes.values()].sort((a, b) => a.node.localeCompare(b.node));
}

/** What the straggler rule reads of a job (a JobRecord has these). */
export interface JobMetricsView {
  jobId: string;
  state: string;
  latestMetrics: Record<number, { step: number; values: Record<string, number> }>;
  assignments: ReadonlyArray<{ nodeName: string; group: string; globalRankOffset: number; localWorldSize: number }>;
}

export type AlertKind = "gpu-temperature" | "gpu-throttle" | "gpu-ecc" | "gpu-xid" | "node-silent" | "straggler" | "escrow-low";

export interface Alert {
  /** Stable while the condition holds (the head logs a raise and a clear per key). */
  key: string;
  kind: AlertKind;
  /** The node it concerns; for a lease's escrow, the lease's group. */
  node: string;
  message: string;
}

/** The rank's node and group, from the assignment whose ranks contain it. */
export function rankPlacement(job: JobMetricsView, rank: number): { nodeName: string; group: string } | undefined {
  return job.assignments.find((assignment) => rank >= assignment.globalRankOffset && rank < assignment.globalRankOffset + assignment.localWorldSize);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/**
 * Every alert that holds at `nowMs`: hot or slowed-down GPUs and silent nodes from the
 * telemetry, stragglers from the running jobs' per-rank images_per_s, and leases whose
 * escrow runs out soon from the newest cost report (its time left less the time since).
 */
export function evaluateAlerts(input: { nodes: readonly NodeTelemetry[]; jobs: readonly JobMetricsView[]; nowMs: number; thresholds: AlertThresholds; cost?: Pick<CostReport, "computedAtMs" | "leases"> }): Alert[] {
  const { thresholds } = input;
  const alerts: Alert[] = [];
  for (const node of input.nodes) {
    const silentMs = input.nowMs - node.sampleTimeMs;
    if (silentMs > thresholds.silentIntervals * node.intervalMs) {
      alerts.push({
        key: `node-silent:${node.node}`,
        kind: "node-silent",
        node: node.node,
        message: `${node.node} not heard from for ${Math.round(silentMs / 1000)}s (telemetry every ${formatSeconds(node.intervalMs)}, alert after ${thresholds.silentIntervals} intervals)`,
      });
      // A silent node's readings are old: a temperature from minutes ago is no alarm now.
      continue;
    }
    for (const gpu of node.gpus) {
      const temperature = gpu.readings.temperatureCelsius;
      if (temperature !== undefined && temperature > thresholds.gpuTemperatureCelsius) {
        alerts.push({ key: `gpu-temperature:${node.node}:${gpu.index}`, kind: "gpu-temperature", node: node.node, message: `${node.node} GPU ${gpu.index} at ${temperature} C (threshold ${thresholds.gpuTemperatureCelsius} C)` });
      }
      const mask = gpu.readings.throttleReasons;
      const reasons = mask === undefined ? [] : slowdownReasons(mask);
      if (reasons.length > 0) {
        alerts.push({ key: `gpu-throttle:${node.node}:${gpu.index}`, kind: "gpu-throttle", node: node.node, message: `${node.node} GPU ${gpu.index} throttled: ${reasons.join(", ")} (clocks_throttle_reasons 0x${mask!.toString(16)})` });
      }
      // The volatile count starts at 0 when the driver loads: any uncorrected error since
      // is a fault (the kernel that hit it likely crashed or computed garbage), and it
      // holds until the driver reloads or the node is replaced. Corrected errors are
      // expected in small numbers and are only exported.
      const uncorrected = gpu.readings.eccErrorsUncorrected;
      if (uncorrected !== undefined && uncorrected > 0) {
        alerts.push({ key: `gpu-ecc:${node.node}:${gpu.index}`, kind: "gpu-ecc", node: node.node, message: `${node.node} GPU ${gpu.index} has ${uncorrected} uncorrected ECC error${uncorrected === 1 ? "" : "s"} since its driver loaded: its memory is failing` });
      }
      // Any Xid in the kernel log: some are the job's own fault (13, 31: a bad kernel or
      // address), most are the GPU's or the driver's; either way the run should know.
      const xids = gpu.readings.xidErrors;
      if (xids !== undefined && xids > 0) {
        const last = gpu.readings.lastXid;
        alerts.push({ key: `gpu-xid:${node.node}:${gpu.index}`, kind: "gpu-xid", node: node.node, message: `${node.node} GPU ${gpu.index} has ${xids} Xid error${xids === 1 ? "" : "s"} in the kernel log${last === undefined ? "" : ` (newest: Xid ${last})`}` });
      }
    }
  }
  for (const job of input.jobs) {
    if (job.state !== "running") continue;
    const byGroup = new Map<string, Array<{ rank: number; nodeName: string; imagesPerS: number }>>();
    for (const [rankText, metric] of Object.entries(job.latestMetrics)) {
      const imagesPerS = metric.values.images_per_s;
      const placement = rankPlacement(job, Number(rankText));
      if (imagesPerS === undefined || !Number.isFinite(imagesPerS) || !placement) continue;
      const ranks = byGroup.get(placement.group) ?? [];
      ranks.push({ rank: Number(rankText), nodeName: placement.nodeName, imagesPerS });
      byGroup.set(placement.group, ranks);
    }
    for (const [group, ranks] of byGroup) {
      // One rank has no peers to be slower than.
      if (ranks.length < 2) continue;
      const groupMedian = median(ranks.map((rank) => rank.imagesPerS));
      for (const rank of ranks) {
        if (rank.imagesPerS >= thresholds.stragglerRatio * groupMedian) continue;
        alerts.push({
          key: `straggler:${job.jobId}:${rank.rank}`,
          kind: "straggler",
          node: rank.nodeName,
          message: `${job.jobId} rank ${rank.rank} on ${rank.nodeName} is a straggler: ${formatRate(rank.imagesPerS)} img/s, below ${thresholds.stragglerRatio} x group ${group}'s median ${formatRate(groupMedian)} img/s`,
        });
      }
    }
  }
  alerts.push(...escrowAlerts(input.cost, input.nowMs, thresholds.escrowMinutes));
  return alerts;
}

/**
 * Leases whose deployment's escrow runs out within `thresholdMinutes`. The head's escrow
 * keeper tops an escrow up before it gets this low whenever the wallet can pay, so one
 * that stays low means the wallet cannot (or the keeper is off): the message says so.
 */
function escrowAlerts(cost: Pick<CostReport, "computedAtMs" | "leases"> | undefined, nowMs: number, thresholdMinutes: number): Alert[] {
  if (cost === undefined) return [];
  const sinceReportMinutes = Math.max(0, nowMs - cost.computedAtMs) / 60_000;
  const alerts: Alert[] = [];
  for (const lease of cost.leases) {
    if (lease.escrowMinutesLeft === undefined) continue;
    const minutesLeft = Math.max(0, lease.escrowMinutesLeft - sinceReportMinutes);
    if (minutesLeft >= thresholdMinutes) continue;
    alerts.push({
      key: `escrow-low:${lease.dseq}`,
      kind: "escrow-low",
      node: lease.group,
      message: `lease ${lease.group} dseq ${lease.dseq} (${lease.provider}): its escrow runs out in about ${minutesLeft.toFixed(1)} min (${lease.escrowLeft ?? "?"} ${lease.denom} left at ${lease.burnPerHour.split(".")[0]} ${lease.denom}/h; threshold ${thresholdMinutes} min). The head tops escrows up when the wallet can pay, so the wallet is likely empty: fund it, or the chain closes the deployment when the escrow runs dry`,
    });
  }
  return alerts;
}

/**
 * How many times a sample raised one of a GPU's error counts (`countOf`: uncorrected ECC
 * errors, Xid lines) over the one before it (`previous`, by GPU index; updated in place).
 * With `firstSeenIsRise`, a GPU first seen with errors counts as one rise (the ECC count
 * was 0 when the driver loaded); without, the first count is only the base (the kernel
 * log holds Xids from before the agent, even from an earlier tenant's job). A count that
 * fell (driver reload, kernel log rotated) is taken as the new base, not as a rise.
 */
export function errorCountRises<Gpu extends { index: number }>(previous: Map<number, number>, gpus: readonly Gpu[], countOf: (gpu: Gpu) => number | undefined, firstSeenIsRise: boolean): Array<{ gpu: number; from: number; to: number }> {
  const rises: Array<{ gpu: number; from: number; to: number }> = [];
  for (const gpu of gpus) {
    const count = countOf(gpu);
    if (count === undefined) continue;
    const before = previous.get(gpu.index) ?? (firstSeenIsRise ? 0 : count);
    if (count > before) rises.push({ gpu: gpu.index, from: before, to: count });
    previous.set(gpu.index, count);
  }
  return rises;
}

/** What changed between two evaluations: alerts that now hold and did not, and ones that no longer hold. */
export function alertTransitions(previous: ReadonlyMap<string, Alert>, current: readonly Alert[]): { raised: Alert[]; cleared: Alert[] } {
  const now = new Map(current.map((alert) => [alert.key, alert]));
  return {
    raised: current.filter((alert) => !previous.has(alert.key)),
    cleared: [...previous.values()].filter((alert) => !now.has(alert.key)),
  };
}

function formatSeconds(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${(ms / 1000).toFixed(1)}s`;
}

function formatRate(value: number): string {
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}
