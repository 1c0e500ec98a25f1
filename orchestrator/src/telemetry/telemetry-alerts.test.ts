import { describe, expect, it } from "vitest";
import { parseClusterSpecYaml } from "../cluster-spec.js";
import { alertTransitions, DEFAULT_ALERT_THRESHOLDS, evaluateAlerts, latestByNode, errorCountRises, slowdownReasons, type Alert, type JobMetricsView, type NodeTelemetry } from "./telemetry-alerts.js";
import { TelemetryStore } from "./telemetry-store.js";

const NOW = 1_700_000_000_000;
const INTERVAL = 5_000;

function node(name: string, gpus: Array<{ temperatureCelsius?: number; throttleReasons?: number; eccErrorsUncorrected?: number; eccErrorsCorrected?: number; xidErrors?: number; lastXid?: number }>, sampleTimeMs = NOW): NodeTelemetry {
  return { node: name, group: "alpha", intervalMs: INTERVAL, sampleTimeMs, readings: { cpuUtilizationRatio: 0.5 }, gpus: gpus.map((readings, index) => ({ index, readings })) };
}

function job(imagesPerS: Record<number, number | undefined>, state = "running"): JobMetricsView {
  const latestMetrics: JobMetricsView["latestMetrics"] = {};
  for (const [rank, rate] of Object.entries(imagesPerS)) latestMetrics[Number(rank)] = { step: 10, values: rate === undefined ? { loss: 1 } : { loss: 1, images_per_s: rate } };
  return {
    jobId: "job-1",
    state,
    latestMetrics,
    // Two groups of two nodes, one rank per node.
    assignments: [
      { nodeName: "a0", group: "alpha", globalRankOffset: 0, localWorldSize: 1 },
      { nodeName: "a1", group: "alpha", globalRankOffset: 1, localWorldSize: 1 },
      { nodeName: "a2", group: "alpha", globalRankOffset: 2, localWorldSize: 1 },
      { nodeName: "b0", group: "beta", globalRankOffset: 3, localWorldSize: 2 },
    ],
  };
}

const keys = (alerts: Alert[]) => alerts.map((alert) => alert.key);
const evaluate = (nodes: NodeTelemetry[], jobs: JobMetricsView[] = [], thresholds = DEFAULT_ALERT_THRESHOLDS, nowMs = NOW) => evaluateAlerts({ nodes, jobs, nowMs, thresholds });

describe("alert rules", () => {
  it("raises a GPU above the temperature threshold and clears it at or below", () => {
    const hot = evaluate([node("a0", [{ temperatureCelsius: 64 }, { temperatureCelsius: 91 }])]);
    expect(keys(hot)).toEqual(["gpu-temperature:a0:1"]);
    expect(hot[0]!.message).toBe("a0 GPU 1 at 91 C (threshold 85 C)");
    expect(evaluate([node("a0", [{ temperatureCelsius: 64 }, { temperatureCelsius: 85 }])])).toEqual([]);
    // A missing temperature is no alarm either way.
    expect(evaluate([node("a0", [{}])])).toEqual([]);
  });

  it("reads the thresholds from the spec's head.alerts", () => {
    const spec = parseClusterSpecYaml("head:\n  alerts:\n    gpuTemperatureCelsius: 70\n    silentIntervals: 10\n    stragglerRatio: 0.9\n", "/tmp/alerts.yaml");
    const thresholds = spec.head.alerts;
    expect(keys(evaluate([node("a0", [{ temperatureCelsius: 71 }])], [], thresholds))).toEqual(["gpu-temperature:a0:0"]);
    expect(keys(evaluate([node("a0", [{ temperatureCelsius: 71 }])]))).toEqual([]);
    // 20 s of silence: 4 intervals, past the default 3, within 10.
    expect(keys(evaluate([node("a0", [], NOW - 20_000)]))).toEqual(["node-silent:a0"]);
    expect(evaluate([node("a0", [], NOW - 20_000)], [], thresholds)).toEqual([]);
    // 400 against a median of 500: above 0.5x, below 0.9x.
    expect(evaluate([], [job({ 0: 500, 1: 500, 2: 400 })])).toEqual([]);
    expect(keys(evaluate([], [job({ 0: 500, 1: 500, 2: 400 })], thresholds))).toEqual(["straggler:job-1:2"]);
  });

  it("raises a lease whose escrow runs out within head.alerts.escrowMinutes, counting the time since the cost report", () => {
    const lease = { provider: "akash1prov", dseq: "101", group: "a100", denom: "uact", pricePerBlock: "1500", createdHeight: 1, blocks: 10, spent: "15000", burnPerHour: "900000", escrowLeft: "975000" };
    const cost = { computedAtMs: NOW, leases: [{ ...lease, escrowMinutesLeft: 65 }, { ...lease, dseq: "102" }] };
    const escrow = (nowMs: number, thresholds = DEFAULT_ALERT_THRESHOLDS) => evaluateAlerts({ nodes: [], jobs: [], nowMs, thresholds, cost });
    // 65 minutes left: above the default 60 ...
    expect(escrow(NOW)).toEqual([]);
    // ... 6 minutes after the report, 59 are left.
    const [alert, ...others] = escrow(NOW + 6 * 60_000);
    expect(others).toEqual([]);
    expect(alert).toMatchObject({ key: "escrow-low:101", kind: "escrow-low", node: "a100" });
    expect(alert!.message).toContain("lease a100 dseq 101 (akash1prov): its escrow runs out in about 59.0 min (975000 uact left");
    expect(alert!.message).toContain("the wallet is likely empty");
    const spec = parseClusterSpecYaml("head:\n  alerts:\n    escrowMinutes: 90\n", "/tmp/alerts.yaml");
    expect(keys(escrow(NOW, spec.head.alerts))).toEqual(["escrow-low:101"]);
    expect(() => parseClusterSpecYaml("head:\n  alerts:\n    escrowMinutes: 0\n", "/tmp/alerts.yaml")).toThrow(/escrowMinutes/);
  });

  it("decodes the throttle bits that mean a thermal or power slowdown, and not the power cap of a busy GPU", () => {
    expect(slowdownReasons(0)).toEqual([]);
    expect(slowdownReasons(0x1 | 0x2 | 0x4 | 0x10 | 0x100)).toEqual([]);
    expect(slowdownReasons(0x8)).toEqual(["hardware slowdown"]);
    expect(slowdownReasons(0x20 | 0x40 | 0x80)).toEqual(["software thermal slowdown", "hardware thermal slowdown", "hardware power brake"]);
    const throttled = evaluate([node("a0", [{ throttleReasons: 0x4 }, { throttleReasons: 0x24 }])]);
    expect(keys(throttled)).toEqual(["gpu-throttle:a0:1"]);
    expect(throttled[0]!.message).toBe("a0 GPU 1 throttled: software thermal slowdown (clocks_throttle_reasons 0x24)");
    expect(evaluate([node("a0", [{ throttleReasons: 0x4 }, { throttleReasons: 0 }])])).toEqual([]);
  });

  it("raises a GPU with uncorrected ECC errors since its driver loaded, not corrected ones or a GPU without ECC", () => {
    const failing = evaluate([node("a0", [{ eccErrorsUncorrected: 0, eccErrorsCorrected: 12 }, { eccErrorsUncorrected: 3, eccErrorsCorrected: 41 }, {}])]);
    expect(failing).toEqual([{ key: "gpu-ecc:a0:1", kind: "gpu-ecc", node: "a0", message: "a0 GPU 1 has 3 uncorrected ECC errors since its driver loaded: its memory is failing" }]);
    expect(evaluate([node("a0", [{ eccErrorsUncorrected: 0, eccErrorsCorrected: 500 }])])).toEqual([]);
    // The key holds while the count grows: raised once, not at every new error.
    const more = evaluate([node("a0", [{ eccErrorsUncorrected: 0 }, { eccErrorsUncorrected: 5 }])]);
    expect(alertTransitions(new Map(failing.map((alert) => [alert.key, alert])), more)).toEqual({ raised: [], cleared: [] });
  });

  it("counts rises of a GPU's error count, taking a fall (driver reload, rotated log) as the new base", () => {
    const previous = new Map<number, number>();
    const uncorrectedEccRises = (gpus: Array<{ index: number; eccErrorsUncorrected?: number }>) => errorCountRises(previous, gpus, (gpu) => gpu.eccErrorsUncorrected, true);
    expect(uncorrectedEccRises([{ index: 0, eccErrorsUncorrected: 0 }, { index: 1 }])).toEqual([]);
    expect(uncorrectedEccRises([{ index: 0, eccErrorsUncorrected: 2 }])).toEqual([{ gpu: 0, from: 0, to: 2 }]);
    expect(uncorrectedEccRises([{ index: 0, eccErrorsUncorrected: 2 }])).toEqual([]);
    expect(uncorrectedEccRises([{ index: 0, eccErrorsUncorrected: 1 }])).toEqual([]);
    expect(uncorrectedEccRises([{ index: 0, eccErrorsUncorrected: 2 }, { index: 3, eccErrorsUncorrected: 7 }])).toEqual([{ gpu: 0, from: 1, to: 2 }, { gpu: 3, from: 0, to: 7 }]);
  });

  it("takes the first Xid count seen as the base: the kernel log holds Xids from before the agent", () => {
    const previous = new Map<number, number>();
    const xidRises = (xidErrors: number) => errorCountRises(previous, [{ index: 0, xidErrors }], (gpu) => gpu.xidErrors, false);
    expect(xidRises(5)).toEqual([]);
    expect(xidRises(6)).toEqual([{ gpu: 0, from: 5, to: 6 }]);
  });

  it("raises a GPU with Xid errors in the kernel log, naming the newest code", () => {
    const xid = evaluate([node("a0", [{ xidErrors: 0 }, { xidErrors: 2, lastXid: 79 }, {}])]);
    expect(xid).toEqual([{ key: "gpu-xid:a0:1", kind: "gpu-xid", node: "a0", message: "a0 GPU 1 has 2 Xid errors in the kernel log (newest: Xid 79)" }]);
    expect(evaluate([node("a0", [{ xidErrors: 0 }])])).toEqual([]);
  });

  it("reads head.alerts.replaceNodeOnGpuErrors and gpuErrorsToReplace, off and 3 by default", () => {
    expect(parseClusterSpecYaml("head: {}\n", "/tmp/alerts.yaml").head.alerts).toMatchObject({ replaceNodeOnGpuErrors: false, gpuErrorsToReplace: 3 });
    expect(parseClusterSpecYaml("head:\n  alerts:\n    replaceNodeOnGpuErrors: true\n    gpuErrorsToReplace: 1\n", "/tmp/alerts.yaml").head.alerts).toMatchObject({ replaceNodeOnGpuErrors: true, gpuErrorsToReplace: 1 });
    expect(() => parseClusterSpecYaml("head:\n  alerts:\n    gpuErrorsToReplace: 0\n", "/tmp/alerts.yaml")).toThrow(/gpuErrorsToReplace/);
  });

  it("raises a node silent for more than 3 intervals, clears it when it reports, and ignores its old readings", () => {
    expect(evaluate([node("a0", [{ temperatureCelsius: 95 }], NOW - 3 * INTERVAL)]).map((alert) => alert.kind)).toEqual(["gpu-temperature"]);
    const silent = evaluate([node("a0", [{ temperatureCelsius: 95 }], NOW - 3 * INTERVAL - 1)]);
    expect(keys(silent)).toEqual(["node-silent:a0"]);
    expect(silent[0]!.message).toBe("a0 not heard from for 15s (telemetry every 5s, alert after 3 intervals)");
  });

  it("raises a rank below half its group's median images_per_s, per group, for running jobs only", () => {
    // alpha: 500, 480, 200 -> median 480, 200 < 240; beta's two ranks (100, 110) are judged against each other.
    const straggler = evaluate([], [job({ 0: 500, 1: 480, 2: 200, 3: 100, 4: 110 })]);
    expect(keys(straggler)).toEqual(["straggler:job-1:2"]);
    expect(straggler[0]).toMatchObject({ node: "a2", message: "job-1 rank 2 on a2 is a straggler: 200 img/s, below 0.5 x group alpha's median 480 img/s" });
    // Two ranks: the median is the mean of the middle two (160 and 500 -> 330; 160 < 165, 170 >= 167.5).
    expect(keys(evaluate([], [job({ 0: 160, 1: 500 })]))).toEqual(["straggler:job-1:0"]);
    expect(evaluate([], [job({ 0: 170, 1: 500 })])).toEqual([]);
    // Groups are judged apart: beta's slow pair is not compared with alpha.
    expect(keys(evaluate([], [job({ 0: 100, 1: 500, 2: 600, 3: 10, 4: 10 })]))).toEqual(["straggler:job-1:0"]);
    // Caught up: cleared.
    expect(evaluate([], [job({ 0: 500, 1: 480, 2: 470 })])).toEqual([]);
    // A rank without images_per_s, a group of one, a job that is not running: no straggler.
    expect(evaluate([], [job({ 0: 500, 1: undefined, 3: 10 })])).toEqual([]);
    expect(evaluate([], [job({ 0: 500, 1: 480, 2: 200 }, "succeeded")])).toEqual([]);
  });

  it("reports raises and clears between evaluations", () => {
    const first = evaluate([node("a0", [{ temperatureCelsius: 91 }, { throttleReasons: 0x40 }])]);
    const step1 = alertTransitions(new Map(), first);
    expect(keys(step1.raised)).toEqual(["gpu-temperature:a0:0", "gpu-throttle:a0:1"]);
    expect(step1.cleared).toEqual([]);
    const second = evaluate([node("a0", [{ temperatureCelsius: 92 }, { throttleReasons: 0 }])]);
    const step2 = alertTransitions(new Map(first.map((alert) => [alert.key, alert])), second);
    // Still hot (92 now): no new raise; the throttle cleared.
    expect(step2.raised).toEqual([]);
    expect(keys(step2.cleared)).toEqual(["gpu-throttle:a0:1"]);
  });
});

describe("latestByNode", () => {
  it("gives each node's newest sample and leaves out a reading that stopped being reported", () => {
    const store = new TelemetryStore({ retentionMs: 3_600_000, now: () => NOW });
    const gpu = { index: 0, uuid: "GPU-1", temperatureCelsius: 70, powerDrawWatts: 500 };
    store.record("a0", "alpha", { intervalMs: INTERVAL, samples: [
      { timeMs: NOW - 10_000, node: { cpuUtilizationRatio: 0.2 }, gpus: [gpu] },
      // nvidia-smi printed [N/A] for power in the newest sample.
      { timeMs: NOW - 5_000, node: { cpuUtilizationRatio: 0.3 }, gpus: [{ index: 0, uuid: "GPU-1", temperatureCelsius: 72 }] },
    ] } as never);
    store.record("b0", "beta", { intervalMs: INTERVAL, samples: [{ timeMs: NOW - 1_000, node: { cpuUtilizationRatio: 0.9 }, gpus: [] }] } as never);
    const nodes = latestByNode(store.latest(() => Infinity));
    expect(nodes).toEqual([
      { node: "a0", group: "alpha", intervalMs: INTERVAL, sampleTimeMs: NOW - 5_000, readings: { cpuUtilizationRatio: 0.3 }, gpus: [{ index: 0, uuid: "GPU-1", readings: { temperatureCelsius: 72 } }] },
      { node: "b0", group: "beta", intervalMs: INTERVAL, sampleTimeMs: NOW - 1_000, readings: { cpuUtilizationRatio: 0.9 }, gpus: [] },
    ]);
  });
});
