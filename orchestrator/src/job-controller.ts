import { randomBytes, randomUUID } from "node:crypto";
import { EventEmitter } from "node:events";
import type { IBridgeTls, ICheckpointReport, ILogLine, IMetricReport, IRankExit } from "@drover/proto";
import { LogStream } from "@drover/proto";
import { JobRequestError } from "./errors.js";
import type { Logger } from "./logger.js";
import { outputLine } from "./job-view.js";
import { assignRanks, topologyFor, type NodeAssignment } from "./rank-assignment.js";
import type { RegisteredWorker, WorkerRegistry } from "./worker-registry.js";

/**
 * `finishing`: every rank exited 0 and the head waits for the checkpoints they reported
 * to be committed before it declares the result (a job is done only when its last
 * checkpoint is stored or known lost).
 */
export type JobState = "pending" | "running" | "finishing" | "restarting" | "stopping" | "succeeded" | "failed" | "stopped";
const FINAL_STATES: ReadonlySet<JobState> = new Set(["succeeded", "failed", "stopped"]);

export interface JobRequest {
  command: string[];
  workingDir: string;
  env: Record<string, string>;
  runId?: string;
  /** How many nodes the job needs; they must all be connected before it starts. */
  nodes: number;
  /** Committed checkpoint step the job starts from. */
  resumeStep?: number;
  /** Restarts after a node failure before the job fails; default: the controller's. */
  maxRestarts?: number;
  /** The working directory shipped as a code bundle (runs/<run>/code/<id>/). */
  codeBundleId?: string;
  /**
   * A rank that reports no step and prints nothing for this long is reported stalled;
   * for twice as long, the attempt is restarted from the checkpoint as a node failure
   * would be. Raised to 20 of the rank's own recent step times when those are longer.
   * 0 = no watchdog; default: the controller's.
   */
  stallTimeoutMs?: number;
}

/** One automatic restart: why the attempt ended and where the next one resumed. */
export interface JobRestart {
  /** The attempt that ended (1 = the first). */
  attempt: number;
  reason: string;
  atMs: number;
  /** Newest step rank 0 reported in the attempt that ended. */
  lastStep?: number;
  /** Committed checkpoint the next attempt starts from; undefined = from scratch. */
  resumeStep?: number;
  /**
   * Set when only this group restarted (a job with several groups): the other groups
   * trained on, and the group took their live outer state when it came back.
   */
  group?: string;
}

export interface JobFailure {
  reason: string;
  rank?: number;
  lastLines: string[];
}

export interface JobRecord {
  jobId: string;
  runId: string;
  request: JobRequest;
  state: JobState;
  /** 1 for the first run, +1 per automatic restart. */
  attempt: number;
  /**
   * The job id workers see for the current attempt (`<jobId>` then `<jobId>-a2`, ...):
   * anything a worker still sends about an earlier attempt is recognised and dropped.
   */
  wireJobId: string;
  /** Committed checkpoint step the current attempt started from. */
  resumeStep?: number;
  maxRestarts: number;
  restarts: JobRestart[];
  createdAtMs: number;
  startedAtMs?: number;
  endedAtMs?: number;
  assignments: NodeAssignment[];
  worldSize: number;
  exitCodes: Record<number, number>;
  failure?: JobFailure;
  /** Latest metrics of every rank, and step -> rank 0's metrics (the loss curve). */
  latestMetrics: Record<number, { step: number; values: Record<string, number> }>;
  /** Steps of the current attempt: the ranks that reported each one stored. */
  checkpointsReported: Record<number, number[]>;
  /** Steps of the current attempt that were committed. */
  checkpointsCommitted: number[];
  /** Steps that could not be stored, with the reason (any attempt; shown in the summary). */
  checkpointsLost: Record<number, string>;
  /** Newest checkpoint step committed to the store by this job (or the one it resumed from). */
  lastCommittedStep?: number;
  /** Ranks of the current attempt that made no progress (no step, no output) for the stall timeout. */
  stalled?: Array<{ rank: number; idleMs: number }>;
  /**
   * The job id the workers of a group restarted on its own run under (`<wireJobId>-g<index>r<n>`);
   * groups not listed run under wireJobId. All of an attempt's groups share wireJobId on the bridge.
   */
  groupWireIds?: Record<string, string>;
  /** Groups restarting on their own right now (the others train on). */
  groupsRestarting?: string[];
  /**
   * Several groups: per group restarted on its own, the step up to which it writes no
   * checkpoint (the step it started again from, then the inner step it joined the others
   * at, OuterJoin); the groups that trained on commit those steps without it. Kept in
   * the record so that a head taking the job over knows it.
   */
  groupsBackAfter?: Record<string, number>;
  /**
   * Several groups: per group, the groups its leader last said it is in step with
   * (OuterJoin, at joins and when an outer step's groups change). Groups split apart (a
   * broken link) each train on; the lowest-index group training is the job's model (the
   * bridge has the higher index take the lower's state when they meet again), and a group
   * not in step with it trains apart.
   */
  groupsInStep?: Record<string, string[]>;
}

/** One group of a several-group job restarting on its own. */
interface GroupRestart {
  group: string;
  /** draining: its old ranks are being stopped; waiting: for its nodes to be connected. */
  phase: "draining" | "waiting";
  /** Global ranks of the group still expected to report their exit. */
  waiting: Set<number>;
  drained: () => void;
  resumeStep?: number;
  waitTimer?: NodeJS.Timeout;
}

/** What the watchdog knows of one rank of the current attempt. */
interface RankProgress {
  lastMs: number;
  lastStepMs?: number;
  /** Recent intervals between steps, newest last. */
  stepIntervals: number[];
}

/** The watchdog's default stall timeout, and how often it looks. */
export const DEFAULT_STALL_TIMEOUT_MS = 5 * 60_000;
const WATCHDOG_TICK_MS = 1_000;

export interface JobLogLine {
  jobId: string;
  rank: number;
  stream: "stdout" | "stderr" | "drover";
  line: string;
}

interface JobEvents {
  changed: [JobRecord];
  log: [JobLogLine];
  metric: [JobRecord, IMetricReport];
  checkpoint: [JobRecord, ICheckpointReport];
  /** The groups a checkpoint step waits for changed (checkpointGroups): pending steps may be complete now. */
  checkpointGroupsChanged: [JobRecord];
}

/**
 * Whose ranks one checkpoint step of a several-group job is made of: every rank of each
 * `required` group, plus each `optional` group all of whose ranks reported it (a group
 * restarting or training alone, or one that came back past the step and never writes it).
 */
export interface CheckpointGroups {
  required: string[];
  optional: string[];
  /** Groups training apart from the job's model (a split): their files are never in the step. */
  apart: string[];
}

/** The job's groups by name, which is their index order. */
function groupsOf(job: JobRecord): string[] {
  return [...new Set(job.assignments.map((assignment) => assignment.group))].sort();
}

/** An earlier attempt being stopped before the next one starts. */
interface DrainingAttempt {
  wireJobId: string;
  /** Global ranks still expected to report their exit. */
  waiting: Set<number>;
  done: () => void;
}

/** Chooses the rendezvous port of a group at its first node. */
export type MasterPortAllocator = (assignment: NodeAssignment) => Promise<number>;

/**
 * Runs jobs on the registered workers: waits until the requested nodes are connected,
 * assigns ranks and rendezvous, starts the ranks everywhere, and decides success
 * (every rank exited 0) or failure (the first non-zero exit, a node that could not
 * launch), stopping the other ranks on failure.
 *
 * A node failure (a worker lost or restarted, or a rank failing while one of the job's
 * nodes is gone) is not the trainer's fault: the job is stopped everywhere and started
 * again from the newest committed checkpoint once enough nodes are connected, at most
 * `maxRestarts` times. A plain non-zero exit with every node healthy is a bug in the
 * trainer and fails the job at once (rerunning it would fail the same way).
 */
export class JobController extends EventEmitter<JobEvents> {
  private readonly jobs = new Map<string, JobRecord>();
  private readonly waitTimers = new Map<string, NodeJS.Timeout>();
  /** Wire job id -> job, for every attempt (earlier attempts' messages must be recognised). */
  private readonly byWireId = new Map<string, JobRecord>();
  private readonly draining = new Map<string, DrainingAttempt>();
  private starting = false;
  private startAgain = false;
  private readonly watchdog: NodeJS.Timeout;
  /** jobId -> global rank -> progress, for the current attempt. */
  private readonly progress = new Map<string, Map<number, RankProgress>>();
  /** jobId -> the bridge key of the current attempt (several groups only; never logged or stored). */
  private readonly bridgeSecrets = new Map<string, Buffer>();
  /**
   * jobId -> group -> its leader's bridge certificate for the current attempt's bridge id
   * (several groups, a head with a CA only; never logged or stored). A group restarted
   * alone keeps the attempt's bridge id, so it gets the same one again.
   */
  private readonly bridgeCertificates = new Map<string, ReadonlyMap<string, IBridgeTls>>();
  /**
   * jobId -> workers of an adopted attempt (adoptInterrupted) that have not yet said, in
   * their first heartbeat to this head, whether its trainers still run there.
   */
  private readonly adopting = new Map<string, Set<string>>();
  /**
   * jobId -> global rank -> the newest step of the current attempt this head's files
   * hold: a metric an agent sends again (replayed) at or below it was written already.
   */
  private readonly replayFloors = new Map<string, Map<number, number>>();
  /**
   * jobId -> the newest lines of its output.log (outputLine) with how often each occurs
   * there: a replayed output line found here was written already and is taken once less.
   */
  private readonly replayedOutputTail = new Map<string, Map<string, number>>();
  /**
   * jobId -> groups that were still restarting on their own when every other group's
   * ranks had finished: stopped, and named when the final checkpoint lacks their ranks.
   */
  private readonly absentAtEnd = new Map<string, string[]>();
  /**
   * jobId -> groups restarted alone whose trainer joined the outer steps in step with no
   * other group (OuterJoin): they train on their own state until another group's state
   * reaches them. Trainers that never join (no OuterSync) are never listed.
   */
  private readonly joinedAlone = new Map<string, Set<string>>();
  /** jobId -> group -> its restart on its own, while it lasts. */
  private readonly groupRestarts = new Map<string, Map<string, GroupRestart>>();
  private groupRestartCount = 0;

  constructor(private readonly deps: {
    registry: WorkerRegistry;
    allocateMasterPort: MasterPortAllocator;
    workerWaitTimeoutMs: number;
    stopGraceMs: number;
    logger: Logger;
    /** Restarts after node failures when a request names none. */
    defaultMaxRestarts?: number;
    /**
     * The committed step a restart resumes from. The head waits for commits still in
     * flight and asks the store, so a restart never recomputes (and re-uploads over) a
     * step that was committed meanwhile. Without it: the newest step this job committed.
     */
    restartStep?: (job: JobRecord) => Promise<number | undefined>;
    /**
     * Resolves once the commits of the job's reported checkpoints have settled (stored or
     * failed for good); false when the cluster has no checkpoint store, so reported steps
     * are not expected to be committed. Without it the job finishes at once.
     */
    settleCheckpoints?: (job: JobRecord) => Promise<boolean>;
    /**
     * host:port other groups dial for a node's bridge when its provisioner publishes one
     * (Head.bridgeAddressOf); undefined: the address the worker reported applies.
     */
    bridgeAddressOf?: (nodeName: string) => string | undefined;
    /**
     * The TLS credentials of each group leader's bridge for one bridge job id (the head's
     * CA issues them); undefined: the bridge is plaintext, HMAC only (head.insecure).
     */
    issueBridgeCertificates?: (bridgeJobId: string, groups: readonly string[]) => Promise<ReadonlyMap<string, IBridgeTls> | undefined>;
    /** The stall timeout of jobs whose request names none (0 = off); default 5 minutes. */
    defaultStallTimeoutMs?: number;
    now?: () => number;
  }) {
    super();
    this.watchdog = setInterval(() => this.checkProgress(), WATCHDOG_TICK_MS);
    this.watchdog.unref();
    deps.registry.on("changed", () => {
      void this.startPendingJobs();
      void this.startWaitingGroups();
    });
    deps.registry.on("lost", (worker, reason) => this.onWorkerLost(worker, reason));
  }

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  submit(request: JobRequest): JobRecord {
    if (request.command.length === 0) throw new JobRequestError("the job has no command");
    if (request.nodes < 1) throw new JobRequestError("a job needs at least one node");
    const active = [...this.jobs.values()].find((job) => !FINAL_STATES.has(job.state));
    if (active) throw new JobRequestError(`job ${active.jobId} is still ${active.state}; stop it first (drover stop) or wait`, { jobId: active.jobId });
    const jobId = `job-${new Date(this.now()).toISOString().replace(/[-:T]/g, "").slice(0, 14)}-${randomUUID().slice(0, 4)}`;
    const job: JobRecord = {
      jobId,
      runId: request.runId ?? jobId.replace(/^job-/, "run-"),
      request,
      state: "pending",
      attempt: 1,
      wireJobId: jobId,
      resumeStep: request.resumeStep,
      maxRestarts: request.maxRestarts ?? this.deps.defaultMaxRestarts ?? 3,
      restarts: [],
      createdAtMs: this.now(),
      assignments: [],
      worldSize: 0,
      exitCodes: {},
      latestMetrics: {},
      checkpointsReported: {},
      checkpointsCommitted: [],
      checkpointsLost: {},
    };
    this.jobs.set(jobId, job);
    this.byWireId.set(jobId, job);
    this.deps.logger.info("job submitted", { jobId, runId: job.runId, nodes: request.nodes, command: request.command.join(" ") });
    this.armWaitTimer(job);
    this.emit("changed", job);
    void this.startPendingJobs();
    return job;
  }

  /**
   * A job a previous head was running when it died: it goes on here as its next attempt,
   * from `resumeStep` (the newest committed checkpoint), once its nodes are connected.
   * The same job id, so its output and metrics continue in the same files.
   */
  resumeInterrupted(previous: JobRecord, resumeStep: number | undefined, reason: string): JobRecord {
    const attempt = previous.attempt + 1;
    const lastStep = previous.latestMetrics?.[0]?.step;
    const job: JobRecord = {
      ...previous,
      state: "pending",
      attempt,
      wireJobId: `${previous.jobId}-a${attempt}`,
      resumeStep,
      restarts: [...(previous.restarts ?? []), { attempt: previous.attempt, reason, atMs: this.now(), ...(lastStep === undefined ? {} : { lastStep }), ...(resumeStep === undefined ? {} : { resumeStep }) }],
      assignments: [],
      worldSize: 0,
      exitCodes: {},
      checkpointsReported: {},
      checkpointsCommitted: [],
      checkpointsLost: previous.checkpointsLost ?? {},
      latestMetrics: previous.latestMetrics ?? {},
      groupWireIds: {},
      groupsRestarting: [],
      stalled: [],
    };
    delete job.failure;
    delete job.endedAtMs;
    delete job.groupsBackAfter;
    delete job.groupsInStep;
    this.jobs.set(job.jobId, job);
    this.byWireId.set(job.wireJobId, job);
    // The dead head's attempt, if this head had taken it up first: its late messages are not this attempt's.
    for (const wireJobId of [previous.wireJobId, ...Object.values(previous.groupWireIds ?? {})]) this.byWireId.set(wireJobId, job);
    this.adopting.delete(job.jobId);
    this.replayFloors.delete(job.jobId);
    this.replayedOutputTail.delete(job.jobId);
    this.progress.delete(job.jobId);
    this.deps.logger.info("job resumed after a head restart", { jobId: job.jobId, runId: job.runId, attempt, resumeStep });
    this.log(job, `${reason}; attempt ${attempt} resumes ${resumeStep === undefined ? "from scratch (nothing committed yet)" : `from committed checkpoint step ${resumeStep}`} once ${job.request.nodes} nodes are connected`);
    this.armWaitTimer(job);
    this.emit("changed", job);
    void this.startPendingJobs();
    return job;
  }

  /**
   * A job a previous head was running when it died, taken up where it runs: the same
   * attempt, wire id and ranks, so its trainers go on untouched. Its agents re-register
   * with this head and their first heartbeat says whether the attempt's trainers still
   * run there (onHeartbeat); a node whose trainers are gone fails the attempt as a lost
   * node would (a restart from the newest committed checkpoint), and one that never comes
   * back is lost at the heartbeat timeout. `lastSteps`: the newest step per global rank of
   * this attempt in the job's metrics file, below which replayed metrics are duplicates.
   */
  adoptInterrupted(previous: JobRecord, lastSteps: ReadonlyMap<number, number>, outputTail: readonly string[] = []): JobRecord {
    const job: JobRecord = {
      ...previous,
      state: "running",
      exitCodes: { ...previous.exitCodes },
      checkpointsReported: { ...previous.checkpointsReported },
      checkpointsCommitted: [...previous.checkpointsCommitted],
      checkpointsLost: { ...previous.checkpointsLost },
      latestMetrics: { ...previous.latestMetrics },
      groupWireIds: { ...previous.groupWireIds },
      groupsRestarting: [],
      stalled: [],
    };
    for (const [rank, step] of lastSteps) {
      if ((job.latestMetrics[rank]?.step ?? -1) < step) job.latestMetrics[rank] = { step, values: job.latestMetrics[rank]?.values ?? {} };
    }
    this.jobs.set(job.jobId, job);
    for (const wireJobId of [job.wireJobId, ...Object.values(job.groupWireIds ?? {})]) this.byWireId.set(wireJobId, job);
    this.replayFloors.set(job.jobId, new Map(lastSteps));
    const tail = new Map<string, number>();
    for (const line of outputTail) tail.set(line, (tail.get(line) ?? 0) + 1);
    this.replayedOutputTail.set(job.jobId, tail);
    const startedMs = this.now();
    this.progress.set(job.jobId, new Map(Array.from({ length: job.worldSize }, (_, rank) => [rank, { lastMs: startedMs, stepIntervals: [] }])));
    this.adopting.set(job.jobId, new Set(job.assignments.map((assignment) => assignment.workerId)));
    this.deps.logger.info("job adopted after a head restart", { jobId: job.jobId, attempt: job.attempt, nodes: job.assignments.length });
    this.log(job, `the head restarted; attempt ${job.attempt} goes on where it runs once its ${job.assignments.length} node${job.assignments.length === 1 ? "" : "s"} reconnect and report their trainers`);
    this.emit("changed", job);
    return job;
  }

  /**
   * A worker's heartbeat (Heartbeat.running_job_ids). The first one an adopted attempt's
   * worker sends this head settles whether its trainers survived: the agent sends again
   * what the dead head may have lost (exits, checkpoint reports) before it, so a node
   * whose ranks all exited meanwhile is no loss.
   */
  onHeartbeat(workerId: string, runningJobIds: readonly string[]): void {
    for (const [jobId, waiting] of this.adopting) {
      if (!waiting.delete(workerId)) continue;
      const job = this.jobs.get(jobId);
      const assignment = job?.assignments.find((candidate) => candidate.workerId === workerId);
      if (!job || !assignment || job.state !== "running") {
        this.adopting.delete(jobId);
        continue;
      }
      const ranks = Array.from({ length: assignment.localWorldSize }, (_, local) => assignment.globalRankOffset + local);
      const running = runningJobIds.includes(this.wireIdOf(job, assignment.group));
      if (!running && ranks.some((rank) => job.exitCodes[rank] === undefined)) {
        this.adopting.delete(jobId);
        // Gone without an exit anyone saw (-1, as for a signal): the restart waits for no report of them.
        for (const rank of ranks) job.exitCodes[rank] ??= -1;
        this.fail(job, { reason: `the trainers of node ${assignment.nodeName} did not outlive the head`, lastLines: [] }, true);
        continue;
      }
      if (waiting.size > 0) continue;
      this.adopting.delete(jobId);
      this.log(job, `adopted: attempt ${job.attempt}'s ${job.worldSize} ranks on ${job.assignments.length} node${job.assignments.length === 1 ? "" : "s"} go on without a restart`);
      if (Object.keys(job.exitCodes).length === job.worldSize) void this.finishAfterCheckpoints(job);
      else this.emit("changed", job);
    }
  }

  /** Whether an adopted attempt still waits for some of its nodes to say their trainers live. */
  adoptionPending(jobId: string): boolean {
    return this.adopting.has(jobId);
  }

  /** A resumed job that has not started yet starts from `step` instead (a newer commit the store knows of). */
  resumeFrom(jobId: string, step: number): void {
    const job = this.jobs.get(jobId);
    if (!job || job.state !== "pending" || job.resumeStep === step) return;
    job.resumeStep = step;
    const restart = job.restarts.at(-1);
    if (restart) restart.resumeStep = step;
    this.log(job, `the store's newest committed checkpoint of run ${job.runId} is step ${step}; attempt ${job.attempt} resumes from it`);
    this.emit("changed", job);
  }

  /** A pending job fails when its nodes are not all connected in time. */
  private armWaitTimer(job: JobRecord): void {
    clearTimeout(this.waitTimers.get(job.jobId));
    this.waitTimers.set(job.jobId, setTimeout(() => {
      if (job.state === "pending") {
        const connected = this.deps.registry.connected().length;
        this.finish(job, "failed", { reason: `only ${connected} of ${job.request.nodes} nodes connected after ${Math.round(this.deps.workerWaitTimeoutMs / 1000)}s`, lastLines: [] });
      }
    }, this.deps.workerWaitTimeoutMs));
  }

  /** The job a worker message is about, if it is about the job's current attempt. */
  private current(wireJobId: string | null | undefined): JobRecord | undefined {
    const job = this.byWireId.get(wireJobId ?? "");
    if (!job) return undefined;
    return job.wireJobId === wireJobId || Object.values(job.groupWireIds ?? {}).includes(wireJobId ?? "") ? job : undefined;
  }

  /** The job id a group's workers run under now. */
  private wireIdOf(job: JobRecord, group: string): string {
    return job.groupWireIds?.[group] ?? job.wireJobId;
  }

  /**
   * Whether a worker's message is from its group's current run: a group restarted on its
   * own runs under a job id of its own, and its old ranks' late messages are not.
   */
  private fromCurrentRun(job: JobRecord, workerId: string, wireJobId: string | null | undefined): NodeAssignment | undefined {
    const assignment = job.assignments.find((candidate) => candidate.workerId === workerId);
    return assignment && this.wireIdOf(job, assignment.group) === wireJobId ? assignment : undefined;
  }

  get(jobId: string): JobRecord | undefined {
    return this.jobs.get(jobId);
  }

  all(): JobRecord[] {
    return [...this.jobs.values()];
  }

  private async startPendingJobs(): Promise<void> {
    // A call while a pass runs asks for another pass: the running one may already have
    // looked at a job that became pending since (a restart), and no later event may come.
    if (this.starting) {
      this.startAgain = true;
      return;
    }
    this.starting = true;
    try {
      do {
        this.startAgain = false;
        for (const job of this.jobs.values()) {
          if (job.state !== "pending") continue;
          const connected = this.deps.registry.connected();
          if (connected.length < job.request.nodes) continue;
          await this.start(job, connected.sort((a, b) => a.nodeName.localeCompare(b.nodeName)).slice(0, job.request.nodes));
        }
      } while (this.startAgain);
    } finally {
      this.starting = false;
    }
  }

  private async start(job: JobRecord, workers: RegisteredWorker[]): Promise<void> {
    clearTimeout(this.waitTimers.get(job.jobId));
    job.assignments = assignRanks(workers.map((worker) => ({
      workerId: worker.workerId,
      nodeName: worker.nodeName,
      group: worker.group,
      address: worker.resources.address || "127.0.0.1",
      slots: worker.slots,
      bridgeAddress: this.deps.bridgeAddressOf?.(worker.nodeName) ?? worker.bridgeAddress,
    })));
    job.worldSize = job.assignments.reduce((sum, assignment) => sum + assignment.localWorldSize, 0);
    const masterPorts = new Map<string, number>();
    for (const assignment of job.assignments) {
      if (assignment.groupRank === 0) masterPorts.set(assignment.group, await this.deps.allocateMasterPort(assignment));
    }
    const groupCount = job.assignments[0]?.groupCount ?? 1;
    // One certificate per group of this attempt's bridge id, issued before any leader is
    // told to start: a leader without its certificate could not take part in outer steps.
    const certificates = groupCount > 1 ? await this.deps.issueBridgeCertificates?.(job.wireJobId, groupsOf(job)) : undefined;
    // Cancelled while the ports and certificates were being made: nothing to start.
    if (job.state !== "pending") return;
    if (certificates) this.bridgeCertificates.set(job.jobId, certificates);
    else this.bridgeCertificates.delete(job.jobId);
    // Groups sync through their leaders' bridges, authenticated with a key of this
    // attempt's own: a leader of a stopped attempt cannot pass as a peer of the next.
    const bridgeSecret = groupCount > 1 ? randomBytes(32) : undefined;
    if (bridgeSecret) this.bridgeSecrets.set(job.jobId, bridgeSecret);
    else this.bridgeSecrets.delete(job.jobId);
    job.groupWireIds = {};
    job.groupsRestarting = [];
    delete job.groupsBackAfter;
    delete job.groupsInStep;
    if (bridgeSecret) {
      const without = job.assignments.filter((assignment) => assignment.groupRank === 0 && !assignment.bridgeAddress);
      if (without.length > 0) {
        this.log(job, `warning: ${without.map((a) => `group ${a.group}'s leader ${a.nodeName}`).join(", ")} runs without a bridge; trainers that sync across groups (OuterSync) will fail`);
      }
    }
    job.state = "running";
    job.startedAtMs ??= this.now();
    const startedMs = this.now();
    this.progress.set(job.jobId, new Map(Array.from({ length: job.worldSize }, (_, rank) => [rank, { lastMs: startedMs, stepIntervals: [] }])));
    job.stalled = [];
    this.log(job, `${job.attempt > 1 ? `attempt ${job.attempt}: ` : ""}starting ${job.worldSize} ranks on ${job.assignments.length} nodes: ${job.assignments.map((a) => `${a.nodeName}=ranks ${a.rankOffset}-${a.rankOffset + a.localWorldSize - 1}`).join(", ")}`);
    this.emit("changed", job);
    for (const assignment of job.assignments) {
      const sent = this.deps.registry.send(assignment.workerId, { startJob: this.startJobMessage(job, assignment, masterPorts.get(assignment.group)!, job.resumeStep) });
      if (!sent) {
        this.fail(job, { reason: `node ${assignment.nodeName} disconnected before the job could start`, lastLines: [] }, true);
        return;
      }
    }
  }

  /** What one node is told to run: its ranks, its group's rendezvous, the job's topology. */
  private startJobMessage(job: JobRecord, assignment: NodeAssignment, masterPort: number, resumeStep: number | undefined) {
    const bridgeSecret = this.bridgeSecrets.get(job.jobId);
    const bridgeTls = this.bridgeCertificates.get(job.jobId)?.get(assignment.group);
    return {
      jobId: this.wireIdOf(job, assignment.group),
      bridgeJobId: job.wireJobId,
      runId: job.runId,
      command: job.request.command,
      workingDir: job.request.workingDir,
      env: job.request.env,
      topology: topologyFor(job.assignments, assignment),
      maxRestarts: job.maxRestarts,
      worldSize: assignment.worldSize,
      rankOffset: assignment.rankOffset,
      localWorldSize: assignment.localWorldSize,
      groupRank: assignment.groupRank,
      masterAddr: assignment.masterAddr,
      masterPort,
      group: assignment.group,
      resume: resumeStep !== undefined,
      resumeStep: resumeStep ?? 0,
      attempt: job.attempt,
      codeBundleId: job.request.codeBundleId ?? "",
      ...(bridgeSecret && assignment.groupRank === 0 ? { bridgeSecret } : {}),
      ...(bridgeSecret && bridgeTls && assignment.groupRank === 0 ? { bridgeTls } : {}),
    };
  }

  /** Global rank of a (worker, local) report: workers report group-local ranks. */
  private globalRank(job: JobRecord, workerId: string, rank: number): number {
    const assignment = job.assignments.find((candidate) => candidate.workerId === workerId);
    return assignment ? assignment.globalRankOffset + (rank - assignment.rankOffset) : rank;
  }

  /** `replayed`: sent to the dead head before this one; taken unless its output file's tail holds it. */
  onLog(workerId: string, line: ILogLine, replayed = false): void {
    const job = this.current(line.jobId);
    if (!job) return;
    const agentLine = line.stream === LogStream.LOG_STREAM_AGENT;
    const rank = agentLine ? -1 : this.globalRank(job, workerId, line.rank ?? 0);
    if (replayed) {
      const tail = this.replayedOutputTail.get(job.jobId);
      const written = outputLine({ rank, line: line.line ?? "" });
      const count = tail?.get(written) ?? 0;
      if (count > 0) {
        tail!.set(written, count - 1);
        return;
      }
    }
    if (agentLine) {
      this.log(job, line.line ?? "");
      return;
    }
    const stream = line.stream === LogStream.LOG_STREAM_STDERR ? "stderr" : "stdout";
    this.madeProgress(job, rank, false);
    this.emit("log", { jobId: job.jobId, rank, stream, line: line.line ?? "" });
  }

  /** `replayed`: sent to the dead head before this one (WorkerMessage.replayed); taken only if its files lack it. */
  onMetric(workerId: string, metric: IMetricReport, replayed = false): void {
    const job = this.current(metric.jobId);
    if (!job || (job.state !== "running" && job.state !== "finishing") || !this.fromCurrentRun(job, workerId, metric.jobId)) return;
    const rank = this.globalRank(job, workerId, metric.rank ?? 0);
    if (replayed) {
      const floor = this.replayFloors.get(job.jobId);
      if ((floor?.get(rank) ?? -1) >= Number(metric.step ?? 0)) return;
      floor?.set(rank, Number(metric.step ?? 0));
    }
    if (job.latestMetrics[rank]?.step !== Number(metric.step ?? 0)) this.madeProgress(job, rank, true);
    job.latestMetrics[rank] = { step: Number(metric.step ?? 0), values: { ...(metric.values ?? {}) } };
    this.emit("metric", job, { ...metric, rank });
  }

  onCheckpoint(workerId: string, report: ICheckpointReport, replayed = false): void {
    const job = this.current(report.jobId);
    // Reports of a failed attempt never count: its ranks may not all have written the step.
    // A finishing job still takes them: agents report a rank's exit only after its uploads.
    const assignment = job && (job.state === "running" || job.state === "finishing") ? this.fromCurrentRun(job, workerId, report.jobId) : undefined;
    if (!job || !assignment) return;
    // Sent again to this head after the previous one died: a committed step needs nothing more.
    if (replayed && job.checkpointsCommitted.includes(Number(report.step ?? 0))) return;
    const rank = this.globalRank(job, workerId, report.rank ?? 0);
    const group = assignment.group;
    if (this.joinedAlone.get(job.jobId)?.has(group) || this.absentAtEnd.get(job.jobId)?.includes(group)) {
      // Its files hold a model of its own (an older checkpoint trained on alone): never
      // part of the job's checkpoint, which the other groups commit without it.
      this.log(job, `checkpoint step ${Number(report.step ?? 0)} of rank ${rank} is left out: group ${group} trains alone on its own state`);
      return;
    }
    if (report.error) {
      this.checkpointLost(job.jobId, Number(report.step ?? 0), `rank ${rank} could not store it: ${report.error}`);
      return;
    }
    // A rank of a group that restarted on its own may report a step its earlier run reported.
    const reported = (job.checkpointsReported[Number(report.step)] ??= []);
    if (!reported.includes(rank)) reported.push(rank);
    this.emit("checkpoint", job, { ...report, rank });
  }

  onRankExit(workerId: string, exit: IRankExit, replayed = false): void {
    const draining = this.draining.get(exit.jobId ?? "");
    if (draining) {
      const job = this.byWireId.get(draining.wireJobId)!;
      draining.waiting.delete(this.globalRank(job, workerId, exit.rank ?? 0));
      if (draining.waiting.size === 0) draining.done();
      return;
    }
    const job = this.current(exit.jobId);
    if (!job) return;
    const assignment = job.assignments.find((candidate) => candidate.workerId === workerId);
    const restarting = assignment ? this.groupRestarts.get(job.jobId)?.get(assignment.group) : undefined;
    if (restarting) {
      // The old ranks of a group restarting on its own: their exits only end its drain.
      restarting.waiting.delete(this.globalRank(job, workerId, exit.rank ?? 0));
      if (restarting.waiting.size === 0) restarting.drained();
      return;
    }
    if (!this.fromCurrentRun(job, workerId, exit.jobId)) return;
    const rank = this.globalRank(job, workerId, exit.rank ?? 0);
    const exitCode = exit.exitCode ?? 0;
    if (replayed && job.exitCodes[rank] !== undefined) {
      // The dead head had it; what it had not done with it is done when the adoption settles.
      return;
    }
    job.exitCodes[rank] = exitCode;
    const how = exit.signal ? `signal ${exit.signal}` : `exit code ${exitCode}`;
    this.log(job, `rank ${rank} exited with ${how}`);
    if (job.state === "running" && (exitCode !== 0 || exit.signal)) {
      // Peers of a dead node fail in their collectives; that is the node's failure.
      const downNodes = job.assignments.filter((assignment) => this.deps.registry.get(assignment.workerId)?.connection !== "connected");
      const reason = downNodes.length > 0
        ? `rank ${rank} exited with ${how} while node ${downNodes.map((node) => node.nodeName).join(", ")} was down`
        : `rank ${rank} exited with ${how}`;
      const downGroups = new Set(downNodes.map((node) => node.group));
      this.fail(job, { reason, rank, lastLines: exit.lastLines ?? [] }, downNodes.length > 0, downGroups.size === 1 ? [...downGroups][0] : undefined);
      return;
    }
    if (job.state === "running" && this.othersFinished(job)) this.giveUpGroupRestarts(job);
    if (Object.keys(job.exitCodes).length === job.worldSize && job.state !== "failed" && !this.adopting.has(job.jobId)) {
      if (job.state === "stopping") this.finish(job, "stopped");
      else void this.finishAfterCheckpoints(job);
    } else {
      this.emit("changed", job);
    }
  }

  /**
   * A group's leader says whom it is in step with (`inStepWith`, its own group first): at
   * a join (OuterSync.join; `innerStep` is where it goes on from) or after an outer step
   * whose groups changed. A group restarted alone whose join found nobody trains on its
   * own state; a group not in step with the main group (a split) trains apart; both are
   * one model with the others again once they take their state.
   */
  onOuterJoin(workerId: string, wireJobId: string, inStepWith: readonly string[], innerStep: number, atJoin = true): void {
    const job = this.current(wireJobId);
    const assignment = job ? this.fromCurrentRun(job, workerId, wireJobId) : undefined;
    if (!job || !assignment || job.state !== "running" || assignment.groupRank !== 0) return;
    const group = assignment.group;
    const known = (job.groupsInStep ??= {});
    const wasApart = this.apartGroups(job);
    known[group] = [...inStepWith];
    const withOthers = inStepWith.some((other) => other !== group);
    if (atJoin && withOthers) {
      // It took the others' state at `innerStep` (or started with them there): it never
      // writes the steps up to it.
      const backAfter = (job.groupsBackAfter ??= {});
      backAfter[group] = Math.max(backAfter[group] ?? 0, innerStep);
      // Those groups are in step with it from now on; their own word comes only with
      // their next outer step, and until then their last one leaves it out.
      for (const other of inStepWith) {
        const theirs = known[other];
        if (other !== group && theirs && !theirs.includes(group)) known[other] = [...theirs, group];
      }
    }
    // Whether a group restarted alone trains alone is decided by what its join found.
    const alone = this.joinedAlone.get(job.jobId) ?? new Set<string>();
    this.joinedAlone.set(job.jobId, alone);
    if (atJoin && job.groupWireIds?.[group]) {
      if (!withOthers) alone.add(group);
      else if (alone.delete(group)) this.log(job, `group ${group} is in step with ${inStepWith.filter((other) => other !== group).join(", ")} again`);
    }
    const apart = this.apartGroups(job);
    for (const split of apart.filter((candidate) => !wasApart.includes(candidate))) {
      this.log(job, `group ${split} trains apart from group ${this.mainGroup(job)} (not in step with it): its checkpoints are left out until it takes that group's state`);
    }
    for (const merged of wasApart.filter((candidate) => !apart.includes(candidate))) {
      if (known[merged]?.includes(this.mainGroup(job) ?? "")) this.log(job, `group ${merged} is in step with group ${this.mainGroup(job)} again`);
    }
    this.emit("checkpointGroupsChanged", job);
    if (alone.has(group) && this.othersFinished(job)) this.giveUpGroupRestarts(job);
  }

  /**
   * The groups checkpoint `step` of a several-group job is committed with (undefined for
   * one group: every rank). A group restarting on its own, training alone, stopped at the
   * end, or back only after the step is optional: the groups that trained on commit it
   * without waiting for files that never come. A group training apart (split from the
   * main group) is never in it: its files hold another model. The groups share one model
   * after each outer step; a group missing from a step starts from another group's files
   * when the run resumes there.
   */
  checkpointGroups(job: JobRecord, step: number): CheckpointGroups | undefined {
    const groups = groupsOf(job);
    if (groups.length < 2) return undefined;
    const apart = this.apartGroups(job);
    const away = new Set([...this.absentGroups(job), ...(this.absentAtEnd.get(job.jobId) ?? [])]);
    const optional = groups.filter((group) => !apart.includes(group) && (away.has(group) || (job.groupsBackAfter?.[group] ?? -1) >= step));
    return { required: groups.filter((group) => !optional.includes(group) && !apart.includes(group)), optional, apart };
  }

  /**
   * The group whose model is the job's: the lowest-index group training, that is not
   * restarting, not alone after a restart, and not started again but yet to join.
   */
  private mainGroup(job: JobRecord): string | undefined {
    const away = this.groupsNotTraining(job);
    return groupsOf(job).find((group) => !away.has(group));
  }

  private groupsNotTraining(job: JobRecord): Set<string> {
    const known = job.groupsInStep;
    const awaitingJoin = Object.keys(job.groupWireIds ?? {}).filter((group) => known !== undefined && known[group] === undefined);
    return new Set([...this.absentGroups(job), ...awaitingJoin]);
  }

  /** Groups that said they are in step with others, but not with the main group. */
  private apartGroups(job: JobRecord): string[] {
    const main = this.mainGroup(job);
    const known = job.groupsInStep;
    if (main === undefined || !known) return [];
    const away = this.groupsNotTraining(job);
    return Object.entries(known).filter(([group, groups]) => group !== main && !away.has(group) && !groups.includes(main)).map(([group]) => group).sort();
  }


  /**
   * Some group restarts on its own (or came back but trains alone on its own state), and
   * every rank of the other groups exited 0: their training is done.
   */
  private othersFinished(job: JobRecord): boolean {
    const absentGroups = this.absentGroups(job);
    if (absentGroups.length === 0) return false;
    const absent = new Set(absentGroups.flatMap((group) => this.ranksOfGroup(job, group)));
    for (let rank = 0; rank < job.worldSize; rank++) if (!absent.has(rank) && job.exitCodes[rank] !== 0) return false;
    return true;
  }

  /**
   * The groups that trained on have finished while others were still restarting: those
   * are stopped rather than started again, since with nobody left to take the live outer
   * state from they would train a model of their own from an older checkpoint (and their
   * final step would be committed beside the others' as if it were the same model). The
   * job then ends through finishAfterCheckpoints: the final step is committed with the
   * groups that trained on (checkpointGroups), and a run resumed from it starts the
   * stopped groups from their files.
   */
  private giveUpGroupRestarts(job: JobRecord): void {
    const groups = this.absentGroups(job);
    if (groups.length === 0) return;
    for (const entry of this.groupRestarts.get(job.jobId)?.values() ?? []) {
      clearTimeout(entry.waitTimer);
      entry.drained();
    }
    this.groupRestarts.delete(job.jobId);
    this.joinedAlone.delete(job.jobId);
    job.groupsRestarting = [];
    this.absentAtEnd.set(job.jobId, groups);
    for (const group of groups) {
      for (const assignment of job.assignments.filter((candidate) => candidate.group === group)) {
        this.deps.registry.send(assignment.workerId, { stopJob: { jobId: this.wireIdOf(job, group), reason: "the other groups finished training", graceMs: this.deps.stopGraceMs } });
      }
      // Not started again: no exit of theirs is awaited (-1, as for a rank gone without one).
      for (const rank of this.ranksOfGroup(job, group)) job.exitCodes[rank] ??= -1;
      this.log(job, `the other groups finished while group ${group} was restarting or training alone; it is stopped (alone it trains a model of its own from an older checkpoint), and the final checkpoint holds the other groups' ranks`);
    }
    this.emit("checkpointGroupsChanged", job);
  }

  /** Groups restarting alone, and those back but in step with no other group. */
  private absentGroups(job: JobRecord): string[] {
    return [...new Set([...(this.groupRestarts.get(job.jobId)?.keys() ?? []), ...(this.joinedAlone.get(job.jobId) ?? [])])];
  }

  onJobFailure(workerId: string, jobId: string, reason: string): void {
    const job = this.current(jobId);
    if (job && !FINAL_STATES.has(job.state) && job.state !== "restarting") this.finish(job, "failed", { reason, lastLines: [] });
  }

  private onWorkerLost(worker: RegisteredWorker, reason: string): void {
    for (const job of this.jobs.values()) {
      if (job.state !== "running" && job.state !== "stopping") continue;
      const assignment = job.assignments.find((candidate) => candidate.workerId === worker.workerId);
      if (!assignment) continue;
      if (job.state === "stopping") this.finish(job, "stopped", { reason: `node ${worker.nodeName} lost (${reason}) while stopping`, lastLines: [] });
      else this.fail(job, { reason: `node ${worker.nodeName} lost (${reason})`, lastLines: [] }, true, assignment.group);
    }
  }

  /**
   * Every rank exited 0. The job succeeds once each checkpoint its ranks reported is
   * committed; when the last one could not be stored the job fails saying so (the run's
   * final state is not in the store), and earlier lost steps are named in the summary.
   */
  private async finishAfterCheckpoints(job: JobRecord): Promise<void> {
    if (job.state !== "running") return;
    job.state = "finishing";
    const waiting = this.uncommittedSteps(job);
    if (waiting.length > 0) this.log(job, `every rank exited 0; waiting for checkpoint step${waiting.length === 1 ? "" : "s"} ${waiting.join(", ")} to be committed`);
    this.emit("changed", job);
    let expectCommits = false;
    try {
      expectCommits = (await this.deps.settleCheckpoints?.(job)) ?? false;
    } catch (error) {
      this.log(job, `could not wait for checkpoint commits: ${(error as Error).message}`);
      expectCommits = true;
    }
    if (job.state !== "finishing") return; // stopped meanwhile
    if (!expectCommits) {
      this.finish(job, "succeeded");
      return;
    }
    for (const step of this.uncommittedSteps(job)) {
      if (job.checkpointsLost[step] !== undefined) continue;
      const ranks = job.checkpointsReported[step]?.length ?? 0;
      this.checkpointLost(job.jobId, step, ranks < job.worldSize ? `only ${ranks} of ${job.worldSize} ranks reported it stored` : "its commit did not complete");
    }
    const reported = this.reportedSteps(job);
    const finalStep = reported.at(-1);
    if (finalStep !== undefined && !job.checkpointsCommitted.includes(finalStep)) {
      const newest = job.lastCommittedStep === undefined ? "none" : `step ${job.lastCommittedStep}`;
      const absent = this.absentAtEnd.get(job.jobId);
      const why = absent ? `group ${absent.join(", ")} was still restarting or training alone when the others finished` : job.checkpointsLost[finalStep];
      this.finish(job, "failed", { reason: `training finished but its final checkpoint, step ${finalStep}, was not stored (${why}); newest committed checkpoint: ${newest}${absent ? `; resume the run with drover submit --run-id ${job.runId}` : ""}`, lastLines: [] });
      return;
    }
    const absent = this.absentAtEnd.get(job.jobId);
    if (absent && finalStep !== undefined) {
      this.log(job, `final checkpoint step ${finalStep} holds the groups that trained to the end; group ${absent.join(", ")} was not in step then and starts from their files if the run resumes`);
    }
    this.finish(job, "succeeded");
  }

  /** Steps this attempt's ranks reported (stored or lost), ascending. */
  private reportedSteps(job: JobRecord): number[] {
    const steps = new Set(Object.keys(job.checkpointsReported).map(Number));
    for (const step of Object.keys(job.checkpointsLost).map(Number)) {
      if (step > (job.resumeStep ?? -1)) steps.add(step);
    }
    return [...steps].sort((a, b) => a - b);
  }

  private uncommittedSteps(job: JobRecord): number[] {
    return this.reportedSteps(job).filter((step) => !job.checkpointsCommitted.includes(step));
  }

  /**
   * A node failure restarts the job while restarts are left; anything else fails it. A
   * failure within one group of a several-group job restarts that group alone while
   * another group trains on (the groups share no torch world, only outer steps).
   */
  private fail(job: JobRecord, failure: JobFailure, nodeFailure: boolean, group?: string): void {
    if (job.state !== "running") return;
    if (nodeFailure && group !== undefined && this.groupRestarts.get(job.jobId)?.has(group)) return; // already restarting
    if (!nodeFailure || job.restarts.length >= job.maxRestarts) {
      const exhausted = nodeFailure ? ` (no restarts left: ${job.maxRestarts} allowed)` : "";
      this.finish(job, "failed", { ...failure, reason: failure.reason + exhausted });
      return;
    }
    if (group !== undefined && this.canRestartGroupAlone(job, group)) {
      void this.restartGroup(job, group, failure.reason).catch((error: Error) => {
        this.deps.logger.error("group restart failed", { jobId: job.jobId, group, error: error.message });
        this.finish(job, "failed", { reason: `could not restart group ${group} after "${failure.reason}": ${error.message}`, lastLines: [] });
      });
      return;
    }
    void this.restart(job, failure.reason).catch((error: Error) => {
      this.deps.logger.error("restart failed", { jobId: job.jobId, error: error.message });
      this.finish(job, "failed", { reason: `could not restart after "${failure.reason}": ${error.message}`, lastLines: [] });
    });
  }

  /** The step a restart resumes from: the store's newest committed one, else what the head knows. */
  private async newestCommittedStep(job: JobRecord): Promise<number | undefined> {
    const known = job.lastCommittedStep ?? job.resumeStep;
    if (!this.deps.restartStep) return known;
    try {
      return await this.deps.restartStep(job);
    } catch (error) {
      this.log(job, `could not ask the checkpoint store for the newest step (${(error as Error).message}); using step ${known ?? "none"} known to the head`);
      return known;
    }
  }

  /** Another group of the job trains on (connected, not restarting itself). */
  private canRestartGroupAlone(job: JobRecord, group: string): boolean {
    if ((job.assignments[0]?.groupCount ?? 1) < 2 || !this.bridgeSecrets.has(job.jobId)) return false;
    const restarting = this.groupRestarts.get(job.jobId);
    return job.assignments.some((assignment) => assignment.group !== group && !restarting?.has(assignment.group)
      && this.deps.registry.get(assignment.workerId)?.connection === "connected");
  }

  /** The job's global ranks of one group, ascending. */
  ranksOfGroup(job: JobRecord, group: string): number[] {
    return job.assignments.filter((assignment) => assignment.group === group)
      .flatMap((assignment) => Array.from({ length: assignment.localWorldSize }, (_, local) => assignment.globalRankOffset + local));
  }

  /**
   * Restarts one group of a several-group job while the others train on: stops its
   * ranks (bounded wait), then starts it again from the newest committed checkpoint on
   * its nodes once they are connected, under a job id of its own. Its trainers join the
   * others over the bridge and take their live outer state (OuterSync.join).
   */
  private async restartGroup(job: JobRecord, group: string, reason: string): Promise<void> {
    const lastStep = job.latestMetrics[0]?.step;
    job.restarts.push({ attempt: job.attempt, reason, atMs: this.now(), group, ...(lastStep === undefined ? {} : { lastStep }) });
    this.log(job, `group ${group} failed: ${reason}; restarting that group alone while the other groups train on (restart ${job.restarts.length} of at most ${job.maxRestarts})`);
    const members = job.assignments.filter((assignment) => assignment.group === group);
    const waiting = new Set<number>();
    for (const assignment of members) {
      if (this.deps.registry.get(assignment.workerId)?.connection !== "connected") continue;
      for (let local = 0; local < assignment.localWorldSize; local++) {
        const rank = assignment.globalRankOffset + local;
        if (job.exitCodes[rank] === undefined) waiting.add(rank);
      }
    }
    const entry: GroupRestart = { group, phase: "draining", waiting, drained: () => undefined };
    const drained = new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, this.deps.stopGraceMs + 5_000);
      entry.drained = () => { clearTimeout(timer); resolve(); };
      if (waiting.size === 0) entry.drained();
    });
    const restarts = this.groupRestarts.get(job.jobId) ?? new Map<string, GroupRestart>();
    this.groupRestarts.set(job.jobId, restarts);
    restarts.set(group, entry);
    job.groupsRestarting = [...restarts.keys()];
    if (job.groupsInStep) delete job.groupsInStep[group]; // its next run says anew
    this.emit("checkpointGroupsChanged", job);
    this.emit("changed", job);
    for (const assignment of members) {
      this.deps.registry.send(assignment.workerId, { stopJob: { jobId: this.wireIdOf(job, group), reason: `restarting group ${group}: ${reason}`, graceMs: this.deps.stopGraceMs } });
    }
    await drained;
    // Given up meanwhile (the other groups finished, or the job restarted as a whole).
    if (this.groupRestarts.get(job.jobId)?.get(group) !== entry) return;
    const ranks = new Set(this.ranksOfGroup(job, group));
    for (const rank of ranks) delete job.exitCodes[rank];
    job.stalled = job.stalled?.filter((entry) => !ranks.has(entry.rank));
    const resumeStep = await this.newestCommittedStep(job);
    if (job.state !== "running" || restarts.get(group) !== entry) return;
    entry.phase = "waiting";
    entry.resumeStep = resumeStep;
    this.log(job, `group ${group} will start again ${resumeStep === undefined ? "from scratch" : `from committed checkpoint step ${resumeStep}`} and rejoin the groups that trained on (a trainer syncing with OuterSync takes their live outer state), once its ${members.length} node${members.length === 1 ? " is" : "s are"} connected`);
    entry.waitTimer = setTimeout(() => {
      if (restarts.get(group) !== entry || entry.phase !== "waiting" || job.state !== "running") return;
      this.fail(job, { reason: `group ${group}'s nodes were not connected again within ${Math.round(this.deps.workerWaitTimeoutMs / 1000)}s`, lastLines: [] }, true);
    }, this.deps.workerWaitTimeoutMs);
    this.emit("changed", job);
    await this.startWaitingGroups();
  }

  /** Starts every restarting group whose nodes are connected again. */
  private async startWaitingGroups(): Promise<void> {
    for (const job of this.jobs.values()) {
      if (job.state !== "running") continue;
      for (const entry of [...(this.groupRestarts.get(job.jobId)?.values() ?? [])]) {
        if (entry.phase !== "waiting") continue;
        const members = job.assignments.filter((assignment) => assignment.group === entry.group).sort((a, b) => a.groupRank - b.groupRank);
        const taken = new Set(job.assignments.filter((assignment) => assignment.group !== entry.group).map((assignment) => assignment.workerId));
        const workers = this.deps.registry.connected().filter((worker) => worker.group === entry.group && !taken.has(worker.workerId))
          .sort((a, b) => a.nodeName.localeCompare(b.nodeName)).slice(0, members.length);
        if (workers.length < members.length) continue;
        if (workers.some((worker, index) => worker.slots !== members[index]!.localWorldSize)) {
          clearTimeout(entry.waitTimer);
          this.groupRestarts.get(job.jobId)?.delete(entry.group);
          this.fail(job, { reason: `group ${entry.group} came back with other slot counts than it had; the job restarts as a whole`, lastLines: [] }, true);
          continue;
        }
        await this.startGroup(job, entry, members, workers);
      }
    }
  }

  private async startGroup(job: JobRecord, entry: GroupRestart, members: NodeAssignment[], workers: RegisteredWorker[]): Promise<void> {
    clearTimeout(entry.waitTimer);
    entry.phase = "draining"; // not picked up twice while the port is allocated
    const masterAddr = workers[0]!.resources.address || "127.0.0.1";
    const replaced = new Map(members.map((member, index) => {
      const worker = workers[index]!;
      return [member.workerId, {
        ...member,
        workerId: worker.workerId,
        nodeName: worker.nodeName,
        masterAddr,
        bridgeAddress: member.groupRank === 0 ? (this.deps.bridgeAddressOf?.(worker.nodeName) ?? worker.bridgeAddress) : member.bridgeAddress,
      } satisfies NodeAssignment];
    }));
    job.assignments = job.assignments.map((assignment) => replaced.get(assignment.workerId) ?? assignment);
    const leader = job.assignments.find((assignment) => assignment.group === entry.group && assignment.groupRank === 0)!;
    const masterPort = await this.deps.allocateMasterPort(leader);
    if (job.state !== "running" || this.groupRestarts.get(job.jobId)?.get(entry.group) !== entry) return;
    this.groupRestartCount += 1;
    const wireId = `${job.wireJobId}-g${leader.groupIndex}r${this.groupRestartCount}`;
    job.groupWireIds = { ...job.groupWireIds, [entry.group]: wireId };
    this.byWireId.set(wireId, job);
    this.groupRestarts.get(job.jobId)!.delete(entry.group);
    job.groupsRestarting = [...(this.groupRestarts.get(job.jobId)?.keys() ?? [])];
    // Steps up to its resume step are the other groups' to commit; its join moves this on.
    const backAfter = (job.groupsBackAfter ??= {});
    backAfter[entry.group] = Math.max(backAfter[entry.group] ?? 0, entry.resumeStep ?? 0);
    const now = this.now();
    const progress = this.progress.get(job.jobId);
    for (const rank of this.ranksOfGroup(job, entry.group)) progress?.set(rank, { lastMs: now, stepIntervals: [] });
    const groupNodes = job.assignments.filter((assignment) => assignment.group === entry.group);
    this.log(job, `group ${entry.group} starting again on ${groupNodes.map((a) => `${a.nodeName}=ranks ${a.globalRankOffset}-${a.globalRankOffset + a.localWorldSize - 1}`).join(", ")}`);
    this.emit("changed", job);
    for (const assignment of groupNodes) {
      const sent = this.deps.registry.send(assignment.workerId, { startJob: this.startJobMessage(job, assignment, masterPort, entry.resumeStep) });
      if (!sent) {
        this.fail(job, { reason: `node ${assignment.nodeName} disconnected before group ${entry.group} could start again`, lastLines: [] }, true);
        return;
      }
    }
    // The groups that trained on learn where the group's leader listens now.
    for (const other of job.assignments.filter((assignment) => assignment.groupRank === 0 && assignment.group !== entry.group)) {
      this.deps.registry.send(other.workerId, { bridgePeers: { jobId: this.wireIdOf(job, other.group), groups: topologyFor(job.assignments, other).groups } });
    }
  }

  /**
   * Stops the current attempt everywhere, waits for its ranks to exit (bounded), picks
   * the newest committed checkpoint and queues the next attempt, which starts as soon as
   * enough nodes are connected (the local provisioner brings a dead worker back).
   */
  private async restart(job: JobRecord, reason: string): Promise<void> {
    const lastStep = job.latestMetrics[0]?.step;
    const restart: JobRestart = { attempt: job.attempt, reason, atMs: this.now(), ...(lastStep === undefined ? {} : { lastStep }) };
    job.restarts.push(restart);
    job.state = "restarting";
    this.adopting.delete(job.jobId);
    this.replayFloors.delete(job.jobId);
    this.replayedOutputTail.delete(job.jobId);
    this.log(job, `attempt ${job.attempt} failed: ${reason}; restarting from the newest committed checkpoint (restart ${job.restarts.length} of at most ${job.maxRestarts})`);
    this.emit("changed", job);

    const previous = job.wireJobId;
    const previousIds = [previous, ...Object.values(job.groupWireIds ?? {})];
    for (const entry of this.groupRestarts.get(job.jobId)?.values() ?? []) {
      clearTimeout(entry.waitTimer);
      entry.drained();
    }
    this.groupRestarts.delete(job.jobId);
    this.joinedAlone.delete(job.jobId);
    delete job.groupsBackAfter;
    delete job.groupsInStep;
    job.groupsRestarting = [];
    const waiting = new Set<number>();
    for (const assignment of job.assignments) {
      if (this.deps.registry.get(assignment.workerId)?.connection !== "connected") continue;
      for (let local = 0; local < assignment.localWorldSize; local++) {
        const rank = assignment.globalRankOffset + local;
        if (job.exitCodes[rank] === undefined) waiting.add(rank);
      }
    }
    const drained = new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, this.deps.stopGraceMs + 5_000);
      for (const id of previousIds) this.draining.set(id, { wireJobId: previous, waiting, done: () => { clearTimeout(timer); resolve(); } });
      if (waiting.size === 0) {
        clearTimeout(timer);
        resolve();
      }
    });
    this.broadcastStop(job, `restarting: ${reason}`);
    await drained;
    for (const id of previousIds) this.draining.delete(id);

    const resumeStep = await this.newestCommittedStep(job);
    if (job.state !== "restarting") return; // stopped meanwhile
    restart.resumeStep = resumeStep;
    job.attempt += 1;
    job.wireJobId = `${job.jobId}-a${job.attempt}`;
    this.byWireId.set(job.wireJobId, job);
    job.resumeStep = resumeStep;
    job.exitCodes = {};
    job.checkpointsReported = {};
    job.checkpointsCommitted = [];
    job.state = "pending";
    this.log(job, `attempt ${job.attempt} will resume ${resumeStep === undefined ? "from scratch (nothing committed yet)" : `from committed checkpoint step ${resumeStep}`} once ${job.request.nodes} nodes are connected`);
    this.armWaitTimer(job);
    this.emit("changed", job);
    await this.startPendingJobs();
  }

  /** Stops a running job everywhere (user request or shutdown). */
  stop(jobId: string, reason: string): boolean {
    const job = this.jobs.get(jobId);
    if (!job || FINAL_STATES.has(job.state)) return false;
    if (job.state === "pending" || job.state === "restarting" || job.state === "finishing") {
      this.finish(job, "stopped", { reason, lastLines: [] });
      return true;
    }
    job.state = "stopping";
    this.log(job, `stopping: ${reason}`);
    this.broadcastStop(job, reason);
    this.emit("changed", job);
    return true;
  }

  private broadcastStop(job: JobRecord, reason: string): void {
    for (const assignment of job.assignments) {
      this.deps.registry.send(assignment.workerId, { stopJob: { jobId: this.wireIdOf(job, assignment.group), reason, graceMs: this.deps.stopGraceMs } });
    }
  }

  private finish(job: JobRecord, state: JobState, failure?: JobFailure): void {
    if (FINAL_STATES.has(job.state)) return;
    clearTimeout(this.waitTimers.get(job.jobId));
    job.state = state;
    job.endedAtMs = this.now();
    this.progress.delete(job.jobId);
    this.absentAtEnd.delete(job.jobId);
    this.joinedAlone.delete(job.jobId);
    this.adopting.delete(job.jobId);
    this.replayFloors.delete(job.jobId);
    this.replayedOutputTail.delete(job.jobId);
    for (const entry of this.groupRestarts.get(job.jobId)?.values() ?? []) clearTimeout(entry.waitTimer);
    this.groupRestarts.delete(job.jobId);
    this.bridgeSecrets.delete(job.jobId);
    this.bridgeCertificates.delete(job.jobId);
    job.groupsRestarting = [];
    if (failure) job.failure = failure;
    if (state === "failed") this.broadcastStop(job, failure?.reason ?? "job failed");
    this.log(job, `job ${state}${failure ? `: ${failure.reason}` : ""}`);
    this.deps.logger.info("job finished", { jobId: job.jobId, state, reason: failure?.reason });
    this.emit("changed", job);
  }

  activeJobs(): JobRecord[] {
    return [...this.jobs.values()].filter((job) => !FINAL_STATES.has(job.state));
  }

  /**
   * Records a committed checkpoint step (the head's checkpoint coordinator calls this). A
   * step the attempt's ranks report again after its commit (a trainer that saves its last
   * step both on the interval and at the end) is committed again, over the same objects;
   * the job's output says it once per attempt, not once per commit.
   */
  /** `absentGroups`: groups of a several-group job whose files the step does not hold. */
  markCommitted(jobId: string, step: number, absentGroups: readonly string[] = []): void {
    const job = this.jobs.get(jobId);
    if (!job) return;
    job.lastCommittedStep = Math.max(job.lastCommittedStep ?? -1, step);
    const first = !job.checkpointsCommitted.includes(step);
    if (first) job.checkpointsCommitted.push(step);
    delete job.checkpointsLost[step];
    const without = absentGroups.length > 0 ? ` without group ${absentGroups.join(", ")} (not in step then; it starts from the other groups' files if the run resumes here)` : "";
    if (first) this.log(job, `checkpoint step ${step} committed${without}`);
    else this.deps.logger.debug("checkpoint step committed again", { jobId, step });
    this.emit("changed", job);
  }

  /** Records (and says) that a checkpoint step could not be stored. */
  checkpointLost(jobId: string, step: number, reason: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.checkpointsCommitted.includes(step)) return;
    const first = job.checkpointsLost[step] === undefined;
    job.checkpointsLost[step] ??= reason;
    if (first) this.log(job, `checkpoint step ${step} NOT stored: ${reason}`);
    this.emit("changed", job);
  }

  note(jobId: string, line: string): void {
    const job = this.jobs.get(jobId);
    if (job) this.log(job, line);
  }

  private log(job: JobRecord, line: string): void {
    this.emit("log", { jobId: job.jobId, rank: -1, stream: "drover", line });
  }

  dispose(): void {
    for (const timer of this.waitTimers.values()) clearTimeout(timer);
    clearInterval(this.watchdog);
  }

  private madeProgress(job: JobRecord, rank: number, step: boolean): void {
    const progress = this.progress.get(job.jobId)?.get(rank);
    if (!progress) return;
    const now = this.now();
    progress.lastMs = now;
    if (step) {
      if (progress.lastStepMs !== undefined) {
        progress.stepIntervals.push(now - progress.lastStepMs);
        if (progress.stepIntervals.length > 20) progress.stepIntervals.shift();
      }
      progress.lastStepMs = now;
    }
    if (job.stalled?.some((entry) => entry.rank === rank)) {
      job.stalled = job.stalled.filter((entry) => entry.rank !== rank);
      this.log(job, `rank ${rank} is making progress again`);
      this.emit("changed", job);
    }
  }

  /**
   * The progress watchdog: a rank of a running attempt that has reported no step and
   * printed nothing for the stall timeout (or 20 of its own recent step times, if
   * longer) is reported stalled; for twice that, the attempt is restarted from the
   * newest committed checkpoint, as a node failure would be. A rank that already exited
   * is not watched.
   */
  private checkProgress(): void {
    const now = this.now();
    for (const job of this.jobs.values()) {
      const ranks = this.progress.get(job.jobId);
      if (job.state !== "running" || !ranks) continue;
      const timeoutMs = job.request.stallTimeoutMs ?? this.deps.defaultStallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
      if (timeoutMs <= 0) continue;
      let changed = false;
      const restarting = new Set([...(this.groupRestarts.get(job.jobId)?.keys() ?? [])].flatMap((group) => this.ranksOfGroup(job, group)));
      for (const [rank, progress] of ranks) {
        if (job.exitCodes[rank] !== undefined || restarting.has(rank)) continue;
        const intervals = [...progress.stepIntervals].sort((a, b) => a - b);
        const typicalStepMs = intervals.length >= 5 ? intervals[Math.floor(intervals.length / 2)]! : 0;
        const limitMs = Math.max(timeoutMs, 20 * typicalStepMs);
        const idleMs = now - progress.lastMs;
        if (idleMs > 2 * limitMs) {
          this.deps.logger.warn("rank stalled; restarting the attempt", { jobId: job.jobId, rank, idleMs });
          const group = job.assignments.find((assignment) => rank >= assignment.globalRankOffset && rank < assignment.globalRankOffset + assignment.localWorldSize)?.group;
          this.fail(job, { reason: `rank ${rank} made no progress (no step, no output) for ${Math.round(idleMs / 1000)}s`, rank, lastLines: [] }, true, group);
          break;
        }
        if (idleMs > limitMs && !job.stalled?.some((entry) => entry.rank === rank)) {
          (job.stalled ??= []).push({ rank, idleMs });
          this.log(job, `warning: rank ${rank} has made no progress (no step, no output) for ${Math.round(idleMs / 1000)}s; the attempt restarts from the checkpoint after ${Math.round((2 * limitMs) / 1000)}s`);
          changed = true;
        }
        const entry = job.stalled?.find((candidate) => candidate.rank === rank);
        if (entry) entry.idleMs = idleMs;
      }
      if (changed) this.emit("changed", job);
    }
  }
}

export function isFinal(state: JobState): boolean {
  return FINAL_STATES.has(state);
}
