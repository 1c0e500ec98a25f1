import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { JobController, JobRecord } from "../job-controller.js";
import { silentLogger } from "../logger.js";
import { StateDirectory } from "../state-store.js";
import { MetricsServer } from "../telemetry/metrics-server.js";
import { TelemetryStore } from "../telemetry/telemetry-store.js";
import type { WorkerRegistry } from "../worker-registry.js";
import { DASHBOARD_PATH, DashboardServer } from "./dashboard-server.js";

const TOKEN = "admin-token-for-the-test";

/** A job with one restart: attempt 1 reached step 7, attempt 2 resumed from the checkpoint at 5. */
function restartedJob(): JobRecord {
  return {
    jobId: "job-1", runId: "run-1", state: "running", attempt: 2, wireJobId: "job-1-a2", maxRestarts: 3,
    restarts: [{ attempt: 1, reason: "node local-1 lost", atMs: 1, lastStep: 7, resumeStep: 5 }],
    createdAtMs: 1, assignments: [{ nodeName: "b0", group: "beta", globalRankOffset: 1, localWorldSize: 1 }, { nodeName: "a0", group: "alpha", globalRankOffset: 0, localWorldSize: 1 }], worldSize: 2, exitCodes: {}, latestMetrics: { 0: { step: 8, values: { loss: 0.5, images_per_s: 100 } } },
    checkpointsReported: {}, checkpointsCommitted: [], checkpointsLost: {}, lastCommittedStep: 5,
    request: { command: ["python"] },
  } as unknown as JobRecord;
}

describe("DashboardServer", () => {
  let dir: string;
  let server: MetricsServer;
  let dashboard: DashboardServer;
  let origin: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(os.tmpdir(), "drover-dashboard-"));
    const stateDir = new StateDirectory(dir);
    await mkdir(stateDir.path("jobs/job-1"), { recursive: true });
    const metric = (attempt: number, step: number, rank = 0) => JSON.stringify({ rank, attempt, step, timeMs: step, loss: 10 - step }) + "\n";
    // Attempt 1's steps 6 and 7 were thrown away by the restart; rank 1 and a torn line are not the curve.
    const lines = [1, 2, 3, 4, 5, 6, 7].map((step) => metric(1, step)).join("") + metric(1, 3, 1) + metric(2, 6) + metric(2, 7) + metric(2, 8) + '{"rank": 0, "ste';
    await writeFile(stateDir.path("jobs/job-1/metrics.ndjson"), lines);
    await writeFile(stateDir.path("jobs/job-1/output.log"), Array.from({ length: 300 }, (_, index) => `[rank 0] line ${index}`).join("\n") + "\n");
    dashboard = DashboardServer.create({
      adminToken: TOKEN,
      stateDir,
      workers: { all: () => [] } as unknown as WorkerRegistry,
      jobs: { all: () => [restartedJob()] } as unknown as JobController,
      telemetry: () => new TelemetryStore({ retentionMs: 60_000 }),
      cost: () => undefined,
      alerts: () => [{ key: "gpu-temperature/gpu-1/1", kind: "gpu-temperature", node: "gpu-1", message: "gpu-1 GPU 1 is at 91 C (above 85 C)" }],
      logger: silentLogger,
    });
    server = await MetricsServer.listen({ host: "127.0.0.1", port: 0, render: async () => ({ contentType: "text/plain", body: "up 1\n" }), logger: silentLogger });
    server.mount(DASHBOARD_PATH, dashboard.handle);
    origin = server.origin;
  });
  afterEach(async () => {
    dashboard.shutdown();
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("answers 401 without the token, and sets an HttpOnly cookie for it, leaving /metrics open", async () => {
    expect((await fetch(`${origin}/dashboard/api/job`)).status).toBe(401);
    expect((await fetch(`${origin}/dashboard?token=nope`)).status).toBe(401);
    expect((await fetch(`${origin}/metrics`)).status).toBe(200);
    const opened = await fetch(`${origin}/dashboard/?token=${TOKEN}&x=1`, { redirect: "manual" });
    expect(opened.status).toBe(303);
    expect(opened.headers.get("location")).toBe("/dashboard/?x=1");
    const cookie = opened.headers.get("set-cookie")!;
    expect(cookie).toContain("HttpOnly; SameSite=Strict");
    const page = await fetch(`${origin}/dashboard`, { headers: { cookie: cookie.split(";")[0]! } });
    expect(page.status).toBe(200);
    expect(await page.text()).toContain("/dashboard/dashboard.js");
    expect((await fetch(`${origin}/dashboard/nothing`, { headers: { cookie: cookie.split(";")[0]! } })).status).toBe(404);
  });

  it("serves rank 0's loss stitched across attempts, with the restart and checkpoint steps", async () => {
    const view = await (await fetch(`${origin}/dashboard/api/job`, { headers: { cookie: `drover_dashboard=${TOKEN}` } })).json() as {
      job: { attempt: number; imagesPerSecond: number }; loss: Array<{ step: number; attempt: number }>; restarts: Array<{ resumeStep: number }>; checkpoints: number[];
    };
    expect(view.loss.map((point) => `${point.attempt}:${point.step}`)).toEqual(["1:1", "1:2", "1:3", "1:4", "1:5", "2:6", "2:7", "2:8"]);
    expect(view.restarts).toMatchObject([{ resumeStep: 5 }]);
    expect(view.checkpoints).toEqual([5]);
    expect(view.job).toMatchObject({ attempt: 2, imagesPerSecond: 100 });
  });

  it("serves rank 0's MFU and the job's outer steps across groups, stitched like the loss", async () => {
    const line = (fields: Record<string, number>) => JSON.stringify({ rank: 0, timeMs: 1, ...fields }) + "\n";
    // Outer steps arrive on lines of their own; attempt 1's outer step at step 7 was thrown away by the restart (resumed at 5).
    await writeFile(join(dir, "jobs/job-1/metrics.ndjson"), [
      line({ attempt: 1, step: 2, loss: 3, mfu: 0.41 }), line({ attempt: 1, step: 4, loss: 2, mfu: 0.43 }), line({ attempt: 1, step: 4, outer_step: 1, outer_seconds: 0.8 }),
      line({ attempt: 1, step: 7, outer_step: 2, outer_seconds: 0.9 }), line({ attempt: 2, step: 6, loss: 1.5, mfu: 0.39 }), line({ attempt: 2, step: 8, outer_step: 2, outer_seconds: 1.1 }),
      JSON.stringify({ rank: 1, attempt: 2, step: 6, mfu: 0.9 }) + "\n",
    ].join(""));
    const view = await (await fetch(`${origin}/dashboard/api/job`, { headers: { cookie: `drover_dashboard=${TOKEN}` } })).json() as {
      job: { mfu: number; lastOuterStep: number }; groups: string[]; mfu: Array<{ step: number; attempt: number; mfu: number }>; outerSteps: Array<{ step: number; attempt: number; outerStep: number; seconds: number }>;
    };
    expect(view.mfu).toEqual([{ step: 2, attempt: 1, mfu: 0.41 }, { step: 4, attempt: 1, mfu: 0.43 }, { step: 6, attempt: 2, mfu: 0.39 }]);
    expect(view.outerSteps).toEqual([{ step: 4, attempt: 1, outerStep: 1, seconds: 0.8 }, { step: 8, attempt: 2, outerStep: 2, seconds: 1.1 }]);
    expect(view.groups).toEqual(["alpha", "beta"]);
    // Rank 0's latest report has no MFU: the newest on the curve, not rank 1's.
    expect(view.job).toMatchObject({ mfu: 0.39, lastOuterStep: 2 });
  });

  it("lists the head's current alerts with the cluster", async () => {
    const view = await (await fetch(`${origin}/dashboard/api/cluster`, { headers: { cookie: `drover_dashboard=${TOKEN}` } })).json() as { alerts: unknown[] };
    expect(view.alerts).toEqual([{ kind: "gpu-temperature", node: "gpu-1", message: "gpu-1 GPU 1 is at 91 C (above 85 C)" }]);
  });

  it("tails the job's output.log", async () => {
    const view = await (await fetch(`${origin}/dashboard/api/logs`, { headers: { cookie: `drover_dashboard=${TOKEN}` } })).json() as { lines: string[] };
    expect(view.lines).toHaveLength(200);
    expect(view.lines.at(-1)).toBe("[rank 0] line 299");
  });

  it("pushes a coalesced event per kind to open streams", async () => {
    const response = await fetch(`${origin}/dashboard/events`, { headers: { cookie: `drover_dashboard=${TOKEN}` } });
    expect(response.headers.get("content-type")).toBe("text/event-stream");
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let received = "";
    while (!received.includes("event: hello")) received += (await reader.read()).value ?? "";
    for (let index = 0; index < 5; index++) dashboard.notify("metric");
    dashboard.notify("job");
    while (!received.includes("event: job")) received += (await reader.read()).value ?? "";
    expect(received.match(/event: metric/g)).toHaveLength(1);
    await reader.cancel();
  });
});
