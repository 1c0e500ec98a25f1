// End to end: a real 1-node local cluster whose agent runs the FAKE nvidia-smi
// (test/fakes/nvidia-smi) in its `hot` mode, GPU 1 at 91 C with the software thermal
// slowdown bit set. `drover top --once` and `drover status` read only the state
// directory (cluster.json, telemetry.json, saved every second here) and must show both
// GPUs and warn about GPU 1; the head must log the alert; after `drover down` status
// still shows the last telemetry.
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { repoRoot, runDrover } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

const HOT_GPU_WARNING = "warning: local-0 GPU 1 at 91 C (threshold 85 C)";
const THROTTLE_WARNING = "warning: local-0 GPU 1 throttled: software thermal slowdown (clocks_throttle_reasons 0x20)";

describe("drover top and status warn about a hot GPU, end to end", { timeout: 60_000 }, () => {
  let stateDir: string;
  const env = {
    PATH: `${join(repoRoot, "test", "fakes")}:${process.env.PATH ?? ""}`,
    FAKE_NVIDIA_SMI_MODE: "hot",
    DROVER_TELEMETRY_INTERVAL: "1s",
  };

  beforeAll(async () => {
    stateDir = await mkdtemp(join(os.tmpdir(), "drover-top-e2e-"));
    const spec = join(stateDir, "cluster.yaml");
    await writeFile(spec, "name: top\nhead:\n  telemetrySaveInterval: 1s\nlocal:\n  nodes: 1\n  ranksPerNode: 1\n");
    const up = await runDrover(stateDir, ["up", spec], 30_000, env);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    await waitFor(async () => (await readFile(join(stateDir, "telemetry.json"), "utf8").catch(() => "")).includes('"temperatureCelsius"'), 15_000, "telemetry.json with GPU temperatures", 200);
  });
  afterAll(async () => {
    await runDrover(stateDir, ["down"], 30_000);
    await rm(stateDir, { recursive: true, force: true });
  });

  it("`drover top --once` draws both GPUs from the state directory and the alerts", async () => {
    const top = await runDrover(stateDir, ["top", "--once"], 15_000);
    expect(top.code, top.stderr).toBe(0);
    const lines = top.stdout.split("\n");
    expect(lines[0]).toMatch(/^drover top: cluster top, head ready, telemetry as saved \d+s ago, /);
    expect(lines).toContainEqual(expect.stringMatching(/^local-0\s+local\s+connected\s+\d+s\s+\d+%\s+[\d.]+\/[\d.]+ GiB\s+[\d.]+\/[\d.]+ GiB$/));
    expect(lines).toContainEqual(expect.stringMatching(/^local-0\s+0\s+97%\s+69\.6\/79\.6 GiB\s+64 C\s+512\/700 W$/));
    expect(lines).toContainEqual(expect.stringMatching(/^local-0\s+1\s+88%\s+68\.5\/79\.6 GiB\s+91 C\s+601\/700 W$/));
    expect(lines).toContain("job: none");
    expect(lines).toContain(HOT_GPU_WARNING);
    expect(lines).toContain(THROTTLE_WARNING);
    // stdout is a pipe here: without --once, top prints one frame and exits all the same.
    const piped = await runDrover(stateDir, ["top", "--interval", "1s"], 15_000);
    expect(piped.code, piped.stderr).toBe(0);
    expect(piped.stdout).toContain(HOT_GPU_WARNING);
    expect(piped.stdout).not.toContain("\x1b[");
  });

  it("`drover status` shows each GPU's newest reading and warns; the head logs the alert once", async () => {
    const status = await runDrover(stateDir, ["status"], 15_000);
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toMatch(/\n {4}telemetry \d+s old: cpu \d+%, mem [\d.]+\/[\d.]+ GiB, shm [\d.]+\/[\d.]+ GiB\n/);
    expect(status.stdout).toContain("    gpu 0: util 97%, mem 69.6/79.6 GiB, temp 64 C, power 512/700 W\n");
    expect(status.stdout).toContain("    gpu 1: util 88%, mem 68.5/79.6 GiB, temp 91 C, power 601/700 W\n");
    expect(status.stdout).toContain(`${HOT_GPU_WARNING}\n`);
    expect(status.stdout).toContain(`${THROTTLE_WARNING}\n`);

    let log = "";
    await waitFor(async () => (log = await readFile(join(stateDir, "head.log"), "utf8")).includes("alert: local-0 GPU 1 at 91 C"), 15_000, "the head to log the temperature alert", 250);
    expect(log.split("\n").filter((line) => line.includes("alert: local-0 GPU 1 at 91 C"))).toHaveLength(1);
    expect(log).toContain("alert: local-0 GPU 1 throttled: software thermal slowdown");
  });

  it("`drover status` still shows the last telemetry once the head is gone", async () => {
    const down = await runDrover(stateDir, ["down"], 30_000);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    const status = await runDrover(stateDir, ["status"], 15_000);
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toContain("NOT RUNNING");
    expect(status.stdout).toMatch(/telemetry: as the head saved it \d+s ago/);
    expect(status.stdout).toContain("    gpu 1: util 88%, mem 68.5/79.6 GiB, temp 91 C, power 601/700 W\n");
  });
});
