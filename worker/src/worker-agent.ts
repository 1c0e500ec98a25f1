import { createHash, randomUUID } from "node:crypto";
import { setMaxListeners } from "node:events";
import { createReadStream } from "node:fs";
import { mkdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import { join, resolve as resolvePath } from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import { z } from "zod";
import {
  ControlClient, LogStream, PROTOCOL_VERSION, callUnary, controlChannelOptions, presignOperationValue,
  type HeadMessage, type ICheckpointFile, type IPresignedStorage, type IStartJob, type IWorkerMessage,
} from "@drover/proto";
import {
  CheckpointStore, ObjectStoreRequestError, PresignedObjectStore, forgetSecretValue, groupCheckpointFolder, groupOfCheckpointFolder, parseTransferConfig, registerSecretValue, resumeSubdirFor,
  retryThroughOutage, STORE_OUTAGE_RETRY, type CheckpointManifest, type PresignedRequest, type PresignRequest, type StorageConfigInput,
} from "@drover/storage";
import { AgentSocketServer, type CheckpointMessage } from "./agent-socket.js";
import { confineCheckpointReport } from "./checkpoint-report.js";
import { HeadTrustError, JoinRefusedError, WorkerConfigError } from "./errors.js";
import { headChannel, type HeadTrust } from "./head-trust.js";
import type { Logger } from "./logger.js";
import { probeResources } from "./resource-probe.js";
import { TrainerSupervisor } from "./trainer-supervisor.js";
import { bridgeTlsCredentials, type BridgeTlsCredentials } from "./bridge/bridge-link.js";
import { BridgeEndpoint, type BridgePeer, type JobBridge } from "./bridge/job-bridge.js";
import { OuterSyncSocketServer } from "./bridge/outer-sync-socket.js";
import { DEFAULT_TELEMETRY_INTERVAL_MS, MIN_TELEMETRY_INTERVAL_MS, TelemetryReporter } from "./telemetry/telemetry-reporter.js";

export const AGENT_VERSION = "0.1.0";

export const workerOptionsSchema = z.object({
  headAddress: z.string().regex(/^[^\s:]+:\d+$/, "expected host:port"),
  /**
   * Single-use join tokens (DROVER_JOIN_TOKEN): one, or a comma-separated list where the
   * replicas of one Akash service share an environment; the agent spends the first the
   * head still accepts. Once registered it holds a session credential instead.
   */
  joinToken: z.string().min(16, "join token is too short").transform((text) => text.split(",").map((token) => token.trim()).filter(Boolean))
    .pipe(z.array(z.string().min(16, "join token is too short")).min(1).max(64, "more than 64 join tokens")),
  /** How the head proves itself: its CA's pinned fingerprint (TLS), or plaintext by explicit choice. */
  headTrust: z.custom<HeadTrust>((value) => typeof value === "object" && value !== null && ["pinned", "insecure"].includes((value as HeadTrust).kind), "expected a head trust (pinned CA fingerprint or insecure)"),
  nodeName: z.string().regex(/^[A-Za-z0-9._-]{1,63}$/, "letters, digits, '.', '_' and '-' only"),
  group: z.string().min(1).default("local"),
  slots: z.number().int().min(1).max(64),
  stateDir: z.string().min(1),
  advertiseAddress: z.string().min(1).default("127.0.0.1"),
  reconnectInitialMs: z.number().int().positive().default(250),
  reconnectMaxMs: z.number().int().positive().default(5_000),
  /** Give up (stop trainers, exit) after the head is unreachable this long; 0 = never. */
  headLostTimeoutMs: z.number().int().nonnegative().default(0),
  stopGraceMs: z.number().int().nonnegative().default(5_000),
  /**
   * How long a checkpoint upload that fails on the store's side (unreachable, 5xx) is
   * tried again, with backoff up to 30 s, before the step is reported lost. The rank's
   * exit is held back meanwhile, so a job is never declared done while its last
   * checkpoint is still on its way.
   */
  uploadRetryForMs: z.number().int().nonnegative().default(STORE_OUTAGE_RETRY.retryForMs),
  /**
   * The bridge other groups' leaders dial for cross-group outer steps: the port this
   * agent listens on (0: any free one; unset: no bridge, so this node cannot lead a group
   * of a job that syncs across groups), the interface, and host:port as other groups
   * reach it (on Akash the provider's forwarded port; default: advertiseAddress and the
   * port listened on).
   */
  bridgePort: z.number().int().min(0).max(65_535).optional(),
  bridgeHost: z.string().min(1).default("0.0.0.0"),
  bridgeAdvertise: z.string().regex(/^(?:|(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5})$/, "expected host:port").default(""),
  /**
   * Where checkpoints go with `storage.workerAccess: keys` (@drover/storage config,
   * credentials included), from the node's own environment (DROVER_STORAGE_CONFIG).
   * Without it the head may name a presigned store at Register: the agent then holds no
   * keys and asks the head to sign each request (Control.Presign).
   */
  storage: z.custom<StorageConfigInput>().optional(),
  /**
   * host:port to dial for the presigned store's host (DROVER_STORAGE_DIAL: a forwarder,
   * for a local group in its own network namespace); the signed Host header is kept.
   */
  storageDial: z.string().regex(/^[^\s/]+:\d{1,5}$/, "expected host:port").optional(),
  /** How often node and GPU telemetry is sampled and sent to the head; 0 = never. */
  telemetryIntervalMs: z.number().int().refine((ms) => ms === 0 || ms >= MIN_TELEMETRY_INTERVAL_MS, `at least ${MIN_TELEMETRY_INTERVAL_MS}ms, or 0 for off`).default(DEFAULT_TELEMETRY_INTERVAL_MS),
});
export type WorkerOptionsInput = z.input<typeof workerOptionsSchema>;
export type WorkerOptions = z.output<typeof workerOptionsSchema>;

export type WorkerState = "created" | "connecting" | "connected" | "stopping" | "stopped";

/** Where worker/python (the drover_agent helper) lives, put on trainers' PYTHONPATH. */
const PYTHON_HELPER_DIR = fileURLToPath(new URL("../python", import.meta.url));

/** Messages kept while the head is unreachable; log lines are dropped first beyond it. */
const OUTBOX_LIMIT = 10_000;

/**
 * What the agent keeps of what it sent, to send again to a new head over the same state
 * (a crashed head's successor): the newest metrics and output lines and every checkpoint report, exit and
 * failure of the newest jobs. A head killed the moment after a write never read it, or
 * read it without writing it down; the new head takes what it has no record of.
 */
const REPLAY_METRICS_PER_JOB = 1_024;
const REPLAY_LOG_LINES_PER_JOB = 512;
const REPLAY_REPORTS_PER_JOB = 8_192;
const REPLAY_JOBS = 8;

interface SentJournal {
  metrics: IWorkerMessage[];
  logs: IWorkerMessage[];
  reports: IWorkerMessage[];
}

interface RunningJob {
  job: IStartJob;
  supervisor: TrainerSupervisor;
  socket: AgentSocketServer;
  /**
   * Aborted when the head stops the job: a stopped attempt's uploads are dropped by the
   * head anyway, and one finishing late could overwrite the same step's objects written
   * by the next attempt.
   */
  uploads: AbortController;
  /** Uploads in flight per local rank: a rank's exit is reported once its own are done. */
  uploadsByRank: Map<number, Set<Promise<void>>>;
  /** Exit reports still waiting for their rank's uploads; the job is cleaned up after them. */
  exitReports: Set<Promise<void>>;
  /** DROVER_CKPT_DIR of the job's ranks: reported checkpoint files must lie under it. */
  ckptDir: string;
  /** On a group leader of a job with several groups: its bridge and DROVER_OUTER_SOCKET. */
  outer?: { bridge: JobBridge; socket: OuterSyncSocketServer };
  /**
   * A group restarted on its own: per step, whether the store already holds it committed
   * (the other groups may have committed it without this group); asked once per step for
   * all the node's ranks.
   */
  committedBefore?: Map<number, Promise<boolean>>;
}

/** A trainer's last socket lines may be read after its exit is seen; wait this long for them. */
const SOCKET_DRAIN_MS = 2_000;

/**
 * The drover-worker agent: dials the head (outbound only), registers with probed
 * resources, keeps the Session stream open across head restarts and network drops, and
 * runs the trainer ranks the head asks for.
 */
export class WorkerAgent {
  state: WorkerState = "created";
  private client: ControlClient | undefined;
  private stream: grpc.ClientDuplexStream<IWorkerMessage, HeadMessage> | undefined;
  private readonly outbox: IWorkerMessage[] = [];
  /** Job id -> what was written to a head's stream about it (see REPLAY_*). */
  private readonly sentJournal = new Map<string, SentJournal>();
  /** The head process this agent last registered with (RegisterResponse.head_instance). */
  private headInstance: string | undefined;
  private readonly jobs = new Map<string, RunningJob>();
  private readonly stopController = new AbortController();
  private heartbeatTimer: NodeJS.Timeout | undefined;
  private lastContact = Date.now();
  private pidFileWrites: Promise<void> = Promise.resolve();

  private bridge: BridgeEndpoint | undefined;
  private telemetry: TelemetryReporter | undefined;
  private checkpoints: CheckpointStore | undefined;
  /** Tells the head this is a new agent process (see RegisterRequest.incarnation). */
  private readonly incarnation = randomUUID();
  /**
   * The session credential the head gave this agent (renewed on the Session stream): a
   * reconnect proves itself with it, since the join token was spent on the first Register;
   * Presign calls carry it too.
   */
  private session: { workerId: string; token: string; expiresAtMs: number; previous?: string } | undefined;

  private constructor(readonly options: WorkerOptions, private readonly logger: Logger) {
    // Every concurrent part transfer listens on this one signal; the default cap of 10 warns.
    setMaxListeners(256, this.stopController.signal);
    this.checkpoints = options.storage
      ? CheckpointStore.fromConfig(options.storage, { logger, resumeStateDir: join(options.stateDir, "upload-journal") })
      : undefined;
  }

  static create(input: WorkerOptionsInput, logger: Logger): WorkerAgent {
    const parsed = workerOptionsSchema.safeParse(input);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      throw new WorkerConfigError(`invalid worker option ${issue.path.join(".")}: ${issue.message}`);
    }
    return new WorkerAgent(parsed.data, logger.child({ node: parsed.data.nodeName }));
  }

  private setState(state: WorkerState): void {
    if (this.state === state) return;
    this.logger.info("worker state", { from: this.state, to: state });
    this.state = state;
  }

  /** Runs until shutdown() or a fatal error (a refused join token). */
  async run(): Promise<void> {
    await mkdir(this.options.stateDir, { recursive: true });
    await this.reapLeftoverTrainers();
    await this.openBridge();
    this.startTelemetry();
    let backoffMs = this.options.reconnectInitialMs;
    try {
      while (!this.stopController.signal.aborted) {
        this.setState("connecting");
        try {
          await this.connectOnce();
          backoffMs = this.options.reconnectInitialMs;
        } catch (error) {
          if (error instanceof JoinRefusedError) throw error;
          if (this.stopController.signal.aborted) break;
          // A head that cannot prove itself may be an impostor or a misconfiguration; the
          // real one may still come (a DNS name moving), so keep trying, loudly.
          if (error instanceof HeadTrustError) this.logger.error(error.message, { retryInMs: backoffMs });
          else this.logger.warn("head unreachable; retrying", { error: (error as Error).message, retryInMs: backoffMs });
        }
        if (this.stopController.signal.aborted) break;
        const lostForMs = Date.now() - this.lastContact;
        if (this.options.headLostTimeoutMs > 0 && lostForMs > this.options.headLostTimeoutMs) {
          this.logger.error("head lost for too long; stopping", { lostForMs });
          break;
        }
        await sleep(backoffMs * (0.75 + Math.random() * 0.5), this.stopController.signal);
        backoffMs = Math.min(backoffMs * 2, this.options.reconnectMaxMs);
      }
    } finally {
      await this.telemetry?.shutdown();
      await this.stopAllJobs("worker stopping");
      this.client?.close();
      this.setState("stopped");
    }
  }

  /** Registers and holds one Session stream until it ends. */
  private async connectOnce(): Promise<void> {
    const signal = this.stopController.signal;
    const resources = await probeResources({ workDir: this.options.stateDir, advertiseAddress: this.options.advertiseAddress, logger: this.logger, signal });
    // Created once the head proved itself (the pinned CA); the channel then reconnects on its own.
    if (!this.client) {
      const channel = await headChannel(this.options.headAddress, this.options.headTrust, signal);
      this.client = new ControlClient(this.options.headAddress, channel.credentials, { ...controlChannelOptions, ...channel.options });
    }
    const client = this.client;
    const registered = await this.register(client, resources, signal);
    this.lastContact = Date.now();
    // Another head process than before: the previous one died, maybe before it acted on
    // what it was sent last. Its successor gets it again, marked as replayed.
    const newHead = registered.headInstance ? registered.headInstance : undefined;
    const replay = this.headInstance !== undefined && newHead !== undefined && newHead !== this.headInstance;
    this.headInstance = newHead ?? this.headInstance;
    const metadata = new grpc.Metadata();
    metadata.set("x-drover-worker-id", registered.workerId);
    if (registered.presignedStorage) this.openPresignedStore(registered.presignedStorage);
    metadata.set("x-drover-session-token", registered.sessionToken);
    const stream = client.session(metadata);
    this.stream = stream;
    this.setState("connected");
    this.logger.info("registered with head", { workerId: registered.workerId, slots: this.options.slots });

    const heartbeat = () => this.send({ heartbeat: { timeMs: Date.now(), runningJobIds: [...this.jobs.keys()] } }, true);
    if (replay) this.replayJournal(stream);
    this.flushOutbox();
    // After what was sent again and what waited: a new head judges from the first
    // heartbeat which of its jobs' trainers outlived its predecessor, knowing every exit.
    heartbeat();
    this.heartbeatTimer = setInterval(heartbeat, registered.heartbeatIntervalMs || 1_000);
    const onAbort = () => stream.cancel();
    signal.addEventListener("abort", onAbort, { once: true });

    await new Promise<void>((resolve, reject) => {
      stream.on("data", (message: HeadMessage) => {
        this.lastContact = Date.now();
        this.handleHeadMessage(message);
      });
      stream.on("error", (error) => reject(error));
      stream.on("end", () => resolve());
    }).finally(() => {
      clearInterval(this.heartbeatTimer);
      signal.removeEventListener("abort", onAbort);
      this.stream = undefined;
      this.lastContact = Date.now();
    });
    throw new Error("session stream ended");
  }

  /**
   * Register: with the session credential when the agent holds one (a reconnect), else
   * with its join tokens in turn (replicas sharing a list start at different places, so
   * they rarely race for one). A refused credential is final: a new node needs a new token.
   */
  private async register(client: ControlClient, resources: Awaited<ReturnType<typeof probeResources>>, signal: AbortSignal) {
    const request = {
      protocolVersion: PROTOCOL_VERSION,
      nodeName: this.options.nodeName,
      group: this.options.group,
      resources,
      agentVersion: AGENT_VERSION,
      incarnation: this.incarnation,
      slots: this.options.slots,
      bridgeAddress: this.bridge?.advertised ?? "",
    };
    const attempt = (credential: { joinToken: string } | { sessionToken: string }) =>
      callUnary(client.register.bind(client), { ...request, ...credential }, new grpc.Metadata(), { signal, timeoutMs: 10_000 });
    const refused = (error: unknown) => (error as grpc.ServiceError).code === grpc.status.UNAUTHENTICATED;
    let registered;
    if (this.session) {
      try {
        registered = await attempt({ sessionToken: this.session.token });
      } catch (error) {
        if (!refused(error)) throw error;
        throw new JoinRefusedError(`the head no longer accepts this worker's session (${(error as grpc.ServiceError).details}); the node needs a new join token`, { head: this.options.headAddress }, { cause: error });
      }
    } else {
      const tokens = this.options.joinToken;
      const start = createHash("sha256").update(this.options.nodeName).digest().readUInt32BE(0) % tokens.length;
      let lastRefusal: grpc.ServiceError | undefined;
      for (let offset = 0; offset < tokens.length && !registered; offset++) {
        try {
          registered = await attempt({ joinToken: tokens[(start + offset) % tokens.length]! });
        } catch (error) {
          if (!refused(error)) throw error;
          lastRefusal = error as grpc.ServiceError;
        }
      }
      if (!registered) {
        throw new JoinRefusedError(`the head refused this worker's join token${tokens.length > 1 ? "s" : ""} (${lastRefusal?.details ?? "refused"})`, { head: this.options.headAddress }, { cause: lastRefusal });
      }
    }
    this.holdSession(registered.workerId, registered.sessionToken, Number(registered.sessionExpiresAtMs ?? 0));
    return registered;
  }

  /** Keeps the newest credential and the one before it (a reconnect racing a renewal), redacted from logs. */
  private holdSession(workerId: string, token: string, expiresAtMs: number): void {
    registerSecretValue(token);
    if (this.session?.previous) forgetSecretValue(this.session.previous);
    this.session = { workerId, token, expiresAtMs, ...(this.session ? { previous: this.session.token } : {}) };
  }

  /**
   * Telemetry never queues in the outbox: the reporter keeps its own bounded backlog
   * and sends it once the stream is back and the outbox (exits, checkpoints) is empty.
   */
  private startTelemetry(): void {
    this.telemetry = TelemetryReporter.create({
      intervalMs: this.options.telemetryIntervalMs,
      workDir: this.options.stateDir,
      logger: this.logger.child({ component: "telemetry" }),
      send: (telemetry) => {
        if (!this.stream || this.outbox.length > 0) return false;
        this.send({ telemetry });
        return true;
      },
    });
    void this.telemetry.run();
  }

  private handleHeadMessage(message: HeadMessage): void {
    if (message.startJob) {
      this.startJob(message.startJob).catch((error: Error) => {
        this.logger.error("could not start job", { jobId: message.startJob!.jobId, error: error.message });
        this.send({ jobFailure: { jobId: message.startJob!.jobId, reason: `${this.options.nodeName}: ${error.message}` } });
      });
    } else if (message.stopJob) {
      const running = this.jobs.get(message.stopJob.jobId ?? "");
      if (running) {
        this.logger.info("stopping job", { jobId: message.stopJob.jobId, reason: message.stopJob.reason });
        running.uploads.abort(new Error(`job stopped: ${message.stopJob.reason}`));
        running.outer?.bridge.close();
        void running.supervisor.stop(message.stopJob.graceMs || this.options.stopGraceMs);
      }
    } else if (message.sessionRenewal) {
      if (this.session) this.holdSession(this.session.workerId, message.sessionRenewal.sessionToken ?? "", Number(message.sessionRenewal.expiresAtMs ?? 0));
    } else if (message.bridgePeers) {
      // Another group restarted or moved: its leader's bridge may listen elsewhere now.
      const running = this.jobs.get(message.bridgePeers.jobId ?? "");
      running?.outer?.bridge.updatePeers((message.bridgePeers.groups ?? []).filter((group) => group.name !== running.job.group)
        .map((group) => ({ group: group.name ?? "", index: group.index ?? 0, address: group.bridgeAddress ?? "" })));
    }
  }

  private async startJob(received: IStartJob): Promise<void> {
    const jobId = received.jobId ?? "";
    if (this.jobs.has(jobId)) return; // a duplicate StartJob after a reconnect
    const jobDir = join(this.options.stateDir, "jobs", jobId);
    const ckptDir = join(jobDir, "ckpt");
    await mkdir(ckptDir, { recursive: true });
    const job = received.codeBundleId ? { ...received, workingDir: await this.downloadCodeBundle(received, join(jobDir, "code")) } : received;
    const resumeDir = job.resume ? await this.downloadResumeCheckpoint(job, join(jobDir, "resume")) : undefined;
    const socket = await AgentSocketServer.listen(agentSocketPath(this.options.stateDir, jobId), this.logger);
    const outer = await this.openOuterSync(job).catch(async (error: Error) => {
      await socket.close();
      throw error;
    });
    const env = TrainerSupervisor.jobEnvironment(job, { ckptDir, resumeDir, agentSocket: socket.path, outerSocket: outer?.socket.path, pythonPath: PYTHON_HELPER_DIR });
    let supervisor: TrainerSupervisor;
    try {
      supervisor = await TrainerSupervisor.start(job, env, this.logger.child({ jobId }), { errorDir: join(jobDir, "errors"), signal: this.stopController.signal });
    } catch (error) {
      await socket.close();
      await this.closeOuterSync(outer);
      throw error;
    }
    const uploads = new AbortController();
    setMaxListeners(256, uploads.signal);
    // Only a group restarted on its own (its run has a job id of its own, the bridge keeps
    // the attempt's) can save a step the others committed.
    const restartedAlone = Boolean(job.bridgeJobId) && job.bridgeJobId !== job.jobId;
    const running: RunningJob = { job, supervisor, socket, uploads, uploadsByRank: new Map(), exitReports: new Set(), ckptDir, outer, ...(restartedAlone ? { committedBefore: new Map() } : {}) };
    this.jobs.set(jobId, running);
    // Listeners go on before anything is awaited: a fast trainer's first lines (or its
    // exit) would otherwise be emitted to no one.
    const ranks = [...supervisor.pids().keys()];
    this.send({ ranksStarted: { jobId, ranks, pids: ranks.map((rank) => supervisor.pids().get(rank) ?? 0) } });
    supervisor.on("line", ({ rank, stream, line }) => {
      this.send({ log: { jobId, rank, stream: stream === "stdout" ? LogStream.LOG_STREAM_STDOUT : LogStream.LOG_STREAM_STDERR, line, timeMs: Date.now() } });
    });
    supervisor.on("exit", (exit) => {
      void this.writePidFile();
      const report = this.reportRankExit(running, exit);
      running.exitReports.add(report);
    });
    supervisor.on("allExited", () => {
      // The job's state goes once every exit is reported, i.e. after the ranks' uploads.
      void Promise.allSettled([...running.exitReports]).then(async () => {
        this.jobs.delete(jobId);
        await socket.close();
        await this.closeOuterSync(outer);
        await this.writePidFile();
      });
    });
    socket.on("metric", (metric) => {
      this.send({ metric: { jobId, rank: metric.rank, step: metric.step, values: metric.values, timeMs: Date.now() } });
    });
    socket.on("checkpoint", (report) => {
      const pending = running.uploadsByRank.get(report.rank) ?? new Set<Promise<void>>();
      // A rank's steps are stored in the order it saved them: a later step committed while
      // an earlier one still uploads (the store or the head out for a while) would have
      // the commit's prune take the earlier step's objects for abandoned.
      const earlier = [...pending];
      const upload = Promise.allSettled(earlier).then(() => this.reportCheckpoint(jobId, report));
      running.uploadsByRank.set(report.rank, pending);
      pending.add(upload);
      void upload.finally(() => pending.delete(upload));
    });
    await this.writePidFile();
  }

  /** Listens for other groups' leaders when a bridge port is configured; runs on without one if it cannot. */
  private async openBridge(): Promise<void> {
    if (this.options.bridgePort === undefined) return;
    try {
      this.bridge = await BridgeEndpoint.listen({
        host: this.options.bridgeHost,
        port: this.options.bridgePort,
        advertise: this.options.bridgeAdvertise,
        // Listening on one address (a namespace's wan address, loopback): that is where
        // peers dial; on every interface, the node's advertised address.
        advertiseHost: ["0.0.0.0", "::"].includes(this.options.bridgeHost) ? this.options.advertiseAddress : this.options.bridgeHost,
        // The bridge follows the head: a head with a CA (pinned) gives every job's leaders
        // certificates from it; an insecure head has none to give.
        secure: this.options.headTrust.kind === "pinned",
        logger: this.logger,
      });
      this.logger.info("bridge listening", { port: this.bridge.port, advertised: this.bridge.advertised, tls: this.bridge.secure });
      if (!this.bridge.secure) this.logger.warn("the bridge is plaintext (the head is insecure): group leaders authenticate each other with the job's HMAC key, but tensors cross the network unencrypted");
    } catch (error) {
      this.logger.warn("bridge could not listen; this node cannot lead a group of a job that syncs across groups", { port: this.options.bridgePort, error: (error as Error).message });
    }
  }

  /**
   * On the leader node of a group in a job with several groups: the job's bridge to the
   * other groups' leaders and the socket rank 0 asks for outer steps on. Nothing on
   * other nodes, or for a one-group job.
   */
  private async openOuterSync(job: IStartJob): Promise<RunningJob["outer"]> {
    const jobId = job.jobId ?? "";
    const groups = job.topology?.groups ?? [];
    if (groups.length < 2 || (job.groupRank ?? 0) !== 0) return undefined;
    const key = job.bridgeSecret && job.bridgeSecret.length > 0 ? Buffer.from(job.bridgeSecret) : undefined;
    if (!key || !this.bridge) {
      this.agentLog(jobId, `this node leads group ${job.group} of a job with ${groups.length} groups but ${this.bridge ? "the head sent no bridge key" : "runs without a bridge (--bridge-port)"}: outer steps across groups will fail`);
      return undefined;
    }
    let tls: BridgeTlsCredentials | undefined;
    try {
      tls = job.bridgeTls ? bridgeTlsCredentials(job.bridgeTls) : undefined;
    } catch (error) {
      this.agentLog(jobId, `this node leads group ${job.group} but ${(error as Error).message}: outer steps across groups will fail`);
      return undefined;
    }
    if (this.bridge.secure && !tls) {
      this.agentLog(jobId, `this node leads group ${job.group} of a job with ${groups.length} groups but the head sent no bridge certificate (this bridge runs TLS): outer steps across groups will fail`);
      return undefined;
    }
    const groupIndex = job.topology?.groupIndex ?? 0;
    const peers: BridgePeer[] = groups.filter((_, index) => index !== groupIndex)
      .map((entry) => ({ group: entry.name ?? "", index: entry.index ?? 0, address: entry.bridgeAddress ?? "" }));
    // Every group of the attempt meets under one id, also a group restarted on its own.
    let bridge: JobBridge;
    try {
      bridge = this.bridge.open({
        job: job.bridgeJobId || jobId, group: job.group ?? "", groupIndex, key,
        // A plaintext bridge (insecure head) ignores certificates it cannot use.
        ...(tls && this.bridge.secure ? { tls } : {}),
        peers, logger: this.logger, onEvent: (line) => this.agentLog(jobId, line),
      });
    } catch (error) {
      // A bad PEM from the head: named, never quoted.
      this.agentLog(jobId, `could not open the bridge of group ${job.group}: ${(error as Error).message}; outer steps across groups will fail`);
      return undefined;
    }
    // A success is the trainer's to print (with the checksum of the new outer
    // parameters); a failure is told here too, naming the peer, since the trainer may
    // not live to say it.
    const told = <T>(what: string) => (error: Error): T => {
      if (!bridge.closed) this.agentLog(jobId, `${what} failed: ${error.message}`);
      throw error;
    };
    // The head keeps which groups each group is in step with (the checkpoints a step waits
    // for depend on it): told at every join, and after an outer step whose groups differ
    // from the last told (a group left, or came back).
    let toldInStep = "";
    const tellInStep = (groups: readonly string[], innerStep: number, atJoin: boolean) => {
      const key = [...groups].sort().join("+");
      if (!atJoin && key === toldInStep) return;
      toldInStep = key;
      this.send({ outerJoin: { jobId, group: job.group ?? "", inStepWith: [...groups], innerStep, atJoin } });
    };
    try {
      const socket = await OuterSyncSocketServer.listen(agentSocketPath(this.options.stateDir, `${jobId}-outer`), {
        exchange: (request) => bridge.exchange(request).then((answer) => {
          tellInStep(answer.groups, 0, false);
          return answer;
        }, told(`outer step ${request.outerStep}`)),
        join: (request) => bridge.join(request).then((answer) => {
          tellInStep(answer.groups, answer.mode === "state" ? answer.state.innerStep : request.innerStep, true);
          return answer;
        }, told(`joining at outer step ${request.outerStep}`)),
        shareState: (request) => bridge.shareState(request).catch(told(`sending the outer state of step ${request.outerStep}`)),
      }, this.logger);
      return { bridge, socket };
    } catch (error) {
      bridge.close();
      throw error;
    }
  }

  private async closeOuterSync(outer: RunningJob["outer"]): Promise<void> {
    if (!outer) return;
    outer.bridge.close();
    await outer.socket.close();
  }

  /**
   * The checkpoint store through URLs the head signs: opened at the first Register that
   * names one (a node configured with keys keeps its own store), kept across reconnects.
   */
  private openPresignedStore(described: IPresignedStorage): void {
    if (this.checkpoints) return;
    let transfer;
    try {
      transfer = parseTransferConfig(JSON.parse(described.transferJson || "{}"));
    } catch (error) {
      this.logger.error("the head's transfer settings do not parse; no checkpoint store on this node", { error: (error as Error).message });
      return;
    }
    const store = new PresignedObjectStore({
      sign: (requests, signal) => this.presign(requests, signal),
      description: described.description || "presigned store",
      keyPrefix: described.keyPrefix ?? "",
      wireIsProtected: described.wireIsProtected ?? false,
      transfer,
      ...(this.options.storageDial ? { dial: this.options.storageDial } : {}),
      logger: this.logger.child({ component: "presigned-store" }),
    });
    this.checkpoints = new CheckpointStore({ store, transfer, logger: this.logger, resumeStateDir: join(this.options.stateDir, "upload-journal") });
    this.logger.info("checkpoint store reached through presigned URLs from the head", { store: store.description });
  }

  /**
   * Asks the head to sign S3 requests. The head being away is an outage (retryable, the
   * upload waits it out); a refusal is final for that request.
   */
  private async presign(requests: readonly PresignRequest[], signal?: AbortSignal): Promise<PresignedRequest[]> {
    const client = this.client;
    const session = this.session;
    if (!client || !session) throw new ObjectStoreRequestError("not registered with the head: nothing can be signed", { operation: "Presign", retryable: true });
    const metadata = new grpc.Metadata();
    metadata.set("x-drover-worker-id", session.workerId);
    metadata.set("x-drover-session-token", session.token);
    const items = requests.map((request) => ({
      operation: presignOperationValue(request.operation),
      key: request.key,
      uploadId: request.uploadId ?? "",
      partNumber: request.partNumber ?? 0,
      metadata: request.metadata ?? {},
      delimiter: request.delimiter ?? "",
      marker: request.marker ?? "",
      uploadIdMarker: request.uploadIdMarker ?? "",
    }));
    let response;
    try {
      response = await callUnary(client.presign.bind(client), { protocolVersion: PROTOCOL_VERSION, items }, metadata, { ...(signal ? { signal } : {}), timeoutMs: 30_000 });
    } catch (error) {
      const code = (error as grpc.ServiceError).code;
      const final = code === grpc.status.PERMISSION_DENIED || code === grpc.status.INVALID_ARGUMENT || code === grpc.status.UNIMPLEMENTED;
      throw new ObjectStoreRequestError(`the head did not sign: ${(error as grpc.ServiceError).details || (error as Error).message}`, { operation: "Presign", retryable: !final, code: String(code) });
    }
    return (response.urls ?? []).map((url) => ({
      url: url.url ?? "",
      method: (url.method ?? "GET") as PresignedRequest["method"],
      headers: { ...(url.headers ?? {}) },
      expiresInMs: url.expiresInMs ?? 0,
    }));
  }

  /** Fetches a job's shipped working directory; the trainers run in it. */
  private async downloadCodeBundle(job: IStartJob, destDir: string): Promise<string> {
    if (!this.checkpoints) throw new WorkerConfigError("the job's code was shipped as a bundle but this node has no checkpoint store (the head named none at Register, and DROVER_STORAGE_CONFIG is unset)");
    const started = Date.now();
    const bundle = await this.checkpoints.downloadCodeBundle({ run: job.runId ?? "", bundleId: job.codeBundleId ?? "", destDir, signal: this.stopController.signal });
    this.agentLog(job.jobId ?? "", `code bundle ${bundle.bundleId.slice(0, 12)} verified: ${bundle.files.length} files, ${(bundle.totalBytes / 2 ** 20).toFixed(1)} MiB in ${((Date.now() - started) / 1000).toFixed(1)}s`);
    return destDir;
  }

  /** Downloads the committed checkpoint a resumed job starts from; every byte is verified first. */
  private async downloadResumeCheckpoint(job: IStartJob, destDir: string): Promise<string> {
    if (!this.checkpoints) throw new WorkerConfigError("the job resumes from a checkpoint but this node has no checkpoint store (the head named none at Register, and DROVER_STORAGE_CONFIG is unset)");
    const step = Number(job.resumeStep ?? 0);
    const started = Date.now();
    this.agentLog(job.jobId ?? "", `downloading checkpoint step ${step} of run ${job.runId}`);
    let subdir = groupCheckpointSubdir(job);
    let committed: CheckpointManifest | undefined;
    if (subdir) {
      // A step committed while this group was not in step holds the other groups' files
      // only; the group starts from one of theirs (the same model after an outer step).
      committed = await this.checkpoints.readManifest(job.runId ?? "", step, { signal: this.stopController.signal });
      const own = job.topology?.groups?.find((group) => group.name === job.group);
      const from = committed && resumeSubdirFor(committed, job.group ?? "", own?.worldSize ?? 0);
      if (from && from !== subdir) {
        this.agentLog(job.jobId ?? "", `checkpoint step ${step} was committed without group ${job.group} (it was not in step then): the group starts from ${groupOfCheckpointFolder(from)}'s files`);
        subdir = from;
      }
    }
    // The manifest read above is not read again (download reads it when not given one).
    const manifest = await this.checkpoints.download({ run: job.runId ?? "", step, destDir, subdir, ...(committed ? { manifest: committed } : {}), signal: this.stopController.signal });
    const seconds = (Date.now() - started) / 1000;
    const files = subdir ? manifest.files.filter((file) => file.path.startsWith(`${subdir}/`)) : manifest.files;
    const bytes = files.reduce((sum, file) => sum + file.size, 0);
    this.agentLog(job.jobId ?? "", `checkpoint step ${step}${subdir ? ` (${subdir})` : ""} verified: ${files.length} files, ${(bytes / 2 ** 20).toFixed(1)} MiB in ${seconds.toFixed(1)}s`);
    return subdir ? join(destDir, subdir) : destDir;
  }

  /** A line from the agent itself into the job's output (uploads, downloads). */
  private agentLog(jobId: string, line: string): void {
    this.send({ log: { jobId, rank: 0, stream: LogStream.LOG_STREAM_AGENT, line: `${this.options.nodeName}: ${line}`, timeMs: Date.now() } });
  }

  /**
   * Tells the head a rank exited, but only after that rank's checkpoint uploads are done
   * (stored, or failed and reported): the head decides the job's result from the exits,
   * and a result declared while the last checkpoint is still uploading would lose it. A
   * trainer's last socket lines can be read after its exit is seen, so the socket is
   * given a moment to deliver them first.
   */
  private async reportRankExit(running: RunningJob, exit: { rank: number; exitCode: number; signal: string; lastLines: string[] }): Promise<void> {
    const jobId = running.job.jobId ?? "";
    await running.socket.drained(exit.rank, SOCKET_DRAIN_MS);
    const pending = [...(running.uploadsByRank.get(exit.rank) ?? [])];
    if (pending.length > 0) {
      this.agentLog(jobId, `rank ${exit.rank} exited; reporting it once its ${pending.length} checkpoint upload${pending.length === 1 ? "" : "s"} finish`);
      await Promise.allSettled(pending);
    }
    this.send({ rankExit: { jobId, rank: exit.rank, exitCode: exit.exitCode, signal: exit.signal, lastLines: exit.lastLines } });
  }

  /**
   * One rank's upload of one step, tried again while the store is unreachable or failing
   * (the transfer engine's own retries cover seconds; an outage can last minutes) until
   * `uploadRetryForMs` has passed. Interrupted multipart uploads resume where they were.
   * A failure that another try cannot fix (a missing file, refused credentials) or the
   * job's stop ends it at once.
   */
  private async uploadWithRetry(running: RunningJob, report: CheckpointMessage, signal: AbortSignal) {
    const jobId = running.job.jobId ?? "";
    const confined = await confineCheckpointReport(running.ckptDir, report);
    const { value, attempts } = await retryThroughOutage(() => this.checkpoints!.uploadRank({
      run: running.job.runId ?? "",
      step: report.step,
      rank: report.rank,
      dir: confined.dir,
      files: confined.files,
      subdir: groupCheckpointSubdir(running.job),
      signal,
    }), {
      policy: { ...STORE_OUTAGE_RETRY, retryForMs: this.options.uploadRetryForMs },
      signal,
      // One line per try, not one per request: the transfer engine's own retries stay quiet.
      onRetry: ({ attempt, delayMs, remainingMs, error }) => {
        this.agentLog(jobId, `rank ${report.rank} checkpoint step ${report.step}: upload failed (${error.message}); trying again in ${Math.round(delayMs / 1000)}s (try ${attempt + 1}, giving up ${Math.round(remainingMs / 1000)}s from now)`);
        this.logger.warn("checkpoint upload failed; retrying", { jobId, step: report.step, rank: report.rank, attempt, delayMs, error: error.message });
      },
    });
    if (attempts > 1) this.agentLog(jobId, `rank ${report.rank} checkpoint step ${report.step} stored after ${attempts} tries`);
    return value;
  }

  /** Whether `step` is committed already, asked of the store once per step for all the node's ranks. */
  private committedBefore(running: RunningJob, step: number, signal: AbortSignal): Promise<boolean> {
    const known = running.committedBefore!;
    let answer = known.get(step);
    if (!answer) {
      answer = this.checkpoints!.isCommitted(running.job.runId ?? "", step, { signal });
      known.set(step, answer);
      // A failed question is asked again by the next rank, not remembered.
      answer.catch(() => known.delete(step));
    }
    return answer;
  }

  /**
   * Uploads the files a rank reports for a checkpoint step (sha256 recorded with each
   * object) and reports them to the head, which commits the step once every rank has.
   * Without a store the files are only hashed: the head then cannot commit them.
   */
  private async reportCheckpoint(jobId: string, report: CheckpointMessage): Promise<void> {
    const running = this.jobs.get(jobId);
    if (this.checkpoints && running) {
      try {
        const started = Date.now();
        const signal = AbortSignal.any([this.stopController.signal, running.uploads.signal]);
        setMaxListeners(256, signal); // every concurrent part transfer listens on it
        // A group restarted on its own may save a step the others committed without it;
        // its files must not replace objects a committed manifest names.
        if (running.committedBefore && await this.committedBefore(running, report.step, signal)) {
          this.agentLog(jobId, `rank ${report.rank} checkpoint step ${report.step}: already committed by the groups in step then; not uploaded over it`);
          return;
        }
        const uploaded = await this.uploadWithRetry(running, report, signal);
        const bytes = uploaded.files.reduce((sum, file) => sum + file.size, 0);
        this.logger.info("checkpoint files uploaded", { jobId, step: report.step, rank: report.rank, bytes, ms: Date.now() - started });
        this.send({ checkpoint: { jobId, rank: report.rank, step: report.step, files: uploaded.files } });
      } catch (error) {
        const message = (error as Error).message;
        this.logger.error("checkpoint upload failed", { jobId, step: report.step, rank: report.rank, error: message });
        this.send({ checkpoint: { jobId, rank: report.rank, step: report.step, error: message } });
      }
      return;
    }
    try {
      if (!running) return;
      const confined = await confineCheckpointReport(running.ckptDir, report);
      const files: ICheckpointFile[] = [];
      for (const relative of confined.files) {
        const absolute = resolvePath(confined.dir, relative);
        const { size } = await stat(absolute);
        const subdir = groupCheckpointSubdir(running.job);
        files.push({ path: subdir ? `${subdir}/${relative}` : relative, size, sha256: await sha256File(absolute, this.stopController.signal) });
      }
      this.send({ checkpoint: { jobId, rank: report.rank, step: report.step, files } });
    } catch (error) {
      this.send({ checkpoint: { jobId, rank: report.rank, step: report.step, error: (error as Error).message } });
    }
  }

  private send(message: IWorkerMessage, skipQueue = false): void {
    const full = { protocolVersion: PROTOCOL_VERSION, ...message };
    if (this.stream && this.outbox.length === 0) {
      this.writeToHead(this.stream, full);
      return;
    }
    if (skipQueue) return;
    this.outbox.push(full);
    if (this.outbox.length > OUTBOX_LIMIT) {
      const firstLog = this.outbox.findIndex((queued) => queued.log);
      this.outbox.splice(firstLog >= 0 ? firstLog : 0, 1);
    }
    if (this.stream) this.flushOutbox();
  }

  private flushOutbox(): void {
    while (this.stream && this.outbox.length > 0) this.writeToHead(this.stream, this.outbox.shift()!);
  }

  /** Writes to the head's stream and keeps what a successor head would need again. */
  private writeToHead(stream: grpc.ClientDuplexStream<IWorkerMessage, HeadMessage>, message: IWorkerMessage): void {
    stream.write(message);
    const jobId = message.metric?.jobId ?? message.log?.jobId ?? message.checkpoint?.jobId ?? message.rankExit?.jobId ?? message.jobFailure?.jobId;
    if (!jobId) return;
    let journal = this.sentJournal.get(jobId);
    if (!journal) {
      journal = { metrics: [], logs: [], reports: [] };
      this.sentJournal.set(jobId, journal);
      // Oldest job first out (a Map iterates in insertion order).
      if (this.sentJournal.size > REPLAY_JOBS) this.sentJournal.delete(this.sentJournal.keys().next().value!);
    }
    const [list, limit] = message.metric ? [journal.metrics, REPLAY_METRICS_PER_JOB] : message.log ? [journal.logs, REPLAY_LOG_LINES_PER_JOB] : [journal.reports, REPLAY_REPORTS_PER_JOB];
    list.push(message);
    if (list.length > limit) list.shift();
  }

  /**
   * Sends a new head what its dead predecessor was sent (replayed = true), before the
   * outbox and the first heartbeat: per job its newest metrics and output lines, then its checkpoint
   * reports and exits in the order they were sent (a rank's reports before its exit).
   */
  private replayJournal(stream: grpc.ClientDuplexStream<IWorkerMessage, HeadMessage>): void {
    let count = 0;
    for (const journal of this.sentJournal.values()) {
      for (const message of [...journal.metrics, ...journal.logs, ...journal.reports]) {
        stream.write({ ...message, replayed: true });
        count++;
      }
    }
    if (count > 0) this.logger.info("sent a new head what its predecessor was sent last", { messages: count });
  }

  /**
   * The pids of running trainer process groups, so `drover down` can stop them even if
   * this agent is gone. Writes are serialised (rank exits come in bursts) and a failed
   * write is logged, never fatal: the trainers matter more than the record of them.
   */
  private writePidFile(): Promise<void> {
    this.pidFileWrites = this.pidFileWrites.then(async () => {
      const pids = [...this.jobs.values()].flatMap((running) => [...running.supervisor.pids().values()]);
      const path = join(this.options.stateDir, "trainers.json");
      const temporary = `${path}.${process.pid}.tmp`;
      try {
        await writeFile(temporary, JSON.stringify({ agentPid: process.pid, trainerPids: pids }) + "\n");
        await rename(temporary, path);
      } catch (error) {
        // A full disk leaves the previous record, not a temporary file beside it.
        await rm(temporary, { force: true }).catch(() => undefined);
        throw error;
      }
    }).catch((error: Error) => this.logger.warn("could not write trainers.json", { error: error.message }));
    return this.pidFileWrites;
  }

  /**
   * Trainers of a previous agent of this node that died without stopping them (kill -9,
   * OOM killer) would go on training with peers of a job the head has already given up
   * on. Their pids are in trainers.json; a pid is only killed while its environment still
   * shows it is a Drover trainer (pids are reused).
   */
  private async reapLeftoverTrainers(): Promise<void> {
    const path = join(this.options.stateDir, "trainers.json");
    let record: { agentPid?: number; trainerPids?: number[] } | undefined;
    try {
      record = JSON.parse(await readFile(path, "utf8")) as typeof record;
    } catch {
      return;
    }
    const leftovers: number[] = [];
    for (const pid of record?.trainerPids ?? []) {
      if (!Number.isInteger(pid) || pid <= 1) continue;
      const environment = await readFile(`/proc/${pid}/environ`, "utf8").catch(() => "");
      if (environment.includes("DROVER_JOB_ID=")) leftovers.push(pid);
    }
    for (const pid of leftovers) signalProcessGroup(pid, "SIGKILL");
    if (leftovers.length > 0) this.logger.warn("killed trainers a previous agent of this node left running", { pids: leftovers, previousAgentPid: record?.agentPid });
    await rm(path, { force: true });
  }

  private async stopAllJobs(reason: string): Promise<void> {
    const running = [...this.jobs.values()];
    if (running.length > 0) this.logger.info("stopping trainers", { reason, jobs: running.length });
    await Promise.all(running.map((job) => job.supervisor.stop(this.options.stopGraceMs)));
    await Promise.all(running.map((job) => job.socket.close()));
    await Promise.all(running.map((job) => this.closeOuterSync(job.outer)));
    await this.bridge?.close();
    await this.pidFileWrites;
    await rm(join(this.options.stateDir, "trainers.json"), { force: true });
    this.checkpoints?.close();
  }

  /** Graceful stop: trainers get SIGTERM, then SIGKILL after the grace period. */
  async shutdown(): Promise<void> {
    if (this.state === "stopped") return;
    this.setState("stopping");
    this.stopController.abort();
    this.stream?.cancel();
  }
}

function signalProcessGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    try {
      process.kill(pid, signal);
    } catch {
      // Gone already.
    }
  }
}

/**
 * Where a group's rank files go inside a checkpoint step when the job has several
 * groups: each group is its own torch world with its own rank 0, and between outer
 * steps each holds its own inner state. Undefined for a one-group job (files at the
 * step's top, as before).
 */
export function groupCheckpointSubdir(job: IStartJob): string | undefined {
  return (job.topology?.groups ?? []).length > 1 ? groupCheckpointFolder(job.group ?? "") : undefined;
}

function agentSocketPath(stateDir: string, jobId: string): string {
  const preferred = join(stateDir, `agent-${jobId}.sock`);
  // sun_path holds 108 bytes; deep state directories fall back to the temp dir.
  if (Buffer.byteLength(preferred) < 100) return preferred;
  const digest = createHash("sha256").update(preferred).digest("hex").slice(0, 16);
  return join(os.tmpdir(), `drover-agent-${digest}.sock`);
}

async function sha256File(path: string, signal: AbortSignal): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { signal })) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
