import { EventEmitter } from "node:events";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { CheckpointCoordinator } from "../checkpoint-coordinator.js";
import { JobController, type JobRecord } from "../job-controller.js";
import { silentLogger, type Logger } from "../logger.js";
import { StateDirectory } from "../state-store.js";
import { WorkerRegistry } from "../worker-registry.js";
import { HeadTelemetry, METRICS_FILE, TELEMETRY_FILE } from "./head-telemetry.js";

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

const MiB = 2 ** 20;
const gpuReading = { index: 0, uuid: "GPU-3f4e8a52", utilizationRatio: 0.97, memoryUsedBytes: 71234 * MiB, memoryTotalBytes: 81559 * MiB, temperatureCelsius: 64, powerDrawWatts: 512.5, powerLimitWatts: 700, smClockHz: 1.98e9, throttleReasons: 4, eccErrorsUncorrected: 0, eccErrorsCorrected: 7 };

describe("HeadTelemetry", () => {
  let dir: string;
  let registry: WorkerRegistry;
  let jobs: JobController;
  let telemetry: HeadTelemetry | undefined;
  let now = 1_700_000_000_000;
  beforeEach(async () => {
    dir = await mkdtemp(join(os.tmpdir(), "drover-head-telemetry-"));
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, logger: silentLogger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 1_000, stopGraceMs: 50, logger: silentLogger });
  });
  afterEach(async () => {
    await telemetry?.shutdown();
    jobs.dispose();
    registry.stop();
    await rm(dir, { recursive: true, force: true });
  });

  function create(logger: Logger = silentLogger) {
    telemetry = HeadTelemetry.create({ metricsHost: "127.0.0.1", metricsPort: 0, retentionMs: 3_600_000, stateDir: new StateDirectory(dir), workers: registry, jobs, logger, now: () => now });
    return telemetry;
  }

  function register(nodeName: string, group: string) {
    const worker = registry.register({ nodeName, group, slots: 2, resources: {}, agentVersion: "test", incarnation: "i-1", bridgeAddress: "" });
    registry.attach(worker.workerId, worker.sessionToken, { send: () => {}, close: () => {} });
    return worker.workerId;
  }

  async function scrape(url: string): Promise<string> {
    const response = await fetch(url);
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toMatch(/^text\/plain; version=0\.0\.4/);
    return response.text();
  }

  it("logs each alert once when it is raised and once when it clears, by the spec's thresholds", async () => {
    const lines: string[] = [];
    telemetry = HeadTelemetry.create({ metricsHost: "127.0.0.1", metricsPort: 0, retentionMs: 3_600_000, stateDir: new StateDirectory(dir), workers: registry, jobs, logger: recordingLogger(lines), now: () => now, alerts: { gpuTemperatureCelsius: 80, silentIntervals: 3, stragglerRatio: 0.5, escrowMinutes: 60 } });
    await telemetry.start();
    const workerId = register("h100-0", "h100");
    const sample = (temperatureCelsius: number, throttleReasons: number) => telemetry!.onTelemetry(workerId, { sentTimeMs: now, intervalMs: 5_000, samples: [{ timeMs: now - 1_000, node: { cpuUtilizationRatio: 0.5 }, gpus: [{ ...gpuReading, temperatureCelsius, throttleReasons }] }] });
    const alertLines = () => lines.filter((line) => line.includes("alert"));

    sample(82, 0x40);
    expect(telemetry.checkAlerts().map((alert) => alert.key)).toEqual(["gpu-temperature:h100-0:0", "gpu-throttle:h100-0:0"]);
    now += 5_000;
    sample(83, 0x40);
    telemetry.checkAlerts();
    expect(alertLines()).toEqual([
      'warn alert: h100-0 GPU 0 at 82 C (threshold 80 C) {"alert":"gpu-temperature:h100-0:0","node":"h100-0"}',
      'warn alert: h100-0 GPU 0 throttled: hardware thermal slowdown (clocks_throttle_reasons 0x40) {"alert":"gpu-throttle:h100-0:0","node":"h100-0"}',
    ]);
    now += 5_000;
    sample(70, 0x4);
    expect(telemetry.checkAlerts()).toEqual([]);
    expect(alertLines().slice(2)).toEqual([
      'info alert cleared: h100-0 GPU 0 at 83 C (threshold 80 C) {"alert":"gpu-temperature:h100-0:0","node":"h100-0"}',
      'info alert cleared: h100-0 GPU 0 throttled: hardware thermal slowdown (clocks_throttle_reasons 0x40) {"alert":"gpu-throttle:h100-0:0","node":"h100-0"}',
    ]);
    // Silence: three intervals pass with no sample.
    now += 16_000;
    expect(telemetry.checkAlerts().map((alert) => alert.key)).toEqual(["node-silent:h100-0"]);
    expect(alertLines()).toHaveLength(5);

    // What status and top read once the head is gone: the file as saved, judged as of the save.
    await telemetry.shutdown();
    const { TelemetryStore } = await import("./telemetry-store.js");
    const snapshot = (await TelemetryStore.loadSnapshot(join(dir, TELEMETRY_FILE)))!;
    expect(snapshot.problem).toBeUndefined();
    expect(snapshot.savedAtMs).toBe(now);
    const temperature = snapshot.store.latest(() => Infinity).find((point) => point.metric === "temperatureCelsius");
    expect(temperature).toMatchObject({ node: "h100-0", gpu: 0, value: 70 });
    expect(await TelemetryStore.loadSnapshot(join(dir, "absent.json"))).toBeUndefined();
  });

  it("declares a node lost once its GPUs' uncorrected ECC count rose gpuErrorsToReplace times, with replaceNodeOnGpuErrors", async () => {
    const lines: string[] = [];
    const lost: string[] = [];
    registry.on("lost", (worker, reason) => lost.push(`${worker.nodeName}: ${reason}`));
    telemetry = HeadTelemetry.create({ metricsHost: "127.0.0.1", metricsPort: 0, retentionMs: 3_600_000, stateDir: new StateDirectory(dir), workers: registry, jobs, logger: recordingLogger(lines), now: () => now,
      alerts: { gpuTemperatureCelsius: 85, silentIntervals: 3, stragglerRatio: 0.5, escrowMinutes: 60, replaceNodeOnGpuErrors: true, gpuErrorsToReplace: 2 } });
    await telemetry.start();
    const workerId = register("h100-0", "h100");
    const sample = (uncorrected: number[]) => {
      now += 5_000;
      telemetry!.onTelemetry(workerId, { sentTimeMs: now, intervalMs: 5_000, samples: [{ timeMs: now - 1_000, gpus: uncorrected.map((count, index) => ({ ...gpuReading, index, eccErrorsUncorrected: count, eccErrorsCorrected: 7 })) }] });
    };
    sample([0, 0]);
    sample([0, 1]);
    expect(telemetry.checkAlerts().map((alert) => alert.key)).toEqual(["gpu-ecc:h100-0:1"]);
    expect(lines.filter((line) => line.includes("ECC errors rose"))).toEqual(['warn GPU uncorrected ECC errors rose {"node":"h100-0","gpu":1,"from":0,"to":1,"rises":1,"replaceAfter":2}']);
    // The same count again is no rise.
    sample([0, 1]);
    expect(lost).toEqual([]);
    expect(registry.get(workerId)!.connection).toBe("connected");
    // A second rise, on another GPU: the node is lost, and cannot come back with its old session.
    sample([4, 1]);
    expect(lost).toEqual(["h100-0: its GPUs' uncorrected ECC or Xid errors rose 2 times (head.alerts.gpuErrorsToReplace 2)"]);
    expect(registry.get(workerId)!.connection).toBe("lost");
    expect(registry.reauthenticate("h100-0", registry.get(workerId)!.sessionToken)).toMatchObject({ ok: false });
    expect(lines.filter((line) => line.startsWith("error node declared lost"))).toHaveLength(1);
  });

  it("counts rises of a GPU's Xid errors after the first sample toward replacing the node too", async () => {
    const lost: string[] = [];
    registry.on("lost", (worker) => lost.push(worker.nodeName));
    telemetry = HeadTelemetry.create({ metricsHost: "127.0.0.1", metricsPort: 0, retentionMs: 3_600_000, stateDir: new StateDirectory(dir), workers: registry, jobs, logger: silentLogger, now: () => now,
      alerts: { gpuTemperatureCelsius: 85, silentIntervals: 3, stragglerRatio: 0.5, escrowMinutes: 60, replaceNodeOnGpuErrors: true, gpuErrorsToReplace: 2 } });
    await telemetry.start();
    const workerId = register("h100-0", "h100");
    const sample = (xidErrors: number) => {
      now += 5_000;
      telemetry!.onTelemetry(workerId, { sentTimeMs: now, intervalMs: 5_000, samples: [{ timeMs: now - 1_000, gpus: [{ ...gpuReading, xidErrors, lastXid: 79 }] }] });
    };
    // Xids already in the log when the agent first looked are the base, not rises.
    sample(4);
    expect(telemetry.checkAlerts().map((alert) => alert.key)).toEqual(["gpu-xid:h100-0:0"]);
    sample(5);
    expect(lost).toEqual([]);
    sample(7);
    expect(lost).toEqual(["h100-0"]);
  });

  it("only alerts on GPU errors when replaceNodeOnGpuErrors is off (the default)", async () => {
    const lost: string[] = [];
    registry.on("lost", (worker) => lost.push(worker.nodeName));
    create();
    await telemetry!.start();
    const workerId = register("h100-0", "h100");
    for (const count of [1, 2, 3, 4, 5]) {
      now += 5_000;
      telemetry!.onTelemetry(workerId, { sentTimeMs: now, intervalMs: 5_000, samples: [{ timeMs: now - 1_000, gpus: [{ ...gpuReading, eccErrorsUncorrected: count }] }] });
    }
    expect(telemetry!.checkAlerts().map((alert) => alert.kind)).toEqual(["gpu-ecc"]);
    expect(lost).toEqual([]);
    expect(registry.get(workerId)!.connection).toBe("connected");
  });

  it("raises a lease's escrow running out from the cost tracker's report, logged once, and clears it after a top-up", async () => {
    const lines: string[] = [];
    create(recordingLogger(lines));
    await telemetry!.start();
    const lease = { provider: "akash1prov", dseq: "101", group: "a100", denom: "uact", pricePerBlock: "1500", createdHeight: 1, blocks: 10, spent: "15000", burnPerHour: "900000", escrowLeft: "300000", escrowMinutesLeft: 20 };
    const report = (escrowMinutesLeft: number) => ({ computedAtMs: now, leases: [{ ...lease, escrowMinutesLeft }], nodes: [], totals: [], training: { images: 0, committedCheckpoints: 0 } });
    const alertLines = () => lines.filter((line) => line.includes("alert"));
    expect(telemetry!.checkAlerts()).toEqual([]);
    telemetry!.observeCost(report(20));
    expect(telemetry!.checkAlerts().map((alert) => alert.key)).toEqual(["escrow-low:101"]);
    now += 5_000;
    telemetry!.observeCost(report(19.9));
    expect(telemetry!.alerts.map((alert) => alert.key)).toEqual(["escrow-low:101"]);
    telemetry!.checkAlerts();
    expect(alertLines()).toHaveLength(1);
    expect(alertLines()[0]).toMatch(/^warn alert: lease a100 dseq 101 \(akash1prov\): its escrow runs out in about 20\.0 min .*"alert":"escrow-low:101","node":"a100"/);
    telemetry!.observeCost(report(360));
    expect(telemetry!.checkAlerts()).toEqual([]);
    expect(alertLines().slice(1)).toEqual([expect.stringMatching(/^info alert cleared: lease a100 dseq 101 /)]);
  });

  it("serves node, GPU, training and checkpoint series on /metrics and writes where to metrics.json", async () => {
    const head = create();
    await head.start();
    const url = head.metricsUrl!;
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    expect(JSON.parse(await readFile(join(dir, METRICS_FILE), "utf8"))).toEqual({ formatVersion: 1, url });

    const workerId = register("h100-0", "h100");
    register("h100-1", "h100");
    head.onTelemetry(workerId, { sentTimeMs: 50_000, intervalMs: 5_000, samples: [{ timeMs: 49_000, node: { cpuUtilizationRatio: 0.25, shmUsedBytes: 3 * 2 ** 30, networkReceiveBytes: 12_345 }, gpus: [gpuReading] }] });
    jobs.emit("metric", { runId: "run-a" } as JobRecord, { jobId: "job-1", rank: 3, step: 40, values: { loss: 2.5, lr: 1e-4, images_per_s: 812.5 } });
    const coordinator = new EventEmitter();
    head.watchCheckpoints(coordinator as unknown as CheckpointCoordinator);
    coordinator.emit("committed", { runId: "run-a", step: 40, seconds: 1.7 });

    const text = await scrape(url);
    expect(text).toContain('drover_gpu_utilization_ratio{node="h100-0",group="h100",gpu="0"} 0.97');
    expect(text).toContain('drover_gpu_temperature_celsius{node="h100-0",group="h100",gpu="0"} 64');
    expect(text).toContain(`drover_gpu_memory_used_bytes{node="h100-0",group="h100",gpu="0"} ${71234 * MiB}`);
    expect(text).toContain('drover_gpu_power_watts{node="h100-0",group="h100",gpu="0"} 512.5');
    expect(text).toContain('drover_gpu_sm_clock_hertz{node="h100-0",group="h100",gpu="0"} 1980000000');
    expect(text).toContain('drover_gpu_info{node="h100-0",group="h100",gpu="0",uuid="GPU-3f4e8a52"} 1');
    expect(text).toContain("# TYPE drover_gpu_ecc_errors_uncorrected_total counter");
    expect(text).toContain('drover_gpu_ecc_errors_uncorrected_total{node="h100-0",group="h100",gpu="0"} 0');
    expect(text).toContain('drover_gpu_ecc_errors_corrected_total{node="h100-0",group="h100",gpu="0"} 7');
    expect(text).toContain('drover_node_cpu_utilization_ratio{node="h100-0",group="h100"} 0.25');
    expect(text).toContain(`drover_node_shm_used_bytes{node="h100-0",group="h100"} ${3 * 2 ** 30}`);
    expect(text).toContain("# TYPE drover_node_network_receive_bytes_total counter");
    expect(text).toContain('drover_node_network_receive_bytes_total{node="h100-0",group="h100"} 12345');
    expect(text).toContain('drover_node_up{node="h100-0",group="h100"} 1');
    expect(text).toContain('drover_node_up{node="h100-1",group="h100"} 1');
    expect(text).toContain('drover_train_loss{run="run-a",rank="3"} 2.5');
    expect(text).toContain('drover_train_step{run="run-a",rank="3"} 40');
    expect(text).toContain('drover_train_images_per_second{run="run-a",rank="3"} 812.5');
    expect(text).toContain('drover_checkpoint_commit_seconds_bucket{le="2.5"} 1');
    expect(text).toContain("drover_checkpoint_commit_seconds_count 1");

    // A node that stopped reporting drops out rather than showing its last reading forever.
    now += 60_000;
    const later = await scrape(url);
    expect(later).not.toContain("drover_gpu_temperature_celsius{");
    expect(later).toContain('drover_node_up{node="h100-0",group="h100"} 1');

    expect((await fetch(url.replace("/metrics", "/"))).status).toBe(404);
    expect((await fetch(url, { method: "POST" })).status).toBe(405);
    await head.shutdown();
    await expect(stat(join(dir, METRICS_FILE))).rejects.toThrow(/ENOENT/);
  });

  it("exports the training series of the 8 newest runs only, so labels stay bounded", async () => {
    const head = create();
    await head.start();
    for (let run = 0; run < 9; run += 1) jobs.emit("metric", { runId: `run-${run}` } as JobRecord, { jobId: `job-${run}`, rank: 0, step: 1, values: { loss: run } });
    const text = await scrape(head.metricsUrl!);
    expect(text).not.toContain('run="run-0"');
    expect(text).toContain('drover_train_loss{run="run-1",rank="0"} 1');
    expect(text).toContain('drover_train_loss{run="run-8",rank="0"} 8');
  });

  it("keeps its history across a restart of the head", async () => {
    const first = create();
    await first.start();
    const workerId = register("h100-0", "h100");
    for (let sample = 0; sample < 10; sample += 1) {
      now += 5_000;
      first.onTelemetry(workerId, { sentTimeMs: now, intervalMs: 5_000, samples: [{ timeMs: now, gpus: [{ ...gpuReading, temperatureCelsius: 60 + sample }] }] });
    }
    await first.shutdown();
    const saved = JSON.parse(await readFile(join(dir, TELEMETRY_FILE), "utf8")) as { formatVersion: number };
    expect(saved.formatVersion).toBe(1);

    const second = create();
    await second.start();
    const temperature = second.series.query().find((series) => series.metric === "temperatureCelsius")!;
    expect(temperature.points.map(([, value]) => value)).toEqual([60, 61, 62, 63, 64, 65, 66, 67, 68, 69]);
    expect(await scrape(second.metricsUrl!)).toContain('drover_gpu_temperature_celsius{node="h100-0",group="h100",gpu="0"} 69');
  });

  it("refuses implausible telemetry, warning about a node at most once a minute", async () => {
    const lines: string[] = [];
    const head = create(recordingLogger(lines));
    await head.start();
    const workerId = register("h100-0", "h100");
    for (let attempt = 0; attempt < 5; attempt += 1) head.onTelemetry(workerId, { sentTimeMs: now, samples: [{ timeMs: now, gpus: [{ ...gpuReading, temperatureCelsius: 9_999 }] }] });
    now += 61_000;
    head.onTelemetry(workerId, { sentTimeMs: now, samples: [{ timeMs: now, gpus: [{ ...gpuReading, powerDrawWatts: -5 }] }] });
    const warnings = lines.filter((line) => line.startsWith("warn telemetry refused"));
    expect(warnings).toHaveLength(2);
    expect(warnings[0]).toContain("samples[0].gpus[0].temperature_celsius: is more than 200 °C");
    expect(warnings[1]).toContain('"refusedSinceLastWarning":5');
    expect(head.series.seriesCount).toBe(0);
    // Telemetry from a worker the registry does not know is not kept under any name.
    head.onTelemetry("w-unknown", { sentTimeMs: now, samples: [{ timeMs: now, gpus: [gpuReading] }] });
    expect(head.series.seriesCount).toBe(0);
  });

  it("starts with no history from a bad telemetry file, and says so", async () => {
    await writeFile(join(dir, TELEMETRY_FILE), "{ cut sho");
    const lines: string[] = [];
    const head = create(recordingLogger(lines));
    await head.start();
    expect(head.state).toBe("running");
    expect(lines.some((line) => line.startsWith("warn telemetry file not read; starting with no history") && line.includes("is not valid JSON"))).toBe(true);
  });
});
