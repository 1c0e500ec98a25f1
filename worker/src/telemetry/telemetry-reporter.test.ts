import type { ITelemetry } from "@drover/proto";
import { describe, expect, it } from "vitest";
import { WorkerConfigError } from "../errors.js";
import { silentLogger } from "../logger.js";
import { parseTelemetryInterval, TelemetryReporter } from "./telemetry-reporter.js";

function reporter(options: { connected: () => boolean; sent: ITelemetry[]; intervalMs?: number }) {
  let clock = 1_000_000;
  let step = 0;
  return {
    advance: (ms: number) => (clock += ms),
    reporter: TelemetryReporter.create({
      intervalMs: options.intervalMs ?? 5_000,
      workDir: "/",
      logger: silentLogger,
      now: () => clock,
      send: (telemetry) => {
        if (!options.connected()) return false;
        options.sent.push(structuredClone(telemetry));
        return true;
      },
      gpuSampler: { sample: async () => [{ index: 0, uuid: "GPU-0", temperatureCelsius: 60 + step }] },
      nodeSampler: { sample: async () => ({ cpuUtilizationRatio: (step++ % 10) / 10 }) },
    }),
  };
}

describe("TelemetryReporter", () => {
  it("sends each sample as it is taken, GPUs and node together", async () => {
    const sent: ITelemetry[] = [];
    const { reporter: telemetry } = reporter({ connected: () => true, sent });
    await telemetry.sampleOnce();
    expect(sent).toEqual([{ samples: [{ timeMs: 1_000_000, node: { cpuUtilizationRatio: 0 }, gpus: [{ index: 0, uuid: "GPU-0", temperatureCelsius: 60 }] }], sentTimeMs: 1_000_000, intervalMs: 5_000 }]);
  });

  it("keeps samples while the head is unreachable and sends the backlog in bounded batches, oldest first", async () => {
    const sent: ITelemetry[] = [];
    let connected = false;
    const { reporter: telemetry, advance } = reporter({ connected: () => connected, sent });
    for (let sample = 0; sample < 150; sample += 1) {
      await telemetry.sampleOnce();
      advance(5_000);
    }
    expect(sent).toEqual([]);
    // Bounded: the oldest 30 of 150 are gone.
    expect(telemetry.pendingSamples).toBe(120);
    connected = true;
    await telemetry.sampleOnce();
    // 151 taken, the newest 120 kept, in batches of at most 60.
    expect(sent.map((batch) => batch.samples!.length)).toEqual([60, 60]);
    const times = sent.flatMap((batch) => batch.samples!.map((sample) => Number(sample.timeMs)));
    expect(times[0]).toBe(1_000_000 + 31 * 5_000);
    expect(times.at(-1)).toBe(1_000_000 + 150 * 5_000);
    expect(times).toEqual([...times].sort((a, b) => a - b));
    expect(telemetry.pendingSamples).toBe(0);
  });

  it("samples on its interval until shutdown, and not at all with interval 0", async () => {
    const sent: ITelemetry[] = [];
    const off = TelemetryReporter.create({ intervalMs: 0, workDir: "/", logger: silentLogger, send: () => true });
    await off.run();
    expect(off.state).toBe("created");
    await off.shutdown();
    const running = TelemetryReporter.create({
      intervalMs: 500, workDir: "/", logger: silentLogger,
      send: (telemetry) => (sent.push(telemetry), true),
      gpuSampler: { sample: async () => [] },
      nodeSampler: { sample: async () => ({}) },
    });
    const done = running.run();
    await new Promise((resolve) => setTimeout(resolve, 1_200));
    await running.shutdown();
    await done;
    expect(running.state).toBe("stopped");
    expect(sent.length).toBeGreaterThanOrEqual(2);
    expect(sent.length).toBeLessThanOrEqual(4);
  });

  it("parses DROVER_TELEMETRY_INTERVAL", () => {
    expect(parseTelemetryInterval("5s")).toBe(5_000);
    expect(parseTelemetryInterval("2")).toBe(2_000);
    expect(parseTelemetryInterval("750ms")).toBe(750);
    expect(parseTelemetryInterval("1m")).toBe(60_000);
    expect(parseTelemetryInterval("0")).toBe(0);
    expect(() => parseTelemetryInterval("fast")).toThrow(WorkerConfigError);
    expect(() => parseTelemetryInterval("10ms")).toThrow(/at least 500ms, or 0 for off/);
    expect(() => TelemetryReporter.create({ intervalMs: 10, workDir: "/", logger: silentLogger, send: () => true })).toThrow(WorkerConfigError);
  });
});
