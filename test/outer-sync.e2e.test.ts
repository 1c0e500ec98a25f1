// Two groups, one model, end to end: the real CLI, head, worker agents (their bridges)
// and the AT-1 trainer with DiLoCo outer steps. Group alpha runs 2 ranks, group beta 1
// (so their FSDP shardings differ); each is its own torch world, and every outer step
// their leaders' agents average the pseudo-gradients over the bridge. After every outer
// step both groups must hold the same outer parameters to the bit (sha256 printed by
// each group's rank 0), validation loss must fall, and a run stopped after a checkpoint
// and resumed must continue exactly as the uninterrupted run did. As root, each group
// runs in a network namespace of its own (only the bridge and the control plane connect
// them), with the link between them shaped by tbf.
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isolationUnavailable, StateDirectory, stitchAttempts, type JobRecord, type MetricPoint } from "@drover/orchestrator";
import { repoRoot, runDrover } from "./drover-cli.js";
import { waitForValue } from "./wait-for.js";

const at1Dir = join(repoRoot, "examples", "at1");
const python = join(repoRoot, ".venv", "bin", "python");

let scratch: string;
let dataDir: string;

const drover = (stateDir: string, args: string[]) => runDrover(stateDir, args, 240_000);

/**
 * The namespaces this cluster made (local-netns.json names them): other e2e files running
 * at the same time make their own, so "no drover namespace at all" is not this test's to say.
 */
async function clusterNamespaces(stateDir: string): Promise<string[]> {
  const plan = await new StateDirectory(stateDir).readJson<{ wanNamespace?: string; groups?: Array<{ namespace: string }> }>("local-netns.json").catch(() => undefined);
  return plan?.wanNamespace ? [plan.wanNamespace, ...(plan.groups ?? []).map((group) => group.namespace)] : [];
}

function namespacesLeft(names: string[]): string[] {
  const listed = new Set((spawnSync("ip", ["netns", "list"], { encoding: "utf8" }).stdout ?? "").split("\n").map((line) => line.split(" ")[0]).filter(Boolean));
  return names.filter((name) => listed.has(name));
}

/** `drover down`, which must succeed and leave none of the cluster's namespaces behind. */
async function downCluster(stateDir: string): Promise<void> {
  const namespaces = await clusterNamespaces(stateDir);
  const down = await drover(stateDir, ["down"]);
  expect(down.code, down.stdout + down.stderr).toBe(0);
  expect(namespacesLeft(namespaces)).toEqual([]);
}

/** `[rank R] outer step K: ... checksum H` lines: global rank -> outer step -> checksum. */
function outerChecksums(stdout: string): Map<number, Map<number, string>> {
  const byRank = new Map<number, Map<number, string>>();
  for (const match of stdout.matchAll(/^\[rank (\d+)\] outer step (\d+): .*checksum ([0-9a-f]{16})/gm)) {
    const rank = Number(match[1]);
    const steps = byRank.get(rank) ?? new Map<number, string>();
    steps.set(Number(match[2]), match[3]!);
    byRank.set(rank, steps);
  }
  return byRank;
}

interface Point { rank: number; step: number; attempt: number; loss?: number; val_loss?: number }

async function metrics(stateDir: string, jobId: string): Promise<Point[]> {
  await new Promise((resolveDelay) => setTimeout(resolveDelay, 500)); // metric appends are asynchronous
  return (await readFile(join(stateDir, "jobs", jobId, "metrics.ndjson"), "utf8")).split("\n").filter(Boolean).map((line) => JSON.parse(line) as Point);
}

const STEPS = 16;
const trainArgs = (extra: string[]) => ["--working-dir", at1Dir, "--", "python", "train.py",
  "--config", "tiny", "--data", dataDir, "--steps", String(STEPS), "--batch-size", "8", "--warmup-steps", "4", "--lr", "2e-3",
  "--outer-every", "4", "--ckpt-every", "8", "--val-every", "8", "--val-samples", "32", "--log-every", "1", ...extra];

describe("two local groups train one model through the bridge", { timeout: 780_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    dataDir = join(scratch, "data");
    const made = spawnSync(python, ["make_synthetic_shards.py", "--out", dataDir, "--train-samples", "512", "--val-samples", "64", "--samples-per-shard", "64"], { cwd: at1Dir, encoding: "utf8" });
    expect(made.status, made.stderr).toBe(0);
  });
  afterAll(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  it("goes on without a group whose leader is killed, and the group rejoins with the live outer state", async () => {
    const stateDir = join(scratch, "state-kill");
    const spec = join(scratch, "kill.json");
    await writeFile(spec, JSON.stringify({
      name: "outer-kill",
      head: { heartbeatInterval: "1s", heartbeatTimeout: "5s" },
      local: { groups: [{ name: "alpha", nodes: 1, ranksPerNode: 1 }, { name: "beta", nodes: 1, ranksPerNode: 1 }] },
      // Every step kept: the run is resumed from one committed while beta was away.
      storage: { store: { kind: "local", directory: join(scratch, "kill-store") }, retention: { keepLast: 100 } },
    }));
    const steps = 96;
    try {
      const up = await drover(stateDir, ["up", spec]);
      expect(up.code, up.stdout + up.stderr).toBe(0);
      const submit = await drover(stateDir, ["submit", "--no-wait", "--run-id", "kill", "--working-dir", at1Dir, "--", "python", "train.py",
        "--config", "tiny", "--data", dataDir, "--steps", String(steps), "--batch-size", "8", "--warmup-steps", "4", "--lr", "2e-3",
        "--outer-every", "4", "--outer-timeout", "10", "--ckpt-every", "8", "--val-samples", "32", "--log-every", "1"]);
      expect(submit.code, submit.stdout + submit.stderr).toBe(0);
      const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
      const state = new StateDirectory(stateDir);
      const job = async () => (await state.readJson<{ jobs: JobRecord[] }>("cluster.json").catch(() => undefined))?.jobs.find((candidate) => candidate.jobId === jobId);

      // Mid-run, after a committed checkpoint, beta's leader agent freezes (SIGSTOP) until
      // alpha has gone on without it, then is killed (kill -9): the local provisioner
      // starts a new agent, and the head restarts group beta alone.
      await waitForValue(async () => {
        const current = await job();
        const step = current?.latestMetrics[0]?.step;
        return current?.lastCommittedStep !== undefined && step !== undefined && step >= current.lastCommittedStep + 4 ? current : undefined;
      }, 150_000, "a committed checkpoint and 4 more steps");
      const nodes = await state.readJson<Array<{ nodeName: string; pid: number }>>("local-nodes.json");
      const beta = nodes.find((node) => node.nodeName.startsWith("beta"))!;
      const output = () => readFile(join(stateDir, "jobs", jobId, "output.log"), "utf8");
      process.kill(beta.pid, "SIGSTOP");
      try {
        await waitForValue(async () => ((await output()).includes("group beta left the outer steps") ? true : undefined), 60_000, "alpha to go on without beta");
      } finally {
        process.kill(beta.pid, "SIGKILL");
      }

      const final = await waitForValue(async () => {
        const current = await job();
        return current && ["succeeded", "failed", "stopped"].includes(current.state) ? current : undefined;
      }, 420_000, "the job to end").catch(async (error: Error) => {
        // What the job was doing is what a timeout needs to be understood.
        throw new Error(`${error.message}; the job's output ends:\n${(await output().catch(() => "")).slice(-6000)}`);
      });
      const log = await output();
      expect(final.state, `${JSON.stringify(final.failure)}\n${log.slice(-4000)}`).toBe("succeeded");
      // Only beta restarted: the job stayed in its first attempt.
      expect(final.attempt).toBe(1);
      expect(final.restarts).toHaveLength(1);
      expect(final.restarts[0]).toMatchObject({ group: "beta" });
      // Alpha went on alone while beta was gone, and said so.
      expect(log).toMatch(/\[rank 0\] outer step \d+: groups alpha, /);
      // Beta came back and took alpha's live outer state over the bridge.
      // (Under load an outer step may time out again later and split the groups for a
      // while; the group of the higher index then takes the state again: the last take counts.)
      const took = [...log.matchAll(/\[rank 1\] joined: took group alpha's live outer state at outer step (\d+) \(inner step (\d+)\)/g)].at(-1);
      expect(took, log.slice(-4000)).toBeDefined();
      const joinedAt = Number(took![1]);
      expect(Number(took![2])).toBe(joinedAt * 4);
      // From the next outer step on, both groups step together on the same parameters.
      const checksums = outerChecksums(log);
      const afterJoin = [...(checksums.get(0) ?? new Map<number, string>()).keys()].filter((step) => step > joinedAt);
      expect(afterJoin.length).toBeGreaterThan(0);
      for (const step of afterJoin) expect(checksums.get(1)?.get(step), `outer step ${step}\n${log.slice(-4000)}`).toBe(checksums.get(0)!.get(step));
      expect(log).toMatch(new RegExp(`\\[rank 0\\] outer step ${afterJoin[0]}: groups alpha\\+beta`));
      // The stitched curve (rank 0, alpha, never restarted) has every step once.
      await new Promise((resolveDelay) => setTimeout(resolveDelay, 500));
      const points = (await readFile(join(stateDir, "jobs", jobId, "metrics.ndjson"), "utf8")).split("\n").filter(Boolean)
        .map((line) => JSON.parse(line) as MetricPoint & { rank: number; loss?: number }).filter((point) => point.rank === 0 && typeof point.loss === "number");
      expect(stitchAttempts(points, final.restarts).map((point) => point.step)).toEqual(Array.from({ length: steps }, (_, index) => index + 1));

      // The steps alpha saved while beta was away were committed without beta (its files
      // never came): no checkpoint of the run is lost.
      expect([...final.checkpointsCommitted].sort((a, b) => a - b), log.slice(-4000)).toEqual(Array.from({ length: steps / 8 }, (_, index) => (index + 1) * 8));
      const without = [...log.matchAll(/checkpoint step (\d+) committed without group beta/g)].map((match) => Number(match[1]));
      expect(without.length, log.slice(-4000)).toBeGreaterThan(0);
      // A run resumed from such a step starts beta from alpha's files: one model again at
      // the first outer step.
      const from = without[0]!;
      const resumed = await drover(stateDir, ["submit", "--run-id", "kill", "--from-step", String(from), "--working-dir", at1Dir, "--", "python", "train.py",
        "--config", "tiny", "--data", dataDir, "--steps", String(from + 4), "--batch-size", "8", "--warmup-steps", "4", "--lr", "2e-3",
        "--outer-every", "4", "--outer-timeout", "60", "--val-samples", "32", "--log-every", "1"]);
      expect(resumed.code, resumed.stdout + resumed.stderr).toBe(0);
      const resumedId = /submitted (\S+)/.exec(resumed.stdout)![1]!;
      const resumedLog = await readFile(join(stateDir, "jobs", resumedId, "output.log"), "utf8");
      expect(resumedLog).toContain(`checkpoint step ${from} was committed without group beta (it was not in step then): the group starts from alpha's files`);
      expect(resumedLog).toContain(`group beta resumes from group alpha's checkpoint files (it was not in step when step ${from} was saved): fresh noise draws`);
      const resumedChecksums = outerChecksums(resumedLog);
      const outerStep = (from + 4) / 4;
      expect(resumedChecksums.get(1)?.get(outerStep), resumedLog.slice(-4000)).toBe(resumedChecksums.get(0)?.get(outerStep));
      expect(resumedLog).toMatch(new RegExp(`\\[rank 0\\] outer step ${outerStep}: groups alpha\\+beta`));
      // `drover ckpt ls` says which steps lack a group.
      const listed = await drover(stateDir, ["ckpt", "ls", "--run", "kill"]);
      expect(listed.stdout).toMatch(new RegExp(`step ${from}: .*groups alpha \\(without beta\\)`));
      expect(listed.stdout).toMatch(/step \d+: .*groups alpha\+beta,/);
    } finally {
      await downCluster(stateDir);
    }
  });

  it("keeps three groups on one model over mutual TLS (agreement round, reduce-scatter): every outer step has all three, the outer parameters identical", async () => {
    const stateDir = join(scratch, "state-three");
    const spec = join(scratch, "three.json");
    await writeFile(spec, JSON.stringify({
      name: "outer-three",
      local: { groups: ["alpha", "beta", "gamma"].map((name) => ({ name, nodes: 1, ranksPerNode: 1 })) },
    }));
    try {
      const up = await drover(stateDir, ["up", spec]);
      expect(up.code, up.stdout + up.stderr).toBe(0);
      const run = await drover(stateDir, ["submit", "--working-dir", at1Dir, "--", "python", "train.py",
        "--config", "tiny", "--data", dataDir, "--steps", "8", "--batch-size", "8", "--warmup-steps", "2", "--lr", "2e-3",
        "--outer-every", "4", "--outer-timeout", "120", "--val-samples", "32", "--log-every", "1"]);
      expect(run.code, run.stdout + run.stderr).toBe(0);
      const jobId = /submitted (\S+)/.exec(run.stdout)![1]!;
      const log = await readFile(join(stateDir, "jobs", jobId, "output.log"), "utf8");
      // The head has a CA (the default): every leader got a certificate and the bridge ran TLS.
      for (const node of ["alpha-0", "beta-0", "gamma-0"]) expect(await readFile(join(stateDir, "workers", `${node}.log`), "utf8")).toMatch(/"tls":true/);
      const checksums = outerChecksums(log);
      for (const outerStep of [1, 2]) {
        for (const rank of [0, 1, 2]) expect(log, log.slice(-4000)).toMatch(new RegExp(`\\[rank ${rank}\\] outer step ${outerStep}: groups alpha\\+beta\\+gamma`));
        expect(new Set([0, 1, 2].map((rank) => checksums.get(rank)?.get(outerStep))).size, log.slice(-4000)).toBe(1);
        expect(checksums.get(0)?.get(outerStep)).toMatch(/^[0-9a-f]{16}$/);
      }
    } finally {
      await downCluster(stateDir);
    }
  });

  it("keeps both groups' outer parameters identical, lowers validation loss, and resumes exactly", async () => {
    const stateDir = join(scratch, "state");
    const spec = join(scratch, "groups.json");
    await writeFile(spec, JSON.stringify({
      name: "outer",
      head: { heartbeatInterval: "1s", heartbeatTimeout: "10s" },
      local: { groups: [{ name: "alpha", nodes: 1, ranksPerNode: 2 }, { name: "beta", nodes: 1, ranksPerNode: 1 }], interGroupRate: "200mbit" },
    }));
    try {
      const up = await drover(stateDir, ["up", spec]);
      expect(up.code, up.stdout + up.stderr).toBe(0);
      // As root with ip netns and tc, each group has a namespace of its own and its bridge
      // listens on the group's wan address; otherwise both share loopback.
      const isolated = (await isolationUnavailable()) === undefined;
      const bridgeLine = /"advertised":"([^"]+)"/.exec(await readFile(join(stateDir, "workers", "beta-0.log"), "utf8"))?.[1];
      if (isolated) {
        const namespaces = await clusterNamespaces(stateDir);
        expect(namespaces.some((name) => /^drover-[0-9a-f]{4}-g1$/.test(name))).toBe(true);
        expect(namespacesLeft(namespaces)).toEqual(namespaces);
        expect(bridgeLine).toMatch(/^169\.254\.101\.2:\d+$/);
      } else {
        expect(bridgeLine).toMatch(/^127\.0\.0\.1:\d+$/);
      }

      // 1. The whole run.
      const whole = await drover(stateDir, ["submit", "--run-id", "whole", ...trainArgs([])]);
      expect(whole.code, whole.stdout + whole.stderr).toBe(0);
      const checksums = outerChecksums(whole.stdout);
      // Global rank 0 is alpha's rank 0, global rank 2 beta's.
      const alpha = checksums.get(0);
      const beta = checksums.get(2);
      expect([...(alpha?.keys() ?? [])], whole.stdout).toEqual([1, 2, 3, 4]);
      expect(beta).toEqual(alpha);
      // The parameters move: no two outer steps leave the same model.
      expect(new Set(alpha!.values()).size).toBe(4);
      // The exchange went through the leaders' bridges, both groups in it.
      expect(whole.stdout).toMatch(/outer step 1: groups alpha\+beta, [\d.]+ MiB sent/);
      const wholeJob = /submitted (\S+)/.exec(whole.stdout)![1]!;
      const wholePoints = await metrics(stateDir, wholeJob);
      const validation = wholePoints.filter((point) => point.rank === 0 && typeof point.val_loss === "number").map((point) => [point.step, point.val_loss!] as const);
      expect(validation.map(([step]) => step)).toEqual([8, 16]);
      expect(validation[1]![1]).toBeLessThan(validation[0]![1]);

      // 2. The same run stopped at step 10 (checkpoint 8 committed), then resumed.
      const first = await drover(stateDir, ["submit", "--run-id", "resumed", ...trainArgs(["--stop-after-step", "10"])]);
      expect(first.code, first.stdout + first.stderr).toBe(0);
      const second = await drover(stateDir, ["submit", "--run-id", "resumed", ...trainArgs([])]);
      expect(second.code, second.stdout + second.stderr).toBe(0);
      expect(second.stdout).toMatch(/resumed from .*group-alpha at step 8/);
      expect(second.stdout).toMatch(/resumed from .*group-beta at step 8/);
      const resumedPoints = await metrics(stateDir, /submitted (\S+)/.exec(second.stdout)![1]!);
      for (const rank of [0, 2]) {
        const expected = new Map(wholePoints.filter((point) => point.rank === rank && typeof point.loss === "number").map((point) => [point.step, point.loss!]));
        const got = resumedPoints.filter((point) => point.rank === rank && typeof point.loss === "number");
        expect(got.map((point) => point.step)).toEqual(Array.from({ length: STEPS - 8 }, (_, index) => 9 + index));
        for (const point of got) expect(Math.abs(point.loss! - expected.get(point.step)!), `rank ${rank} step ${point.step}`).toBeLessThan(1e-6);
      }
      // The outer steps after the resume land on the same parameters as the whole run's.
      const resumedChecksums = outerChecksums(second.stdout);
      expect(resumedChecksums.get(0)).toEqual(new Map([...alpha!].filter(([step]) => step > 2)));
      expect(resumedChecksums.get(2)).toEqual(resumedChecksums.get(0));
    } finally {
      const namespaces = await clusterNamespaces(stateDir);
      await drover(stateDir, ["down"]);
      // Nothing of the cluster's namespaces is left.
      expect(namespacesLeft(namespaces)).toEqual([]);
    }
  });
});
