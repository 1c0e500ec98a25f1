// A full disk under the head, end to end with the real CLI, head, worker and a trainer:
// the state directory is a 16 MiB tmpfs and the trainer writes a 6 MiB checkpoint each
// step, so the embedded S3 server's copy of the second one does not fit. The head used to
// die of an unhandled ENOSPC on s3rver's write stream (issue 14 item 17), leaving a
// worker without a head and `drover status` showing the job running. Now the upload is
// refused with "disk full: <path> (<free> bytes free)", the step is named as not stored,
// the job fails saying so, and the head stays up until `drover down`.
import { spawnSync } from "node:child_process";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { mkdtempSync, rmdirSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { processAlive, StateDirectory, type HeadRecord, type JobRecord } from "@drover/orchestrator";
import { repoRoot, runDrover } from "./drover-cli.js";

const python = join(repoRoot, ".venv", "bin", "python");
const MiB = 1024 * 1024;

/** Why this machine cannot run the test (mounting a tmpfs needs root), or undefined. */
function cannotMountReason(): string | undefined {
  if (process.getuid?.() !== 0) return "not root: mounting the small tmpfs that makes the disk full needs root";
  const probe = mkdtempSync(join(os.tmpdir(), "drover-full-disk-probe-"));
  try {
    const mount = spawnSync("mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], { encoding: "utf8" });
    if (mount.status !== 0) return `cannot mount a tmpfs: ${(mount.stderr || mount.error?.message || "").trim()}`;
    spawnSync("umount", [probe]);
    return undefined;
  } finally {
    rmdirSync(probe);
  }
}

// One rank writes a CHECKPOINT_BYTES checkpoint per step under DROVER_CKPT_DIR (on the
// tmpfs too) and removes it once the agent has had time to upload it, so that the
// trainer's own writes fit and the store's copies are what fill the disk.
const TRAINER = `
import os, shutil, sys, time
import drover_agent
agent = drover_agent.Agent.from_env()
size, steps = int(sys.argv[1]), int(sys.argv[2])
for step in range(1, steps + 1):
    agent.metric(step, loss=1.0 / step)
    step_dir = os.path.join(os.environ["DROVER_CKPT_DIR"], str(step))
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "weights.bin"), "wb") as f:
        f.write(os.urandom(size))
    agent.checkpoint(step, step_dir, ["weights.bin"])
    print(f"step {step}: checkpoint written", flush=True)
    time.sleep(1.5)
    shutil.rmtree(step_dir)
print("done", flush=True)
`;

const skipReason = cannotMountReason();

describe.skipIf(skipReason !== undefined)(`a full disk under the head${skipReason ? ` (skipped: ${skipReason})` : ""}`, { timeout: 60_000 }, () => {
  let scratch: string;
  let stateDir: string;
  let mounted = false;

  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-full-disk-"));
    stateDir = join(scratch, "state");
    await mkdir(stateDir);
    const mount = spawnSync("mount", ["-t", "tmpfs", "-o", "size=16m", "tmpfs", stateDir], { encoding: "utf8" });
    expect(mount.status, mount.stderr).toBe(0);
    mounted = true;
    await mkdir(join(scratch, "trainer"));
    await writeFile(join(scratch, "trainer", "fill_disk.py"), TRAINER);
  });

  afterAll(async () => {
    if (mounted) {
      // Whatever the test left running must not hold the mount.
      await runDrover(stateDir, ["down"], 30_000);
      const unmount = spawnSync("umount", [stateDir], { encoding: "utf8" });
      if (unmount.status !== 0) spawnSync("umount", ["-l", stateDir]);
    }
    if (scratch) await rm(scratch, { recursive: true, force: true });
  });

  it("survives, fails the job naming the disk, shows it in status, leaks no *.tmp, and goes down", async () => {
    const drover = (args: string[]) => runDrover(stateDir, args, 45_000);
    const spec = join(scratch, "spec.json");
    await writeFile(spec, JSON.stringify({ name: "full-disk", head: { heartbeatInterval: "1s", heartbeatTimeout: "10s" }, local: { nodes: 1, ranksPerNode: 1 } }));
    const state = new StateDirectory(stateDir);

    const up = await drover(["up", spec]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    const head = (await state.readJson<HeadRecord>("head.json"))!;

    const submit = await drover(["submit", "--run-id", "fill", "--max-restarts", "0", "--working-dir", join(scratch, "trainer"), "--",
      python, "fill_disk.py", String(6 * MiB), "3"]);
    const said = submit.stdout + submit.stderr;
    // The head lived through it: `submit` followed the job to its end, not "the head stopped".
    expect(said).not.toMatch(/the head stopped/);
    expect(processAlive(head.pid), said).toBe(true);
    expect(submit.code, said).toBe(1);
    expect(said).toMatch(/checkpoint step 1 committed/);
    expect(said).toMatch(/checkpoint step 2 NOT stored: rank 0 could not store it: .*disk full: \S+ \(\d+ bytes free\)/);
    expect(said).toMatch(/FAILED/);

    const job = (await state.readJson<{ jobs: JobRecord[] }>("cluster.json"))!.jobs.at(-1)!;
    expect(job.state).toBe("failed");
    expect(job.failure?.reason).toMatch(/final checkpoint, step 3, was not stored \(.*disk full: \S+ \(\d+ bytes free\)/);
    expect(job.lastCommittedStep).toBe(1);

    const status = await drover(["status"]);
    expect(status.code, status.stdout + status.stderr).toBe(0);
    expect(status.stdout).toMatch(new RegExp(`head pid ${head.pid} ready`));
    expect(status.stdout).toMatch(/failed.*disk full: \S+ \(\d+ bytes free\)/);
    expect(status.stdout).toMatch(/warning: the head could not write for a full disk \d+s ago: disk full: /);

    expect(await readFile(join(stateDir, "head.log"), "utf8")).toMatch(/"message":"disk full: \S+ \(\d+ bytes free\)"/);

    const files = (await readdir(stateDir, { recursive: true })).map(String);
    expect(files.filter((name) => name.endsWith(".tmp"))).toEqual([]);

    const down = await drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    expect(processAlive(head.pid)).toBe(false);
  });
});
