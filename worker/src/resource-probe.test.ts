import { describe, expect, it } from "vitest";
import { silentLogger } from "./logger.js";
import { parseNvidiaSmi, probeResources } from "./resource-probe.js";

describe("resource probe", () => {
  it("parses nvidia-smi's CSV", () => {
    const csv = "0, NVIDIA A100 80GB PCIe, 81920, GPU-aaaa\n1, NVIDIA A100 80GB PCIe, 81920, GPU-bbbb\n";
    expect(parseNvidiaSmi(csv)).toEqual([
      { index: 0, name: "NVIDIA A100 80GB PCIe", memoryBytes: 81920 * 2 ** 20, uuid: "GPU-aaaa" },
      { index: 1, name: "NVIDIA A100 80GB PCIe", memoryBytes: 81920 * 2 ** 20, uuid: "GPU-bbbb" },
    ]);
    expect(parseNvidiaSmi("")).toEqual([]);
  });

  it("reports this machine's CPUs, memory and /dev/shm", async () => {
    const resources = await probeResources({ workDir: ".", advertiseAddress: "127.0.0.1", logger: silentLogger });
    expect(resources.cpuCount).toBeGreaterThan(0);
    expect(resources.memoryBytes).toBeGreaterThan(0);
    expect(resources.shmBytes).toBeGreaterThan(0);
    expect(resources.diskFreeBytes).toBeGreaterThan(0);
  });
});
