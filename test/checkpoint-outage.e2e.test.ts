// The final checkpoint is never lost quietly. A real S3 server on loopback (s3rver) is
// stopped just as the trainers write their last checkpoint, with the real CLI, head and
// workers: a short outage must end with the step committed and the job SUCCEEDED (the
// agents retry and hold each rank's exit until its upload is done; the head waits for the
// commit before it declares the result); an outage longer than the agents' retry window
// must end with the job FAILED, naming the step that was not stored, and exit code 1.
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { CheckpointStore, startLocalS3Server, type LocalS3Server } from "@drover/storage";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");
const python = join(root, ".venv", "bin", "python");

// A trainer as small as the contract allows: each rank writes a 256 KiB file per
// checkpoint and reports it on the agent socket. Before its final checkpoint it waits
// for the gate file, which the test creates once the S3 server is down.
const TRAINER = `
import os, sys, time
import drover_agent
steps, every, gate = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rank = int(os.environ["RANK"])
agent = drover_agent.Agent.from_env()
for step in range(1, steps + 1):
    time.sleep(0.02)
    if rank == 0:
        print(f"step {step}/{steps}", flush=True)
    agent.metric(step, loss=1.0 / step)
    if step % every == 0:
        if step == steps:
            while not os.path.exists(gate):
                time.sleep(0.05)
        directory = os.path.join(os.environ["DROVER_CKPT_DIR"], str(step))
        os.makedirs(directory, exist_ok=True)
        name = f"state.rank{rank}.bin"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(os.urandom(256 * 1024))
        agent.checkpoint(step, directory, [name])
agent.close()
`;

interface CliRun { code: number | null; stdout: string; stderr: string }

function drover(stateDir: string, args: string[], env: NodeJS.ProcessEnv = {}, onStdout?: (text: string) => void): Promise<CliRun> {
  return new Promise((resolveRun) => {
    const child = spawn(process.execPath, [cli, ...args], { env: { ...process.env, ...env, DROVER_STATE_DIR: stateDir }, stdio: ["ignore", "pipe", "pipe"], timeout: 180_000 });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
      stdout += chunk;
      onStdout?.(stdout);
    });
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
    child.on("close", (code) => resolveRun({ code, stdout, stderr }));
  });
}

const sleep = (ms: number) => new Promise((resolveDelay) => setTimeout(resolveDelay, ms));

describe("an S3 outage at the final checkpoint", { timeout: 240_000 }, () => {
  let scratch: string;
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-outage-"));
    await writeFile(join(scratch, "trainer.py"), TRAINER);
  });
  afterAll(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  /**
   * Brings a 1-node x 2-rank cluster up against `s3`, runs the trainer for 40 steps with
   * checkpoints at 20 and 40, and takes the server down for `outageMs` right before the
   * final checkpoint is written. Returns the submit's result and the server, restarted.
   */
  async function runWithOutage(name: string, outageMs: number, workerEnv: NodeJS.ProcessEnv): Promise<{ submit: CliRun; s3: LocalS3Server; run: string; workerLogs: string }> {
    const stateDir = join(scratch, `${name}-state`);
    const s3Dir = join(scratch, `${name}-s3`);
    let s3 = await startLocalS3Server({ directory: s3Dir });
    const port = s3.port;
    const gate = join(scratch, `${name}.gate`);
    const spec = join(scratch, `${name}.json`);
    await writeFile(spec, JSON.stringify({
      name,
      head: { heartbeatInterval: "1s", heartbeatTimeout: "10s" },
      local: { nodes: 1, ranksPerNode: 2 },
      // Few request retries, so the outage outlasts the transfer engine's own and the
      // agents' retries of whole uploads are what carries the step through.
      storage: { store: s3.storeConfig(), transfer: { maxAttempts: 2, backoffBaseMs: 50, backoffMaxMs: 200 }, retention: { keepLast: 10 } },
    }));
    const run = `${name}-run`;
    try {
      const up = await drover(stateDir, ["up", spec], workerEnv);
      expect(up.code, up.stderr).toBe(0);
      let sawFinalStep!: () => void;
      const finalStep = new Promise<void>((resolveStep) => (sawFinalStep = resolveStep));
      const submitting = drover(stateDir, ["submit", "--run-id", run, "--working-dir", scratch, "--", python, "trainer.py", "40", "20", gate], {}, (stdout) => {
        if (stdout.includes("step 40/40")) sawFinalStep();
      });
      await finalStep;
      // Step 20 is committed; 40 is about to be written.
      const direct = CheckpointStore.fromConfig({ store: s3.storeConfig() });
      await waitFor(async () => (await direct.listCommitted(run)).includes(20), 30_000, "step 20 to be committed");
      direct.close();
      await s3.stop();
      await writeFile(gate, "");
      await sleep(outageMs);
      s3 = await startLocalS3Server({ directory: s3Dir, port });
      const submit = await submitting;
      const workerLogs = await readFile(join(stateDir, "workers", "local-0.log"), "utf8");
      return { submit, s3, run, workerLogs };
    } finally {
      const down = await drover(stateDir, ["down"]);
      expect(down.code, down.stderr).toBe(0);
    }
  }

  it("a 3 s outage: the agents retry, the head waits for the commit, and the job succeeds with step 40 committed", async () => {
    const { submit, s3, run, workerLogs } = await runWithOutage("short", 3_000, {});
    try {
      expect(submit.code, submit.stdout + submit.stderr).toBe(0);
      expect(submit.stdout).toContain("SUCCEEDED");
      expect(submit.stdout).toContain("newest committed checkpoint: step 40");
      // The agent said what it was doing: the upload failed, was tried again and stored,
      // and the rank's exit waited for it.
      expect(submit.stdout).toMatch(/checkpoint step 40: upload failed \(.+\); trying again in \d+s/);
      expect(submit.stdout).toMatch(/checkpoint step 40 stored after \d+ tries/);
      expect(submit.stdout).toContain("exited; reporting it once its 1 checkpoint upload finish");
      expect(submit.stdout).not.toContain("NOT stored");
      const store = CheckpointStore.fromConfig({ store: s3.storeConfig() });
      try {
        expect(await store.listCommitted(run)).toEqual([20, 40]);
        expect((await store.readManifest(run, 40))?.files).toHaveLength(2);
      } finally {
        store.close();
      }
      // The worker log has one warning per failed try of a rank's upload, naming it, and
      // none of the AWS SDK's console lines (one per failed request, naming nothing).
      const tries = [...submit.stdout.matchAll(/checkpoint step 40: upload failed/g)].length;
      const warnings = workerLogs.split("\n").filter((line) => line.includes("checkpoint upload failed; retrying"));
      expect(warnings).toHaveLength(tries);
      expect(workerLogs).not.toContain("non-retryable streaming request");
    } finally {
      await s3.stop();
    }
  });

  it("an outage past the retry window: the job fails naming the final step, exit code 1", async () => {
    const { submit, s3, run } = await runWithOutage("long", 8_000, { DROVER_UPLOAD_RETRY_MS: "2000" });
    try {
      expect(submit.code, submit.stdout + submit.stderr).toBe(1);
      expect(submit.stdout).toContain("FAILED");
      expect(submit.stdout).toMatch(/training finished but its final checkpoint, step 40, was not stored \(rank \d could not store it: .+\); newest committed checkpoint: step 20/);
      expect(submit.stdout).toMatch(/checkpoint step 40 NOT stored: rank \d could not store it/);
      const store = CheckpointStore.fromConfig({ store: s3.storeConfig() });
      try {
        expect(await store.listCommitted(run)).toEqual([20]);
      } finally {
        store.close();
      }
    } finally {
      await s3.stop();
    }
  });
});
