import type { JobRecord, JobRestart } from "./job-controller.js";

/** A job output line as output.log holds it: `[rank N] text`, or `[drover] text` for the head's and agents' own lines. */
export function outputLine(line: { rank: number; line: string }): string {
  return `${line.rank < 0 ? "[drover]" : `[rank ${line.rank}]`} ${line.line}`;
}

/** One line of rank 0's metrics, e.g. `step 12 loss 0.4312 lr 3.0e-04`. */
export function formatMetrics(step: number, values: Record<string, number>): string {
  const parts = Object.entries(values).map(([name, value]) => `${name} ${formatNumber(value)}`);
  return `step ${step} ${parts.join(" ")}`.trim();
}

function formatNumber(value: number): string {
  if (Number.isInteger(value)) return String(value);
  const magnitude = Math.abs(value);
  return magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5) ? value.toExponential(2) : value.toFixed(4);
}

/** The closing summary of a job, for `drover submit`, `drover demo` and `drover status`. */
export function summarizeJob(job: JobRecord): string[] {
  const seconds = job.startedAtMs && job.endedAtMs ? ((job.endedAtMs - job.startedAtMs) / 1000).toFixed(1) : "?";
  const lines = [
    `job ${job.jobId} (run ${job.runId}): ${job.state.toUpperCase()} after ${seconds}s`,
    `  world: ${job.worldSize} ranks on ${job.assignments.length} nodes (${job.assignments.map((a) => `${a.nodeName} x${a.localWorldSize}`).join(", ")})`,
  ];
  const codes = Object.entries(job.exitCodes).map(([rank, code]) => `${rank}:${code}`).join(" ");
  if (codes) lines.push(`  exit codes by rank: ${codes}`);
  for (const restart of job.restarts ?? []) lines.push(`  ${describeRestart(restart)}`);
  if (job.lastCommittedStep !== undefined) lines.push(`  newest committed checkpoint: step ${job.lastCommittedStep}`);
  for (const [step, reason] of Object.entries(job.checkpointsLost ?? {})) lines.push(`  checkpoint step ${step} NOT stored: ${reason}`);
  const rank0 = job.latestMetrics[0];
  if (rank0) lines.push(`  last metrics (rank 0): ${formatMetrics(rank0.step, rank0.values)}`);
  if (job.failure) {
    lines.push(`  failure: ${job.failure.reason}`);
    if (job.failure.lastLines.length > 0) {
      lines.push(`  last lines of rank ${job.failure.rank ?? "?"}:`);
      for (const line of job.failure.lastLines) lines.push(`    | ${line}`);
    }
  }
  return lines;
}

export function describeRestart(restart: JobRestart): string {
  const at = restart.lastStep === undefined ? "" : ` at step ${restart.lastStep}`;
  if (restart.group !== undefined) {
    return `group ${restart.group} restarted alone${at} (${restart.reason}); the other groups trained on`;
  }
  const from = restart.resumeStep === undefined ? "from scratch" : `from checkpoint step ${restart.resumeStep}`;
  return `restart ${restart.attempt}: attempt ${restart.attempt} ended${at} (${restart.reason}); attempt ${restart.attempt + 1} resumed ${from}`;
}

/** One rank-0 metrics line of jobs/<id>/metrics.ndjson. */
export interface MetricPoint {
  attempt: number;
  step: number;
  [name: string]: number;
}

/**
 * The job's metric curve as one run: an attempt's points count up to the step the next
 * attempt resumed from; what it computed after that checkpoint was thrown away and
 * recomputed, so showing both would duplicate steps.
 */
export function stitchAttempts(points: readonly MetricPoint[], restarts: readonly JobRestart[]): MetricPoint[] {
  const keptUpTo = new Map<number, number>();
  // A group restarted on its own ends no attempt: the other groups' ranks train on.
  for (const restart of restarts) if (restart.group === undefined) keptUpTo.set(restart.attempt, restart.resumeStep ?? 0);
  return points
    .filter((point) => point.step <= (keptUpTo.get(point.attempt) ?? Number.POSITIVE_INFINITY))
    .sort((a, b) => a.step - b.step || a.attempt - b.attempt);
}
