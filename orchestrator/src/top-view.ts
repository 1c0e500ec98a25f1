import type { Alert, JobMetricsView, NodeTelemetry } from "./telemetry/telemetry-alerts.js";
import { rankPlacement } from "./telemetry/telemetry-alerts.js";

// What `drover top` draws and `drover status` prints of the telemetry: pure functions
// from data to lines, so the layout is tested without a cluster or a terminal. No
// package imports: both commands load this without zod or gRPC.

/** A reading the node did not send in its newest sample (nvidia-smi's [N/A], no GPU, an old agent). */
export const MISSING = "n/a";

export interface TopNode {
  nodeName: string;
  group: string;
  /** As cluster.json records it (connected, disconnected, lost, ...). */
  connection: string;
  telemetry?: NodeTelemetry;
}

export interface TopJob extends JobMetricsView {
  runId: string;
  attempt: number;
  worldSize: number;
}

export interface TopFrame {
  clusterName: string;
  /** The head's state, or why there is none running. */
  headState: string;
  nowMs: number;
  /** When the head last saved telemetry.json; undefined when there is no file. */
  telemetrySavedAtMs?: number;
  /** Why telemetry.json could not be read, if it could not. */
  telemetryProblem?: string;
  nodes: readonly TopNode[];
  /** The running job, else the latest one. */
  job?: TopJob;
  alerts: readonly Alert[];
}

const GiB = 2 ** 30;

function percent(ratio: number | undefined): string {
  return ratio === undefined ? MISSING : `${Math.round(ratio * 100)}%`;
}

function gib(used: number | undefined, total: number | undefined): string {
  if (used === undefined) return total === undefined ? MISSING : `${MISSING}/${(total / GiB).toFixed(1)} GiB`;
  return total === undefined ? `${(used / GiB).toFixed(1)} GiB` : `${(used / GiB).toFixed(1)}/${(total / GiB).toFixed(1)} GiB`;
}

function celsius(value: number | undefined): string {
  return value === undefined ? MISSING : `${Math.round(value)} C`;
}

function watts(draw: number | undefined, limit: number | undefined): string {
  if (draw === undefined) return limit === undefined ? MISSING : `${MISSING}/${Math.round(limit)} W`;
  return limit === undefined ? `${Math.round(draw)} W` : `${Math.round(draw)}/${Math.round(limit)} W`;
}

function age(nowMs: number, thenMs: number): string {
  const seconds = Math.max(0, Math.round((nowMs - thenMs) / 1000));
  return seconds < 120 ? `${seconds}s` : `${Math.round(seconds / 60)}m`;
}

function optionalNumber(value: number | undefined, digits: number): string {
  return value === undefined || !Number.isFinite(value) ? MISSING : value.toFixed(digits);
}

/** Left-aligned columns, two spaces apart, trailing spaces trimmed. */
export function formatTable(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string[] {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => (row[column] ?? "").length)));
  const line = (cells: readonly string[]) => cells.map((cell, column) => cell.padEnd(widths[column]!)).join("  ").trimEnd();
  return [line(header), ...rows.map(line)];
}

/** `drover status`'s lines under a node: its newest sample, each GPU on its own line. */
export function nodeTelemetryLines(telemetry: NodeTelemetry | undefined, asOfMs: number): string[] {
  if (!telemetry) return ["telemetry: none received"];
  const { readings } = telemetry;
  const lines = [`telemetry ${age(asOfMs, telemetry.sampleTimeMs)} old: cpu ${percent(readings.cpuUtilizationRatio)}, mem ${gib(readings.memoryUsedBytes, readings.memoryTotalBytes)}, shm ${gib(readings.shmUsedBytes, readings.shmTotalBytes)}`];
  if (telemetry.gpus.length === 0) lines.push("no GPUs reported");
  for (const gpu of telemetry.gpus) {
    const r = gpu.readings;
    lines.push(`gpu ${gpu.index}: util ${percent(r.utilizationRatio)}, mem ${gib(r.memoryUsedBytes, r.memoryTotalBytes)}, temp ${celsius(r.temperatureCelsius)}, power ${watts(r.powerDrawWatts, r.powerLimitWatts)}`);
  }
  return lines;
}

/** One frame of `drover top`. */
export function renderTop(frame: TopFrame): string[] {
  const lines: string[] = [];
  const asOf = frame.telemetrySavedAtMs;
  const telemetryNote = frame.telemetryProblem
    ? `telemetry.json unreadable: ${frame.telemetryProblem}`
    : asOf === undefined ? "no telemetry saved yet" : `telemetry as saved ${age(frame.nowMs, asOf)} ago`;
  lines.push(`drover top: cluster ${frame.clusterName}, head ${frame.headState}, ${telemetryNote}, ${new Date(frame.nowMs).toISOString().slice(11, 19)} UTC`);
  lines.push("");

  // Sample ages are as of the save: between saves the file does not change.
  const sampleAge = (node: TopNode) => (node.telemetry && asOf !== undefined ? age(asOf, node.telemetry.sampleTimeMs) : MISSING);
  lines.push(...formatTable(
    ["NODE", "GROUP", "STATE", "SAMPLE AGE", "CPU", "MEM", "SHM"],
    frame.nodes.map((node) => {
      const r = node.telemetry?.readings ?? {};
      return [node.nodeName, node.group, node.connection, sampleAge(node), percent(r.cpuUtilizationRatio), gib(r.memoryUsedBytes, r.memoryTotalBytes), gib(r.shmUsedBytes, r.shmTotalBytes)];
    }),
  ));
  lines.push("");

  const gpuRows = frame.nodes.flatMap((node) => (node.telemetry?.gpus ?? []).map((gpu) => {
    const r = gpu.readings;
    return [node.nodeName, String(gpu.index), percent(r.utilizationRatio), gib(r.memoryUsedBytes, r.memoryTotalBytes), celsius(r.temperatureCelsius), watts(r.powerDrawWatts, r.powerLimitWatts)];
  }));
  if (gpuRows.length === 0) lines.push("GPUs: none reported");
  else lines.push(...formatTable(["NODE", "GPU", "UTIL", "MEM", "TEMP", "POWER"], gpuRows));
  lines.push("");

  const job = frame.job;
  if (!job) {
    lines.push("job: none");
  } else {
    lines.push(`job ${job.jobId} (run ${job.runId}) ${job.state}${job.attempt > 1 ? `, attempt ${job.attempt}` : ""}`);
    const ranks = new Set<number>(Object.keys(job.latestMetrics).map(Number));
    for (let rank = 0; rank < job.worldSize; rank += 1) ranks.add(rank);
    lines.push(...formatTable(["RANK", "NODE", "GROUP", "STEP", "LOSS", "IMG/S"], [...ranks].sort((a, b) => a - b).map((rank) => {
      const metric = job.latestMetrics[rank];
      const placement = rankPlacement(job, rank);
      return [String(rank), placement?.nodeName ?? MISSING, placement?.group ?? MISSING, metric ? String(metric.step) : MISSING, optionalNumber(metric?.values.loss, 4), optionalNumber(metric?.values.images_per_s, 1)];
    })));
  }
  lines.push("");

  if (frame.alerts.length === 0) lines.push("alerts: none");
  else for (const alert of frame.alerts) lines.push(`warning: ${alert.message}`);
  return lines;
}
