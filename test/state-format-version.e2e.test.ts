// State files carry a format version. A real cluster's files without the field (as an
// earlier release wrote them) are read as format 1; after the head is killed with SIGKILL,
// files of a newer format are refused by every command, naming the file and both
// versions (exit 2), and `drover down` still stops every worker and trainer it can find.
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { processAlive } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { droverCli } from "./drover-cli.js";
import { processesUnderState } from "./processes-under-state.js";
import { waitFor } from "./wait-for.js";

let scratch: string;
let stateDir: string;
const drover = (args: string[]) => {
  const result = spawnSync(process.execPath, [droverCli, ...args], { env: { ...process.env, DROVER_STATE_DIR: stateDir }, encoding: "utf8", timeout: 120_000 });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
};

const stateFile = (name: string) => join(stateDir, name);
const readState = async (name: string) => JSON.parse(await readFile(stateFile(name), "utf8")) as Record<string, unknown>;

describe("state files of another format", { timeout: 180_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-format-"));
    stateDir = join(scratch, "state");
  });
  afterAll(async () => {
    drover(["down"]);
    await rm(scratch, { recursive: true, force: true });
  });

  it("reads files without a version as format 1, refuses a newer format by name, and `drover down` still stops everything", async () => {
    const spec = join(scratch, "one.json");
    await writeFile(spec, JSON.stringify({ name: "formats", local: { nodes: 1, ranksPerNode: 1 } }));
    const up = drover(["up", spec]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    for (const name of ["head.json", "cluster.json", "local-nodes.json"]) expect((await readState(name)).formatVersion).toBe(1);
    const submit = drover(["submit", "--no-wait", "--working-dir", scratch, "--", "python", "-c", "import time; time.sleep(600)"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    await waitFor(async () => {
      const trainers = JSON.parse(await readFile(join(stateDir, "workers", "local-0", "trainers.json"), "utf8").catch(() => "{}")) as { trainerPids?: number[] };
      return (trainers.trainerPids ?? []).length === 1;
    }, 30_000, "the trainer to run");

    // head.json as an earlier release wrote it: no formatVersion.
    const { formatVersion: _, ...headOfEarlierRelease } = await readState("head.json");
    await writeFile(stateFile("head.json"), JSON.stringify(headOfEarlierRelease));
    const status = drover(["status"]);
    expect(status.code, status.stdout + status.stderr).toBe(0);
    expect(status.stdout).toMatch(/cluster formats: head pid \d+ ready/);

    const head = headOfEarlierRelease as { pid: number };
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
    expect((await processesUnderState(stateDir)).length).toBeGreaterThanOrEqual(2); // the worker and its trainer

    // What a newer release would leave: the same records under a format this one does not know.
    for (const name of ["head.json", "cluster.json", "local-nodes.json"]) {
      await writeFile(stateFile(name), JSON.stringify({ ...(await readState(name)), formatVersion: 2 }));
    }
    const refused = (name: string) => `state file ${stateFile(name)} has format version 2, newer than this drover reads (format 1)`;

    const newerStatus = drover(["status"]);
    expect(newerStatus.code).toBe(2);
    expect(newerStatus.stderr).toContain(refused("head.json"));

    const down = drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(2);
    expect(down.stdout).toContain(refused("head.json"));
    expect(down.stdout).toContain(refused("local-nodes.json"));
    expect(down.stdout).toMatch(/stopped local-0 \(pid \d+\)/);
    expect(down.stdout).toMatch(/stopped trainer of local-0 \(pid \d+\)/);
    await waitFor(async () => (await processesUnderState(stateDir)).length === 0, 20_000, "every process under the state directory to stop");
  });
});
