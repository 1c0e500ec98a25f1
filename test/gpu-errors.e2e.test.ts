// End to end: a real 1-node local cluster whose agent runs the FAKE nvidia-smi
// (test/fakes/nvidia-smi) in its `ecc` mode, GPU 1 reporting 3 uncorrected ECC errors,
// and the FAKE dmesg (test/fakes/dmesg) in its `xid` mode, GPU 1's bus with Xid 48 and 79.
// `drover status` (reading only the state directory) must warn about GPU 1, and the
// head must log each alert once.
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { repoRoot, runDrover } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

const ECC_WARNING = "warning: local-0 GPU 1 has 3 uncorrected ECC errors since its driver loaded: its memory is failing";
const XID_WARNING = "warning: local-0 GPU 1 has 2 Xid errors in the kernel log (newest: Xid 79)";

describe("drover status warns about a GPU with uncorrected ECC errors and Xid errors, end to end", { timeout: 60_000 }, () => {
  let stateDir: string;
  const env = {
    PATH: `${join(repoRoot, "test", "fakes")}:${process.env.PATH ?? ""}`,
    FAKE_NVIDIA_SMI_MODE: "ecc",
    FAKE_DMESG_MODE: "xid",
    DROVER_TELEMETRY_INTERVAL: "1s",
  };

  beforeAll(async () => {
    stateDir = await mkdtemp(join(os.tmpdir(), "drover-gpu-errors-e2e-"));
    const spec = join(stateDir, "cluster.yaml");
    await writeFile(spec, "name: ecc\nhead:\n  telemetrySaveInterval: 1s\nlocal:\n  nodes: 1\n  ranksPerNode: 1\n");
    const up = await runDrover(stateDir, ["up", spec], 30_000, env);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    await waitFor(async () => (await readFile(join(stateDir, "telemetry.json"), "utf8").catch(() => "")).includes('"xidErrors"'), 15_000, "telemetry.json with ECC counts", 200);
  });
  afterAll(async () => {
    await runDrover(stateDir, ["down"], 30_000);
    await rm(stateDir, { recursive: true, force: true });
  });

  it("`drover status` warns about GPU 1 and not GPU 0; the head logs the alert once", async () => {
    const status = await runDrover(stateDir, ["status"], 15_000);
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toContain(`${ECC_WARNING}\n`);
    expect(status.stdout).toContain(`${XID_WARNING}\n`);
    expect(status.stdout).not.toContain("local-0 GPU 0 has");

    let log = "";
    await waitFor(async () => (log = await readFile(join(stateDir, "head.log"), "utf8")).includes("alert: local-0 GPU 1 has 3 uncorrected ECC errors"), 15_000, "the head to log the ECC alert", 250);
    expect(log.split("\n").filter((line) => line.includes("alert: local-0 GPU 1 has 3 uncorrected ECC errors"))).toHaveLength(1);
    // The rise itself is logged once too: the count stays at 3.
    expect(log.split("\n").filter((line) => line.includes("GPU uncorrected ECC errors rose"))).toHaveLength(1);
    expect(log.split("\n").filter((line) => line.includes("alert: local-0 GPU 1 has 2 Xid errors"))).toHaveLength(1);
  });
});
