// A head that dies under a running job (kill -9), end to end with the real CLI, head,
// workers and the AT-1 trainer.
//
// - Its nodes outlive it: the next head (started by `drover up --supervise`'s supervisor,
//   or by `drover up` again) listens where the agents dial, accepts their session
//   credentials (sessions.json) and takes the job up as it runs: the same attempt, the
//   same trainer processes, one loss curve with every step once. Checkpoints the ranks
//   saved while no head was up are uploaded and committed once it is back.
// - Its node died with it (agent and trainers): the next head replaces the node and the
//   job resumes from its newest committed checkpoint as its next attempt.
import { spawnSync } from "node:child_process";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
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

type HeadFault =
  /** The supervisor starts the head again at once; the node lives on. */
  | "supervised"
  /** No head for a while (a checkpoint is saved meanwhile), then `drover up` again. */
  | "down-for-a-while"
  /** The node's agent and trainers are killed with the head; the supervisor starts it again. */
  | "node-dies-too";

const cases: Array<{ fault: HeadFault; title: string }> = [
  { fault: "supervised", title: "is started again by the supervisor and takes up the running trainers: same attempt, same processes, every step once" },
  { fault: "down-for-a-while", title: "takes up the running trainers when `drover up` runs again, and commits the checkpoints saved while it was down" },
  { fault: "node-dies-too", title: "resumes the job from its newest committed checkpoint when the node died with it" },
];

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

  for (const { fault, title } of cases) {
    it(title, async () => {
      const stateDir = join(scratch, fault);
      const drover = (args: string[]) => runDrover(stateDir, args, 120_000);
      const spec = join(scratch, "spec.json");
      await writeFile(spec, JSON.stringify({ name: "head-restart", head: { heartbeatInterval: "1s", heartbeatTimeout: "10s" }, local: { nodes: 1, ranksPerNode: 2 }, cost: { pricePerNodeHour: { amount: "3600", denom: "usd" } } }));
      const state = new StateDirectory(stateDir);
      const supervise = fault !== "down-for-a-while";
      // With no head for a while, the ranks must still be training when the next one comes.
      const steps = fault === "down-for-a-while" ? 120 : 60;
      try {
        const up = await drover(["up", ...(supervise ? ["--supervise"] : []), spec]);
        expect(up.code, up.stdout + up.stderr).toBe(0);
        const submit = await drover(["submit", "--no-wait", "--run-id", "survivor", "--working-dir", at1Dir, "--", "python", "train.py",
          "--config", "tiny", "--data", dataDir, "--steps", String(steps), "--batch-size", "8", "--warmup-steps", "4", "--lr", "1e-3",
          "--ckpt-every", "10", "--log-every", "1", "--val-samples", "0"]);
        expect(submit.code, submit.stdout + submit.stderr).toBe(0);
        const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
        const job = async () => (await state.readJson<{ jobs: JobRecord[] }>("cluster.json").catch(() => undefined))?.jobs.find((candidate) => candidate.jobId === jobId);
        const outputLog = () => readFile(join(stateDir, "jobs", jobId, "output.log"), "utf8").catch(() => "");
        // Someone following the job as the head streams it, through the head's death.
        if (fault === "supervised") await waitForValue(async () => ((await job()) ? true : undefined), 10_000, "the job in cluster.json");
        const follower = fault === "supervised" ? runDrover(stateDir, ["logs", "-f", "--job", jobId], 280_000) : undefined;

        const before = await waitForValue(async () => {
          const current = await job();
          const step = current?.latestMetrics[0]?.step;
          return current?.lastCommittedStep !== undefined && step !== undefined && step >= current.lastCommittedStep + 3 ? current : undefined;
        }, 150_000, "a committed checkpoint and 3 more steps");
        const dead = (await state.readJson<HeadRecord>("head.json"))!;
        expect(dead.supervisorPid !== undefined).toBe(supervise);
        const node = (await state.readJson<Array<{ pid: number }>>("local-nodes.json"))![0]!;
        const trainers = (await state.readJson<{ trainerPids: number[] }>(join("workers", "local-0", "trainers.json")))!.trainerPids;
        expect(trainers).toHaveLength(2);
        const deadCost = fault === "supervised" ? await waitForValue(async () => {
          // A cost report that prices the node (one every 30 s) before the head dies.
          const cost = await state.readJson<{ totals: Array<{ denom: string; spent: string }> }>("cost.json").catch(() => undefined);
          return cost?.totals.length ? cost : undefined;
        }, 60_000, "a cost report pricing the node") : undefined;
        process.kill(dead.pid, "SIGKILL");
        if (fault === "node-dies-too") for (const pid of [node.pid, ...trainers]) process.kill(pid, "SIGKILL");
        await waitForValue(async () => (processAlive(dead.pid) ? undefined : true), 5_000, "the head to die");

        let savedWhileDown: number | undefined;
        if (fault === "down-for-a-while") {
          // The ranks go on with no head: wait for a step they save then, before any head is back.
          const ckptDir = join(stateDir, "workers", "local-0", "jobs", before.wireJobId, "ckpt");
          savedWhileDown = await waitForValue(async () => {
            const saved = (await readdir(ckptDir).catch(() => [] as string[])).map(Number).filter((step) => step > before.lastCommittedStep! + 10);
            return saved.length > 0 ? Math.min(...saved) : undefined;
          }, 60_000, "a checkpoint saved while the head is down");
          expect(processAlive(dead.pid)).toBe(false);
          const again = await drover(["up", spec]);
          expect(again.code, again.stdout + again.stderr).toBe(0);
        }

        if (fault !== "node-dies-too") {
          // Taken up as it runs: the very processes the dead head's job started train on.
          await waitForValue(async () => ((await outputLog()).includes("adopted: attempt 1's 2 ranks on 1 node go on without a restart") ? true : undefined), 60_000, "the job to be adopted");
          for (const pid of [node.pid, ...trainers]) expect(processAlive(pid), `pid ${pid}`).toBe(true);
        }
        const final = await waitForValue(async () => {
          const current = await job();
          return current && ["succeeded", "failed", "stopped"].includes(current.state) ? current : undefined;
        }, 200_000, "the job to end");
        const log = await outputLog();
        expect(final.state, `${JSON.stringify(final.failure)}\n${log.slice(-3000)}`).toBe("succeeded");
        const now = (await state.readJson<HeadRecord>("head.json"))!;
        expect(now.pid).not.toBe(dead.pid);
        if (supervise) {
          expect(now.supervisorPid).toBe(dead.supervisorPid);
          expect(await readFile(join(stateDir, "head.out"), "utf8")).toMatch(new RegExp(`the head \\(pid ${dead.pid}\\) ended with signal SIGKILL; starting it again \\(1 of at most 5`));
        }

        if (fault === "node-dies-too") {
          // The job went on as its second attempt, from a checkpoint the dead head had committed.
          expect(final.attempt).toBe(2);
          expect(final.restarts).toHaveLength(1);
          expect(final.restarts[0]!.resumeStep).toBeGreaterThanOrEqual(before.lastCommittedStep!);
          expect(log).toMatch(/attempt 2 (will )?resumes? from committed checkpoint step \d+/);
        } else {
          expect(final.attempt).toBe(1);
          expect(final.restarts).toEqual([]);
          expect(log.match(/starting 2 ranks on 1 nodes/g)).toHaveLength(1);
          expect(log).toContain("the head restarted; attempt 1 goes on where it runs");
        }
        if (savedWhileDown !== undefined) {
          // Saved with no head to sign its uploads; stored and committed once one was back.
          expect(log).toContain(`checkpoint step ${savedWhileDown} committed`);
          expect(final.checkpointsCommitted).toContain(savedWhileDown);
        }
        expect(log).not.toMatch(/NOT stored/);
        if (follower) {
          // It followed on from the state directory while the supervisor started the head again: every step once, to the end.
          const followed = await follower;
          expect(followed.code, followed.stderr).toBe(0);
          expect(followed.stderr).toContain("the head stopped; its supervisor starts it again");
          const printedSteps = [...followed.stdout.matchAll(/^\[rank 0\] step (\d+)\/\d+ /gm)].map((match) => Number(match[1]));
          expect(printedSteps).toEqual(Array.from({ length: steps }, (_, index) => index + 1));
          expect(followed.stdout).toContain("[drover] job succeeded");
        }
        // One loss curve, every step once: nothing the dead head missed is missing, nothing it had is doubled.
        await new Promise((resolveDelay) => setTimeout(resolveDelay, 500));
        const points = (await readFile(join(stateDir, "jobs", jobId, "metrics.ndjson"), "utf8")).split("\n").filter(Boolean)
          .map((line) => JSON.parse(line) as MetricPoint & { rank: number; loss?: number }).filter((point) => point.rank === 0 && typeof point.loss === "number");
        expect(stitchAttempts(points, final.restarts).map((point) => point.step)).toEqual(Array.from({ length: steps }, (_, index) => index + 1));
        expect(final.lastCommittedStep).toBe(steps);
        if (deadCost) {
          // The new head counts on from what the dead one spent (node-hours here, at 1 usd/s).
          const cost = (await state.readJson<{ earlier?: { spent: Array<{ denom: string; spent: string }> }; totals: Array<{ denom: string; spent: string }> }>("cost.json"))!;
          expect(cost.earlier?.spent).toEqual(deadCost.totals.map(({ denom, spent }) => ({ denom, spent })));
          expect(Number(cost.totals[0]!.spent)).toBeGreaterThan(Number(deadCost.totals[0]!.spent));
          const status = await drover(["status"]);
          expect(status.stdout).toMatch(/earlier heads of this cluster \(they died; their last report\): [\d.]+ usd/);
        }
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
