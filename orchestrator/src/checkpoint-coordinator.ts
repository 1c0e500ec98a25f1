import { CheckpointStore, type RankUploadReport } from "@drover/storage";
import type { ICheckpointReport } from "@drover/proto";
import type { JobController, JobRecord } from "./job-controller.js";
import type { Logger } from "./logger.js";

/**
 * The head's half of the commit protocol: it collects every rank's report for a step
 * and, once all ranks of the job have reported, asks the store to verify the objects
 * and write MANIFEST.json. A step some rank never reported stays invisible.
 */
export class CheckpointCoordinator {
  private readonly pending = new Map<string, Map<number, RankUploadReport[]>>();

  constructor(readonly store: CheckpointStore, private readonly jobs: JobController, private readonly logger: Logger) {
    jobs.on("checkpoint", (job, report) => void this.onReport(job, report));
  }

  private async onReport(job: JobRecord, report: ICheckpointReport): Promise<void> {
    const step = Number(report.step ?? 0);
    const byStep = this.pending.get(job.jobId) ?? new Map<number, RankUploadReport[]>();
    this.pending.set(job.jobId, byStep);
    const reports = byStep.get(step) ?? [];
    byStep.set(step, reports);
    reports.push({
      run: job.runId,
      step,
      rank: report.rank ?? 0,
      files: (report.files ?? []).map((file) => ({ path: file.path ?? "", size: Number(file.size ?? 0), sha256: file.sha256 ?? "" })),
    });
    if (reports.length < job.worldSize) return;
    byStep.delete(step);
    try {
      await this.store.commit({
        run: job.runId,
        step,
        world: { worldSize: job.worldSize, nodes: job.assignments.length, localWorldSize: job.assignments[0]?.localWorldSize },
        reports,
        signal: AbortSignal.timeout(120_000),
      });
      this.jobs.markCommitted(job.jobId, step);
      const pruned = await this.store.prune({ run: job.runId, signal: AbortSignal.timeout(120_000) });
      if (pruned.deleted.length > 0) this.logger.info("pruned checkpoints", { run: job.runId, steps: pruned.deleted });
    } catch (error) {
      const problems = (error as { problems?: string[] }).problems;
      this.jobs.note(job.jobId, `checkpoint step ${step} NOT committed: ${(error as Error).message}${problems ? ` (${problems.slice(0, 3).join("; ")})` : ""}`);
      this.logger.warn("checkpoint commit failed", { run: job.runId, step, error: (error as Error).message });
    }
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
