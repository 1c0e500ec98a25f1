import { createHash, timingSafeEqual } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { CostReport } from "../cost/run-cost.js";
import type { JobController, JobRecord } from "../job-controller.js";
import { stitchAttempts, type MetricPoint } from "../job-view.js";
import type { Logger } from "../logger.js";
import { readTailLines, type StateDirectory } from "../state-store.js";
import type { Alert } from "../telemetry/telemetry-alerts.js";
import type { TelemetryStore } from "../telemetry/telemetry-store.js";
import type { WorkerRegistry } from "../worker-registry.js";

/** Where the dashboard lives on the head's /metrics server. */
export const DASHBOARD_PATH = "/dashboard";
/** The cookie the page carries after it was opened once with `?token=`. */
const SESSION_COOKIE = "drover_dashboard";
/** The page's two static files: orchestrator/dashboard/, beside src/ and dist/ alike. */
const STATIC_DIR = new URL("../../dashboard/", import.meta.url);
const STATIC_FILES: Record<string, { file: string; contentType: string }> = {
  [DASHBOARD_PATH]: { file: "index.html", contentType: "text/html; charset=utf-8" },
  [`${DASHBOARD_PATH}/`]: { file: "index.html", contentType: "text/html; charset=utf-8" },
  [`${DASHBOARD_PATH}/dashboard.js`]: { file: "dashboard.js", contentType: "text/javascript; charset=utf-8" },
};
/** Lines of output.log the page shows; read from the file's end, never the whole file. */
const LOG_TAIL_LINES = 200;
const LOG_TAIL_BYTES = 64 * 1024;
/** Points per sparkline: enough for its width, however long the history. */
const SPARKLINE_POINTS = 120;
/** Bursts of events (every rank's metric every step) reach the page as one per kind this often. */
const EVENT_COALESCE_MS = 250;
/** A comment line that keeps idle streams open through proxies. */
const KEEPALIVE_MS = 15_000;

export type DashboardEventKind = "job" | "metric" | "log" | "workers" | "telemetry";

export interface DashboardOptions {
  adminToken: string;
  stateDir: StateDirectory;
  workers: WorkerRegistry;
  jobs: JobController;
  /** The telemetry history (the store is replaced when the head loads its file). */
  telemetry: () => TelemetryStore;
  cost: () => CostReport | undefined;
  /** The head's current alerts (hot or throttling GPUs, silent nodes, stragglers). */
  alerts?: () => Alert[];
  logger: Logger;
  now?: () => number;
}

/**
 * The head's web dashboard: one static page and its JSON, behind the admin token, and an
 * SSE stream that tells open pages what changed (they fetch the new figures themselves,
 * so an event is a few bytes however large the job).
 */
export class DashboardServer {
  private readonly streams = new Set<ServerResponse>();
  private readonly pending = new Set<DashboardEventKind>();
  private flushTimer: NodeJS.Timeout | undefined;
  private keepAliveTimer: NodeJS.Timeout | undefined;
  private readonly tokenDigest: Buffer;
  private closed = false;

  private constructor(private readonly options: DashboardOptions) {
    this.tokenDigest = digest(options.adminToken);
  }

  static create(options: DashboardOptions): DashboardServer {
    return new DashboardServer(options);
  }

  /** Tells the open pages that something of `kind` changed (coalesced). */
  notify(kind: DashboardEventKind): void {
    if (this.closed || this.streams.size === 0) return;
    this.pending.add(kind);
    this.flushTimer ??= setTimeout(() => this.flush(), EVENT_COALESCE_MS);
  }

  private flush(): void {
    this.flushTimer = undefined;
    const kinds = [...this.pending];
    this.pending.clear();
    for (const kind of kinds) for (const stream of this.streams) stream.write(`event: ${kind}\ndata: {}\n\n`);
  }

  /** Ends every open stream; later requests are refused. */
  shutdown(): void {
    this.closed = true;
    clearTimeout(this.flushTimer);
    clearInterval(this.keepAliveTimer);
    for (const stream of this.streams) stream.end();
    this.streams.clear();
  }

  /** The request handler mounted at DASHBOARD_PATH. */
  readonly handle = (request: IncomingMessage, response: ServerResponse): void => {
    this.route(request, response).catch((error: Error) => {
      this.options.logger.warn("dashboard request failed", { path: pathOf(request), error: error.message });
      if (!response.headersSent) response.writeHead(500, { "content-type": "text/plain; charset=utf-8" });
      response.end("internal error\n");
    });
  };

  private async route(request: IncomingMessage, response: ServerResponse): Promise<void> {
    if (request.method !== "GET" && request.method !== "HEAD") {
      response.writeHead(405, { allow: "GET, HEAD", "content-type": "text/plain; charset=utf-8" }).end("method not allowed\n");
      return;
    }
    const url = new URL(request.url ?? "/", "http://dashboard");
    const queryToken = url.searchParams.get("token");
    if (queryToken !== null && this.tokenMatches(queryToken)) {
      // The token leaves the address bar (and history) at once; the cookie carries it on.
      url.searchParams.delete("token");
      response.writeHead(303, {
        location: url.pathname + url.search,
        "set-cookie": `${SESSION_COOKIE}=${this.options.adminToken}; HttpOnly; SameSite=Strict; Path=${DASHBOARD_PATH}`,
        "cache-control": "no-store",
      }).end();
      return;
    }
    if (!this.tokenMatches(cookieValue(request.headers.cookie, SESSION_COOKIE))) {
      response.writeHead(401, { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" })
        .end("unauthorized: open the address `drover dashboard` prints (it carries the admin token)\n");
      return;
    }
    const path = url.pathname;
    const staticFile = STATIC_FILES[path];
    if (staticFile) {
      const body = await readFile(new URL(staticFile.file, STATIC_DIR));
      response.writeHead(200, { "content-type": staticFile.contentType, "cache-control": "no-store", "x-content-type-options": "nosniff" });
      response.end(request.method === "HEAD" ? undefined : body);
      return;
    }
    if (path === `${DASHBOARD_PATH}/events`) return this.openStream(request, response);
    const api: Record<string, () => Promise<unknown>> = {
      [`${DASHBOARD_PATH}/api/cluster`]: async () => this.clusterView(),
      [`${DASHBOARD_PATH}/api/job`]: () => this.jobView(),
      [`${DASHBOARD_PATH}/api/logs`]: () => this.logsView(),
    };
    const view = api[path];
    if (!view) {
      response.writeHead(404, { "content-type": "text/plain; charset=utf-8" }).end("not found\n");
      return;
    }
    const body = JSON.stringify(await view());
    response.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
    response.end(request.method === "HEAD" ? undefined : body);
  }

  private tokenMatches(candidate: string | undefined): boolean {
    // Equal-length digests: the comparison takes the same time whatever was sent.
    return candidate !== undefined && candidate !== "" && timingSafeEqual(digest(candidate), this.tokenDigest);
  }

  private openStream(request: IncomingMessage, response: ServerResponse): void {
    if (this.closed) {
      response.writeHead(503).end();
      return;
    }
    response.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive" });
    response.write("retry: 2000\n\nevent: hello\ndata: {}\n\n");
    this.streams.add(response);
    response.on("close", () => this.streams.delete(response));
    this.keepAliveTimer ??= setInterval(() => {
      for (const stream of this.streams) stream.write(": keep-alive\n\n");
    }, KEEPALIVE_MS).unref();
  }

  /** Groups, their nodes' connection and GPUs (latest value and a short history), and the cost report. */
  clusterView(): unknown {
    const series = this.options.telemetry().query();
    const groups = new Map<string, Array<Record<string, unknown>>>();
    for (const worker of this.options.workers.all()) {
      const gpus = new Map<number, { index: number; utilization: Array<[number, number]>; temperature: Array<[number, number]>; memoryUsedBytes?: number; memoryTotalBytes?: number }>();
      const node: Record<string, number> = {};
      for (const entry of series) {
        if (entry.node !== worker.nodeName) continue;
        if (entry.scope === "node") {
          node[entry.metric] = entry.points[entry.points.length - 1]![1];
          continue;
        }
        const gpu = gpus.get(entry.gpu) ?? { index: entry.gpu, utilization: [], temperature: [] };
        if (entry.metric === "utilizationRatio") gpu.utilization = downsample(entry.points);
        else if (entry.metric === "temperatureCelsius") gpu.temperature = downsample(entry.points);
        else if (entry.metric === "memoryUsedBytes" || entry.metric === "memoryTotalBytes") gpu[entry.metric] = entry.points[entry.points.length - 1]![1];
        gpus.set(entry.gpu, gpu);
      }
      const members = groups.get(worker.group) ?? [];
      members.push({
        name: worker.nodeName,
        connection: worker.connection,
        lastSeenMs: worker.lastSeenMs,
        slots: worker.slots,
        cpuUtilization: node.cpuUtilizationRatio,
        memoryUsedBytes: node.memoryUsedBytes,
        memoryTotalBytes: node.memoryTotalBytes,
        gpus: [...gpus.values()].sort((a, b) => a.index - b.index),
      });
      groups.set(worker.group, members);
    }
    return {
      nowMs: this.options.now?.() ?? Date.now(),
      groups: [...groups].map(([name, nodes]) => ({ name, nodes: nodes.sort((a, b) => String(a.name).localeCompare(String(b.name))) })),
      cost: this.options.cost() ?? null,
      alerts: (this.options.alerts?.() ?? []).map(({ kind, node, message }) => ({ kind, node, message })),
    };
  }

  /**
   * The running job, else the newest: its record, rank 0's loss and MFU curves across
   * attempts, its outer steps (a job over several groups, DiLoCo), restarts and checkpoints.
   */
  async jobView(): Promise<unknown> {
    const job = currentJob(this.options.jobs.all());
    if (!job) return { job: null };
    const points = await this.rankZeroPoints(job.jobId);
    const curve = stitchAttempts(points, job.restarts);
    const rank0 = job.latestMetrics[0];
    // Rank 0 reports an outer step on its own line (examples/at1: outer_step, outer_seconds),
    // which replaces its latest metrics: the newest of each value comes from the curve.
    const newest = (name: string) => curve.findLast((point) => typeof point[name] === "number")?.[name];
    const outerSteps = curve.filter((point) => typeof point.outer_step === "number")
      .map((point) => ({ step: point.step, attempt: point.attempt, outerStep: point.outer_step!, ...(typeof point.outer_seconds === "number" ? { seconds: point.outer_seconds } : {}) }));
    return {
      job: {
        jobId: job.jobId,
        runId: job.runId,
        state: job.state,
        attempt: job.attempt,
        worldSize: job.worldSize,
        nodes: job.assignments.map((assignment) => assignment.nodeName),
        startedAtMs: job.startedAtMs,
        endedAtMs: job.endedAtMs,
        failure: job.failure?.reason,
        latestStep: rank0?.step,
        imagesPerSecond: rank0?.values.images_per_s ?? newest("images_per_s"),
        /** Model FLOPs utilization, 0..1, as the trainer reports it (examples/at1: with --peak-flops or a GPU it knows). */
        mfu: rank0?.values.mfu ?? newest("mfu"),
        lastOuterStep: outerSteps.at(-1)?.outerStep,
        lastCommittedStep: job.lastCommittedStep,
      },
      /** The job's groups: outer steps sync them. */
      groups: [...new Set(job.assignments.map((assignment) => assignment.group))].sort(),
      loss: curve.filter((point) => typeof point.loss === "number").map((point) => ({ step: point.step, attempt: point.attempt, loss: point.loss })),
      mfu: curve.filter((point) => typeof point.mfu === "number").map((point) => ({ step: point.step, attempt: point.attempt, mfu: point.mfu })),
      outerSteps,
      restarts: job.restarts.map((restart) => ({ attempt: restart.attempt, reason: restart.reason, lastStep: restart.lastStep, resumeStep: restart.resumeStep ?? 0, group: restart.group })),
      checkpoints: committedSteps(job),
    };
  }

  private async rankZeroPoints(jobId: string): Promise<MetricPoint[]> {
    const text = await readFile(this.options.stateDir.path(`jobs/${jobId}/metrics.ndjson`), "utf8").catch(() => "");
    const points: MetricPoint[] = [];
    for (const line of text.split("\n")) {
      if (line.trim() === "") continue;
      try {
        const parsed = JSON.parse(line) as MetricPoint & { rank?: number };
        if (parsed.rank === 0) points.push(parsed);
      } catch {
        // A line cut short by a crash mid-append: the rest of the curve still shows.
      }
    }
    return points;
  }

  /** The last lines of the current job's output.log. */
  async logsView(): Promise<unknown> {
    const job = currentJob(this.options.jobs.all());
    if (!job) return { jobId: null, lines: [] };
    return { jobId: job.jobId, lines: (await readTailLines(this.options.stateDir.path(`jobs/${job.jobId}/output.log`), LOG_TAIL_BYTES)).slice(-LOG_TAIL_LINES) };
  }
}

function digest(value: string): Buffer {
  return createHash("sha256").update(value).digest();
}

function pathOf(request: IncomingMessage): string {
  // Never the query: it may carry the token.
  return (request.url ?? "/").split("?")[0] ?? "/";
}

function cookieValue(header: string | undefined, name: string): string | undefined {
  for (const part of (header ?? "").split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return rest.join("=");
  }
  return undefined;
}

/** Every `step`-th point so a sparkline stays cheap; the newest point always kept. */
function downsample(points: Array<[number, number]>): Array<[number, number]> {
  if (points.length <= SPARKLINE_POINTS) return points;
  const step = points.length / SPARKLINE_POINTS;
  const out: Array<[number, number]> = [];
  for (let index = 0; index < SPARKLINE_POINTS - 1; index++) out.push(points[Math.floor(index * step)]!);
  out.push(points[points.length - 1]!);
  return out;
}

function currentJob(jobs: JobRecord[]): JobRecord | undefined {
  const running = jobs.filter((job) => !["succeeded", "failed", "stopped"].includes(job.state));
  const candidates = running.length > 0 ? running : jobs;
  return candidates.reduce<JobRecord | undefined>((newest, job) => (!newest || job.createdAtMs >= newest.createdAtMs ? job : newest), undefined);
}

/** Committed steps of every attempt: the current attempt's, the ones earlier attempts resumed from, the newest. */
function committedSteps(job: JobRecord): number[] {
  const steps = new Set<number>(job.checkpointsCommitted);
  for (const restart of job.restarts) if (restart.resumeStep !== undefined) steps.add(restart.resumeStep);
  if (job.lastCommittedStep !== undefined) steps.add(job.lastCommittedStep);
  return [...steps].sort((a, b) => a - b);
}
