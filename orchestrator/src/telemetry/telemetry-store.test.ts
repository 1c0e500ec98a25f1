import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { TelemetryBatch } from "./telemetry-report.js";
import { MAX_POINTS_PER_SERIES, SeriesRing, TelemetryStore } from "./telemetry-store.js";

const HOUR = 3_600_000;

function batch(timeMs: number, temperature: number, intervalMs = 5_000): TelemetryBatch {
  return {
    intervalMs,
    samples: [{
      timeMs,
      node: { cpuUtilizationRatio: 0.5, memoryTotalBytes: 512 * 2 ** 30, networkReceiveBytes: 1_000 + timeMs },
      gpus: [{ index: 0, uuid: "GPU-a", temperatureCelsius: temperature, utilizationRatio: 0.97 }, { index: 1, uuid: "GPU-b", temperatureCelsius: temperature + 7 }],
    }],
  };
}

describe("SeriesRing", () => {
  it("keeps the newest `capacity` points in time order and refuses points that do not move forward", () => {
    const ring = new SeriesRing(3);
    for (let time = 1; time <= 5; time += 1) expect(ring.push(time * 10, time)).toBe(true);
    expect(ring.points()).toEqual([[30, 3], [40, 4], [50, 5]]);
    expect(ring.push(50, 99)).toBe(false);
    expect(ring.push(20, 99)).toBe(false);
    expect(ring.last()).toEqual({ timeMs: 50, value: 5 });
    expect(ring.points(40)).toEqual([[40, 4], [50, 5]]);
    expect(ring.grown(10).points()).toEqual(ring.points());
  });
});

describe("TelemetryStore", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(os.tmpdir(), "drover-telemetry-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("keeps a ring per series bounded to the retention at the agent's interval", () => {
    let now = 0;
    const store = new TelemetryStore({ retentionMs: HOUR, now: () => now });
    for (let sample = 0; sample < 1_000; sample += 1) {
      now = sample * 5_000;
      store.record("node-a", "h100", batch(now, 60 + (sample % 10)));
    }
    // cpu, memory total, rx of the node; temperature and utilisation of GPU 0; temperature of GPU 1.
    expect(store.seriesCount).toBe(6);
    const temperature = store.query().find((series) => series.scope === "gpu" && series.gpu === 1 && series.metric === "temperatureCelsius")!;
    expect(temperature).toMatchObject({ node: "node-a", group: "h100", uuid: "GPU-b", intervalMs: 5_000 });
    // One hour at 5 s: 721 points (both ends), the newest last.
    expect(temperature.points.length).toBe(721);
    expect(temperature.points.at(-1)).toEqual([999 * 5_000, 67 + 9]);
    expect(temperature.points[0]![0]).toBe(now - HOUR);
    // At most MAX_POINTS_PER_SERIES however fast an agent samples.
    store.record("node-b", "h100", { intervalMs: 1, samples: [{ timeMs: now, node: { cpuUtilizationRatio: 0.1 }, gpus: [] }] });
    for (let ms = 1; ms <= MAX_POINTS_PER_SERIES + 50; ms += 1) store.record("node-b", "h100", { intervalMs: 1, samples: [{ timeMs: now - MAX_POINTS_PER_SERIES - 50 + ms, node: { cpuUtilizationRatio: 0.2 }, gpus: [] }] });
    expect(store.query({ node: "node-b" })[0]!.points.length).toBeLessThanOrEqual(MAX_POINTS_PER_SERIES);
  });

  it("drops the least recently updated series beyond maxSeries", () => {
    const store = new TelemetryStore({ retentionMs: HOUR, maxSeries: 4, now: () => 100 });
    store.record("old", "g", { intervalMs: 5_000, samples: [{ timeMs: 1, node: { cpuUtilizationRatio: 0.1, memoryUsedBytes: 1 }, gpus: [] }] });
    store.record("new", "g", { intervalMs: 5_000, samples: [{ timeMs: 50, node: { cpuUtilizationRatio: 0.1, memoryUsedBytes: 1, shmUsedBytes: 2 }, gpus: [] }] });
    expect(store.seriesCount).toBe(4);
    expect(store.query().map((series) => `${series.node}.${series.metric}`).sort()).toEqual(["new.cpuUtilizationRatio", "new.memoryUsedBytes", "new.shmUsedBytes", "old.memoryUsedBytes"]);
  });

  it("returns only fresh series as the latest readings", () => {
    let now = 0;
    const store = new TelemetryStore({ retentionMs: HOUR, now: () => now });
    store.record("node-a", "g", batch(0, 60));
    now = 10_000;
    expect(store.latest(() => 15_000).length).toBe(6);
    now = 20_000;
    expect(store.latest(() => 15_000)).toEqual([]);
  });

  it("survives a save and a load, minus what fell out of the retention", async () => {
    let now = 0;
    const store = new TelemetryStore({ retentionMs: HOUR, now: () => now });
    for (let sample = 0; sample < 100; sample += 1) {
      now = 1_700_000_000_000 + sample * 5_000;
      store.record("node-a", "h100", batch(now, 60 + sample / 3));
    }
    const path = join(dir, "telemetry.json");
    await store.save(path);
    const file = JSON.parse(await readFile(path, "utf8")) as { formatVersion: number; series: Array<{ times: number[] }> };
    expect(file.formatVersion).toBe(1);
    // Times after the first are deltas: the file stays small.
    expect(file.series[0]!.times.slice(1).every((delta) => delta === 5_000)).toBe(true);
    const loaded = await TelemetryStore.load(path, { retentionMs: HOUR, now: () => now });
    expect(loaded.problem).toBeUndefined();
    const rounded = (series: ReturnType<TelemetryStore["query"]>) => series.map((entry) => ({ ...entry, points: entry.points.map(([time, value]) => [time, Number.isInteger(value) ? value : Number(value.toPrecision(7))]) }));
    expect(loaded.store.query()).toEqual(rounded(store.query()));
    // The file spans 8 min 15 s; loaded 55 minutes later, its last 5 minutes are within the hour.
    const later = await TelemetryStore.load(path, { retentionMs: HOUR, now: () => now + 55 * 60_000 });
    const points = later.store.query({ node: "node-a" })[0]!.points;
    expect(points[0]![0]).toBe(now - 5 * 60_000);
    expect(points.length).toBe(61);
  });

  it("starts empty, saying why, from a file it cannot use", async () => {
    const problem = async (contents: string | undefined) => {
      const path = join(dir, `bad-${Math.random()}.json`);
      if (contents !== undefined) await writeFile(path, contents);
      const loaded = await TelemetryStore.load(path, { retentionMs: HOUR });
      if (loaded.problem) expect(loaded.store.seriesCount).toBe(0);
      return loaded.problem;
    };
    const series = { node: "node-a", group: "g", metric: "cpuUtilizationRatio", intervalMs: 5_000, times: [Date.now()], values: [0.5] };
    expect(await problem(undefined)).toBeUndefined();
    expect(await problem('{"formatVersion": 1, "series": [')).toMatch(/^is not valid JSON/);
    expect(await problem(JSON.stringify({ formatVersion: 2, series: [] }))).toBe("format version 2 is not 1");
    expect(await problem(JSON.stringify({ series: [] }))).toBe("format version undefined is not 1");
    expect(await problem(JSON.stringify({ formatVersion: 1, series: [{ ...series, node: "../../etc" }] }))).toMatch(/^series\.0\.node: /);
    expect(await problem(JSON.stringify({ formatVersion: 1, series: [{ ...series, metric: "rootShell" }] }))).toBe('series.0.metric: "rootShell" is not a telemetry metric');
    expect(await problem(JSON.stringify({ formatVersion: 1, series: [{ ...series, values: [] }] }))).toBe("series.0: 1 times but 0 values");
    expect(await problem(JSON.stringify({ formatVersion: 1, series: [{ ...series, values: ["hot"] }] }))).toMatch(/^series\.0\.values\.0: /);
    expect(await problem(JSON.stringify({ formatVersion: 1, series: [series] }))).toBeUndefined();
  });
});
