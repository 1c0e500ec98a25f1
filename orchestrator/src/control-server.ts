import * as grpc from "@grpc/grpc-js";
import {
  PROTOCOL_VERSION, adminService, controlChannelOptions, controlService,
  type AdminHandlers, type ControlHandlers, type IHeadMessage, type ITelemetry, type IWorkerMessage,
} from "@drover/proto";
import { AdminViews, type HeadLiveView } from "./admin-service.js";
import { DroverError, JobRequestError, PresignRefusedError } from "./errors.js";
import type { JobController, JobRecord } from "./job-controller.js";
import type { Logger } from "./logger.js";
import type { JoinTokenBook } from "./join-tokens.js";
import type { PresignService } from "./presign-service.js";
import { checkRegistration } from "./register-request.js";
import { secretsEqual } from "./secret-compare.js";
import type { WorkerChannel, WorkerRegistry } from "./worker-registry.js";

export { secretsEqual } from "./secret-compare.js";


export interface ControlServerDeps {
  registry: WorkerRegistry;
  jobs: JobController;
  /** Single-use join tokens the head minted for the nodes it asked for. */
  joinTokens: JoinTokenBook;
  adminToken: string;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** Random per head process (RegisterResponse.head_instance): agents replay to a new one. */
  headInstance?: string;
  logger: Logger;
  /** Called by Admin.Shutdown after the reply is sent. */
  onShutdownRequested: () => void;
  /** Admission of a job: resolves the resume step, then hands it to the job controller. */
  /** A worker's Telemetry batch (checked and kept by the head's telemetry). */
  onTelemetry?: (workerId: string, telemetry: ITelemetry) => void;
  /** Signs S3 requests for workers when the store is presigned (Control.Presign); absent = UNIMPLEMENTED. */
  presign?: () => PresignService | undefined;
  /** What Admin.Status and Admin.WatchJob tell beyond the registry and the jobs (the head's state, telemetry, cost). */
  live?: HeadLiveView;
  submitJob: (request: { command: string[]; workingDir: string; env: Record<string, string>; runId?: string; nodes?: number; fromStep?: number; maxRestarts?: number; codeBundleId?: string; stallTimeoutMs?: number }) => Promise<JobRecord>;
}

function fail(callback: grpc.sendUnaryData<never>, code: grpc.status, details: string): void {
  callback({ code, details, name: "Error", message: details, metadata: new grpc.Metadata() }, null);
}

/**
 * The head's gRPC edge: Control for workers (any interface the spec names) and Admin
 * for the CLI (loopback only). Domain errors become gRPC statuses here and nowhere else.
 */
export class ControlServer {
  private readonly control = new grpc.Server(controlChannelOptions);
  private readonly admin = new grpc.Server(controlChannelOptions);
  private readonly views: AdminViews;
  controlPort = 0;
  adminPort = 0;

  constructor(private readonly deps: ControlServerDeps) {
    this.views = new AdminViews({ registry: deps.registry, jobs: deps.jobs, logger: deps.logger, ...(deps.live ? { live: deps.live } : {}) });
    this.control.addService(controlService, this.controlHandlers());
    this.admin.addService(adminService, this.adminHandlers());
  }

  /**
   * Control listens with TLS when given the head's certificate chain (head certificate,
   * then the CA workers pin), plaintext only without one (`head.insecure`). Admin stays
   * on loopback, where only this machine's users reach it, behind the admin token.
   */
  async listen(host: string, port: number, tls?: { chainPem: string; keyPem: string }): Promise<void> {
    const credentials = tls
      ? grpc.ServerCredentials.createSsl(null, [{ cert_chain: Buffer.from(tls.chainPem), private_key: Buffer.from(tls.keyPem) }], false)
      : grpc.ServerCredentials.createInsecure();
    this.controlPort = await bind(this.control, `${host.includes(":") ? `[${host}]` : host}:${port}`, credentials);
    this.adminPort = await bind(this.admin, "127.0.0.1:0", grpc.ServerCredentials.createInsecure());
  }

  private controlHandlers(): ControlHandlers {
    const { registry, jobs, logger } = this.deps;
    return {
      register: (call, callback) => {
        const request = call.request;
        const peer = call.getPeer();
        const nodeName = request.nodeName ?? "";
        const group = request.group ?? "";
        const reauthenticating = (request.sessionToken ?? "") !== "";
        // First the credential, before anything else the caller says is looked at: a join
        // token (spent below, once the registration is valid) or, from a node reconnecting,
        // its session credential. Neither value is ever logged.
        if (reauthenticating) {
          const verdict = registry.reauthenticate(nodeName, request.sessionToken ?? "");
          if (!verdict.ok) {
            logger.warn("worker refused: session credential not accepted", { node: nodeName, peer, reason: verdict.reason });
            fail(callback, grpc.status.UNAUTHENTICATED, `session credential not accepted (${verdict.reason}); the node needs a new join token`);
            return;
          }
        } else {
          const verdict = this.deps.joinTokens.check(request.joinToken ?? "", { nodeName, group });
          if (!verdict.ok) {
            // A spent token presented again is a replay (or two replicas racing for one): said as such.
            logger.warn(`worker refused: ${verdict.detail}`, { node: nodeName, group, peer });
            fail(callback, grpc.status.UNAUTHENTICATED, verdict.detail);
            return;
          }
        }
        if ((request.protocolVersion ?? 0) !== PROTOCOL_VERSION) {
          fail(callback, grpc.status.FAILED_PRECONDITION, `protocol_version ${request.protocolVersion} is not supported; this head speaks ${PROTOCOL_VERSION}`);
          return;
        }
        const checked = checkRegistration(request);
        if (!checked.ok) {
          logger.warn("worker refused: invalid registration", { peer, error: checked.error });
          fail(callback, grpc.status.INVALID_ARGUMENT, checked.error);
          return;
        }
        if (!reauthenticating) {
          const spent = this.deps.joinTokens.spend(request.joinToken ?? "", { nodeName, group });
          if (!spent.ok) {
            logger.warn(`worker refused: ${spent.detail}`, { node: nodeName, group, peer });
            fail(callback, grpc.status.UNAUTHENTICATED, spent.detail);
            return;
          }
        }
        const worker = registry.register(checked.value);
        callback(null, {
          protocolVersion: PROTOCOL_VERSION,
          workerId: worker.workerId,
          sessionToken: worker.sessionToken,
          sessionExpiresAtMs: worker.sessionExpiresAtMs,
          heartbeatIntervalMs: this.deps.heartbeatIntervalMs,
          heartbeatTimeoutMs: this.deps.heartbeatTimeoutMs,
          presignedStorage: this.deps.presign?.()?.describe() ?? null,
          headInstance: this.deps.headInstance ?? "",
        });
      },
      session: (call) => {
        const workerId = String(call.metadata.get("x-drover-worker-id")[0] ?? "");
        const sessionToken = String(call.metadata.get("x-drover-session-token")[0] ?? "");
        const channel: WorkerChannel = {
          send: (message: IHeadMessage) => call.write({ protocolVersion: PROTOCOL_VERSION, ...message }),
          close: () => call.end(),
        };
        if (!registry.attach(workerId, sessionToken, channel)) {
          const known = registry.get(workerId) !== undefined;
          logger.warn("session refused", { workerId, peer: call.getPeer(), reason: known ? "stale session token" : "unknown worker" });
          // grpc-js sends a server stream's status only through its error path: emitting
          // it ends the call with that status at once (destroy() left the client waiting
          // until its own deadline, and the stream open).
          call.emit("error", {
            code: known ? grpc.status.UNAUTHENTICATED : grpc.status.NOT_FOUND,
            details: known ? "stale session for this worker; register again" : `unknown worker ${workerId || "(none)"}; register again`,
          });
          return;
        }
        // The credential is renewed well before it expires, on the stream it protects.
        const renewals = setInterval(() => {
          const renewed = registry.renewSession(workerId);
          if (renewed) channel.send({ sessionRenewal: { sessionToken: renewed.token, expiresAtMs: renewed.expiresAtMs } });
        }, Math.max(1_000, Math.floor(registry.sessionTtlMs / 3)));
        renewals.unref();
        call.on("data", (message: IWorkerMessage) => {
          registry.seen(workerId);
          const replayed = message.replayed === true;
          if (message.heartbeat) jobs.onHeartbeat(workerId, message.heartbeat.runningJobIds ?? []);
          else if (message.metric) jobs.onMetric(workerId, message.metric, replayed);
          else if (message.log) jobs.onLog(workerId, message.log, replayed);
          else if (message.rankExit) jobs.onRankExit(workerId, message.rankExit, replayed);
          else if (message.checkpoint) jobs.onCheckpoint(workerId, message.checkpoint, replayed);
          else if (message.jobFailure) jobs.onJobFailure(workerId, message.jobFailure.jobId ?? "", message.jobFailure.reason ?? "the node could not run the job");
          else if (message.telemetry) this.deps.onTelemetry?.(workerId, message.telemetry);
          else if (message.outerJoin) {
            const groups = message.outerJoin.inStepWith ?? [];
            const innerStep = Number(message.outerJoin.innerStep ?? 0);
            if (groups.length <= 8 && groups.every((group) => group.length <= 64) && Number.isSafeInteger(innerStep)) jobs.onOuterJoin(workerId, message.outerJoin.jobId ?? "", groups, innerStep, message.outerJoin.atJoin === true);
            else logger.warn("outer join report refused: more than 8 groups, a name over 64 characters or an inner step past 2^53", { workerId });
          }
        });
        const end = () => {
          clearInterval(renewals);
          registry.detach(workerId, channel);
        };
        call.on("end", () => {
          end();
          call.end();
        });
        call.on("cancelled", end);
        call.on("error", end);
      },
      presign: (call, callback) => {
        const workerId = String(call.metadata.get("x-drover-worker-id")[0] ?? "");
        const sessionToken = String(call.metadata.get("x-drover-session-token")[0] ?? "");
        const worker = registry.get(workerId);
        if (!worker || !registry.holdsSession(workerId, sessionToken)) {
          logger.warn("presign refused", { workerId, peer: call.getPeer(), reason: worker ? "stale session token" : "unknown worker" });
          fail(callback, grpc.status.UNAUTHENTICATED, "unknown worker or stale session; register again");
          return;
        }
        const presign = this.deps.presign?.();
        if (!presign) {
          fail(callback, grpc.status.UNIMPLEMENTED, "this cluster's store is not reached through presigned URLs");
          return;
        }
        presign.sign(workerId, call.request.items ?? []).then(
          (urls) => callback(null, { protocolVersion: PROTOCOL_VERSION, urls }),
          (error: Error) => fail(callback, error instanceof PresignRefusedError ? grpc.status.PERMISSION_DENIED : grpc.status.INTERNAL, error.message),
        );
      },
    };
  }

  private adminHandlers(): AdminHandlers {
    const { jobs, logger } = this.deps;
    const authorized = (token: string | null | undefined, callback: grpc.sendUnaryData<never>) => {
      if (secretsEqual(token ?? "", this.deps.adminToken)) return true;
      logger.warn("admin call refused: invalid admin token");
      fail(callback, grpc.status.UNAUTHENTICATED, "invalid admin token (is this the state directory of the running head?)");
      return false;
    };
    return {
      submitJob: (call, callback) => {
        const request = call.request;
        if (!authorized(request.adminToken, callback as grpc.sendUnaryData<never>)) return;
        this.deps.submitJob({
          command: request.command ?? [],
          workingDir: request.workingDir || process.cwd(),
          env: { ...(request.env ?? {}) },
          runId: request.runId || undefined,
          nodes: request.nodes || undefined,
          fromStep: request.hasFromStep ? Number(request.fromStep) : undefined,
          maxRestarts: request.hasMaxRestarts ? Number(request.maxRestarts) : undefined,
          codeBundleId: request.codeBundleId || undefined,
          stallTimeoutMs: request.hasStallTimeout ? Number(request.stallTimeoutMs) : undefined,
        }).then(
          (job) => callback(null, { jobId: job.jobId, runId: job.runId }),
          (error: Error) => {
            const code = error instanceof JobRequestError ? grpc.status.FAILED_PRECONDITION : grpc.status.INTERNAL;
            fail(callback as grpc.sendUnaryData<never>, code, error instanceof DroverError ? error.message : `could not submit: ${error.message}`);
          },
        );
      },
      stopJob: (call, callback) => {
        if (!authorized(call.request.adminToken, callback as grpc.sendUnaryData<never>)) return;
        callback(null, { stopped: jobs.stop(call.request.jobId ?? "", "stopped by user") });
      },
      shutdown: (call, callback) => {
        if (!authorized(call.request.adminToken, callback as grpc.sendUnaryData<never>)) return;
        callback(null, {});
        setImmediate(this.deps.onShutdownRequested);
      },
      status: (call, callback) => {
        if (!authorized(call.request.adminToken, callback as grpc.sendUnaryData<never>)) return;
        callback(null, this.views.status());
      },
      watchJob: (call) => {
        if (!secretsEqual(call.request.adminToken ?? "", this.deps.adminToken)) {
          logger.warn("admin call refused: invalid admin token");
          // A server stream's status goes out through its error path (see session above).
          call.emit("error", { code: grpc.status.UNAUTHENTICATED, details: "invalid admin token (is this the state directory of the running head?)" });
          return;
        }
        this.views.watch(call);
      },
    };
  }

  /** Admin.WatchJob streams being served now. */
  get watchCount(): number {
    return this.views.watchCount;
  }

  async close(graceMs = 2_000): Promise<void> {
    // Open watches would hold the admin server's graceful shutdown for its whole grace.
    this.views.close();
    for (const server of [this.control, this.admin]) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }
}

function bind(server: grpc.Server, address: string, credentials: grpc.ServerCredentials): Promise<number> {
  return new Promise((resolve, reject) => {
    server.bindAsync(address, credentials, (error, port) => {
      // grpc-js says "No address added out of total 1 resolved"; the cause (EADDRNOTAVAIL,
      // EADDRINUSE, ...) is in its message when there is one.
      if (error) reject(new DroverError(`cannot listen on ${address}: ${error.message}`, { address }, { cause: error }));
      else resolve(port);
    });
  });
}
