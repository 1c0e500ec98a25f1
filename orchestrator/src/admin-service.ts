import * as grpc from "@grpc/grpc-js";
import {
  JOB_RECORD_MAX_JSON_BYTES, PROTOCOL_VERSION, STATUS_MAX_JOBS, STATUS_NODE_TELEMETRY_MAX_BYTES,
  type IJobEvent, type IMetricReport, type IStatusResponse, type IWatchJobRequest,
} from "@drover/proto";
import type { CostReport } from "./cost/run-cost.js";
import { isFinal, type JobController, type JobLogLine, type JobRecord } from "./job-controller.js";
import type { Logger } from "./logger.js";
import type { Alert, NodeTelemetry } from "./telemetry/telemetry-alerts.js";
import type { WorkerRegistry } from "./worker-registry.js";

/** What only the head itself knows, for Admin.Status and Admin.WatchJob. */
export interface HeadLiveView {
  state(): string;
  /** The newest telemetry of each node that sent any. */
  nodeTelemetry(): NodeTelemetry[];
  /** Evaluated now, as the head's own alert check does. */
  alerts(): Alert[];
  cost(): CostReport | undefined;
  diskFull(): { message: string; atMs: number } | undefined;
  /**
   * Resolves once every output line and metric the head was handed so far is written to
   * the state directory: a watch ends only then, so the CLI's loss curve (read from
   * metrics.ndjson) is complete when it reads it.
   */
  outputWritten(): Promise<void>;
}

/**
 * Output lines the head keeps per job for a watch that asks for the output so far
 * (`drover submit` attaches after its job was admitted, which already said things).
 * Bounded: the newest lines of the newest jobs; output.log in the state directory has
 * every line.
 */
const BACKLOG_MAX_LINES = 2_000;
/** Characters of one job's kept lines (a line may be up to LOG_LINE_MAX_CHARS). */
const BACKLOG_MAX_CHARS = 1024 * 1024;
const BACKLOG_MAX_JOBS = 4;
/**
 * Events a watch may have queued for a client that reads too slowly before the head ends
 * it (RESOURCE_EXHAUSTED): a stuck CLI must not grow the head's memory without bound.
 */
const WATCH_MAX_QUEUED_EVENTS = 20_000;
/** How long a finished job's watch waits for its output to reach the disk before it ends anyway. */
const OUTPUT_WRITTEN_WAIT_MS = 5_000;

interface OutputBacklog {
  lines: JobLogLine[];
  chars: number;
  /** Every line of the job since its first is here (none was dropped, none came before this head). */
  complete: boolean;
}

/** The job record as WatchJob and Status send it: JSON of at most JOB_RECORD_MAX_JSON_BYTES. */
export function jobRecordJson(job: JobRecord): string {
  const full = JSON.stringify(job);
  if (Buffer.byteLength(full) <= JOB_RECORD_MAX_JSON_BYTES) return full;
  // Per-rank and per-step detail is what grows with a job's size and age; the summary
  // (state, attempts, failure, rank 0's metrics, committed steps) is what the CLI shows.
  const rank0 = job.latestMetrics[0];
  const trimmed = {
    ...job,
    assignments: [],
    exitCodes: {},
    latestMetrics: rank0 ? { 0: rank0 } : {},
    checkpointsReported: {},
    checkpointsCommitted: job.checkpointsCommitted.slice(-100),
    checkpointsLost: {},
    restarts: job.restarts.slice(-20).map((restart) => ({ ...restart, reason: restart.reason.slice(0, 2_000) })),
    ...(job.failure ? { failure: { ...job.failure, reason: job.failure.reason.slice(0, 4_000), lastLines: [] } } : {}),
    request: { ...job.request, env: {} },
    trimmed: true,
  };
  const text = JSON.stringify(trimmed);
  if (Buffer.byteLength(text) <= JOB_RECORD_MAX_JSON_BYTES) return text;
  return JSON.stringify({ ...trimmed, restarts: [], request: { command: job.request.command.slice(0, 1).map((word) => word.slice(0, 1_000)) } });
}

interface Watch {
  jobId: string;
  call: grpc.ServerWritableStream<IWatchJobRequest, IJobEvent>;
  /** What the last snapshot sent said: another one goes out when any of it changes. */
  lastSent: string;
}

/**
 * Admin.Status and Admin.WatchJob: the head's live view, read from memory. Watches follow
 * the job controller's events; each ends after its job's final record, when the client
 * cancels, or when the head shuts down (close()).
 */
export class AdminViews {
  private readonly watches = new Set<Watch>();
  /** Watches of final jobs waiting for their output to reach the disk. */
  private readonly finishing = new Set<Watch>();
  private readonly backlogs = new Map<string, OutputBacklog>();
  private readonly jobsSeen = new Set<string>();
  private readonly createdAtMs = Date.now();
  private closed = false;

  constructor(private readonly deps: { registry: WorkerRegistry; jobs: JobController; live?: HeadLiveView; logger: Logger }) {
    deps.jobs.on("log", this.onLog);
    deps.jobs.on("metric", this.onMetric);
    deps.jobs.on("changed", this.onChanged);
  }

  /** Watches being served now. */
  get watchCount(): number {
    return this.watches.size + this.finishing.size;
  }

  status(): IStatusResponse {
    const { registry, jobs, live } = this.deps;
    const telemetry = new Map((live?.nodeTelemetry() ?? []).map((node) => [node.node, node]));
    const cost = live?.cost();
    const diskFull = live?.diskFull();
    return {
      protocolVersion: PROTOCOL_VERSION,
      headState: live?.state() ?? "",
      timeMs: Date.now(),
      // Field by field: the registry's record also holds the node's session credential.
      nodes: registry.all().map((worker) => {
        const nodeTelemetry = telemetry.get(worker.nodeName);
        const telemetryJson = nodeTelemetry ? JSON.stringify(nodeTelemetry) : "";
        return {
          workerId: worker.workerId,
          nodeName: worker.nodeName,
          group: worker.group,
          connection: worker.connection,
          slots: worker.slots,
          resources: worker.resources,
          registeredAtMs: worker.registeredAtMs,
          lastSeenMs: worker.lastSeenMs,
          agentVersion: worker.agentVersion,
          telemetryJson: Buffer.byteLength(telemetryJson) <= STATUS_NODE_TELEMETRY_MAX_BYTES ? telemetryJson : "",
        };
      }),
      jobsJson: jobs.all().slice(-STATUS_MAX_JOBS).map(jobRecordJson),
      alerts: (live?.alerts() ?? []).map((alert) => ({ key: alert.key, kind: alert.kind, node: alert.node, message: alert.message })),
      costJson: cost ? JSON.stringify(cost) : "",
      diskFullMessage: diskFull?.message ?? "",
      diskFullAtMs: diskFull?.atMs ?? 0,
    };
  }

  /** Serves one WatchJob call (its admin token already checked). */
  watch(call: grpc.ServerWritableStream<IWatchJobRequest, IJobEvent>): void {
    const { jobs } = this.deps;
    const requested = call.request.jobId ?? "";
    const job = requested ? jobs.get(requested) : jobs.activeJobs().at(-1) ?? jobs.all().at(-1);
    if (!job || this.closed) {
      call.emit("error", {
        code: job ? grpc.status.UNAVAILABLE : grpc.status.NOT_FOUND,
        details: job ? "the head is shutting down" : requested ? `no job ${requested} on this head` : "no job has run on this head",
      });
      return;
    }
    const watch: Watch = { jobId: job.jobId, call, lastSent: "" };
    const backlog = this.backlogs.get(job.jobId);
    const withOutput = call.request.withOutputSoFar === true;
    this.sendSnapshot(watch, job, withOutput ? { outputSoFarComplete: backlog?.complete ?? false } : {});
    if (withOutput) for (const line of backlog?.lines ?? []) this.send(watch, { output: { rank: line.rank, stream: line.stream, line: line.line } });
    if (isFinal(job.state)) {
      void this.finish(watch);
      return;
    }
    this.watches.add(watch);
    const drop = () => this.watches.delete(watch);
    call.on("cancelled", drop);
    call.on("error", drop);
  }

  /** Ends every watch (UNAVAILABLE: the head is shutting down) and stops following the jobs. */
  close(): void {
    this.closed = true;
    this.deps.jobs.off("log", this.onLog);
    this.deps.jobs.off("metric", this.onMetric);
    this.deps.jobs.off("changed", this.onChanged);
    for (const watch of this.watches) watch.call.emit("error", { code: grpc.status.UNAVAILABLE, details: "the head is shutting down" });
    this.watches.clear();
    // Their final record is sent: they end now rather than hold the server's shutdown.
    for (const watch of this.finishing) if (!watch.call.cancelled) watch.call.end();
    this.finishing.clear();
  }

  /** A job created after this head started: every line of it passed through here. */
  private seenFromStart(job: JobRecord): boolean {
    return job.createdAtMs >= this.createdAtMs;
  }

  private readonly onLog = (line: JobLogLine) => {
    const backlog = this.backlogs.get(line.jobId);
    if (backlog) {
      backlog.lines.push(line);
      backlog.chars += line.line.length;
      while (backlog.lines.length > BACKLOG_MAX_LINES || backlog.chars > BACKLOG_MAX_CHARS) {
        backlog.chars -= backlog.lines.shift()!.line.length;
        backlog.complete = false;
      }
    }
    for (const watch of this.watches) {
      if (watch.jobId === line.jobId) this.send(watch, { output: { rank: line.rank, stream: line.stream, line: line.line } });
    }
  };

  /**
   * A job's backlog starts with the first event of it this head sees (a submitted job's
   * comes before any of its lines). One dropped for a newer job is never started again:
   * a watch of that job is told its output so far is not complete.
   */
  private startBacklog(job: JobRecord): void {
    if (this.jobsSeen.has(job.jobId)) return;
    this.jobsSeen.add(job.jobId);
    this.backlogs.set(job.jobId, { lines: [], chars: 0, complete: this.seenFromStart(job) });
    // Map order is insertion order: the oldest job's lines go first.
    while (this.backlogs.size > BACKLOG_MAX_JOBS) this.backlogs.delete(this.backlogs.keys().next().value!);
  }

  private readonly onMetric = (job: JobRecord, metric: IMetricReport) => {
    for (const watch of this.watches) {
      if (watch.jobId === job.jobId) this.send(watch, { metric: { jobId: job.jobId, rank: metric.rank ?? 0, step: metric.step ?? 0, values: metric.values ?? {}, timeMs: metric.timeMs ?? 0 } });
    }
  };

  private readonly onChanged = (job: JobRecord) => {
    this.startBacklog(job);
    for (const watch of this.watches) {
      if (watch.jobId !== job.jobId) continue;
      this.sendSnapshot(watch, job);
      if (isFinal(job.state)) {
        this.watches.delete(watch);
        void this.finish(watch);
      }
    }
  };

  /** A snapshot when what the CLI shows of the job changed (its state, attempt, newest committed step, stall); not per metric. */
  private sendSnapshot(watch: Watch, job: JobRecord, first: { outputSoFarComplete?: boolean } = {}): void {
    const shown = JSON.stringify([job.state, job.attempt, job.lastCommittedStep, job.stalled?.map((entry) => entry.rank), job.groupsRestarting]);
    if (shown === watch.lastSent && first.outputSoFarComplete === undefined) return;
    watch.lastSent = shown;
    this.send(watch, {
      job: { jobId: job.jobId, state: job.state, attempt: job.attempt, recordJson: jobRecordJson(job), final: isFinal(job.state), ...first },
    });
  }

  private send(watch: Watch, event: IJobEvent): void {
    if (watch.call.cancelled) return;
    // grpc-js queues what the client has not read yet (object mode: one entry per event).
    if (watch.call.writableLength > WATCH_MAX_QUEUED_EVENTS) {
      this.deps.logger.warn("job watch ended: the client reads too slowly", { jobId: watch.jobId });
      this.watches.delete(watch);
      watch.call.emit("error", { code: grpc.status.RESOURCE_EXHAUSTED, details: `the client fell ${WATCH_MAX_QUEUED_EVENTS} events behind; watch again` });
      return;
    }
    watch.call.write(event);
  }

  /** Ends a watch whose job is final, once its output is on disk (bounded wait). */
  private async finish(watch: Watch): Promise<void> {
    this.finishing.add(watch);
    const written = this.deps.live?.outputWritten() ?? Promise.resolve();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([written.catch(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, OUTPUT_WRITTEN_WAIT_MS)))]);
    clearTimeout(timer);
    if (!this.finishing.delete(watch)) return;
    if (!watch.call.cancelled) watch.call.end();
  }
}
