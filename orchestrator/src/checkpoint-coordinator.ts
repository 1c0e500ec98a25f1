import { EventEmitter, setMaxListeners } from "node:events";
import { CheckpointStore, retryThroughOutage, STORE_OUTAGE_RETRY, type OutageRetryPolicy, type RankUploadReport } from "@drover/storage";
import type { ICheckpointReport } from "@drover/proto";
import type { JobController, JobRecord } from "./job-controller.js";
import type { Logger } from "./logger.js";

/**
 * The head's half of the commit protocol: it collects every rank's report for a step
 * and, once all ranks of the job have reported, asks the store to verify the objects
 * and write MANIFEST.json. A step some rank never reported stays invisible.
 *
 * A job of several groups commits a step once every rank of each group in step reported
 * it (JobController.checkpointGroups): a group restarting, training alone or back only
 * after the step is not waited for, and its files are in the step only if all its ranks
 * reported it; a group split apart from the main group is never in it. The manifest
 * names the groups it holds and those it lacks.
 */
/** One commit try (it checks every object of the step) is abandoned after this long. */
const COMMIT_TRY_TIMEOUT_MS = 120_000;

/** The reports one commit is made of, and the groups they are (several groups only). */
interface CommitSelection {
  reports: RankUploadReport[];
  ranks: number[];
  groups?: string[];
  absentGroups?: string[];
}

export interface CheckpointCoordinatorEvents {
  /** A step's MANIFEST.json is written; `seconds` from the last rank's report, retries included. */
  committed: [{ runId: string; step: number; seconds: number }];
}

export class CheckpointCoordinator extends EventEmitter<CheckpointCoordinatorEvents> {
  /** Reports per attempt (a failed attempt's partial reports must never mix with the next one's). */
  private readonly pending = new Map<string, Map<number, RankUploadReport[]>>();
  /** Commits running per job, which a restart waits for before it picks its step. */
  private readonly inFlight = new Map<string, Set<Promise<void>>>();
  /**
   * The newest commit queued per run: a run's steps are committed one after the other, in
   * the order they became complete, because each commit prunes uncommitted steps older
   * than the newest committed one as abandoned; an older step still being verified would
   * lose its objects.
   */
  private readonly commitQueues = new Map<string, Promise<void>>();

  constructor(
    readonly store: CheckpointStore,
    private readonly jobs: JobController,
    private readonly logger: Logger,
    /** A commit failing because the store is unreachable is tried again this long. */
    private readonly retry: OutageRetryPolicy = STORE_OUTAGE_RETRY,
  ) {
    super();
    jobs.on("checkpoint", (job, report) => this.track(job, this.onReport(job, report)));
    // A group went away (or came back past a step): steps waiting for it may be complete.
    jobs.on("checkpointGroupsChanged", (job) => {
      for (const step of [...(this.pending.get(job.wireJobId)?.keys() ?? [])]) this.track(job, this.commitIfComplete(job, step));
    });
  }

  private track(job: JobRecord, commit: Promise<void>): void {
    const running = this.inFlight.get(job.jobId) ?? new Set();
    this.inFlight.set(job.jobId, running);
    running.add(commit);
    void commit.finally(() => running.delete(commit));
  }

  private async onReport(job: JobRecord, report: ICheckpointReport): Promise<void> {
    const step = Number(report.step ?? 0);
    const byStep = this.pending.get(job.wireJobId) ?? new Map<number, RankUploadReport[]>();
    this.pending.set(job.wireJobId, byStep);
    const reports = byStep.get(step) ?? [];
    byStep.set(step, reports);
    const rankReport = {
      run: job.runId,
      step,
      rank: report.rank ?? 0,
      files: (report.files ?? []).map((file) => ({ path: file.path ?? "", size: Number(file.size ?? 0), sha256: file.sha256 ?? "" })),
    };
    // A group restarted on its own may report a step again: its newer upload replaces the old.
    const earlier = reports.findIndex((candidate) => candidate.rank === rankReport.rank);
    if (earlier >= 0) reports[earlier] = rankReport;
    else reports.push(rankReport);
    await this.commitIfComplete(job, step);
  }

  /** Commits `step` (after the run's earlier commits) once its reports are complete. */
  private async commitIfComplete(job: JobRecord, step: number): Promise<void> {
    const byStep = this.pending.get(job.wireJobId);
    const reports = byStep?.get(step);
    const selection = reports && this.selection(job, step, reports);
    if (!byStep || !selection) return;
    byStep.delete(step);
    const allReportedAt = performance.now();
    const queued = this.commitQueues.get(job.runId) ?? Promise.resolve();
    const commit = queued.then(() => this.commitWithRetry(job, step, selection, allReportedAt));
    this.commitQueues.set(job.runId, commit);
    await commit;
    if (this.commitQueues.get(job.runId) === commit) this.commitQueues.delete(job.runId);
  }

  /** The reports step `step` is committed with now, or undefined while some are due. */
  private selection(job: JobRecord, step: number, reports: RankUploadReport[]): CommitSelection | undefined {
    const groups = this.jobs.checkpointGroups(job, step);
    if (!groups) return reports.length >= job.worldSize ? { reports, ranks: Array.from({ length: job.worldSize }, (_, rank) => rank) } : undefined;
    const byRank = new Map(reports.map((report) => [report.rank, report]));
    const complete = (group: string) => this.jobs.ranksOfGroup(job, group).every((rank) => byRank.has(rank));
    if (groups.required.length === 0 || !groups.required.every(complete)) return undefined;
    const held = [...groups.required, ...groups.optional.filter(complete)].sort();
    const ranks = held.flatMap((group) => this.jobs.ranksOfGroup(job, group)).sort((a, b) => a - b);
    return {
      reports: ranks.map((rank) => byRank.get(rank)!),
      ranks,
      groups: held,
      absentGroups: [...groups.optional, ...groups.apart].filter((group) => !held.includes(group)).sort(),
    };
  }

  /** Commits one complete step, through store outages; a step that cannot be committed is said lost. */
  private async commitWithRetry(job: JobRecord, step: number, selection: CommitSelection, allReportedAt: number): Promise<void> {
    try {
      await retryThroughOutage(() => this.commitOnce(job, step, selection, allReportedAt), {
        policy: this.retry,
        onRetry: ({ attempt, delayMs, error }) => {
          this.jobs.note(job.jobId, `checkpoint step ${step}: commit failed (${error.message}); trying again in ${Math.round(delayMs / 1000)}s`);
          this.logger.warn("checkpoint commit failed; retrying", { run: job.runId, step, attempt, delayMs, error: error.message });
        },
      });
    } catch (error) {
      const problems = (error as { problems?: string[] }).problems;
      this.jobs.checkpointLost(job.jobId, step, `its commit failed: ${(error as Error).message}${problems ? ` (${problems.slice(0, 3).join("; ")})` : ""}`);
      this.logger.warn("checkpoint commit failed", { run: job.runId, step, error: (error as Error).message });
    }
  }

  private async commitOnce(job: JobRecord, step: number, selection: CommitSelection, allReportedAt: number): Promise<void> {
    const signal = AbortSignal.timeout(COMMIT_TRY_TIMEOUT_MS);
    // The commit checks every object concurrently, each request listening on this signal.
    setMaxListeners(256, signal);
    const { groups, absentGroups } = selection;
    await this.store.commit({
      run: job.runId,
      step,
      world: {
        worldSize: job.worldSize,
        nodes: job.assignments.length,
        localWorldSize: job.assignments[0]?.localWorldSize,
        ...(groups ? { groups, absentGroups: absentGroups ?? [] } : {}),
      },
      reports: selection.reports,
      ranks: selection.ranks,
      signal,
    });
    this.jobs.markCommitted(job.jobId, step, absentGroups);
    this.emit("committed", { runId: job.runId, step, seconds: (performance.now() - allReportedAt) / 1000 });
    try {
      const pruned = await this.store.prune({ run: job.runId, signal });
      if (pruned.deleted.length > 0) this.logger.info("pruned checkpoints", { run: job.runId, steps: pruned.deleted });
    } catch (error) {
      // The step is committed; old steps are pruned again after the next commit.
      this.logger.warn("could not prune checkpoints", { run: job.runId, error: (error as Error).message });
    }
  }

  /**
   * Resolves once no commit of the job is running, including commits that start while
   * waiting (a rank's last report can arrive just before its exit).
   */
  async settle(job: JobRecord): Promise<void> {
    for (;;) {
      const running = [...(this.inFlight.get(job.jobId) ?? [])];
      if (running.length === 0) return;
      await Promise.allSettled(running);
    }
  }

  /**
   * The step an automatic restart resumes from: once the commits still running for the
   * job have settled, the newest committed step of its run (the store is the truth; a
   * commit may have landed after the failure).
   */
  async restartStep(job: JobRecord, signal: AbortSignal): Promise<number | undefined> {
    setMaxListeners(256, signal);
    await Promise.allSettled([...(this.inFlight.get(job.jobId) ?? [])]);
    this.pending.forEach((_, wireJobId) => wireJobId.startsWith(job.jobId) && wireJobId !== job.wireJobId && this.pending.delete(wireJobId));
    return (await this.store.latest(job.runId, { signal }))?.step ?? job.resumeStep;
  }

  /** The step a submission resumes from: `fromStep` if committed, else the newest committed, else none. */
  async resumeStep(runId: string, fromStep: number | undefined, signal: AbortSignal): Promise<number | undefined> {
    if (fromStep !== undefined) {
      const manifest = await this.store.readManifest(runId, fromStep, { signal });
      if (!manifest) {
        const committed = await this.store.listCommitted(runId, { signal });
        throw new Error(`run ${runId} has no committed checkpoint at step ${fromStep} (committed: ${committed.join(", ") || "none"})`);
      }
      return fromStep;
    }
    return (await this.store.latest(runId, { signal }))?.step;
  }
}
