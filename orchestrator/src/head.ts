import { randomBytes, randomUUID } from "node:crypto";
import { EventEmitter } from "node:events";
import { mkdir, readFile } from "node:fs/promises";
import type { IBridgeTls, IMetricReport } from "@drover/proto";
import { CheckpointStore, parseStorageConfig, registerSecretValue, startLocalS3Server, type LocalS3Server, type StorageConfigInput } from "@drover/storage";
import { CheckpointCoordinator } from "./checkpoint-coordinator.js";
import { backendSection, expectedNodes, type ClusterSpec } from "./cluster-spec.js";
import { ControlServer } from "./control-server.js";
import { PresignService } from "./presign-service.js";
import { CostTracker } from "./cost/cost-tracker.js";
import { COST_FILE, type CostReport } from "./cost/run-cost.js";
import { DASHBOARD_PATH, DashboardServer } from "./dashboard/dashboard-server.js";
import { JobRequestError, StateError } from "./errors.js";
import { JoinTokenBook } from "./join-tokens.js";
import { JobController, isFinal, type JobLogLine, type JobRecord, type JobRequest } from "./job-controller.js";
import { outputLine } from "./job-view.js";
import type { Logger } from "./logger.js";
import { backendNamed, createProvisioner, type Provisioner } from "./provisioners/registry.js";
import { RepairLoop } from "./repair-loop.js";
import { processAlive, readTailLines, StateDirectory, type HeadRecord } from "./state-store.js";
import { HeadTelemetry } from "./telemetry/head-telemetry.js";
import { latestByNode } from "./telemetry/telemetry-alerts.js";
import { HeadAuthority } from "./tls/head-authority.js";
import { WorkerRegistry, type PersistedWorker } from "./worker-registry.js";

/**
 * How long a job's bridge certificates stay valid: longer than any run we expect (a run
 * that outlives it needs a new attempt), short enough that a leaked key of a finished
 * job soon opens nothing, even if its job id were reused.
 */
const BRIDGE_CERTIFICATE_VALIDITY_MS = 30 * 24 * 3600_000;

export type HeadState = "created" | "starting" | "provisioning" | "ready" | "stopping" | "stopped" | "failed";

interface HeadEvents {
  state: [HeadState];
  log: [JobLogLine];
  metric: [JobRecord, IMetricReport];
  job: [JobRecord];
  workers: [];
  /** A worker's Telemetry sample arrived (after the store kept it). */
  telemetry: [];
}

/** Where the head keeps its workers' registrations and session-credential digests, for a successor to take up (0600). */
const SESSIONS_FILE = "sessions.json";

/** What a head that died under its jobs (kill -9, a crash) left in the state directory. */
interface InterruptedHead {
  jobs: JobRecord[];
  cost?: CostReport;
  /** host:port its agents dial: a successor that binds it again finds them reconnecting. */
  controlAddress?: string;
  /** Its live workers and their credentials' digests (sessions.json). */
  workers: PersistedWorker[];
  /** The embedded store's endpoint (local mode), which its agents' presigned URLs name. */
  embeddedStoreEndpoint?: string;
}

/** How much of a job's output.log end a head taking the job up compares replayed output lines with. */
const OUTPUT_TAIL_BYTES = 256 * 1024;

/** What this head takes over from a dead one instead of reaping it (see adoptionPlan). */
interface Adoption {
  port: number;
  workers: PersistedWorker[];
  /** With the newest step per global rank its metrics file holds (lastMetricSteps). */
  jobs: Array<{ job: JobRecord; lastSteps: Map<number, number>; outputTail: string[] }>;
}

/** A full disk is logged at most this often per file (a log line is written per output line). */
const DISK_FULL_WARN_INTERVAL_MS = 60_000;

/**
 * Serialises appends to one file so lines keep their order. A line that cannot be written
 * (a full disk) is dropped and handed to `onFailure`; the lines after it are tried again.
 */
class OrderedAppender {
  private tail = Promise.resolve();
  constructor(private readonly state: StateDirectory, private readonly onFailure: (relative: string, error: Error) => void) {}
  append(relative: string, text: string): void {
    this.tail = this.tail.then(() => this.state.append(relative, text)).catch((error: Error) => this.onFailure(relative, error));
  }
  flushed(): Promise<void> {
    return this.tail;
  }
}

/**
 * The head: a long-lived component that owns the control server, the worker registry,
 * the job controller and one provisioner, and mirrors what it knows into the state
 * directory so the CLI can read it without asking.
 */
export class Head extends EventEmitter<HeadEvents> {
  state: HeadState = "created";
  /** Why the head failed to start, recorded in head.json. */
  private failure: string | undefined;
  readonly registry: WorkerRegistry;
  readonly jobs: JobController;
  private readonly server: ControlServer;
  /** Created in start(), once the address workers dial is known. */
  private provisioner: Provisioner | undefined;
  private repair: RepairLoop | undefined;
  private readonly appender: OrderedAppender;
  private readonly shutdownController = new AbortController();
  /** One single-use token per node the head asks a backend for (join-tokens.ts). */
  readonly joinTokens = new JoinTokenBook();
  /** The newest disk-full error of any write of the head (state files, logs, checkpoint objects). */
  private diskFull: { message: string; atMs: number } | undefined;
  private readonly diskFullWarnedAt = new Map<string, number>();
  private readonly startedAt = new Date().toISOString();
  private snapshotTimer: NodeJS.Timeout | undefined;
  /** Refreshes cluster.json every heartbeat interval, so status shows real last-heartbeat times. */
  private heartbeatSnapshots: NodeJS.Timeout | undefined;
  private embeddedS3: LocalS3Server | undefined;
  private storageConfig: StorageConfigInput | undefined;
  /** The state directory's CA: signs the control-plane certificate and the bridges' (undefined with `head.insecure`). */
  private authority: HeadAuthority | undefined;
  checkpoints: CheckpointCoordinator | undefined;
  /** Signs workers' S3 requests when they reach the store through presigned URLs (storage.workerAccess). */
  private presign: PresignService | undefined;
  /** Node and GPU telemetry, its persisted history and /metrics. */
  readonly telemetry: HeadTelemetry;
  /** What the leases (or priced nodes) have cost so far: cost.json, status and /metrics. */
  readonly costs: CostTracker;
  /** The web dashboard on the /metrics server, behind the admin token. */
  private readonly dashboard: DashboardServer;
  private stopped: Promise<void> | undefined;
  /** Random per head process: agents that see it change send again what the dead head may have lost. */
  private readonly instance = randomUUID();
  /** Serialises sessions.json writes (registrations and renewals come in bursts). */
  private sessionWrites: Promise<void> = Promise.resolve();
  private shutdownRequested!: () => void;
  readonly shutdownRequestedPromise = new Promise<void>((resolve) => (this.shutdownRequested = resolve));

  private constructor(
    readonly spec: ClusterSpec,
    readonly stateDir: StateDirectory,
    private readonly logger: Logger,
    private readonly adminToken: string,
    /** What a head that stopped without `drover down` (a crash, kill -9) left: taken up again by start(). */
    private readonly interrupted: InterruptedHead | undefined,
  ) {
    super();
    this.appender = new OrderedAppender(stateDir, (relative, error) => this.stateWriteFailed(relative, error));
    this.registry = new WorkerRegistry({ heartbeatTimeoutMs: spec.head.heartbeatTimeoutMs, logger: logger.child({ component: "registry" }) });
    this.jobs = new JobController({
      registry: this.registry,
      allocateMasterPort: (assignment) => {
        if (!this.provisioner) throw new StateError("the cluster has no provisioner yet");
        return this.provisioner.allocateMasterPort(assignment.masterAddr);
      },
      bridgeAddressOf: (nodeName) => this.bridgeAddressOf(nodeName),
      issueBridgeCertificates: (bridgeJobId, groups) => this.issueBridgeCertificates(bridgeJobId, groups),
      workerWaitTimeoutMs: spec.head.workerWaitTimeoutMs,
      stopGraceMs: 5_000,
      defaultMaxRestarts: 3,
      restartStep: async (job) => this.checkpoints ? this.checkpoints.restartStep(job, AbortSignal.timeout(60_000)) : job.lastCommittedStep ?? job.resumeStep,
      settleCheckpoints: async (job) => {
        if (!this.checkpoints) return false;
        await this.checkpoints.settle(job);
        return true;
      },
      logger: logger.child({ component: "jobs" }),
    });
    this.telemetry = HeadTelemetry.create({
      metricsHost: spec.head.metricsHost,
      metricsPort: spec.head.metricsPort,
      retentionMs: spec.head.telemetryRetentionMs,
      saveIntervalMs: spec.head.telemetrySaveIntervalMs,
      alerts: spec.head.alerts,
      stateDir,
      workers: this.registry,
      jobs: this.jobs,
      logger: logger.child({ component: "telemetry" }),
    });
    this.costs = CostTracker.create({
      stateDir,
      workers: this.registry,
      jobs: this.jobs,
      logger: logger.child({ component: "cost" }),
      ...(spec.cost?.pricePerNodeHour === undefined ? {} : { pricePerNodeHour: spec.cost.pricePerNodeHour }),
      ...(interrupted?.cost ? { earlier: interrupted.cost } : {}),
      onReport: (report) => this.telemetry.observeCost(report),
    });
    this.server = new ControlServer({
      registry: this.registry,
      jobs: this.jobs,
      joinTokens: this.joinTokens,
      adminToken,
      heartbeatIntervalMs: spec.head.heartbeatIntervalMs,
      heartbeatTimeoutMs: spec.head.heartbeatTimeoutMs,
      headInstance: this.instance,
      logger: logger.child({ component: "control-server" }),
      onShutdownRequested: () => this.shutdownRequested(),
      submitJob: (request) => this.submit(request),
      // Admin.Status and Admin.WatchJob: `drover status` and `drover submit` ask the head, not its files.
      live: {
        state: () => this.state,
        nodeTelemetry: () => latestByNode(this.telemetry.series.latest(() => Infinity)),
        alerts: () => this.telemetry.checkAlerts(),
        cost: () => this.costs.report,
        diskFull: () => this.diskFull,
        outputWritten: () => this.appender.flushed(),
      },
      presign: () => this.presign,
      onTelemetry: (workerId, telemetry) => {
        this.telemetry.onTelemetry(workerId, telemetry);
        this.emit("telemetry");
      },
    });
    this.dashboard = DashboardServer.create({
      adminToken,
      stateDir,
      workers: this.registry,
      jobs: this.jobs,
      telemetry: () => this.telemetry.series,
      cost: () => this.costs.report,
      alerts: () => this.telemetry.alerts,
      logger: logger.child({ component: "dashboard" }),
    });
    for (const kind of ["job", "metric", "log", "workers", "telemetry"] as const) this.on(kind, () => this.dashboard.notify(kind));
    this.registry.on("lost", (worker, reason) => this.repair?.nodeLost(worker.nodeName, reason, worker.registeredAtMs));
    this.registry.on("changed", () => {
      this.emit("workers");
      this.scheduleSnapshot();
    });
    this.registry.on("sessions", () => this.persistSessions());
    this.jobs.on("changed", (job) => {
      this.emit("job", job);
      // A job's end is what `drover submit` waits for: written at once, not batched.
      if (isFinal(job.state)) this.flushSnapshot();
      else this.scheduleSnapshot();
    });
    this.jobs.on("log", (line) => {
      this.appender.append(`jobs/${line.jobId}/output.log`, `${outputLine(line)}\n`);
      this.emit("log", line);
    });
    this.jobs.on("metric", (job, metric) => {
      this.appender.append(`jobs/${job.jobId}/metrics.ndjson`, JSON.stringify({ rank: metric.rank, attempt: job.attempt, step: Number(metric.step), timeMs: Number(metric.timeMs), ...metric.values }) + "\n");
      this.emit("metric", job, metric);
      this.scheduleSnapshot();
    });
  }

  /**
   * Prepares a head over `stateDirPath`. Refuses a state directory whose head is still
   * alive: two heads would fight over the same workers and files.
   */
  static async create(spec: ClusterSpec, options: { stateDir: string; logger: Logger }): Promise<Head> {
    const state = new StateDirectory(options.stateDir);
    await mkdir(state.root, { recursive: true, mode: 0o700 });
    const previous = await state.readJson<HeadRecord>("head.json");
    if (previous && previous.pid !== process.pid && processAlive(previous.pid) && !["stopped", "failed"].includes(previous.state)) {
      throw new StateError(`a head (pid ${previous.pid}) is already running over ${state.root}; run \`drover down\` first`, { pid: previous.pid });
    }
    const adminToken = randomBytes(24).toString("base64url");
    registerSecretValue(adminToken);
    // A previous head that neither stopped nor failed to start died under its jobs: its
    // nodes are reaped and its unfinished jobs resume from their newest committed
    // checkpoints (read now, before this head's first snapshot replaces cluster.json).
    let interrupted: InterruptedHead | undefined;
    if (previous && !["stopped", "failed"].includes(previous.state)) {
      const cluster = await state.readJson<{ jobs?: JobRecord[] }>("cluster.json").catch((error: Error) => {
        options.logger.warn("the previous head's cluster.json is unreadable; its jobs cannot be resumed", { error: error.message });
        return undefined;
      });
      // What it spent is spent: its last cost report counts on in this head's totals.
      const cost = await state.readJson<CostReport>(COST_FILE).catch((error: Error) => {
        options.logger.warn("the previous head's cost.json is unreadable; this head's cost figures start from zero", { error: error.message });
        return undefined;
      });
      // Its agents' credentials (digests) and where they dial: enough to take them up as they run.
      const sessions = await state.readJson<{ workers?: PersistedWorker[] }>(SESSIONS_FILE).catch((error: Error) => {
        options.logger.warn("the previous head's sessions.json is unreadable; its nodes cannot be taken up and are released", { error: error.message });
        return undefined;
      });
      const storage = await state.readJson<{ storage?: StorageConfigInput; embedded?: boolean }>("storage.json").catch(() => undefined);
      const embeddedStoreEndpoint = storage?.embedded ? (storage.storage as { store?: { endpoint?: string } } | undefined)?.store?.endpoint : undefined;
      interrupted = {
        jobs: (cluster?.jobs ?? []).filter((job) => !isFinal(job.state)),
        ...(cost?.totals ? { cost } : {}),
        ...(previous.controlAddress ? { controlAddress: previous.controlAddress } : {}),
        workers: Array.isArray(sessions?.workers) ? sessions.workers : [],
        ...(embeddedStoreEndpoint ? { embeddedStoreEndpoint } : {}),
      };
    }
    return new Head(spec, state, options.logger, adminToken, interrupted);
  }

  private async setState(state: HeadState): Promise<void> {
    this.logger.info("head state", { from: this.state, to: state });
    this.state = state;
    this.emit("state", state);
    await this.writeHeadRecord();
  }

  /** host:port workers dial: `head.advertise` when set, else where the server listens. */
  get controlAddress(): string {
    const advertise = this.spec.head.advertise;
    if (advertise) return advertise.includes(":") ? advertise : `${advertise}:${this.server.controlPort}`;
    const host = this.spec.head.host === "0.0.0.0" ? "127.0.0.1" : this.spec.head.host;
    return `${host}:${this.server.controlPort}`;
  }

  private async writeHeadRecord(): Promise<void> {
    const record: HeadRecord = {
      pid: process.pid,
      state: this.state,
      clusterName: this.spec.name,
      specSource: this.spec.source,
      controlAddress: this.controlAddress,
      adminAddress: `127.0.0.1:${this.server.adminPort}`,
      sharesFilesystem: backendNamed(this.spec.provisioner)?.sharesFilesystem ?? false,
      // `drover down` reaps with this backend, from the state directory alone.
      provisioner: this.spec.provisioner,
      // `drover status` and `drover top` judge alerts by the spec's thresholds without reading it.
      alerts: this.spec.head.alerts,
      ...(this.authority ? { caFingerprint: this.authority.fingerprint } : {}),
      ...(this.failure ? { error: this.failure } : {}),
      ...(process.env.DROVER_HEAD_SUPERVISOR_PID ? { supervisorPid: Number(process.env.DROVER_HEAD_SUPERVISOR_PID) } : {}),
      startedAt: this.startedAt,
      updatedAt: new Date().toISOString(),
    };
    // A head.json that cannot be written (a full disk) must not stop a state change, the
    // shutdown's above all: `drover down` still finds the head by the pid written before.
    await this.stateDir.writeJson("head.json", record).catch((error: Error) => this.stateWriteFailed("head.json", error));
  }

  /** Starts the servers and provisions the nodes; resolves once every node was asked for. */
  async start(): Promise<void> {
    // A dead head's running job is taken up as it runs when its nodes can be (adoptionPlan):
    // its workers and their credentials are restored before this head listens where they
    // dial, so their reconnects are accepted. Every other unfinished job resumes from its
    // newest committed checkpoint. Both before this head's first snapshot replaces
    // cluster.json, so the jobs are in it from the start.
    let adoption = this.interrupted ? await this.adoptionPlan(this.interrupted) : undefined;
    const resume = (previous: JobRecord) =>
      this.jobs.resumeInterrupted(previous, previous.lastCommittedStep ?? previous.resumeStep, `the head stopped unexpectedly while the job was ${previous.state}`);
    if (adoption) {
      this.registry.restore(adoption.workers);
      for (const { job, lastSteps, outputTail } of adoption.jobs) this.jobs.adoptInterrupted(job, lastSteps, outputTail);
    }
    const resumed = (this.interrupted?.jobs ?? []).filter((job) => !adoption?.jobs.some((adopted) => adopted.job.jobId === job.jobId)).map(resume);
    await this.setState("starting");
    let phase = "starting the control server";
    try {
      if (this.interrupted && !adoption) {
        // First: the dead head's agents must not register here with their trainers running.
        phase = "releasing what the previous head left";
        await this.releaseInterrupted();
      }
      this.registry.start();
      // Heartbeats change lastSeenMs without any other event; without this the state file
      // status reads would show the time since registration.
      this.heartbeatSnapshots = setInterval(() => this.scheduleSnapshot(), this.spec.head.heartbeatIntervalMs);
      this.heartbeatSnapshots.unref();
      phase = "starting the metrics server";
      await this.telemetry.start(this.shutdownController.signal);
      this.telemetry.mount(DASHBOARD_PATH, this.dashboard.handle);
      phase = "starting the control server";
      const certificate = await this.controlCertificate();
      if (adoption) {
        try {
          await this.server.listen(this.spec.head.host, adoption.port, certificate);
        } catch (error) {
          // Its agents dial that port and no other: they cannot be taken up after all.
          this.logger.warn("cannot listen where the previous head's agents dial; releasing them, and its jobs resume from their checkpoints", { port: adoption.port, error: (error as Error).message });
          this.registry.forgetRestored();
          resumed.push(...adoption.jobs.map(({ job }) => resume(job)));
          adoption = undefined;
          phase = "releasing what the previous head left";
          await this.releaseInterrupted();
          phase = "starting the control server";
        }
      }
      if (!adoption) await this.server.listen(this.spec.head.host, this.spec.head.port, certificate);
      await this.stateDir.writeJson("admin-token", { adminToken: this.adminToken }, 0o600);
      phase = "opening checkpoint storage";
      // Where the adopted agents' store was (their presigned store and URLs name it).
      const previousStorePort = adoption && this.interrupted?.embeddedStoreEndpoint ? Number(new URL(this.interrupted.embeddedStoreEndpoint).port) : undefined;
      await this.startStorage(previousStorePort);
      if (this.interrupted) await this.refineResumeSteps(resumed);
      await this.setState("provisioning");
      phase = "provisioning";
      const provisionerLogger = this.logger.child({ component: `provisioner:${this.spec.provisioner}` });
      this.provisioner = createProvisioner(this.spec, {
        clusterName: this.spec.name,
        headAddress: this.controlAddress,
        joinTokens: this.joinTokens,
        agentEnv: {
          ...this.agentStorageEnv(),
          // The CA's fingerprint, not a key: agents pin it and refuse any other head.
          ...(this.authority ? { DROVER_HEAD_CA_SHA256: this.authority.fingerprint } : { DROVER_HEAD_INSECURE: "1" }),
        },
        heartbeatTimeoutMs: this.spec.head.heartbeatTimeoutMs,
        state: this.stateDir,
        logger: provisionerLogger,
      });
      this.repair = new RepairLoop({ provisioner: this.provisioner, groups: backendSection(this.spec).groups, logger: this.logger.child({ component: "repair" }) });
      const adopted = adoption && this.provisioner.adopt ? await this.provisioner.adopt(this.shutdownController.signal) : [];
      if (adoption) this.logger.info("took over the previous head's nodes", { nodes: adopted.map((node) => node.id).join(",") || "none" });
      await this.repair.provisionAll(this.shutdownController.signal, adopted);
      this.repair.start(this.shutdownController.signal);
      this.costs.run(this.provisioner);
    } catch (error) {
      // Whatever failed, nothing is left running and head.json says why: `drover up`
      // reports it instead of waiting for nodes that will never come.
      this.failure = `${phase} failed: ${(error as Error).message}`;
      this.logger.error("head failed to start", { phase, error: (error as Error).message });
      await this.shutdown(this.failure);
      await this.setState("failed");
      throw error;
    }
    await this.setState("ready");
  }

  /**
   * The head's certificate for the control server, from the state directory's CA (made
   * on the first start): named head.drover.invalid, which agents verify whatever address
   * they dial, and `head.advertise`, `head.host` and this machine's addresses for other
   * TLS clients. None with `head.insecure`.
   */
  /**
   * One bridge certificate per group of a bridge job id, from the head's CA: the leaders
   * of that job present them to each other and trust only this CA. Undefined without a
   * CA (head.insecure): the bridge is then plaintext with HMAC only.
   */
  private async issueBridgeCertificates(bridgeJobId: string, groups: readonly string[]): Promise<ReadonlyMap<string, IBridgeTls> | undefined> {
    const authority = this.authority;
    if (!authority) return undefined;
    const issued = new Map<string, IBridgeTls>();
    for (const group of groups) {
      const { certPem, keyPem } = await authority.issueBridgeCertificate(bridgeJobId, group, BRIDGE_CERTIFICATE_VALIDITY_MS);
      issued.set(group, { certificatePem: certPem + authority.caPem, privateKeyPem: keyPem, caPem: authority.caPem });
    }
    return issued;
  }

  private async controlCertificate(): Promise<{ chainPem: string; keyPem: string } | undefined> {
    if (this.spec.head.insecure) {
      this.logger.warn("the control plane is plaintext (head.insecure): anyone on the path can read and inject control traffic");
      this.logger.warn("the cross-provider bridge is plaintext too (head.insecure): group leaders still authenticate each other with the job's HMAC key, but tensors cross the network unencrypted");
      return undefined;
    }
    this.authority = await HeadAuthority.open(this.stateDir, this.spec.name);
    const advertisedHost = this.spec.head.advertise?.replace(/:\d+$/, "");
    const certificate = await this.authority.issueHeadCertificate([this.spec.head.host, ...(advertisedHost ? [advertisedHost] : [])]);
    this.logger.info("control plane uses TLS", { caFingerprint: this.authority.fingerprint, names: certificate.names.join(",") });
    return certificate;
  }

  /**
   * The previous head died without stopping its nodes: they and their trainers are
   * stopped from the state directory's records (as `drover down` would) before this
   * head provisions, so no trainer of the dead head writes into a step the resumed job
   * writes again.
   */
  private async releaseInterrupted(): Promise<void> {
    const backend = backendNamed(this.spec.provisioner);
    if (!backend) return;
    const reaped = await backend.reap(this.stateDir, this.logger.child({ component: "reap" }), AbortSignal.timeout(60_000)).catch((error: Error) => {
      this.logger.warn("could not release everything the previous head left", { error: error.message });
      return [];
    });
    if (reaped.length > 0) this.logger.info("released what the previous head left", { reaped });
  }

  /**
   * Whether the dead head's running job can be taken up as it runs, and with what: the
   * backend can take over its nodes (Provisioner.adopt), this head can listen where its
   * agents dial, and every node of the job has a restorable session. Undefined (said in
   * the log) when not: the job then resumes from its newest committed checkpoint.
   */
  private async adoptionPlan(interrupted: InterruptedHead): Promise<Adoption | undefined> {
    const candidates = interrupted.jobs.filter((job) => (job.state === "running" || job.state === "finishing") && (job.groupsRestarting ?? []).length === 0 && job.assignments.length > 0);
    if (candidates.length === 0) return undefined;
    const refuse = (reason: string) => {
      this.logger.warn("the previous head's running job cannot be taken up as it runs; it resumes from its newest committed checkpoint", { reason });
      return undefined;
    };
    const backend = backendNamed(this.spec.provisioner);
    if (!backend?.adoptable) return refuse(`the ${this.spec.provisioner} backend cannot take over running nodes`);
    const port = Number(/:(\d+)$/.exec(interrupted.controlAddress ?? "")?.[1] ?? 0);
    if (!port) return refuse("the previous head's control address is unknown");
    if (this.spec.head.port !== 0 && this.spec.head.port !== port) return refuse(`head.port is ${this.spec.head.port}, but its agents dial port ${port}`);
    const verdict = await backend.adoptable(this.stateDir).catch((error: Error) => ({ ok: false as const, reason: error.message }));
    if (!verdict.ok) return refuse(verdict.reason);
    const restorable = new Set(interrupted.workers.map((worker) => worker.workerId));
    const jobs: Adoption["jobs"] = [];
    for (const job of candidates) {
      const missing = job.assignments.filter((assignment) => !restorable.has(assignment.workerId)).map((assignment) => assignment.nodeName);
      if (missing.length > 0) {
        refuse(`no session of node ${missing.join(", ")} of job ${job.jobId} is on record`);
        continue;
      }
      jobs.push({ job, lastSteps: await this.lastMetricSteps(job), outputTail: await this.outputTail(job) });
    }
    return jobs.length > 0 ? { port, workers: interrupted.workers, jobs } : undefined;
  }

  /**
   * The newest step per global rank of a job's current attempt in its metrics file: what
   * the dead head wrote down. Metrics its agents send again at or below it are not
   * written twice; those above it were lost with the head and are.
   */
  private async lastMetricSteps(job: JobRecord): Promise<Map<number, number>> {
    const steps = new Map<number, number>();
    const text = await readFile(this.stateDir.path("jobs", job.jobId, "metrics.ndjson"), "utf8").catch(() => "");
    for (const line of text.split("\n")) {
      let point: { rank?: unknown; attempt?: unknown; step?: unknown };
      try {
        point = JSON.parse(line) as typeof point;
      } catch {
        continue; // the torn last line of a head killed mid-write, or an empty one
      }
      if (point.attempt !== job.attempt || typeof point.rank !== "number" || typeof point.step !== "number") continue;
      steps.set(point.rank, Math.max(steps.get(point.rank) ?? -1, point.step));
    }
    return steps;
  }

  /**
   * The newest lines of a job's output.log (its last OUTPUT_TAIL_BYTES): output lines its
   * agents send again that these hold were written by the dead head already.
   */
  private outputTail(job: JobRecord): Promise<string[]> {
    // A last line torn by the kill matches no replayed line, which is then written whole.
    return readTailLines(this.stateDir.path("jobs", job.jobId, "output.log"), OUTPUT_TAIL_BYTES);
  }


  /** Writes sessions.json (0600): what a successor needs to accept this head's agents. */
  private persistSessions(): void {
    this.sessionWrites = this.sessionWrites
      .then(() => this.stateDir.writeJson(SESSIONS_FILE, { workers: this.registry.persisted() }, 0o600))
      .catch((error: Error) => this.stateWriteFailed(SESSIONS_FILE, error));
  }

  /** The store is the truth about what is committed: a resumed job starts from its newest step. */
  private async refineResumeSteps(jobs: JobRecord[]): Promise<void> {
    if (!this.checkpoints) return;
    for (const job of jobs) {
      try {
        const latest = (await this.checkpoints.store.latest(job.runId, { signal: AbortSignal.timeout(30_000) }))?.step;
        if (latest !== undefined) this.jobs.resumeFrom(job.jobId, latest);
      } catch (error) {
        this.logger.warn("could not ask the store for a resumed job's newest step", { jobId: job.jobId, error: (error as Error).message });
      }
    }
  }

  /**
   * Opens the checkpoint store: the spec's, or in local mode an embedded S3-compatible
   * server on loopback with its data in the state directory (so checkpoints outlive the
   * head and a later `drover up` over the same directory resumes from them).
   */
  private async startStorage(preferredPort?: number): Promise<void> {
    if (this.spec.storage) {
      this.storageConfig = this.spec.storage;
    } else if (this.spec.provisioner === "local") {
      const start = (port: number) => startLocalS3Server({
        directory: this.stateDir.path("s3"),
        port,
        signal: this.shutdownController.signal,
        // The upload that met it fails with the same words (its step is named as not stored).
        onDiskFull: (error) => this.stateWriteFailed("s3", error),
      });
      // Adopted agents hold presigned URLs for the previous head's port; new ones are signed for wherever this one listens.
      this.embeddedS3 = preferredPort
        ? await start(preferredPort).catch((error: Error) => {
          this.logger.warn("the embedded S3 server cannot listen where the previous head's did; adopted agents get URLs for the new port", { port: preferredPort, error: error.message });
          return start(0);
        })
        : await start(0);
      this.storageConfig = { store: this.embeddedS3.storeConfig() };
      this.logger.info("embedded S3 server started", { endpoint: this.embeddedS3.endpoint });
    }
    if (!this.storageConfig) return;
    this.presign = PresignService.create({ storage: parseStorageConfig(this.storageConfig), jobs: this.jobs, logger: this.logger.child({ component: "presign" }) });
    const store = CheckpointStore.fromConfig(this.storageConfig, { logger: this.logger.child({ component: "checkpoints" }), resumeStateDir: this.stateDir.path("upload-journal") });
    this.checkpoints = new CheckpointCoordinator(store, this.jobs, this.logger.child({ component: "checkpoints" }));
    this.telemetry.watchCheckpoints(this.checkpoints);
    this.costs.watchCheckpoints(this.checkpoints);
    // The CLI's `drover ckpt` reads the same store; the file holds credentials, so 0600.
    await this.stateDir.writeJson("storage.json", { storage: this.storageConfig, embedded: this.embeddedS3 !== undefined }, 0o600);
  }

  /**
   * What the agents' environment says about the store. Presigned (the default): only
   * where it is (DROVER_STORAGE_ENDPOINT, no secret; a local group's forwarder needs it)
   * and they ask the head for URLs. `workerAccess: keys`, or a local directory store:
   * the whole config, keys included (DROVER_STORAGE_CONFIG).
   */
  private agentStorageEnv(): Record<string, string> {
    if (!this.storageConfig) return {};
    if (!this.presign) return { DROVER_STORAGE_CONFIG: JSON.stringify(this.storageConfig) };
    const { store } = parseStorageConfig(this.storageConfig);
    return store.kind === "s3" && store.endpoint ? { DROVER_STORAGE_ENDPOINT: store.endpoint } : {};
  }

  /**
   * host:port where other groups' leaders dial this node's bridge: the `bridge` port the
   * provisioner publishes for the node of that name (Akash: the provider's forwarded
   * port; Kubernetes: the pod IP and bridgePort), else undefined and the worker's own
   * reported address (RegisterRequest.bridge_address) applies.
   */
  bridgeAddressOf(nodeName: string): string | undefined {
    return this.repair?.bridgeOutside(nodeName);
  }

  /** Resolves when `count` workers are connected, or rejects on abort. */
  waitForWorkers(count: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.registry.connected().length >= count) {
          this.off("workers", check);
          signal.removeEventListener("abort", onAbort);
          resolve();
        }
      };
      const onAbort = () => {
        this.off("workers", check);
        reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.on("workers", check);
      check();
    });
  }

  /**
   * Admits a job. Given a run id with committed checkpoints, the job resumes from the
   * newest one (or from `fromStep`); a new run starts from scratch.
   */
  async submit(request: Omit<JobRequest, "nodes" | "resumeStep"> & { nodes?: number; fromStep?: number }): Promise<JobRecord> {
    let resumeStep: number | undefined;
    if (request.runId && this.checkpoints) {
      try {
        resumeStep = await this.checkpoints.resumeStep(request.runId, request.fromStep, AbortSignal.timeout(30_000));
      } catch (error) {
        throw new JobRequestError((error as Error).message, { runId: request.runId }, { cause: error });
      }
    } else if (request.fromStep !== undefined) {
      throw new JobRequestError(request.runId ? "--from-step needs checkpoint storage, and this cluster has none" : "--from-step needs --run-id: checkpoints belong to a run");
    }
    if (request.codeBundleId && !this.checkpoints) throw new JobRequestError("the job names a code bundle but this cluster has no checkpoint storage to fetch it from");
    const job = this.jobs.submit({ ...request, nodes: request.nodes || expectedNodes(this.spec), resumeStep });
    if (request.codeBundleId) this.jobs.note(job.jobId, `nodes fetch the working directory as code bundle ${request.codeBundleId.slice(0, 12)}`);
    if (resumeStep !== undefined) this.jobs.note(job.jobId, `resuming run ${job.runId} from committed checkpoint step ${resumeStep}`);
    return job;
  }

  waitForJob(jobId: string, signal: AbortSignal): Promise<JobRecord> {
    return new Promise((resolve, reject) => {
      const check = (job?: JobRecord) => {
        const current = job?.jobId === jobId ? job : this.jobs.get(jobId);
        if (current && isFinal(current.state)) {
          this.off("job", check);
          signal.removeEventListener("abort", onAbort);
          resolve(current);
        }
      };
      const onAbort = () => {
        this.off("job", check);
        reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.on("job", check);
      check();
    });
  }

  private scheduleSnapshot(): void {
    if (this.snapshotTimer) return;
    this.snapshotTimer = setTimeout(() => {
      this.snapshotTimer = undefined;
      void this.writeSnapshot();
    }, 200);
  }

  /** Writes cluster.json now, folding in a batched write that was due. */
  private flushSnapshot(): void {
    clearTimeout(this.snapshotTimer);
    this.snapshotTimer = undefined;
    void this.writeSnapshot();
  }

  /** `final`: the head is stopping; no worker is connected to it any more. */
  private async writeSnapshot(final = false): Promise<void> {
    await this.stateDir.writeJson("cluster.json", {
      updatedAt: new Date().toISOString(),
      workers: this.registry.all().map(({ sessionToken: _secret, ...worker }) => (final && worker.connection === "connected" ? { ...worker, connection: "disconnected" } : worker)),
      jobs: this.jobs.all(),
      ...(this.diskFull ? { diskFull: this.diskFull } : {}),
    }).catch((error: Error) => this.stateWriteFailed("cluster.json", error));
  }

  /**
   * A state file, log line or checkpoint object that could not be written. The head stays
   * up (what it could not write is lost, said here); a full disk is remembered with its
   * time for `drover status` (cluster.json, once there is room for it again) and logged as
   * `disk full: <path> (<free> bytes free)`, once per file and minute rather than per line.
   */
  private stateWriteFailed(what: string, error: Error): void {
    if (error.name !== "DiskFullError") {
      this.logger.warn(`could not write ${what}`, { error: error.message });
      return;
    }
    const now = Date.now();
    const previous = this.diskFullWarnedAt.get(what);
    this.diskFull = { message: error.message, atMs: now };
    if (previous !== undefined && now - previous < DISK_FULL_WARN_INTERVAL_MS) return;
    this.diskFullWarnedAt.set(what, now);
    this.logger.error(error.message, { file: what });
    // While stopping, the final snapshot (every node disconnected) must stay the last one.
    if (this.state !== "stopping" && this.state !== "stopped") this.scheduleSnapshot();
  }

  /** Stops jobs, releases every node, closes the servers. Idempotent. */
  shutdown(reason: string): Promise<void> {
    this.stopped ??= (async () => {
      await this.setState("stopping");
      this.logger.info("head shutting down", { reason });
      this.shutdownController.abort(new Error(reason));
      // Nothing minted for this cluster gets a node in any more: unspent tokens and live
      // session credentials are void from here (a node still starting cannot join).
      this.joinTokens.revokeAll();
      this.registry.revokeSessions();
      for (const job of this.jobs.activeJobs()) this.jobs.stop(job.jobId, `cluster shutting down: ${reason}`);
      await this.repair?.idle().catch(() => undefined);
      // Its last report prices the leases while they are still held.
      await this.costs.shutdown().catch((error: Error) => this.logger.warn("the cost tracker did not stop cleanly", { error: error.message }));
      await this.provisioner?.close(AbortSignal.timeout(30_000)).catch((error: Error) => this.logger.error("releasing the nodes failed; `drover down` tries again from the state directory", { error: error.message }));
      this.jobs.dispose();
      this.registry.stop();
      await this.server.close();
      this.dashboard.shutdown();
      await this.telemetry.shutdown();
      this.checkpoints?.store.close();
      await this.embeddedS3?.stop();
      clearTimeout(this.snapshotTimer);
      this.snapshotTimer = undefined;
      clearInterval(this.heartbeatSnapshots);
      await this.writeSnapshot(true);
      await this.appender.flushed();
      await this.setState("stopped");
    })();
    return this.stopped;
  }
}
