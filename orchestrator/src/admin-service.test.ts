import * as grpc from "@grpc/grpc-js";
import { createServer as createHttp2Server } from "node:http2";
import type { AddressInfo } from "node:net";
import { AdminClient, callUnary, controlChannelOptions, type JobEvent } from "@drover/proto";
import { AdminCallError, AdminLoopbackClient, AdminStatusCode } from "@drover/proto/admin-loopback";
import { afterEach, describe, expect, it } from "vitest";
import type { HeadLiveView } from "./admin-service.js";
import { ControlServer } from "./control-server.js";
import { JobController, type JobRecord } from "./job-controller.js";
import { JoinTokenBook } from "./join-tokens.js";
import type { Logger } from "./logger.js";
import type { NodeTelemetry } from "./telemetry/telemetry-alerts.js";
import { WorkerRegistry } from "./worker-registry.js";

const ADMIN_TOKEN = "admin-token-0123456789";

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

async function until(condition: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** Everything a watch receives, and how it ended (undefined while open). */
function collect(stream: grpc.ClientReadableStream<JobEvent>): { events: JobEvent[]; ended: () => { code: number; details: string } | "end" | undefined } {
  const events: JobEvent[] = [];
  let ending: { code: number; details: string } | "end" | undefined;
  stream.on("data", (event: JobEvent) => events.push(event));
  stream.on("end", () => (ending ??= "end"));
  stream.on("error", (error: grpc.ServiceError) => (ending = { code: error.code, details: error.details }));
  return { events, ended: () => ending };
}

/** One line per event, in order, for comparing sequences. */
function describeEvent(event: JobEvent): string {
  if (event.job) return `job ${event.job.state}${event.job.final ? " final" : ""}`;
  if (event.output) return `output ${event.output.rank} ${event.output.line}`;
  if (event.metric) return `metric ${event.metric.rank} ${event.metric.step} loss=${event.metric.values?.loss}`;
  return "unknown";
}

describe("Admin.Status and Admin.WatchJob", () => {
  let server: ControlServer | undefined;
  let client: AdminClient | undefined;
  let registry: WorkerRegistry | undefined;
  let jobs: JobController | undefined;
  afterEach(async () => {
    client?.close();
    await server?.close(100);
    jobs?.dispose();
    registry?.stop();
  });

  /** A real server on a loopback port, one node of one slot, and an Admin client. */
  async function startServer(logger: Logger, live?: Partial<HeadLiveView>) {
    registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger });
    jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger });
    const worker = registry.register({ nodeName: "local-0", group: "local", slots: 1, resources: { address: "127.0.0.1", cpuCount: 4 }, agentVersion: "test", incarnation: "i-1", bridgeAddress: "" });
    registry.attach(worker.workerId, worker.sessionToken, { send: () => {}, close: () => {} });
    const liveView: HeadLiveView = {
      state: () => "ready", nodeTelemetry: () => [], alerts: () => [], cost: () => undefined, diskFull: () => undefined, outputWritten: async () => {},
      ...live,
    };
    server = new ControlServer({
      registry, jobs, logger, joinTokens: new JoinTokenBook(), adminToken: ADMIN_TOKEN,
      heartbeatIntervalMs: 1_000, heartbeatTimeoutMs: 60_000, onShutdownRequested: () => {},
      submitJob: async (request) => jobs!.submit({ ...request, nodes: request.nodes ?? 1 }),
      live: liveView,
    });
    await server.listen("127.0.0.1", 0);
    client = new AdminClient(`127.0.0.1:${server.adminPort}`, grpc.credentials.createInsecure(), controlChannelOptions);
    return { worker, registry, jobs };
  }

  it("Status tells the head's live view: nodes without their session credential, jobs, alerts, cost, a full disk", async () => {
    const telemetry = { node: "local-0", group: "local", intervalMs: 1_000, sampleTimeMs: 123, readings: { cpuUtilizationRatio: 0.5 }, gpus: [] } as unknown as NodeTelemetry;
    const { worker, jobs } = await startServer(recordingLogger([]), {
      state: () => "ready",
      nodeTelemetry: () => [telemetry],
      alerts: () => [{ key: "hot:local-0:1", kind: "gpu-temperature", node: "local-0", message: "local-0 GPU 1 at 91 C" } as never],
      cost: () => ({ totals: { spent: "1.5" } }) as never,
      diskFull: () => ({ message: "disk full: /state (0 bytes free)", atMs: 42 }),
    });
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 1 });

    const status = await callUnary(client!.status.bind(client), { adminToken: ADMIN_TOKEN }, new grpc.Metadata(), { timeoutMs: 5_000 });
    expect(status.headState).toBe("ready");
    expect(status.nodes).toHaveLength(1);
    expect(status.nodes[0]).toMatchObject({ workerId: worker.workerId, nodeName: "local-0", group: "local", connection: "connected", slots: 1 });
    expect(status.nodes[0]!.resources?.cpuCount).toBe(4);
    expect(JSON.parse(status.nodes[0]!.telemetryJson)).toEqual(telemetry);
    expect(status.jobsJson.map((text) => (JSON.parse(text) as JobRecord).jobId)).toEqual([job.jobId]);
    expect((JSON.parse(status.jobsJson[0]!) as JobRecord).state).toBe(job.state);
    expect(status.alerts.map((alert) => alert.message)).toEqual(["local-0 GPU 1 at 91 C"]);
    expect(JSON.parse(status.costJson)).toEqual({ totals: { spent: "1.5" } });
    expect(status.diskFullMessage).toBe("disk full: /state (0 bytes free)");
    expect(Number(status.diskFullAtMs)).toBe(42);
    expect(JSON.stringify(status.toJSON())).not.toContain(worker.sessionToken);
  });

  it("WatchJob sends the record, the output so far, then log lines, metrics and state changes in order, and ends after the final record once the output is written", async () => {
    let outputWrittenAsked = 0;
    const { worker, jobs } = await startServer(recordingLogger([]), {
      outputWritten: () => {
        outputWrittenAsked += 1;
        return new Promise((resolve) => setTimeout(resolve, 50));
      },
    });
    const job = jobs.submit({ command: ["python", "train.py"], workingDir: "/tmp", env: {}, nodes: 1 });
    // Said before any watch exists: the output so far carries it.
    jobs.note(job.jobId, "said before the watch");
    await until(() => job.state === "running", "the job to start");

    const watch = collect(client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: job.jobId, withOutputSoFar: true }));
    await until(() => watch.events.some((event) => event.output?.line === "said before the watch"), "the output so far");
    expect(watch.events[0]!.job).toMatchObject({ jobId: job.jobId, state: "running", final: false, outputSoFarComplete: true });
    expect(server!.watchCount).toBe(1);

    jobs.onLog(worker.workerId, { jobId: job.jobId, rank: 0, stream: 1, line: "hello from rank 0" });
    jobs.onMetric(worker.workerId, { jobId: job.jobId, rank: 0, step: 1, values: { loss: 2.5 }, timeMs: Date.now() });
    jobs.onLog(worker.workerId, { jobId: job.jobId, rank: 0, stream: 1, line: "goodbye" });
    jobs.onRankExit(worker.workerId, { jobId: job.jobId, rank: 0, exitCode: 0 });
    await until(() => watch.ended() !== undefined, "the watch to end");

    expect(watch.ended()).toBe("end");
    expect(watch.events.map(describeEvent)).toEqual([
      "job running",
      "output -1 said before the watch",
      "output -1 starting 1 ranks on 1 nodes: local-0=ranks 0-0",
      "output 0 hello from rank 0",
      "metric 0 1 loss=2.5",
      "output 0 goodbye",
      "output -1 rank 0 exited with exit code 0",
      "job finishing",
      // The closing line comes before the final record: a client that prints output until the final record misses none.
      "output -1 job succeeded",
      "job succeeded final",
    ]);
    const final = watch.events.at(-1)!.job!;
    expect((JSON.parse(final.recordJson) as JobRecord).latestMetrics[0]).toEqual({ step: 1, values: { loss: 2.5 } });
    expect(outputWrittenAsked).toBe(1);
    expect(server!.watchCount).toBe(0);
  });

  it("WatchJob of a finished job sends its final record and ends; without a job id it follows the newest job", async () => {
    const { worker, jobs } = await startServer(recordingLogger([]));
    const job = jobs.submit({ command: ["true"], workingDir: "/tmp", env: {}, nodes: 1 });
    await until(() => job.state === "running", "the job to start");
    jobs.onRankExit(worker.workerId, { jobId: job.jobId, rank: 0, exitCode: 3 });
    await until(() => job.state === "failed", "the job to fail");

    const watch = collect(client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: "" }));
    await until(() => watch.ended() !== undefined, "the watch to end");
    expect(watch.ended()).toBe("end");
    expect(watch.events.map(describeEvent)).toEqual(["job failed final"]);

    const unknown = collect(client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: "job-nope" }));
    await until(() => unknown.ended() !== undefined, "the refusal");
    expect(unknown.ended()).toMatchObject({ code: grpc.status.NOT_FOUND, details: "no job job-nope on this head" });
  });

  it("says when the output so far is not the whole output: the head keeps only a job's newest lines", async () => {
    const { worker, jobs } = await startServer(recordingLogger([]));
    const job = jobs.submit({ command: ["sleep", "100"], workingDir: "/tmp", env: {}, nodes: 1 });
    await until(() => job.state === "running", "the job to start");
    for (let index = 0; index < 2_100; index++) jobs.onLog(worker.workerId, { jobId: job.jobId, rank: 0, stream: 1, line: `line ${index}` });

    const watch = collect(client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: job.jobId, withOutputSoFar: true }));
    await until(() => watch.events.some((event) => event.output?.line === "line 2099"), "the kept lines");
    expect(watch.events[0]!.job).toMatchObject({ jobId: job.jobId, outputSoFarComplete: false });
    const lines = watch.events.flatMap((event) => (event.output ? [event.output.line] : []));
    expect(lines).toHaveLength(2_000);
    expect(lines[0]).toBe("line 100");
  });

  it("refuses a wrong admin token with UNAUTHENTICATED on Status and WatchJob, never echoing or logging it", async () => {
    const lines: string[] = [];
    const { jobs } = await startServer(recordingLogger(lines));
    jobs.submit({ command: ["true"], workingDir: "/tmp", env: {}, nodes: 1 });
    const wrongToken = "guessed-admin-token-that-must-not-leak";

    const refused = await callUnary(client!.status.bind(client), { adminToken: wrongToken }, new grpc.Metadata(), { timeoutMs: 5_000 })
      .then(() => undefined, (error: grpc.ServiceError) => error);
    expect(refused?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(refused?.details).toMatch(/invalid admin token/);
    expect(refused?.details).not.toContain(wrongToken);

    const watch = collect(client!.watchJob({ adminToken: wrongToken, jobId: "" }));
    await until(() => watch.ended() !== undefined, "the watch refusal");
    expect(watch.ended()).toMatchObject({ code: grpc.status.UNAUTHENTICATED, details: expect.stringMatching(/invalid admin token/) });
    expect(JSON.stringify(watch.ended())).not.toContain(wrongToken);
    expect(watch.events).toEqual([]);
    expect(server!.watchCount).toBe(0);
    expect(lines.filter((line) => line.includes("admin call refused"))).toHaveLength(2);
    expect(lines.join("\n")).not.toContain(wrongToken);
  });

  it("forgets a watch the client cancelled", async () => {
    const { worker, jobs } = await startServer(recordingLogger([]));
    const job = jobs.submit({ command: ["sleep", "100"], workingDir: "/tmp", env: {}, nodes: 1 });
    const stream = client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: job.jobId });
    const watch = collect(stream);
    await until(() => watch.events.length > 0, "the first record");
    expect(server!.watchCount).toBe(1);
    stream.cancel();
    await until(() => server!.watchCount === 0, "the server to drop the watch");
    expect(watch.ended()).toMatchObject({ code: grpc.status.CANCELLED });
    // Events after the cancel go nowhere and break nothing.
    jobs.onLog(worker.workerId, { jobId: job.jobId, rank: 0, stream: 1, line: "nobody listens" });
    expect(server!.watchCount).toBe(0);
  });

  it("ends open watches with UNAVAILABLE when the head shuts down, without holding the shutdown", async () => {
    const { jobs } = await startServer(recordingLogger([]));
    const job = jobs.submit({ command: ["sleep", "100"], workingDir: "/tmp", env: {}, nodes: 1 });
    const watches = [collect(client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: job.jobId })), collect(client!.watchJob({ adminToken: ADMIN_TOKEN, jobId: "" }))];
    await until(() => watches.every((watch) => watch.events.length > 0), "both watches to start");
    expect(server!.watchCount).toBe(2);

    const started = Date.now();
    await server!.close(5_000);
    expect(Date.now() - started).toBeLessThan(2_000);
    await until(() => watches.every((watch) => watch.ended() !== undefined), "the watches to end");
    for (const watch of watches) expect(watch.ended()).toMatchObject({ code: grpc.status.UNAVAILABLE, details: "the head is shutting down" });
    expect(server!.watchCount).toBe(0);
    server = undefined;
  });

  describe("through the CLI's node:http2 client (AdminLoopbackClient)", () => {
    let loopback: AdminLoopbackClient | undefined;
    afterEach(() => loopback?.close());

    it("calls Status, and gets UNAUTHENTICATED for a wrong token and DEADLINE_EXCEEDED past its deadline", async () => {
      const { worker } = await startServer(recordingLogger([]), { outputWritten: async () => {} });
      loopback = new AdminLoopbackClient(`127.0.0.1:${server!.adminPort}`);
      const status = await loopback.status({ adminToken: ADMIN_TOKEN }, { timeoutMs: 5_000 });
      expect(status.nodes.map((node) => node.workerId)).toEqual([worker.workerId]);

      const refused = await loopback.status({ adminToken: "wrong" }, { timeoutMs: 5_000 }).then(() => undefined, (error: AdminCallError) => error);
      expect(refused).toBeInstanceOf(AdminCallError);
      expect(refused).toMatchObject({ code: AdminStatusCode.UNAUTHENTICATED, details: "invalid admin token (is this the state directory of the running head?)" });

      // A head that takes the call and never answers (an HTTP/2 server that ignores every
      // stream): the client's own deadline ends it, whatever the machine's speed.
      const silent = createHttp2Server();
      silent.on("stream", () => undefined);
      await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
      const mute = new AdminLoopbackClient(`127.0.0.1:${(silent.address() as AddressInfo).port}`);
      try {
        const late = await mute.status({ adminToken: ADMIN_TOKEN }, { timeoutMs: 200 }).then(() => undefined, (error: AdminCallError) => error);
        expect(late?.code).toBe(AdminStatusCode.DEADLINE_EXCEEDED);
      } finally {
        mute.close();
        await new Promise((resolve) => silent.close(resolve));
      }
    });

    it("streams a watch to its end, and an aborted watch ends CANCELLED and is dropped by the head", async () => {
      const { worker, jobs } = await startServer(recordingLogger([]));
      const job = jobs.submit({ command: ["true"], workingDir: "/tmp", env: {}, nodes: 1 });
      await until(() => job.state === "running", "the job to start");
      loopback = new AdminLoopbackClient(`127.0.0.1:${server!.adminPort}`);

      const aborted = new AbortController();
      const abortedEvents: JobEvent[] = [];
      const abortedWatch = loopback.watchJob({ adminToken: ADMIN_TOKEN, jobId: job.jobId }, (event) => abortedEvents.push(event), { signal: aborted.signal })
        .then(() => undefined, (error: AdminCallError) => error);
      const events: JobEvent[] = [];
      const watch = loopback.watchJob({ adminToken: ADMIN_TOKEN, jobId: job.jobId, withOutputSoFar: true }, (event) => events.push(event));
      await until(() => abortedEvents.length > 0 && events.length > 0 && server!.watchCount === 2, "both watches to start");
      aborted.abort();
      expect((await abortedWatch)?.code).toBe(AdminStatusCode.CANCELLED);
      await until(() => server!.watchCount === 1, "the head to drop the aborted watch");

      jobs.onLog(worker.workerId, { jobId: job.jobId, rank: 0, stream: 1, line: "x".repeat(100_000) });
      jobs.onRankExit(worker.workerId, { jobId: job.jobId, rank: 0, exitCode: 0 });
      await watch;
      expect(events.some((event) => event.output?.line?.length === 100_000)).toBe(true);
      expect(events.at(-1)!.job).toMatchObject({ state: "succeeded", final: true });
    });

    it("ends a call UNAVAILABLE when nothing listens", async () => {
      await startServer(recordingLogger([]));
      const port = server!.adminPort;
      await server!.close(100);
      server = undefined;
      loopback = new AdminLoopbackClient(`127.0.0.1:${port}`);
      const error = await loopback.status({ adminToken: ADMIN_TOKEN }, { timeoutMs: 5_000 }).then(() => undefined, (failure: AdminCallError) => failure);
      expect(error?.code).toBe(AdminStatusCode.UNAVAILABLE);
    });
  });
});
