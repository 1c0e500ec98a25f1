// A state directory that a crash left broken: the head killed with SIGKILL while a job
// runs, then head.json, cluster.json and local-nodes.json cut short (as a full disk or a
// torn write would leave them). Every command names the file and what is wrong (exit 2),
// and `drover down` still stops every worker and trainer under the state directory.
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { processAlive } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runDrover } from "./drover-cli.js";
import { processesUnderState } from "./processes-under-state.js";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");

let scratch: string;
let stateDir: string;
const drover = (args: string[]) => {
  const result = spawnSync(process.execPath, [cli, ...args], { env: { ...process.env, DROVER_STATE_DIR: stateDir }, encoding: "utf8", timeout: 120_000 });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
};

const droverAsync = (args: string[], env: Record<string, string> = {}) => runDrover(stateDir, args, 120_000, env);

describe("a broken state directory after a crash", { timeout: 180_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-state-"));
    stateDir = join(scratch, "state");
  });
  afterAll(async () => {
    drover(["down"]);
    await rm(scratch, { recursive: true, force: true });
  });

  it("names the broken file, and `drover down` still stops every worker and trainer", async () => {
    const spec = join(scratch, "one.json");
    await writeFile(spec, JSON.stringify({ name: "broken", local: { nodes: 1, ranksPerNode: 2 } }));
    const up = drover(["up", spec]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    const submit = drover(["submit", "--no-wait", "--working-dir", scratch, "--", "python", "-c", "import time; time.sleep(600)"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    // Both trainers run (the head records their pids through the agent's trainers.json).
    await waitFor(async () => {
      const trainers = JSON.parse(await readFile(join(stateDir, "workers", "local-0", "trainers.json"), "utf8").catch(() => "{}")) as { trainerPids?: number[] };
      return (trainers.trainerPids ?? []).length === 2;
    }, 30_000, "two trainers to run");
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number };
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
    const before = await processesUnderState(stateDir);
    expect(before.length).toBeGreaterThanOrEqual(3); // the worker and its two trainers

    await writeFile(join(stateDir, "head.json"), '{"pid": 12');
    await writeFile(join(stateDir, "cluster.json"), '{"workers": [');
    await writeFile(join(stateDir, "local-nodes.json"), '[{"nodeN');

    const status = drover(["status"]);
    expect(status.code).toBe(2);
    expect(status.stderr).toContain(`state file ${join(stateDir, "head.json")} is not valid JSON`);

    const down = drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(2);
    expect(down.stdout).toContain(`state file ${join(stateDir, "head.json")} is not valid JSON`);
    expect(down.stdout).toContain(`state file ${join(stateDir, "local-nodes.json")} is not valid JSON`);
    expect(down.stdout).toMatch(/stopped local-0 \(pid \d+\)/);
    expect(down.stdout).toMatch(/stopped trainer of local-0 \(pid \d+\)/);
    await waitFor(async () => (await processesUnderState(stateDir)).length === 0, 20_000, "every process under the state directory to stop");
  });

  it("ends `drover up` with the head's start-up error when it cannot listen, leaving nothing running", async () => {
    await rm(stateDir, { recursive: true, force: true });
    const spec = join(scratch, "unbindable.json");
    // 192.0.2.1 is TEST-NET-1 (RFC 5737): no interface here has it, so bind fails at once
    // (EADDRNOTAVAIL) and no packet is sent anywhere.
    await writeFile(spec, JSON.stringify({ name: "unbindable", head: { host: "192.0.2.1", port: 0 }, local: { nodes: 2, ranksPerNode: 1 } }));
    const up = drover(["up", spec]);
    expect(up.code, up.stdout + up.stderr).toBe(2);
    expect(up.stderr).toMatch(/the head (failed to start|exited during start).*cannot listen on 192\.0\.2\.1:0/);
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number; state: string; error?: string };
    expect(head.state).toBe("failed");
    expect(head.error).toMatch(/starting the control server failed: cannot listen on 192\.0\.2\.1:0/);
    await waitFor(() => !processAlive(head.pid), 10_000, "the failed head to exit");
    expect(await processesUnderState(stateDir)).toEqual([]);
  });

  it("lets one of two simultaneous `drover up` start a head and refuses the other, naming who holds the state", async () => {
    await rm(stateDir, { recursive: true, force: true });
    const spec = join(scratch, "two-ups.json");
    await writeFile(spec, JSON.stringify({ name: "two-ups", local: { nodes: 2, ranksPerNode: 1 } }));
    const [first, second] = await Promise.all([droverAsync(["up", spec]), droverAsync(["up", spec])]);
    const results = [first, second].sort((a, b) => (a.code ?? 9) - (b.code ?? 9));
    expect(results.map((result) => result.code)).toEqual([0, 2]);
    expect(results[1]!.stderr).toMatch(/is in use by `drover up` \(pid \d+|a head \(pid \d+\) is already running/);
    const heads = (await processesUnderState(stateDir)).length;
    expect(heads).toBeGreaterThan(0);
    const down = drover(["down"]);
    expect(down.code, down.stdout).toBe(0);
    await waitFor(async () => (await processesUnderState(stateDir)).length === 0, 20_000, "everything to stop");
  });

  it("`drover down` during `drover up` cancels the start and leaves nothing running", async () => {
    await rm(stateDir, { recursive: true, force: true });
    const spec = join(scratch, "cancel.json");
    await writeFile(spec, JSON.stringify({ name: "cancel", local: { nodes: 2, ranksPerNode: 1 } }));
    // Workers that never join (a FAKE drover-worker: it takes the real arguments and
    // idles), so `up` is surely still waiting when `down` comes, however loaded the
    // machine; its command line still reads as a worker's, so `down` finds and stops it.
    const idleWorker = join(scratch, "idle-worker.sh");
    await writeFile(idleWorker, `#!/bin/sh\nexec "${process.execPath}" -e "setInterval(() => {}, 1000)" drover-worker "$@"\n`, { mode: 0o755 });
    const up = droverAsync(["up", spec], { DROVER_WORKER_BIN: idleWorker });
    await waitFor(async () => (await readFile(join(stateDir, "lock"), "utf8").catch(() => "")).includes('"command":"up"'), 10_000, "up to take the lock");
    const down = drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    expect(down.stdout).toMatch(/cancelling `drover up` \(pid \d+\) in progress/);
    expect(down.stdout).toContain("cluster is down");
    const upResult = await up;
    expect(upResult.code).not.toBe(0);
    await waitFor(async () => (await processesUnderState(stateDir)).length === 0, 20_000, "everything to stop");
  });

  it("restarts an attempt whose rank hangs (SIGSTOP): warned in status, restarted after twice the stall timeout", async () => {
    await rm(stateDir, { recursive: true, force: true });
    const spec = join(scratch, "stall.json");
    await writeFile(spec, JSON.stringify({ name: "stall", local: { nodes: 1, ranksPerNode: 2 } }));
    expect(drover(["up", spec]).code).toBe(0);
    const submitted = droverAsync(["submit", "--stall-timeout", "8s", "--max-restarts", "1", "--working-dir", join(root, "examples", "minimal"), "--", "python", "steady_train.py", "--steps", "60"]);
    // Once rank 1 has stepped a few times, it is frozen: rank 0 then waits in its all-reduce.
    let rank1 = 0;
    await waitFor(async () => {
      const cluster = JSON.parse(await readFile(join(stateDir, "cluster.json"), "utf8").catch(() => "{}")) as { jobs?: Array<{ latestMetrics?: Record<string, { step: number }> }> };
      if ((cluster.jobs?.[0]?.latestMetrics?.["1"]?.step ?? 0) < 3) return false;
      for (const pid of await processesUnderState(stateDir)) {
        const environment = await readFile(`/proc/${pid}/environ`, "utf8").catch(() => "");
        if (environment.split("\0").includes("RANK=1") && environment.includes("DROVER_JOB_ID=")) rank1 = pid;
      }
      return rank1 > 0;
    }, 60_000, "rank 1 to step");
    process.kill(rank1, "SIGSTOP");
    try {
      await waitFor(async () => /STALLED: rank \d has made no progress/.test(drover(["status"]).stdout), 40_000, "status to show the stall");
    } catch (error) {
      process.kill(rank1, "SIGCONT");
      throw error;
    }
    const run = await submitted;
    expect(run.code, run.stdout + run.stderr).toBe(0);
    expect(run.stdout).toMatch(/warning: rank \d has made no progress \(no step, no output\) for \d+s/);
    expect(run.stdout).toMatch(/restart 1: attempt 1 ended at step \d+ \(rank \d made no progress \(no step, no output\) for \d+s\)/);
    expect(run.stdout).toContain("SUCCEEDED");
    expect(drover(["down"]).code).toBe(0);
    await waitFor(async () => (await processesUnderState(stateDir)).length === 0, 20_000, "everything to stop");
  });

  it("shows each node's last heartbeat, not its registration, and no node as connected once the head is gone", async () => {
    await rm(stateDir, { recursive: true, force: true });
    const spec = join(scratch, "status.json");
    await writeFile(spec, JSON.stringify({ name: "status", local: { nodes: 1, ranksPerNode: 1 } }));
    expect(drover(["up", spec]).code).toBe(0);
    // Longer than the heartbeat timeout: a time since registration would read 12s or more.
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 12_000));
    const status = drover(["status"]);
    const seen = Number(/local-0 \(w-\w+\) connected, .* seen ([\d.]+)s ago/.exec(status.stdout)?.[1]);
    expect(seen, status.stdout).toBeLessThan(6);
    expect(drover(["down"]).code).toBe(0);
    const after = drover(["status"]);
    expect(after.stdout).toContain("NOT RUNNING");
    expect(after.stdout).toMatch(/local-0 \(w-\w+\) disconnected \(head not running\)/);
    expect(after.stdout).not.toMatch(/ connected,/);
  });
});
