// A head that dies under a running job (kill -9), end to end with the real CLI, head,
// workers and the AT-1 trainer. With `drover up --supervise` the supervisor starts the
// head again; the new head stops what the dead one left (its agents and trainers), takes
// the job up again as its next attempt from the newest committed checkpoint, and the job
// finishes: one stitched loss curve with every step once, its checkpoints committed.
// Without the supervisor, `drover up` again does the same.
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { processAlive, StateDirectory, stitchAttempts, type HeadRecord, type JobRecord, type MetricPoint } from "@drover/orchestrator";
import { repoRoot, runDrover } from "./drover-cli.js";
import { waitForValue } from "./wait-for.js";

const at1Dir = join(repoRoot, "examples", "at1");
const python = join(repoRoot, ".venv", "bin", "python");
let scratch: string;
let dataDir: string;

describe("a head killed under a running job", { timeout: 300_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-head-restart-"));
    dataDir = join(scratch, "data");
    const made = spawnSync(python, ["make_synthetic_shards.py", "--out", dataDir, "--train-samples", "256", "--val-samples", "0", "--samples-per-shard", "64"], { cwd: at1Dir, encoding: "utf8" });
    expect(made.status, made.stderr).toBe(0);
  });
  afterAll(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  for (const supervise of [true, false]) {
    it(supervise ? "is started again by the supervisor, and the job resumes from its checkpoint and finishes" : "resumes the job when `drover up` runs again", async () => {
      const stateDir = join(scratch, supervise ? "supervised" : "plain");
      const drover = (args: string[]) => runDrover(stateDir, args, 120_000);
      const spec = join(scratch, "spec.json");
      await writeFile(spec, JSON.stringify({ name: "head-restart", head: { heartbeatInterval: "1s", heartbeatTimeout: "10s" }, local: { nodes: 1, ranksPerNode: 2 }, cost: { pricePerNodeHour: { amount: "3600", denom: "usd" } } }));
      const state = new StateDirectory(stateDir);
      const steps = 40;
      try {
        const up = await drover(["up", ...(supervise ? ["--supervise"] : []), spec]);
        expect(up.code, up.stdout + up.stderr).toBe(0);
        const submit = await drover(["submit", "--no-wait", "--run-id", "survivor", "--working-dir", at1Dir, "--", "python", "train.py",
          "--config", "tiny", "--data", dataDir, "--steps", String(steps), "--batch-size", "8", "--warmup-steps", "4", "--lr", "1e-3",
          "--ckpt-every", "10", "--log-every", "1", "--val-samples", "0"]);
        expect(submit.code, submit.stdout + submit.stderr).toBe(0);
        const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
        const job = async () => (await state.readJson<{ jobs: JobRecord[] }>("cluster.json").catch(() => undefined))?.jobs.find((candidate) => candidate.jobId === jobId);

        const before = await waitForValue(async () => {
          const current = await job();
          const step = current?.latestMetrics[0]?.step;
          return current?.lastCommittedStep !== undefined && step !== undefined && step >= current.lastCommittedStep + 3 ? current : undefined;
        }, 150_000, "a committed checkpoint and 3 more steps");
        // A cost report that prices the node (one every 30 s) before the head dies.
        await waitForValue(async () => ((await state.readJson<{ totals: unknown[] }>("cost.json").catch(() => undefined))?.totals.length ? true : undefined), 60_000, "a cost report pricing the node");
        const dead = (await state.readJson<HeadRecord>("head.json"))!;
        expect(dead.supervisorPid !== undefined).toBe(supervise);
        process.kill(dead.pid, "SIGKILL");
        await waitForValue(async () => (processAlive(dead.pid) ? undefined : true), 5_000, "the head to die");
        // What the dead head last said it spent (its cost.json is final now).
        const deadCost = (await state.readJson<{ totals: Array<{ denom: string; spent: string }> }>("cost.json"))!;
        expect(deadCost.totals.map((total) => total.denom)).toEqual(["usd"]);
        if (!supervise) {
          const again = await drover(["up", spec]);
          expect(again.code, again.stdout + again.stderr).toBe(0);
        }
        const final = await waitForValue(async () => {
          const current = await job();
          return current && ["succeeded", "failed", "stopped"].includes(current.state) ? current : undefined;
        }, 200_000, "the job to end");
        const log = await readFile(join(stateDir, "jobs", jobId, "output.log"), "utf8");
        expect(final.state, `${JSON.stringify(final.failure)}\n${log.slice(-3000)}`).toBe("succeeded");
        const now = (await state.readJson<HeadRecord>("head.json"))!;
        expect(now.pid).not.toBe(dead.pid);
        if (supervise) {
          expect(now.supervisorPid).toBe(dead.supervisorPid);
          expect(await readFile(join(stateDir, "head.out"), "utf8")).toMatch(new RegExp(`the head \\(pid ${dead.pid}\\) ended with signal SIGKILL; starting it again \\(1 of at most 5`));
        }
        // The job went on as its second attempt, from a checkpoint the dead head had committed.
        expect(final.attempt).toBe(2);
        expect(final.restarts).toHaveLength(1);
        expect(final.restarts[0]!.reason).toMatch(/the head stopped unexpectedly while the job was running/);
        expect(final.restarts[0]!.resumeStep).toBeGreaterThanOrEqual(before.lastCommittedStep!);
        expect(log).toMatch(/attempt 2 resumes from committed checkpoint step \d+/);
        // The dead head's trainers were stopped before the new attempt started: one run per rank.
        await new Promise((resolveDelay) => setTimeout(resolveDelay, 500));
        const points = (await readFile(join(stateDir, "jobs", jobId, "metrics.ndjson"), "utf8")).split("\n").filter(Boolean)
          .map((line) => JSON.parse(line) as MetricPoint & { rank: number; loss?: number }).filter((point) => point.rank === 0 && typeof point.loss === "number");
        expect(stitchAttempts(points, final.restarts).map((point) => point.step)).toEqual(Array.from({ length: steps }, (_, index) => index + 1));
        expect(final.lastCommittedStep).toBe(steps);
        // The new head counts on from what the dead one spent (node-hours here, at 1 usd/s).
        const cost = (await state.readJson<{ earlier?: { spent: Array<{ denom: string; spent: string }> }; totals: Array<{ denom: string; spent: string }> }>("cost.json"))!;
        expect(cost.earlier?.spent).toEqual(deadCost.totals.map(({ denom, spent }) => ({ denom, spent })));
        expect(Number(cost.totals[0]!.spent)).toBeGreaterThan(Number(deadCost.totals[0]!.spent));
        const status = await drover(["status"]);
        expect(status.stdout).toMatch(/earlier heads of this cluster \(they died; their last report\): [\d.]+ usd/);
        const verify = await drover(["ckpt", "verify", "--run", "survivor"]);
        expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      } finally {
        const down = await drover(["down"]);
        expect(down.code, down.stdout + down.stderr).toBe(0);
        const head = await state.readJson<HeadRecord>("head.json").catch(() => undefined);
        if (head?.supervisorPid) expect(processAlive(head.supervisorPid)).toBe(false);
        if (head) expect(processAlive(head.pid)).toBe(false);
      }
    });
  }
});
