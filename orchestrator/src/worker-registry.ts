import { createHash, randomBytes, randomUUID } from "node:crypto";
import { EventEmitter } from "node:events";
import type { IHeadMessage, IResources } from "@drover/proto";
import type { Logger } from "./logger.js";
import { secretsEqual } from "./secret-compare.js";

export type WorkerConnection = "registered" | "connected" | "disconnected" | "lost";

/** What a worker registers with (checked by register-request.ts before it gets here). */
export interface WorkerRegistration {
  nodeName: string;
  group: string;
  slots: number;
  resources: IResources;
  agentVersion: string;
  /** Random per agent process; a new one on re-registration means the agent restarted. */
  incarnation: string;
  /** host:port where other groups' leaders dial this node's bridge; "" without one. */
  bridgeAddress: string;
}

export interface RegisteredWorker extends WorkerRegistration {
  workerId: string;
  connection: WorkerConnection;
  registeredAtMs: number;
  lastSeenMs: number;
  /**
   * The node's current session credential (opens Session streams, re-registers); a
   * stale one from an earlier registration is refused. Never written to state files.
   */
  sessionToken: string;
  /** When sessionToken stops being accepted unless renewed first. */
  sessionExpiresAtMs: number;
}

/** Default life of a session credential; renewed on the Session stream every third of it. */
export const SESSION_TTL_MS = 15 * 60_000;

function newSessionToken(): string {
  return randomBytes(24).toString("base64url");
}

function sessionDigest(token: string): string {
  return createHash("sha256").update(token).digest("hex");
}

/**
 * What a head keeps of a registered worker across its own death (sessions.json): the
 * registration and the digests of its live session credentials, never a credential. A
 * new head over the same state directory restores these, so the agents of the dead head
 * re-register with the credentials they hold and their trainers go on.
 */
export interface PersistedWorker extends WorkerRegistration {
  workerId: string;
  registeredAtMs: number;
  sessions: Array<{ sha256: string; expiresAtMs: number }>;
}

export interface WorkerChannel {
  send(message: IHeadMessage): void;
  close(): void;
}

interface RegistryEvents {
  changed: [];
  /** A session credential was issued, renewed or revoked: what persisted() returns changed. */
  sessions: [];
  lost: [RegisteredWorker, string];
}

export interface Clock {
  now(): number;
  setInterval(callback: () => void, ms: number): { unref?(): void } | NodeJS.Timeout;
  clearInterval(handle: unknown): void;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  setInterval: (callback, ms) => setInterval(callback, ms),
  clearInterval: (handle) => clearInterval(handle as NodeJS.Timeout),
};

/**
 * Workers known to the head, keyed by node name: a node that registers again (agent
 * restart, network drop) keeps its worker id so jobs stay attached to it. A worker
 * that sends nothing for `heartbeatTimeoutMs` is lost.
 */
export class WorkerRegistry extends EventEmitter<RegistryEvents> {
  private readonly workers = new Map<string, RegisteredWorker>();
  private readonly channels = new Map<string, WorkerChannel>();
  /** The credential a renewal replaced, accepted until its own expiry (the renewal may have been lost on the way). */
  private readonly previousSessions = new Map<string, { token: string; expiresAtMs: number }>();
  /**
   * Digests of credentials a previous head issued (restore()): a worker that re-registers
   * with one of them is the same agent, reconnecting. Dropped once it has re-registered.
   */
  private readonly restoredSessions = new Map<string, Array<{ sha256: string; expiresAtMs: number }>>();
  private timer: unknown;

  constructor(private readonly options: { heartbeatTimeoutMs: number; clock?: Clock; logger: Logger; sessionTtlMs?: number }) {
    super();
  }

  get sessionTtlMs(): number {
    return this.options.sessionTtlMs ?? SESSION_TTL_MS;
  }

  private get clock(): Clock {
    return this.options.clock ?? systemClock;
  }

  start(): void {
    this.timer = this.clock.setInterval(() => this.checkHeartbeats(), Math.max(100, Math.floor(this.options.heartbeatTimeoutMs / 4)));
  }

  stop(): void {
    this.clock.clearInterval(this.timer);
    for (const channel of this.channels.values()) channel.close();
    this.channels.clear();
  }

  register(input: WorkerRegistration): RegisteredWorker {
    const now = this.clock.now();
    const existing = [...this.workers.values()].find((worker) => worker.nodeName === input.nodeName);
    if (existing) this.channels.get(existing.workerId)?.close();
    // A reconnect of the same agent keeps its trainers; a new agent process does not, so
    // the jobs of the previous one are lost even if the heartbeat timeout never fired.
    if (existing && existing.connection !== "lost" && existing.incarnation !== input.incarnation) {
      existing.connection = "lost";
      this.options.logger.warn("worker lost", { workerId: existing.workerId, node: existing.nodeName, reason: "its agent restarted" });
      this.emit("lost", existing, "its agent restarted");
    }
    const worker: RegisteredWorker = {
      workerId: existing?.workerId ?? `w-${randomUUID().slice(0, 8)}`,
      ...input,
      connection: "registered",
      registeredAtMs: now,
      lastSeenMs: now,
      sessionToken: newSessionToken(),
      sessionExpiresAtMs: now + this.sessionTtlMs,
    };
    this.previousSessions.delete(worker.workerId);
    this.restoredSessions.delete(worker.workerId);
    this.workers.set(worker.workerId, worker);
    this.options.logger.info(existing ? "worker re-registered" : "worker registered", { workerId: worker.workerId, node: worker.nodeName, group: worker.group, slots: worker.slots });
    this.emit("changed");
    this.emit("sessions");
    return worker;
  }

  /** True when `token` is a live session credential of this worker (current, or the one a renewal just replaced). */
  private sessionValid(worker: RegisteredWorker, token: string): boolean {
    const now = this.clock.now();
    if (token === "") return false;
    if (secretsEqual(token, worker.sessionToken) && now < worker.sessionExpiresAtMs) return true;
    const previous = this.previousSessions.get(worker.workerId);
    if (previous !== undefined && secretsEqual(token, previous.token) && now < previous.expiresAtMs) return true;
    const digest = sessionDigest(token);
    return (this.restoredSessions.get(worker.workerId) ?? []).some((restored) => secretsEqual(digest, restored.sha256) && now < restored.expiresAtMs);
  }

  /** True when `token` is a live session credential of worker `workerId` (Presign calls carry it). */
  holdsSession(workerId: string, token: string): boolean {
    const worker = this.workers.get(workerId);
    return worker !== undefined && this.sessionValid(worker, token);
  }

  /**
   * The registered node a re-registration with this session credential belongs to, or
   * why there is none (the credential is what a reconnecting agent holds instead of its
   * spent join token).
   */
  reauthenticate(nodeName: string, token: string): { ok: true; worker: RegisteredWorker } | { ok: false; reason: string } {
    const worker = [...this.workers.values()].find((candidate) => candidate.nodeName === nodeName);
    if (!worker) return { ok: false, reason: `no node ${nodeName} is registered` };
    if (!this.sessionValid(worker, token)) return { ok: false, reason: "the session credential is unknown or expired" };
    return { ok: true, worker };
  }

  /** A fresh credential for the worker; the one it replaces is honoured until its own expiry. */
  renewSession(workerId: string): { token: string; expiresAtMs: number } | undefined {
    const worker = this.workers.get(workerId);
    if (!worker) return undefined;
    this.previousSessions.set(workerId, { token: worker.sessionToken, expiresAtMs: worker.sessionExpiresAtMs });
    worker.sessionToken = newSessionToken();
    worker.sessionExpiresAtMs = this.clock.now() + this.sessionTtlMs;
    this.emit("sessions");
    return { token: worker.sessionToken, expiresAtMs: worker.sessionExpiresAtMs };
  }

  /** Every session credential is worthless from now on (the cluster is going down). */
  revokeSessions(): void {
    this.previousSessions.clear();
    this.restoredSessions.clear();
    for (const worker of this.workers.values()) worker.sessionExpiresAtMs = 0;
    this.emit("sessions");
  }

  /** The live workers as a later head would restore them: registrations and credential digests (sessions.json). */
  persisted(): PersistedWorker[] {
    const now = this.clock.now();
    return [...this.workers.values()].filter((worker) => worker.connection !== "lost").map((worker) => {
      const previous = this.previousSessions.get(worker.workerId);
      const sessions = [
        ...(worker.sessionToken ? [{ sha256: sessionDigest(worker.sessionToken), expiresAtMs: worker.sessionExpiresAtMs }] : []),
        ...(previous ? [{ sha256: sessionDigest(previous.token), expiresAtMs: previous.expiresAtMs }] : []),
        ...(this.restoredSessions.get(worker.workerId) ?? []),
      ].filter((session) => session.expiresAtMs > now);
      return {
        workerId: worker.workerId,
        nodeName: worker.nodeName,
        group: worker.group,
        slots: worker.slots,
        resources: worker.resources,
        agentVersion: worker.agentVersion,
        incarnation: worker.incarnation,
        bridgeAddress: worker.bridgeAddress,
        registeredAtMs: worker.registeredAtMs,
        sessions,
      };
    }).filter((worker) => worker.sessions.length > 0);
  }

  /**
   * The workers a dead head had (persisted()), taken up by this head before it listens:
   * disconnected until their agents re-register with the credentials they hold, and lost
   * as any silent worker is if they do not within the heartbeat timeout from now.
   */
  restore(workers: readonly PersistedWorker[]): void {
    const now = this.clock.now();
    for (const { sessions, ...registration } of workers) {
      this.workers.set(registration.workerId, { ...registration, connection: "disconnected", lastSeenMs: now, sessionToken: "", sessionExpiresAtMs: 0 });
      this.restoredSessions.set(registration.workerId, sessions.map((session) => ({ ...session })));
    }
    if (workers.length > 0) {
      this.options.logger.info("workers of the previous head restored; waiting for them to reconnect", { workers: workers.length });
      this.emit("changed");
    }
  }

  /** Forgets restored workers none of whose agents came back (this head could not take them up after all). */
  forgetRestored(): void {
    for (const workerId of this.restoredSessions.keys()) this.workers.delete(workerId);
    this.restoredSessions.clear();
    this.emit("changed");
  }

  /** Binds a Session stream; false when the worker id or session credential does not match (or expired). */
  attach(workerId: string, sessionToken: string, channel: WorkerChannel): boolean {
    const worker = this.workers.get(workerId);
    if (!worker || !this.sessionValid(worker, sessionToken)) return false;
    this.channels.get(workerId)?.close();
    this.channels.set(workerId, channel);
    worker.connection = "connected";
    worker.lastSeenMs = this.clock.now();
    this.emit("changed");
    return true;
  }

  detach(workerId: string, channel: WorkerChannel): void {
    if (this.channels.get(workerId) !== channel) return;
    this.channels.delete(workerId);
    const worker = this.workers.get(workerId);
    if (worker && worker.connection === "connected") {
      worker.connection = "disconnected";
      this.options.logger.warn("worker session closed", { workerId, node: worker.nodeName });
      this.emit("changed");
    }
  }

  seen(workerId: string): void {
    const worker = this.workers.get(workerId);
    if (!worker) return;
    worker.lastSeenMs = this.clock.now();
  }

  send(workerId: string, message: IHeadMessage): boolean {
    const channel = this.channels.get(workerId);
    if (!channel) return false;
    channel.send(message);
    return true;
  }

  get(workerId: string): RegisteredWorker | undefined {
    return this.workers.get(workerId);
  }

  /** Workers with a live Session, the only ones a job may use. */
  connected(): RegisteredWorker[] {
    return [...this.workers.values()].filter((worker) => worker.connection === "connected");
  }

  all(): RegisteredWorker[] {
    return [...this.workers.values()];
  }

  /**
   * Declares a live worker lost although it still answers (its GPUs report memory
   * errors): what a heartbeat loss does, so its jobs restart elsewhere from their
   * checkpoint and the repair loop replaces the node. Its session credential is
   * revoked too: a node condemned for its hardware must not rejoin and be given a job
   * again before it is terminated. False when there is no such worker or it is lost already.
   */
  declareLost(workerId: string, reason: string): boolean {
    const worker = this.workers.get(workerId);
    if (!worker || worker.connection === "lost") return false;
    worker.sessionExpiresAtMs = 0;
    this.previousSessions.delete(workerId);
    this.restoredSessions.delete(workerId);
    this.markLost(worker, reason);
    return true;
  }

  private markLost(worker: RegisteredWorker, reason: string): void {
    worker.connection = "lost";
    this.channels.get(worker.workerId)?.close();
    this.channels.delete(worker.workerId);
    this.options.logger.warn("worker lost", { workerId: worker.workerId, node: worker.nodeName, reason });
    this.emit("lost", worker, reason);
    this.emit("changed");
  }

  private checkHeartbeats(): void {
    const now = this.clock.now();
    for (const worker of this.workers.values()) {
      if (worker.connection === "lost") continue;
      const silentMs = now - worker.lastSeenMs;
      if (worker.connection === "registered" && silentMs > this.options.heartbeatTimeoutMs) {
        // Registered but never opened a Session: nothing ran there, so it is forgotten
        // rather than kept as a lost node (a loop of bare Registers would fill status).
        this.workers.delete(worker.workerId);
        this.options.logger.warn("registration expired: no session opened", { workerId: worker.workerId, node: worker.nodeName });
        this.emit("changed");
        continue;
      }
      if (silentMs > this.options.heartbeatTimeoutMs) this.markLost(worker, `no heartbeat for ${Math.round(silentMs / 1000)}s`);
    }
  }
}
