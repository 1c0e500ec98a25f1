// Checkpoints that survive a dead node, end to end with the real CLI, head, workers and
// AT-1 trainer: one worker is killed with SIGKILL mid-training, then another while its
// checkpoint upload is in flight (an HTTP proxy in front of a real S3 server on loopback
// holds uploads back so the kill lands inside one). The job must restart by itself from
// the newest committed checkpoint, finish, and leave a loss curve with every step exactly
// once; no committed checkpoint may change. Then `drover ckpt` against an embedded store
// whose head is gone, including a corrupted object.
import { spawnSync } from "node:child_process";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { CheckpointStore, startLocalS3Server, type LocalS3Server } from "@drover/storage";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { StateDirectory, stitchAttempts, type JobRecord, type MetricPoint } from "@drover/orchestrator";
import { repoRoot, runDrover } from "./drover-cli.js";

const at1Dir = join(repoRoot, "examples", "at1");
const python = join(repoRoot, ".venv", "bin", "python");

let scratch: string;
let dataDir: string;

/** Runs the CLI without blocking this process: the S3 proxy below lives in it. */
const drover = runDrover;

async function readJson<T>(file: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(file, "utf8")) as T;
  } catch {
    return undefined;
  }
}

async function waitFor<T>(probe: () => Promise<T | undefined | false>, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await probe();
    if (value !== undefined && value !== false) return value;
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * Forwards everything to the S3 server; a checkpoint object PUT is announced and held
 * back `holdMs` before it is forwarded, while `holdUploads` is on.
 */
class UploadHoldingProxy {
  holdUploads = false;
  onUpload: ((upload: { step: number; rank: number }) => void) | undefined;
  private readonly server: http.Server;

  constructor(target: string, private readonly holdMs: number) {
    const upstream = new URL(target);
    this.server = http.createServer((request, response) => {
      const upload = request.method === "PUT" ? /\/ckpt\/(\d+)\/[a-z]+\.rank(\d+)\./.exec(request.url ?? "") : null;
      const forward = () => {
        const outbound = http.request({ host: upstream.hostname, port: upstream.port, method: request.method, path: request.url, headers: request.headers }, (answer) => {
          response.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(response);
        });
        outbound.on("error", () => response.destroy());
        request.pipe(outbound);
      };
      request.on("error", () => undefined);
      if (upload && this.holdUploads) {
        request.pause();
        this.onUpload?.({ step: Number(upload[1]), rank: Number(upload[2]) });
        setTimeout(forward, this.holdMs);
      } else {
        forward();
      }
    });
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolveListen) => this.server.listen(0, "127.0.0.1", resolveListen));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolveClose) => this.server.close(() => resolveClose()));
  }
}

function killNodeAgent(nodes: Array<{ nodeName: string; pid: number }>, nodeName: string): number {
  const node = nodes.find((candidate) => candidate.nodeName === nodeName);
  if (!node) throw new Error(`no ${nodeName} in local-nodes.json`);
  process.kill(node.pid, "SIGKILL");
  return node.pid;
}

describe("checkpoints survive dead nodes, end to end", { timeout: 300_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-recovery-"));
    dataDir = join(scratch, "data");
    const made = spawnSync(python, ["make_synthetic_shards.py", "--out", dataDir, "--train-samples", "512", "--val-samples", "0", "--samples-per-shard", "64"], { cwd: at1Dir, encoding: "utf8" });
    expect(made.status, made.stderr).toBe(0);
  });
  afterAll(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  it("restarts by itself after kill -9 mid-training and mid-upload, with no gap or duplicate step", async () => {
    const stateDir = join(scratch, "state");
    const s3: LocalS3Server = await startLocalS3Server({ directory: join(scratch, "s3") });
    const proxy = new UploadHoldingProxy(s3.endpoint, 1_500);
    const proxyUrl = await proxy.listen();
    const direct = CheckpointStore.fromConfig({ store: s3.storeConfig() });
    const run = "recovery-run";
    const firstSeenCommit = new Map<number, number>();
    const watchCommits = async () => {
      for (const step of await direct.listCommitted(run)) {
        const manifest = await direct.readManifest(run, step);
        if (manifest && !firstSeenCommit.has(step)) firstSeenCommit.set(step, manifest.committedAtMs);
      }
    };
    try {
      const spec = join(scratch, "recovery.yaml");
      await writeFile(spec, JSON.stringify({
        name: "recovery",
        head: { heartbeatInterval: "1s", heartbeatTimeout: "10s" },
        local: { nodes: 2, ranksPerNode: 2 },
        storage: { store: { ...s3.storeConfig(), endpoint: proxyUrl }, retention: { keepLast: 100 } },
      }));
      const up = await drover(stateDir, ["up", spec]);
      expect(up.code, up.stderr).toBe(0);
      const submit = await drover(stateDir, ["submit", "--no-wait", "--run-id", run, "--working-dir", at1Dir, "--", "python", "train.py",
        "--config", "tiny", "--data", dataDir, "--steps", "60", "--batch-size", "16", "--warmup-steps", "5", "--lr", "1e-3",
        "--ckpt-every", "15", "--log-every", "1", "--val-samples", "0"]);
      expect(submit.code, submit.stderr).toBe(0);
      const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
      const job = async () => (await readJson<{ jobs: JobRecord[] }>(join(stateDir, "cluster.json")))?.jobs.find((candidate) => candidate.jobId === jobId);
      const nodes = async () => (await new StateDirectory(stateDir).readJson<Array<{ nodeName: string; pid: number }>>("local-nodes.json").catch(() => undefined)) ?? [];

      // 1. Mid-training: a checkpoint is committed and training is 5 steps past it.
      const before = await waitFor(async () => {
        await watchCommits();
        const current = await job();
        const step = current?.latestMetrics[0]?.step;
        return current?.lastCommittedStep !== undefined && step !== undefined && step >= current.lastCommittedStep + 5 ? current : undefined;
      }, 150_000, "a committed checkpoint and 5 more steps");
      const firstVictim = killNodeAgent(await nodes(), "local-1");

      // 2. While an upload is in flight: hold uploads of attempt 2 and kill the uploader's node.
      const attempt2 = await waitFor(async () => {
        const current = await job();
        return current && current.attempt === 2 && current.state === "running" ? current : undefined;
      }, 60_000, "attempt 2 to run");
      const resumedFrom = attempt2.restarts[0]?.resumeStep ?? 0;
      const killedUpload = new Promise<{ step: number; rank: number; nodeName: string }>((resolveKill) => {
        proxy.onUpload = (upload) => {
          if (upload.step <= resumedFrom) return;
          proxy.onUpload = undefined;
          const nodeName = upload.rank < 2 ? "local-0" : "local-1";
          void nodes().then((list) => {
            killNodeAgent(list, nodeName);
            resolveKill({ ...upload, nodeName });
          });
        };
      });
      proxy.holdUploads = true;
      const uploadKill = await killedUpload;
      await waitFor(async () => ((await job())?.attempt === 3 ? true : undefined), 60_000, "attempt 3");
      proxy.holdUploads = false;

      const final = await waitFor(async () => {
        await watchCommits();
        const current = await job();
        return current && ["succeeded", "failed", "stopped"].includes(current.state) ? current : undefined;
      }, 180_000, "the job to end");
      expect(final.state, JSON.stringify(final.failure)).toBe("succeeded");
      expect(final.attempt).toBe(3);
      expect(final.restarts).toHaveLength(2);
      expect(final.restarts[0]!.reason).toMatch(/local-1/);
      expect(final.restarts[1]!.reason).toMatch(new RegExp(uploadKill.nodeName));
      // The step whose upload was cut off was never committed before the restart picked its step.
      expect(final.restarts[1]!.resumeStep ?? 0).toBeLessThan(uploadKill.step);
      expect(before.lastCommittedStep).toBeGreaterThanOrEqual(15);
      expect(firstVictim).toBeGreaterThan(0);

      // The loss curve: every step exactly once, attempts joined at their checkpoints.
      await new Promise((resolveDelay) => setTimeout(resolveDelay, 500)); // metrics file appends are asynchronous
      const points = (await readFile(join(stateDir, "jobs", jobId, "metrics.ndjson"), "utf8")).split("\n").filter(Boolean)
        .map((line) => JSON.parse(line) as MetricPoint & { rank: number }).filter((point) => point.rank === 0);
      const curve = stitchAttempts(points, final.restarts);
      expect(curve.map((point) => point.step)).toEqual(Array.from({ length: 60 }, (_, index) => index + 1));
      for (const [index, restart] of final.restarts.entries()) {
        const nextAttempt = points.filter((point) => point.attempt === index + 2).map((point) => point.step);
        expect(Math.min(...nextAttempt)).toBe((restart.resumeStep ?? 0) + 1);
        // Steps computed twice (after the checkpoint, before the failure) gave the same loss:
        // the restart resumed the exact trainer state, data position and RNG.
        for (const redone of points.filter((point) => point.attempt === index + 1 && point.step > (restart.resumeStep ?? 0))) {
          const again = points.find((point) => point.attempt === index + 2 && point.step === redone.step);
          if (again) expect(Math.abs(again.loss! - redone.loss!)).toBeLessThan(1e-5);
        }
      }

      // Nothing committed was lost or rewritten.
      await watchCommits();
      expect(await direct.listCommitted(run)).toEqual([15, 30, 45, 60]);
      for (const [step, committedAtMs] of firstSeenCommit) expect((await direct.readManifest(run, step))?.committedAtMs, `step ${step}`).toBe(committedAtMs);

      const status = await drover(stateDir, ["status"]);
      expect(status.stdout).toContain(`${jobId} succeeded (attempt 3, 2 restarts)`);
      expect(status.stdout).toMatch(/restart 1: attempt 1 ended at step \d+ \(.*local-1.*\); attempt 2 resumed from checkpoint step (15|30|45)/);

      const verify = await drover(stateDir, ["ckpt", "verify", "--run", run]);
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      expect(verify.stdout).toContain("4 checkpoint(s) verified");
    } finally {
      await drover(stateDir, ["down"]);
      direct.close();
      await proxy.close();
      await s3.stop();
    }
  });

  it("lists, pulls and verifies the embedded store's checkpoints after the head is gone, and finds a corrupted object", async () => {
    const stateDir = join(scratch, "embedded");
    const spec = join(scratch, "embedded.yaml");
    await writeFile(spec, JSON.stringify({ name: "embedded", local: { nodes: 1, ranksPerNode: 2 } }));
    expect((await drover(stateDir, ["up", spec])).code).toBe(0);
    const run = await drover(stateDir, ["submit", "--run-id", "emb", "--working-dir", at1Dir, "--", "python", "train.py",
      "--config", "tiny", "--data", dataDir, "--steps", "6", "--batch-size", "8", "--ckpt-every", "3", "--log-every", "3", "--val-samples", "0"], 180_000);
    expect(run.code, run.stdout + run.stderr).toBe(0);
    expect((await drover(stateDir, ["down"])).code).toBe(0);

    // A head that crashed between a commit and its next record leaves cluster.json a
    // commit behind: status asks the store instead (served from the state directory).
    const clusterFile = join(stateDir, "cluster.json");
    const cluster = JSON.parse(await readFile(clusterFile, "utf8")) as { jobs: Array<{ runId: string; lastCommittedStep?: number }> };
    for (const job of cluster.jobs) if (job.runId === "emb") job.lastCommittedStep = 3;
    await writeFile(clusterFile, JSON.stringify(cluster));
    const status = await drover(stateDir, ["status"]);
    expect(status.stdout, status.stdout + status.stderr).toMatch(/succeeded, .*committed step 6 \(in the store\)/);

    const runs = await drover(stateDir, ["ckpt", "ls"]);
    expect(runs.stdout).toContain("emb: 2 committed (newest 6)");
    const steps = await drover(stateDir, ["ckpt", "ls", "--run", "emb"]);
    expect(steps.stdout).toMatch(/step 3: \d+ files, [\d.]+ MiB, world 2 ranks/);
    const dest = join(scratch, "pulled");
    const pull = await drover(stateDir, ["ckpt", "pull", "--run", "emb", "--step", "3", dest]);
    expect(pull.code, pull.stderr).toBe(0);
    const manifest = JSON.parse(await readFile(join(dest, "MANIFEST.json"), "utf8")) as { files: Array<{ path: string; size: number }> };
    for (const file of manifest.files) expect((await stat(join(dest, file.path))).size).toBe(file.size);

    // Flip one byte of a stored object, keeping its size: only the sha256 can tell.
    const stepDir = join(stateDir, "s3", "drover", "runs", "emb", "ckpt", "000000000006");
    const objectFile = join(stepDir, (await readdir(stepDir)).find((name) => name.startsWith("model.rank0.pt") && name.endsWith("._S3rver_object"))!);
    const bytes = await readFile(objectFile);
    bytes[bytes.length >> 1]! ^= 0xff;
    await writeFile(objectFile, bytes);
    const verify = await drover(stateDir, ["ckpt", "verify", "--run", "emb"]);
    expect(verify.code).toBe(1);
    expect(verify.stdout).toContain("ok   step 3");
    expect(verify.stdout).toMatch(/BAD {2}step 6: .*sha256/);
    expect(verify.stdout).toContain("1 of 2 checkpoint(s) failed verification");
  });
});
