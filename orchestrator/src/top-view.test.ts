import { describe, expect, it } from "vitest";
import { formatTable, nodeTelemetryLines, renderTop, type TopFrame } from "./top-view.js";

const GiB = 2 ** 30;
const NOW = Date.UTC(2026, 11, 2, 7, 50, 0);

const frame: TopFrame = {
  clusterName: "demo",
  headState: "ready",
  nowMs: NOW,
  telemetrySavedAtMs: NOW - 4_000,
  nodes: [
    {
      nodeName: "local-0",
      group: "local",
      connection: "connected",
      telemetry: {
        node: "local-0", group: "local", intervalMs: 1_000, sampleTimeMs: NOW - 5_000,
        readings: { cpuUtilizationRatio: 0.123, memoryUsedBytes: 10 * GiB, memoryTotalBytes: 64 * GiB, shmUsedBytes: 0.5 * GiB, shmTotalBytes: 32 * GiB },
        gpus: [
          { index: 0, readings: { utilizationRatio: 0.97, memoryUsedBytes: 70 * GiB, memoryTotalBytes: 80 * GiB, temperatureCelsius: 64, powerDrawWatts: 512.37, powerLimitWatts: 700 } },
          // What nvidia-smi's [N/A] leaves: no power, no limit.
          { index: 1, readings: { utilizationRatio: 0.95, memoryUsedBytes: 68.5 * GiB, memoryTotalBytes: 80 * GiB, temperatureCelsius: 91 } },
        ],
      },
    },
    // A node that never sent telemetry (an agent with it turned off).
    { nodeName: "local-1", group: "local", connection: "connected" },
  ],
  job: {
    jobId: "job-1", runId: "run-a", state: "running", attempt: 2, worldSize: 2,
    latestMetrics: { 0: { step: 12, values: { loss: 1.23456, images_per_s: 480.25 } } },
    assignments: [
      { nodeName: "local-0", group: "local", globalRankOffset: 0, localWorldSize: 1 },
      { nodeName: "local-1", group: "local", globalRankOffset: 1, localWorldSize: 1 },
    ],
  },
  alerts: [{ key: "gpu-temperature:local-0:1", kind: "gpu-temperature", node: "local-0", message: "local-0 GPU 1 at 91 C (threshold 85 C)" }],
};

describe("drover top's frame", () => {
  it("draws nodes, GPUs, the job's ranks and the alerts, marking what is missing", () => {
    expect(renderTop(frame)).toEqual([
      "drover top: cluster demo, head ready, telemetry as saved 4s ago, 07:50:00 UTC",
      "",
      "NODE     GROUP  STATE      SAMPLE AGE  CPU  MEM            SHM",
      "local-0  local  connected  1s          12%  10.0/64.0 GiB  0.5/32.0 GiB",
      "local-1  local  connected  n/a         n/a  n/a            n/a",
      "",
      "NODE     GPU  UTIL  MEM            TEMP  POWER",
      "local-0  0    97%   70.0/80.0 GiB  64 C  512/700 W",
      "local-0  1    95%   68.5/80.0 GiB  91 C  n/a",
      "",
      "job job-1 (run run-a) running, attempt 2",
      "RANK  NODE     GROUP  STEP  LOSS    IMG/S",
      "0     local-0  local  12    1.2346  480.3",
      "1     local-1  local  n/a   n/a     n/a",
      "",
      "warning: local-0 GPU 1 at 91 C (threshold 85 C)",
    ]);
  });

  it("says when there is no telemetry, no GPU, no job and no alert", () => {
    const empty = renderTop({ clusterName: "demo", headState: "NOT RUNNING (last state stopped)", nowMs: NOW, nodes: [], alerts: [] });
    expect(empty).toEqual([
      "drover top: cluster demo, head NOT RUNNING (last state stopped), no telemetry saved yet, 07:50:00 UTC",
      "",
      "NODE  GROUP  STATE  SAMPLE AGE  CPU  MEM  SHM",
      "",
      "GPUs: none reported",
      "",
      "job: none",
      "",
      "alerts: none",
    ]);
    expect(renderTop({ ...frame, telemetrySavedAtMs: undefined, telemetryProblem: "is not valid JSON" })[0]).toContain("telemetry.json unreadable: is not valid JSON");
  });
});

describe("drover status's telemetry lines", () => {
  it("gives a node's newest sample and each GPU, or says none came", () => {
    expect(nodeTelemetryLines(frame.nodes[0]!.telemetry, NOW)).toEqual([
      "telemetry 5s old: cpu 12%, mem 10.0/64.0 GiB, shm 0.5/32.0 GiB",
      "gpu 0: util 97%, mem 70.0/80.0 GiB, temp 64 C, power 512/700 W",
      "gpu 1: util 95%, mem 68.5/80.0 GiB, temp 91 C, power n/a",
    ]);
    expect(nodeTelemetryLines({ node: "x", group: "g", intervalMs: 5_000, sampleTimeMs: NOW, readings: { memoryUsedBytes: GiB }, gpus: [] }, NOW)).toEqual([
      "telemetry 0s old: cpu n/a, mem 1.0 GiB, shm n/a",
      "no GPUs reported",
    ]);
    expect(nodeTelemetryLines(undefined, NOW)).toEqual(["telemetry: none received"]);
  });

  it("aligns table columns", () => {
    expect(formatTable(["A", "LONG"], [["wide cell", "x"], ["y", ""]])).toEqual(["A          LONG", "wide cell  x", "y"]);
  });
});
