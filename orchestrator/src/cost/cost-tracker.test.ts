import { EventEmitter } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { CheckpointCoordinator } from "../checkpoint-coordinator.js";
import type { JobController, JobRecord } from "../job-controller.js";
import { silentLogger } from "../logger.js";
import type { Provisioner } from "../provisioners/provisioner.js";
import { StateDirectory } from "../state-store.js";
import type { RegisteredWorker, WorkerRegistry } from "../worker-registry.js";
import { CostTracker } from "./cost-tracker.js";
import type { CostReport, LeaseOnChain } from "./run-cost.js";

let root: string;
let state: StateDirectory;
beforeEach(async () => {
  root = await mkdtemp(join(os.tmpdir(), "drover-cost-"));
  state = new StateDirectory(root);
});
afterEach(async () => rm(root, { recursive: true, force: true }));

// Seams: the registry's list, the jobs' metric events, the provisioner's chain read.
const worker = (nodeName: string, registeredAtMs: number, connection: RegisteredWorker["connection"], lastSeenMs = registeredAtMs) =>
  ({ workerId: `w-${nodeName}`, nodeName, group: "g", connection, registeredAtMs, lastSeenMs }) as RegisteredWorker;
const job = (attempt = 1) => ({ jobId: "j1", runId: "r1", attempt }) as JobRecord;
const provisioner = (leasesOnChain?: Provisioner["leasesOnChain"]) => ({ name: "fake", ...(leasesOnChain ? { leasesOnChain } : {}) }) as unknown as Provisioner;

function tracker(options: { workers?: RegisteredWorker[]; now: () => number; pricePerNodeHour?: { amount: string; denom: string } }) {
  const jobs = new EventEmitter();
  const reports: CostReport[] = [];
  const costs = CostTracker.create({
    stateDir: state, logger: silentLogger, jobs: jobs as unknown as JobController,
    // The registry's list and its change events (a node joining prices it at once).
    workers: Object.assign(new EventEmitter(), { all: () => options.workers ?? [] }) as unknown as WorkerRegistry,
    now: options.now, intervalMs: 3_600_000, onReport: (report) => reports.push(report),
    ...(options.pricePerNodeHour ? { pricePerNodeHour: options.pricePerNodeHour } : {}),
  });
  return { costs, jobs, reports };
}

describe("cost tracker", () => {
  it("prices local nodes by the hour they were up, counts rank 0's images and committed checkpoints, and writes cost.json", async () => {
    let now = 0;
    const workers = [worker("n0", 0, "connected"), worker("n1", 0, "lost", 1_800_000)];
    const { costs, jobs } = tracker({ workers, now: () => now, pricePerNodeHour: { amount: "2", denom: "usd" } });
    const checkpoints = new EventEmitter();
    costs.watchCheckpoints(checkpoints as unknown as CheckpointCoordinator);
    costs.run(provisioner());
    // Rank 0 reports 100 img/s twice, 10 s apart: ~1,000 images; rank 1's figure is not added.
    jobs.emit("metric", job(), { rank: 0, step: 10, timeMs: 10_000, values: { images_per_s: 100 } });
    jobs.emit("metric", job(), { rank: 1, step: 10, timeMs: 10_000, values: { images_per_s: 100 } });
    jobs.emit("metric", job(), { rank: 0, step: 20, timeMs: 20_000, values: { images_per_s: 100 } });
    // A new attempt starts its own interval.
    jobs.emit("metric", job(2), { rank: 0, step: 20, timeMs: 500_000, values: { images_per_s: 100 } });
    checkpoints.emit("committed", { runId: "r1", step: 10, seconds: 1 });
    checkpoints.emit("committed", { runId: "r1", step: 20, seconds: 1 });
    checkpoints.emit("committed", { runId: "r1", step: 20, seconds: 1 });
    now = 3_600_000;
    const report = (await costs.refresh())!;
    expect(report.nodes.map((node) => [node.node, node.spent, node.burnPerHour])).toEqual([["n0", "2", "2"], ["n1", "1", "0"]]);
    expect(report.training).toEqual({ images: 1_000, committedCheckpoints: 2 });
    expect(report.totals).toEqual([{ denom: "usd", spent: "3", burnPerHour: "2", per1kImages: "3", perCheckpoint: "1.5" }]);
    expect(await state.readJson<CostReport>("cost.json")).toEqual(report);
    await costs.shutdown();
    expect(costs.state).toBe("stopped");
  });

  it("prices leases at the chain's height and measures the block time from the first block it saw", async () => {
    let now = 0;
    let height = 100;
    const lease: LeaseOnChain = { provider: "akash1p", dseq: "7", group: "g", pricePerBlock: "10", denom: "uakt", createdHeight: 90 };
    const { costs, reports } = tracker({ now: () => now, pricePerNodeHour: { amount: "5", denom: "usd" }, workers: [worker("n0", 0, "connected")] });
    costs.run(provisioner(async () => ({ latest: { height, timeMs: height * 1_000 }, leases: [lease] })));
    await costs.refresh();
    height = 110;
    now = 60_000;
    const report = (await costs.refresh())!;
    expect(report.chain).toMatchObject({ height: 110, blockTimeMs: 1_000, blockTimeMeasured: true });
    expect(report.leases[0]).toMatchObject({ blocks: 20, spent: "200", burnPerHour: "36000" });
    // Leased nodes are paid per block; the node-hour price is not added on top.
    expect(report.nodes).toEqual([]);
    expect(reports.at(-1)).toEqual(report);
    await costs.shutdown();
  });

  it("skips a report when the chain cannot be read, and keeps trying", async () => {
    let fail = true;
    const { costs } = tracker({ now: () => 0 });
    costs.run(provisioner(async () => {
      if (fail) throw new Error("connection refused");
      return { latest: { height: 5, timeMs: 0 }, leases: [] };
    }));
    expect(await costs.refresh()).toBeUndefined();
    fail = false;
    expect((await costs.refresh())?.chain?.height).toBe(5);
    await costs.shutdown();
  });
});
