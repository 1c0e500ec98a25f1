import type { IHeadMessage, IStartJob } from "@drover/proto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { CheckpointStore } from "@drover/storage";
import { afterEach, describe, expect, it } from "vitest";
import { CheckpointCoordinator } from "./checkpoint-coordinator.js";
import { JobController, type JobRecord } from "./job-controller.js";
import { summarizeJob } from "./job-view.js";
import { silentLogger } from "./logger.js";
import { WorkerRegistry, type WorkerChannel } from "./worker-registry.js";

/** A node as the registry sees it: what the head sent it is recorded. */
interface TestNode {
  workerId: string;
  sent: IHeadMessage[];
  channel: WorkerChannel;
}

function connect(registry: WorkerRegistry, nodeName: string, incarnation: string, group = "local"): TestNode {
  const worker = registry.register({ nodeName, group, slots: 2, resources: { address: "127.0.0.1" }, agentVersion: "test", incarnation, bridgeAddress: `${nodeName}:7447` });
  const sent: IHeadMessage[] = [];
  const node: TestNode = { workerId: worker.workerId, sent, channel: { send: (message) => sent.push(message), close: () => {} } };
  registry.attach(worker.workerId, worker.sessionToken, node.channel);
  return node;
}

const starts = (node: TestNode): IStartJob[] => node.sent.flatMap((message) => (message.startJob ? [message.startJob] : []));
const stops = (node: TestNode): string[] => node.sent.flatMap((message) => (message.stopJob ? [message.stopJob.jobId ?? ""] : []));

async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5_000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

describe("JobController restarts", () => {
  let registry: WorkerRegistry;
  let jobs: JobController;
  afterEach(() => {
    jobs?.dispose();
    registry?.stop();
  });

  function setup(restartStep: (job: JobRecord) => Promise<number | undefined>) {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep });
    return { a: connect(registry, "local-0", "a-1"), b: connect(registry, "local-1", "b-1") };
  }

  it("restarts from the step the store names when a node's agent is replaced, and ignores the old attempt", async () => {
    const { a, b } = setup(async () => 40);
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId: "run-x" });
    await until(() => starts(a).length === 1 && starts(b).length === 1, "attempt 1 to start");
    expect(starts(a)[0]).toMatchObject({ jobId: job.jobId, resume: false });

    // local-1's agent dies and a new one registers: its ranks are gone.
    const b2 = connect(registry, "local-1", "b-2");
    expect(job.state).toBe("restarting");
    expect(stops(a)).toEqual([job.jobId]);
    // The surviving node's ranks exit; the next attempt starts only once they have.
    jobs.onRankExit(a.workerId, { jobId: job.jobId, rank: 0, exitCode: 0, signal: "SIGTERM" });
    expect(starts(b2)).toEqual([]);
    jobs.onRankExit(a.workerId, { jobId: job.jobId, rank: 1, exitCode: 0, signal: "SIGTERM" });
    await until(() => starts(b2).length === 1, "attempt 2 to start");

    const second = starts(a)[1]!;
    expect(second).toMatchObject({ jobId: `${job.jobId}-a2`, runId: "run-x", resume: true, resumeStep: 40 });
    expect(starts(b2)[0]).toMatchObject({ jobId: `${job.jobId}-a2`, resume: true, resumeStep: 40 });
    expect(job.restarts).toEqual([expect.objectContaining({ attempt: 1, reason: "node local-1 lost (its agent restarted)", resumeStep: 40 })]);

    // Late messages of attempt 1 change nothing.
    jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: 55, values: { loss: 9 } });
    jobs.onCheckpoint(a.workerId, { jobId: job.jobId, rank: 0, step: 60, files: [] });
    expect(job.latestMetrics[0]).toBeUndefined();
    expect(job.checkpointsReported).toEqual({});

    for (const [node, ranks] of [[a, [0, 1]], [b2, [0, 1]]] as const) {
      for (const rank of ranks) jobs.onRankExit(node.workerId, { jobId: `${job.jobId}-a2`, rank: rank + (node === b2 ? 2 : 0), exitCode: 0 });
    }
    await until(() => job.state === "succeeded", "the job to succeed");
    expect(job.attempt).toBe(2);
  });

  it("fails at once when a rank exits non-zero while every node is healthy", async () => {
    const { a, b } = setup(async () => 0);
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2 });
    await until(() => starts(a).length === 1 && starts(b).length === 1, "the job to start");
    jobs.onRankExit(b.workerId, { jobId: job.jobId, rank: 2, exitCode: 1, lastLines: ["ValueError: bad config"] });
    expect(job.state).toBe("failed");
    expect(job.restarts).toEqual([]);
    expect(job.failure).toMatchObject({ reason: "rank 2 exited with exit code 1", lastLines: ["ValueError: bad config"] });
  });

  it("counts a peer's crash while a node is down as a node failure, and stops after maxRestarts", async () => {
    const { a, b } = setup(async () => undefined);
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, maxRestarts: 1 });
    await until(() => starts(a).length === 1, "attempt 1");
    // local-1's session drops (agent killed); its peers fail in their collectives.
    registry.detach(b.workerId, b.channel);
    jobs.onRankExit(a.workerId, { jobId: job.jobId, rank: 0, exitCode: 1 });
    expect(job.state).toBe("restarting");
    expect(job.restarts[0]?.reason).toBe("rank 0 exited with exit code 1 while node local-1 was down");
    jobs.onRankExit(a.workerId, { jobId: job.jobId, rank: 1, exitCode: 1 });
    const b2 = connect(registry, "local-1", "b-2");
    await until(() => starts(b2).length === 1, "attempt 2");
    expect(starts(b2)[0]).toMatchObject({ resume: false });
    // A second node failure exceeds maxRestarts: 1.
    connect(registry, "local-0", "a-2");
    expect(job.state).toBe("failed");
    expect(job.failure?.reason).toBe("node local-0 lost (its agent restarted) (no restarts left: 1 allowed)");
  });
  describe("adopting a dead head's running attempt", () => {
    function adopted() {
      const { a, b } = setup(async () => 20);
      const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId: "run-adopt" });
      return { a, b, job };
    }

    it("goes on without a restart when every node's trainers outlived the head, taking only what its files lack", async () => {
      const { a, b, job } = adopted();
      await until(() => starts(a).length === 1 && starts(b).length === 1, "attempt 1 to start");
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: 7, values: { loss: 1 } });
      // What the dead head wrote down (cluster.json), taken up by a new controller.
      const previous = JSON.parse(JSON.stringify(job)) as JobRecord;
      jobs.dispose();
      jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep: async () => 20 });
      const metrics: number[] = [];
      jobs.on("metric", (_job, metric) => metrics.push(Number(metric.step)));
      const taken = jobs.adoptInterrupted(previous, new Map([[0, 9]]));
      expect(taken).toMatchObject({ state: "running", attempt: 1, wireJobId: job.jobId });
      expect(jobs.adoptionPending(job.jobId)).toBe(true);
      // Replayed metrics at or below what the metrics file holds are not taken twice; newer ones are.
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: 9, values: { loss: 1 } }, true);
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: 10, values: { loss: 1 } }, true);
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: 10, values: { loss: 1 } }, true);
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: 11, values: { loss: 1 } });
      expect(metrics).toEqual([10, 11]);
      // b's ranks exited while no head was up: its replayed exits count, and its heartbeat lists no job.
      jobs.onRankExit(b.workerId, { jobId: job.jobId, rank: 2, exitCode: 0 }, true);
      jobs.onRankExit(b.workerId, { jobId: job.jobId, rank: 3, exitCode: 0 }, true);
      jobs.onRankExit(b.workerId, { jobId: job.jobId, rank: 3, exitCode: 0 }, true);
      jobs.onHeartbeat(b.workerId, []);
      jobs.onHeartbeat(a.workerId, [job.jobId]);
      expect(jobs.adoptionPending(job.jobId)).toBe(false);
      expect(jobs.get(job.jobId)).toMatchObject({ state: "running", attempt: 1, restarts: [] });
      expect(starts(a)).toHaveLength(1);
      for (const rank of [0, 1]) jobs.onRankExit(a.workerId, { jobId: job.jobId, rank, exitCode: 0 });
      await until(() => jobs.get(job.jobId)!.state === "succeeded", "the adopted job to succeed");
    });

    it("restarts from the newest committed checkpoint when a node's trainers did not outlive the head", async () => {
      const { a, b, job } = adopted();
      await until(() => starts(a).length === 1 && starts(b).length === 1, "attempt 1 to start");
      const previous = JSON.parse(JSON.stringify(job)) as JobRecord;
      jobs.dispose();
      jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep: async () => 20 });
      jobs.adoptInterrupted(previous, new Map());
      jobs.onHeartbeat(a.workerId, [job.jobId]);
      // b's agent is back, but runs nothing of the job and reported no exit.
      jobs.onHeartbeat(b.workerId, []);
      expect(jobs.get(job.jobId)!.state).toBe("restarting");
      for (const rank of [0, 1]) jobs.onRankExit(a.workerId, { jobId: job.jobId, rank, exitCode: 0, signal: "SIGTERM" });
      await until(() => starts(a).length === 2 && starts(b).length === 2, "attempt 2 to start");
      expect(starts(b)[1]).toMatchObject({ jobId: `${job.jobId}-a2`, resume: true, resumeStep: 20 });
      expect(jobs.get(job.jobId)!.restarts).toEqual([expect.objectContaining({ attempt: 1, reason: "the trainers of node local-1 did not outlive the head" })]);
    });
  });
});

describe("JobController: a group of a several-group job restarts alone", () => {
  let registry: WorkerRegistry;
  let jobs: JobController;
  afterEach(() => {
    jobs?.dispose();
    registry?.stop();
  });

  it("stops only the failed group, starts it again under a job id of its own, and tells the other leader where it listens", async () => {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep: async () => 20 });
    const alpha = connect(registry, "alpha-0", "a-1", "alpha");
    const beta = connect(registry, "beta-0", "b-1", "beta");
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId: "run-g" });
    await until(() => starts(alpha).length === 1 && starts(beta).length === 1, "the job to start");
    expect(starts(beta)[0]).toMatchObject({ jobId: job.jobId, bridgeJobId: job.jobId });

    // beta's agent is replaced (killed, started again): only beta restarts.
    const beta2 = connect(registry, "beta-0", "b-2", "beta");
    expect(job.state).toBe("running");
    expect(job.groupsRestarting).toEqual(["beta"]);
    expect(stops(alpha)).toEqual([]);
    await until(() => starts(beta2).length === 1, "beta to start again");
    const restarted = starts(beta2)[0]!;
    expect(restarted).toMatchObject({ jobId: `${job.jobId}-g1r1`, bridgeJobId: job.jobId, resume: true, resumeStep: 20, group: "beta" });
    expect(restarted.bridgeSecret).toEqual(starts(alpha)[0]!.bridgeSecret);
    expect(restarted.topology?.groups?.map((group) => group.bridgeAddress)).toEqual(["alpha-0:7447", "beta-0:7447"]);
    const peers = alpha.sent.flatMap((message) => (message.bridgePeers ? [message.bridgePeers] : []));
    expect(peers).toEqual([expect.objectContaining({ jobId: job.jobId })]);
    expect(job.restarts).toEqual([expect.objectContaining({ attempt: 1, group: "beta", reason: "node beta-0 lost (its agent restarted)" })]);
    expect(job.attempt).toBe(1);

    // The old beta's late exit is not the new one's; the job ends when both groups' current ranks have.
    jobs.onRankExit(beta.workerId, { jobId: job.jobId, rank: 2, exitCode: 1 });
    expect(job.state).toBe("running");
    for (const rank of [0, 1]) jobs.onRankExit(alpha.workerId, { jobId: job.jobId, rank, exitCode: 0 });
    expect(job.state).toBe("running");
    for (const rank of [0, 1]) jobs.onRankExit(beta2.workerId, { jobId: `${job.jobId}-g1r1`, rank, exitCode: 0 });
    await until(() => job.state === "succeeded", "the job to succeed");
  });

  /** A controller whose checkpoints a real coordinator commits to a local store. */
  async function withStore(runRoot: string) {
    const root = await mkdtemp(join(os.tmpdir(), runRoot));
    const store = CheckpointStore.fromConfig({ store: { kind: "local", directory: join(root, "store") } });
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    let coordinator: CheckpointCoordinator | undefined;
    jobs = new JobController({
      registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger,
      restartStep: (job) => coordinator!.restartStep(job, AbortSignal.timeout(5_000)),
      settleCheckpoints: async (job) => { await coordinator!.settle(job); return true; },
    });
    coordinator = new CheckpointCoordinator(store, jobs, silentLogger);
    const lines: string[] = [];
    jobs.on("log", (line) => lines.push(line.line));
    /** Uploads the files of `ranks` (group-local) of one group's node for `step` and reports them. */
    const save = async (node: TestNode, wireJobId: string, group: string, step: number, ranks: number[], runId: string) => {
      const dir = join(root, "ckpt", group, String(step));
      await mkdir(dir, { recursive: true });
      for (const rank of ranks) {
        await writeFile(join(dir, `model.rank${rank}.pt`), `${group} weights of rank ${rank} at step ${step}`);
        const report = await store.uploadRank({ run: runId, step, rank, dir, files: [`model.rank${rank}.pt`], subdir: `group-${group}` });
        jobs.onCheckpoint(node.workerId, { jobId: wireJobId, rank, step, files: report.files });
      }
    };
    const cleanup = async () => {
      store.close();
      await rm(root, { recursive: true, force: true });
    };
    /** Nodes alpha-0 and beta-0, one group each, running one job of run `runId`. */
    const startTwoGroups = async (runId: string) => {
      const alpha = connect(registry, "alpha-0", "a-1", "alpha");
      const beta = connect(registry, "beta-0", "b-1", "beta");
      const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId });
      await until(() => starts(alpha).length === 1 && starts(beta).length === 1, "the job to start");
      return { alpha, beta, job };
    };
    return { store, lines, save, cleanup, startTwoGroups };
  }

  it("commits the steps of a group that went away without it, waits for it again past the step it rejoined at, and succeeds when it is still away at the end", async () => {
    const { store, lines, save, cleanup, startTwoGroups } = await withStore("drover-absent-group-");
    try {
      const { alpha, beta, job } = await startTwoGroups("run-away");
      // Both groups in step: step 10 waits for beta's ranks too.
      await save(alpha, job.jobId, "alpha", 10, [0, 1], "run-away");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(job.checkpointsCommitted).toEqual([]);
      await save(beta, job.jobId, "beta", 10, [0, 1], "run-away");
      await until(() => job.checkpointsCommitted.includes(10), "step 10 to be committed");
      expect((await store.readManifest("run-away", 10))?.world).toMatchObject({ groups: ["alpha", "beta"], absentGroups: [] });

      // alpha saved step 20; beta's only rank-0 report came before its node was lost.
      await save(alpha, job.jobId, "alpha", 20, [0, 1], "run-away");
      await save(beta, job.jobId, "beta", 20, [0], "run-away");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(job.checkpointsCommitted).toEqual([10]);
      registry.declareLost(beta.workerId, "its machine is gone");
      // beta restarting: the step alpha completed is committed without beta's half-reported files.
      await until(() => job.checkpointsCommitted.includes(20), "step 20 to be committed without beta");
      const twenty = await store.readManifest("run-away", 20);
      expect(twenty?.world).toMatchObject({ groups: ["alpha"], absentGroups: ["beta"] });
      expect(twenty?.files.map((file) => file.path)).toEqual(["group-alpha/model.rank0.pt", "group-alpha/model.rank1.pt"]);
      expect(lines).toContain("checkpoint step 20 committed without group beta (not in step then; it starts from the other groups' files if the run resumes here)");
      await save(alpha, job.jobId, "alpha", 30, [0, 1], "run-away");
      await until(() => job.checkpointsCommitted.includes(30), "step 30 to be committed while beta restarts");

      // beta comes back from step 20 (the newest committed when it restarted) and takes alpha's live state at inner step 40: it
      // never writes step 40, which alpha commits alone; step 50 waits for it again.
      const beta2 = connect(registry, "beta-0", "b-2", "beta");
      await until(() => starts(beta2).length === 1, "beta to start again");
      const betaWire = starts(beta2)[0]!.jobId!;
      expect(starts(beta2)[0]!.resumeStep).toBe(20);
      jobs.onOuterJoin(beta2.workerId, betaWire, ["beta", "alpha"], 40);
      await save(alpha, job.jobId, "alpha", 40, [0, 1], "run-away");
      await until(() => job.checkpointsCommitted.includes(40), "step 40 to be committed without beta");
      await save(alpha, job.jobId, "alpha", 50, [0, 1], "run-away");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(job.checkpointsCommitted).not.toContain(50);
      await save(beta2, betaWire, "beta", 50, [0, 1], "run-away");
      await until(() => job.checkpointsCommitted.includes(50), "step 50 to be committed with both groups");
      expect((await store.readManifest("run-away", 50))?.world).toMatchObject({ groups: ["alpha", "beta"], absentGroups: [] });

      // beta is lost again and alpha trains to the end: the final step holds alpha only.
      registry.declareLost(beta2.workerId, "its machine is gone again");
      await until(() => lines.some((line) => line.startsWith("group beta will start again from committed checkpoint step 50")), "beta to wait for its node");
      await save(alpha, job.jobId, "alpha", 60, [0, 1], "run-away");
      for (const rank of [0, 1]) jobs.onRankExit(alpha.workerId, { jobId: job.jobId, rank, exitCode: 0 });
      await until(() => job.state === "succeeded", "the job to succeed");
      expect(job.checkpointsCommitted).toEqual([10, 20, 30, 40, 50, 60]);
      expect((await store.readManifest("run-away", 60))?.world).toMatchObject({ groups: ["alpha"], absentGroups: ["beta"] });
      expect(lines).toContain("the other groups finished while group beta was restarting or training alone; it is stopped (alone it trains a model of its own from an older checkpoint), and the final checkpoint holds the other groups' ranks");
      // beta's node coming back now starts nothing.
      const beta3 = connect(registry, "beta-0", "b-3", "beta");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(starts(beta3)).toEqual([]);
    } finally {
      await cleanup();
    }
  });

  it("leaves out the files of a group split apart from the main group, and waits for it again once it took that group's state", async () => {
    const { store, lines, save, cleanup, startTwoGroups } = await withStore("drover-split-group-");
    try {
      const { alpha, beta, job } = await startTwoGroups("run-split");
      const wire = job.wireJobId;
      // In step after an outer step: a step waits for both.
      jobs.onOuterJoin(alpha.workerId, wire, ["alpha", "beta"], 0, false);
      jobs.onOuterJoin(beta.workerId, wire, ["beta", "alpha"], 0, false);
      await save(alpha, wire, "alpha", 10, [0, 1], "run-split");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(job.checkpointsCommitted).toEqual([]);
      await save(beta, wire, "beta", 10, [0, 1], "run-split");
      await until(() => job.checkpointsCommitted.includes(10), "step 10 to be committed with both");

      // The link breaks and each goes on alone: two models. alpha (the lower index) is the
      // job's; beta's step 20 is another model's and stays out even though complete.
      jobs.onOuterJoin(alpha.workerId, wire, ["alpha"], 0, false);
      jobs.onOuterJoin(beta.workerId, wire, ["beta"], 0, false);
      expect(lines).toContain("group beta trains apart from group alpha (not in step with it): its checkpoints are left out until it takes that group's state");
      await save(beta, wire, "beta", 20, [0, 1], "run-split");
      await save(alpha, wire, "alpha", 20, [0, 1], "run-split");
      await until(() => job.checkpointsCommitted.includes(20), "step 20 to be committed with alpha's files");
      const twenty = await store.readManifest("run-split", 20);
      expect(twenty?.world).toMatchObject({ groups: ["alpha"], absentGroups: ["beta"] });
      expect(twenty?.files.map((file) => file.path)).toEqual(["group-alpha/model.rank0.pt", "group-alpha/model.rank1.pt"]);
      // A head that takes the job over (cluster.json) knows the split too.
      const nextRegistry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
      const nextHead = new JobController({ registry: nextRegistry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger });
      try {
        const adopted = nextHead.adoptInterrupted(JSON.parse(JSON.stringify(job)) as JobRecord, new Map());
        expect(nextHead.checkpointGroups(adopted, 25)).toEqual({ required: ["alpha"], optional: [], apart: ["beta"] });
      } finally {
        nextHead.dispose();
        nextRegistry.stop();
      }

      // They meet again: beta takes alpha's state at inner step 30, never writes it, and
      // is waited for from step 40 on.
      jobs.onOuterJoin(beta.workerId, wire, ["beta", "alpha"], 30, true);
      jobs.onOuterJoin(alpha.workerId, wire, ["alpha", "beta"], 0, false);
      expect(lines).toContain("group beta is in step with group alpha again");
      await save(alpha, wire, "alpha", 30, [0, 1], "run-split");
      await until(() => job.checkpointsCommitted.includes(30), "step 30 to be committed without beta");
      await save(alpha, wire, "alpha", 40, [0, 1], "run-split");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(job.checkpointsCommitted).not.toContain(40);
      await save(beta, wire, "beta", 40, [0, 1], "run-split");
      await until(() => job.checkpointsCommitted.includes(40), "step 40 to be committed with both");
      expect(job.restarts).toEqual([]);
      for (const node of [alpha, beta]) for (const rank of [0, 1]) jobs.onRankExit(node.workerId, { jobId: wire, rank, exitCode: 0 });
      await until(() => job.state === "succeeded", "the job to succeed");
    } finally {
      await cleanup();
    }
  });

  it("keeps the group that trained on as the job's model while the lowest-index group restarts, and both once it took their state", async () => {
    const { store, save, cleanup, startTwoGroups } = await withStore("drover-main-restart-");
    try {
      const { alpha, beta, job } = await startTwoGroups("run-main");
      const wire = job.wireJobId;
      jobs.onOuterJoin(alpha.workerId, wire, ["alpha", "beta"], 0, false);
      jobs.onOuterJoin(beta.workerId, wire, ["beta", "alpha"], 0, false);
      // alpha (index 0) is lost; beta trains on alone and its steps are the job's.
      registry.declareLost(alpha.workerId, "its machine is gone");
      jobs.onOuterJoin(beta.workerId, wire, ["beta"], 0, false);
      await save(beta, wire, "beta", 20, [0, 1], "run-main");
      await until(() => job.checkpointsCommitted.includes(20), "step 20 to be committed with beta's files");
      const alpha2 = connect(registry, "alpha-0", "a-2", "alpha");
      await until(() => starts(alpha2).length === 1, "alpha to start again");
      const alphaWire = starts(alpha2)[0]!.jobId!;
      // Started again from 20 but not joined yet: beta is still the job's model, and its
      // step 30 waits for alpha, which may still write it.
      await save(beta, wire, "beta", 30, [0, 1], "run-main");
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(job.checkpointsCommitted).not.toContain(30);
      // alpha takes beta's state at inner step 40: it never writes 30, and beta, whose
      // last word left alpha out, is in step with it (not apart).
      jobs.onOuterJoin(alpha2.workerId, alphaWire, ["alpha", "beta"], 40, true);
      await until(() => job.checkpointsCommitted.includes(30), "step 30 to be committed with beta's files");
      expect((await store.readManifest("run-main", 30))?.world).toMatchObject({ groups: ["beta"], absentGroups: ["alpha"] });
      await save(alpha2, alphaWire, "alpha", 50, [0, 1], "run-main");
      await save(beta, wire, "beta", 50, [0, 1], "run-main");
      await until(() => job.checkpointsCommitted.includes(50), "step 50 to be committed");
      expect((await store.readManifest("run-main", 50))?.world).toMatchObject({ groups: ["alpha", "beta"], absentGroups: [] });
    } finally {
      await cleanup();
    }
  });

  it("leaves out the checkpoints of a group that came back but trains alone, and stops it when the other groups finish; one that took their state finishes with them", async () => {
    const { store, lines, save, cleanup, startTwoGroups } = await withStore("drover-alone-group-");
    try {
      const { alpha, beta, job } = await startTwoGroups("run-alone");
      const beta2 = connect(registry, "beta-0", "b-2", "beta");
      await until(() => starts(beta2).length === 1, "beta to start again");
      const betaWire = starts(beta2)[0]!.jobId!;
      // Its trainer found nobody to take the live state from: it trains alone, and its
      // step 40 (another model) must not land beside alpha's.
      jobs.onOuterJoin(beta2.workerId, betaWire, ["beta"], 0);
      expect(job.state).toBe("running");
      await save(beta2, betaWire, "beta", 40, [0, 1], "run-alone");
      expect(lines).toContain("checkpoint step 40 of rank 2 is left out: group beta trains alone on its own state");
      await save(alpha, job.jobId, "alpha", 40, [0, 1], "run-alone");
      for (const rank of [0, 1]) jobs.onRankExit(alpha.workerId, { jobId: job.jobId, rank, exitCode: 0 });
      await until(() => job.state === "succeeded", "the job to end");
      expect(new Set(stops(beta2))).toEqual(new Set([betaWire]));
      expect((await store.readManifest("run-alone", 40))?.files.map((file) => file.path)).toEqual(["group-alpha/model.rank0.pt", "group-alpha/model.rank1.pt"]);

      // The same, but beta took alpha's state: it is one model again and finishes with it.
      const alpha3 = connect(registry, "alpha-0", "a-3", "alpha");
      const beta3 = connect(registry, "beta-0", "b-3", "beta");
      const next = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId: "run-rejoined" });
      await until(() => starts(alpha3).length === 1 && starts(beta3).length === 1, "the next job to start");
      const beta4 = connect(registry, "beta-0", "b-4", "beta");
      await until(() => starts(beta4).length === 1, "beta to start again");
      const beta4Wire = starts(beta4)[0]!.jobId!;
      jobs.onOuterJoin(beta4.workerId, beta4Wire, ["beta"], 0);
      jobs.onOuterJoin(beta4.workerId, beta4Wire, ["beta", "alpha"], 20);
      await save(alpha3, next.jobId, "alpha", 40, [0, 1], "run-rejoined");
      for (const rank of [0, 1]) jobs.onRankExit(alpha3.workerId, { jobId: next.jobId, rank, exitCode: 0 });
      expect(next.state).toBe("running");
      await save(beta4, beta4Wire, "beta", 40, [0, 1], "run-rejoined");
      for (const rank of [0, 1]) jobs.onRankExit(beta4.workerId, { jobId: beta4Wire, rank, exitCode: 0 });
      await until(() => next.state === "succeeded", "the rejoined job to succeed");
      expect((await store.readManifest("run-rejoined", 40))?.world).toMatchObject({ groups: ["alpha", "beta"], absentGroups: [] });
    } finally {
      await cleanup();
    }
  });

  it("gives each group leader the bridge certificate of its group for the attempt's bridge id, the same one again when the group restarts alone", async () => {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    const issued: Array<{ bridgeJobId: string; groups: readonly string[] }> = [];
    jobs = new JobController({
      registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep: async () => 20,
      issueBridgeCertificates: async (bridgeJobId, groups) => {
        issued.push({ bridgeJobId, groups });
        return new Map(groups.map((group) => [group, { certificatePem: `cert of ${group} in ${bridgeJobId}`, privateKeyPem: `key of ${group}`, caPem: "the CA" }]));
      },
    });
    const alpha = connect(registry, "alpha-0", "a-1", "alpha");
    const alphaMember = connect(registry, "alpha-1", "a-1", "alpha");
    const beta = connect(registry, "beta-0", "b-1", "beta");
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 3 });
    await until(() => starts(alpha).length === 1 && starts(beta).length === 1 && starts(alphaMember).length === 1, "the job to start");
    expect(issued).toEqual([{ bridgeJobId: job.wireJobId, groups: ["alpha", "beta"] }]);
    expect(starts(alpha)[0]!.bridgeTls).toEqual({ certificatePem: `cert of alpha in ${job.wireJobId}`, privateKeyPem: "key of alpha", caPem: "the CA" });
    expect(starts(beta)[0]!.bridgeTls).toMatchObject({ certificatePem: `cert of beta in ${job.wireJobId}` });
    // Only leaders speak on the bridge: a member node gets neither key nor certificate.
    expect(starts(alphaMember)[0]!.bridgeTls).toBeUndefined();
    expect(starts(alphaMember)[0]!.bridgeSecret).toBeUndefined();

    const beta2 = connect(registry, "beta-0", "b-2", "beta");
    await until(() => starts(beta2).length === 1, "beta to start again");
    expect(starts(beta2)[0]).toMatchObject({ bridgeJobId: job.wireJobId, bridgeTls: starts(beta)[0]!.bridgeTls });
    expect(issued).toHaveLength(1);
  });

  it("issues no bridge certificates for a job of one group", async () => {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    let calls = 0;
    jobs = new JobController({
      registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger,
      issueBridgeCertificates: async () => {
        calls += 1;
        return new Map();
      },
    });
    const a = connect(registry, "alpha-0", "a-1", "alpha");
    jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 1 });
    await until(() => starts(a).length === 1, "the job to start");
    expect(calls).toBe(0);
    expect(starts(a)[0]!.bridgeTls).toBeUndefined();
  });

  it("restarts the whole job when no other group is up to train on", async () => {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep: async () => undefined });
    const alpha = connect(registry, "alpha-0", "a-1", "alpha");
    const beta = connect(registry, "beta-0", "b-1", "beta");
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2 });
    await until(() => starts(alpha).length === 1 && starts(beta).length === 1, "the job to start");
    registry.detach(alpha.workerId, alpha.channel);
    registry.detach(beta.workerId, beta.channel);
    jobs.onRankExit(beta.workerId, { jobId: job.jobId, rank: 2, exitCode: 1 });
    expect(job.state).toBe("restarting");
    expect(job.restarts[0]?.group).toBeUndefined();
  });
});

describe("JobController: a job is done only when its checkpoints are", () => {
  let registry: WorkerRegistry;
  let jobs: JobController;
  afterEach(() => {
    jobs?.dispose();
    registry?.stop();
  });

  /** `settle` plays the checkpoint coordinator: it resolves when the commits have settled. */
  async function runToExit(settle: (job: JobRecord) => Promise<boolean>) {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, settleCheckpoints: settle });
    const a = connect(registry, "local-0", "a-1");
    const b = connect(registry, "local-1", "b-1");
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId: "run-c" });
    await until(() => starts(a).length === 1 && starts(b).length === 1, "the job to start");
    const lines: string[] = [];
    jobs.on("log", (line) => lines.push(line.line));
    const report = (step: number, error?: string) => {
      for (const [node, ranks] of [[a, [0, 1]], [b, [2, 3]]] as const) {
        for (const rank of ranks) jobs.onCheckpoint(node.workerId, { jobId: job.jobId, rank, step, files: [], ...(error && rank === 3 ? { error } : {}) });
      }
    };
    const exitAll = () => {
      for (const [node, ranks] of [[a, [0, 1]], [b, [2, 3]]] as const) {
        for (const rank of ranks) jobs.onRankExit(node.workerId, { jobId: job.jobId, rank, exitCode: 0 });
      }
    };
    return { job, report, exitAll, lines };
  }

  it("waits in `finishing` for the final commit, then succeeds", async () => {
    let commit: () => void = () => {};
    const { job, report, exitAll, lines } = await runToExit((j) => new Promise((resolve) => {
      commit = () => { jobs.markCommitted(j.jobId, 40); resolve(true); };
    }));
    jobs.markCommitted(job.jobId, 20);
    report(20);
    report(40);
    exitAll();
    expect(job.state).toBe("finishing");
    expect(lines).toContain("every rank exited 0; waiting for checkpoint step 40 to be committed");
    commit();
    await until(() => job.state === "succeeded", "success after the commit");
    expect(job.lastCommittedStep).toBe(40);
  });

  it("fails naming the final step when it could not be stored", async () => {
    const { job, report, exitAll } = await runToExit(async (j) => {
      jobs.checkpointLost(j.jobId, 40, "its commit failed: CompleteMultipartUpload failed after 6 attempts");
      return true;
    });
    jobs.markCommitted(job.jobId, 20);
    report(20);
    report(40);
    exitAll();
    await until(() => job.state === "failed", "the job to fail");
    expect(job.failure?.reason).toBe("training finished but its final checkpoint, step 40, was not stored (its commit failed: CompleteMultipartUpload failed after 6 attempts); newest committed checkpoint: step 20");
    expect(summarizeJob(job)).toContain("  checkpoint step 40 NOT stored: its commit failed: CompleteMultipartUpload failed after 6 attempts");
  });

  it("succeeds when only an earlier step was lost, and the summary names it", async () => {
    const { job, report, exitAll, lines } = await runToExit(async (j) => {
      jobs.markCommitted(j.jobId, 40);
      return true;
    });
    report(20, "PutObject failed: ECONNREFUSED");
    report(40);
    exitAll();
    await until(() => job.state === "succeeded", "the job to succeed");
    expect(lines).toContain("checkpoint step 20 NOT stored: rank 3 could not store it: PutObject failed: ECONNREFUSED");
    expect(summarizeJob(job)).toContain("  checkpoint step 20 NOT stored: rank 3 could not store it: PutObject failed: ECONNREFUSED");
  });

  it("says a step is committed once, even when its ranks report it again and it is committed again (issue 14 item 11)", async () => {
    const { job, report, exitAll, lines } = await runToExit(async () => true);
    // The final step saved on the interval and again at the end: two full rounds of reports, two commits.
    report(120);
    jobs.markCommitted(job.jobId, 120);
    report(120);
    jobs.markCommitted(job.jobId, 120);
    exitAll();
    await until(() => job.state === "succeeded", "the job to succeed");
    expect(lines.filter((line) => line === "checkpoint step 120 committed")).toHaveLength(1);
    expect(job.checkpointsCommitted).toEqual([120]);
  });

  it("counts a step some ranks never reported as lost", async () => {
    const { job, exitAll } = await runToExit(async () => true);
    jobs.onCheckpoint(registry.connected()[0]!.workerId, { jobId: job.jobId, rank: 0, step: 40, files: [] });
    exitAll();
    await until(() => job.state === "failed", "the job to fail");
    expect(job.checkpointsLost[40]).toBe("only 1 of 4 ranks reported it stored");
  });

  it("finishes at once on a cluster without checkpoint storage", async () => {
    const { job, report, exitAll } = await runToExit(async () => false);
    report(40);
    exitAll();
    await until(() => job.state === "succeeded", "the job to succeed");
    expect(job.checkpointsLost).toEqual({});
  });
});

describe("JobController progress watchdog", () => {
  let registry: WorkerRegistry;
  let jobs: JobController;
  afterEach(() => {
    jobs?.dispose();
    registry?.stop();
  });

  it("reports a rank with no step and no output as stalled, then restarts the attempt from the checkpoint", async () => {
    let clock = 1_000_000;
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, restartStep: async () => 20, now: () => clock });
    const lines: string[] = [];
    jobs.on("log", (line) => lines.push(line.line));
    const a = connect(registry, "local-0", "a-1");
    const b = connect(registry, "local-1", "b-1");
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 2, runId: "run-w", stallTimeoutMs: 10_000 });
    await until(() => starts(a).length === 1 && starts(b).length === 1, "attempt 1 to start");

    // Every rank steps for a while; then global rank 3 (local-1's rank 1) goes silent.
    const step = (node: TestNode, rank: number, at: number) => jobs.onMetric(node.workerId, { jobId: job.jobId, rank, step: at, values: { loss: 1 } });
    for (let at = 1; at <= 5; at++) {
      clock += 100;
      step(a, 0, at); step(a, 1, at); step(b, 2, at); step(b, 3, at);
    }
    clock += 6_000;
    step(a, 0, 6); step(a, 1, 6); step(b, 2, 6);
    clock += 5_000; // rank 3: 11 s without progress; the others 5 s
    await until(() => (job.stalled ?? []).length === 1, "rank 3 to be reported stalled");
    expect(job.stalled).toEqual([expect.objectContaining({ rank: 3 })]);
    expect(job.state).toBe("running");
    expect(lines.some((line) => /warning: rank 3 has made no progress .* for 11s/.test(line))).toBe(true);

    // Output counts as progress: a line from rank 3 clears it.
    jobs.onLog(b.workerId, { jobId: job.jobId, rank: 3, stream: 1, line: "still here" });
    expect(job.stalled).toEqual([]);

    // Silent for twice the timeout: the attempt restarts from the checkpoint.
    clock += 21_000;
    await until(() => job.state === "restarting" || job.attempt === 2, "the attempt to restart");
    expect(job.restarts[0]!.reason).toMatch(/rank \d made no progress \(no step, no output\) for \d+s/);
    expect(stops(a)).toEqual([job.jobId]);
  });

  it("waits longer for a rank whose steps are slow", async () => {
    let clock = 0;
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger, now: () => clock });
    const a = connect(registry, "local-0", "a-1");
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 1, stallTimeoutMs: 1_000 });
    await until(() => starts(a).length === 1, "the job to start");
    // Steps every 2 s: 20 steps' time (40 s) beats the 1 s timeout.
    for (let at = 1; at <= 8; at++) {
      clock += 2_000;
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 0, step: at, values: {} });
      jobs.onMetric(a.workerId, { jobId: job.jobId, rank: 1, step: at, values: {} });
    }
    clock += 30_000;
    await new Promise((resolve) => setTimeout(resolve, 1_200));
    expect(job.stalled).toEqual([]);
    clock += 15_000;
    await until(() => (job.stalled ?? []).length === 2, "both ranks stalled past 20 step times");
  });
});

describe("the checkpoint coordinator and the job's output (issue 14 item 11)", () => {
  it("says a step committed once when every rank reports it again and the coordinator commits it again", async () => {
    const root = await mkdtemp(join(os.tmpdir(), "drover-commit-once-"));
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    const store = CheckpointStore.fromConfig({ store: { kind: "local", directory: join(root, "store") } });
    let coordinator: CheckpointCoordinator | undefined;
    const jobs = new JobController({
      registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger,
      settleCheckpoints: async (job) => { await coordinator!.settle(job); return true; },
    });
    coordinator = new CheckpointCoordinator(store, jobs, silentLogger);
    try {
      const node = connect(registry, "local-0", "a-1");
      const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 1, runId: "run-once" });
      await until(() => starts(node).length === 1, "the job to start");
      const lines: string[] = [];
      jobs.on("log", (line) => lines.push(line.line));
      const commits: number[] = [];
      coordinator.on("committed", ({ step }) => commits.push(step));
      // A trainer that saves its last step on the interval and again at the end: each of
      // its 2 ranks reports step 120 twice, the same files.
      const dir = join(root, "ckpt", "120");
      await mkdir(dir, { recursive: true });
      for (const rank of [0, 1]) await writeFile(join(dir, `rank${rank}.pt`), `weights of rank ${rank}`);
      const uploaded = await Promise.all([0, 1].map((rank) => store.uploadRank({ run: "run-once", step: 120, rank, dir, files: [`rank${rank}.pt`] })));
      for (const round of [1, 2]) {
        for (const report of uploaded) jobs.onCheckpoint(node.workerId, { jobId: job.jobId, rank: report.rank, step: 120, files: report.files });
        await until(() => commits.length === round, `commit ${round}`);
      }
      for (const rank of [0, 1]) jobs.onRankExit(node.workerId, { jobId: job.jobId, rank, exitCode: 0 });
      await until(() => job.state === "succeeded", "the job to succeed");
      expect(commits).toEqual([120, 120]);
      expect(lines.filter((line) => line === "checkpoint step 120 committed")).toHaveLength(1);
    } finally {
      jobs.dispose();
      registry.stop();
      store.close();
      await rm(root, { recursive: true, force: true });
    }
  });
});
