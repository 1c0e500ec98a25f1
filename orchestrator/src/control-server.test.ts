import * as grpc from "@grpc/grpc-js";
import { ControlClient, PROTOCOL_VERSION, callUnary, controlChannelOptions } from "@drover/proto";
import { afterEach, describe, expect, it } from "vitest";
import { ControlServer, secretsEqual } from "./control-server.js";
import { JobController } from "./job-controller.js";
import type { Logger } from "./logger.js";
import { WorkerRegistry } from "./worker-registry.js";

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

describe("ControlServer", () => {
  let server: ControlServer | undefined;
  let client: ControlClient | undefined;
  afterEach(async () => {
    client?.close();
    await server?.close(100);
  });

  /** A real control server on a loopback port and a client of it. */
  async function startServer(logger: Logger) {
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, logger });
    const jobs = new JobController({ registry, allocateMasterPort: async () => 29500, workerWaitTimeoutMs: 1_000, stopGraceMs: 100, logger });
    server = new ControlServer({
      registry, jobs, logger, joinToken: "the-real-join-token-0123456789", adminToken: "admin-token-0123456789",
      heartbeatIntervalMs: 1_000, heartbeatTimeoutMs: 5_000, onShutdownRequested: () => {},
      submitJob: async (request) => jobs.submit({ ...request, nodes: request.nodes ?? 1 }),
    });
    await server.listen("127.0.0.1", 0);
    client = new ControlClient(`127.0.0.1:${server.controlPort}`, grpc.credentials.createInsecure(), controlChannelOptions);
    return { registry, jobs };
  }

  it("refuses a wrong join token with UNAUTHENTICATED and never logs its value", async () => {
    const lines: string[] = [];
    const logger = recordingLogger(lines);
    const { registry, jobs } = await startServer(logger);
    const wrongToken = "guessed-token-that-must-not-leak";
    const error = await callUnary(client.register.bind(client), {
      protocolVersion: PROTOCOL_VERSION, joinToken: wrongToken, nodeName: "intruder", slots: 1, resources: {},
    }, new grpc.Metadata(), { timeoutMs: 5_000 }).then(() => undefined, (failure: grpc.ServiceError) => failure);
    expect(error?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(lines.some((line) => line.includes("worker refused: invalid join token") && line.includes("intruder"))).toBe(true);
    expect(lines.join("\n")).not.toContain(wrongToken);
    expect(lines.join("\n")).not.toContain("the-real-join-token");
    expect(registry.all()).toEqual([]);

    const accepted = await callUnary(client.register.bind(client), {
      protocolVersion: PROTOCOL_VERSION, joinToken: "the-real-join-token-0123456789", nodeName: "node-a", slots: 2, resources: {},
    }, new grpc.Metadata(), { timeoutMs: 5_000 });
    expect(accepted.workerId).toMatch(/^w-/);
    expect(registry.all().map((worker) => worker.nodeName)).toEqual(["node-a"]);
    jobs.dispose();
    registry.stop();
  });

  it("compares secrets of different lengths without throwing", () => {
    expect(secretsEqual("a", "abc")).toBe(false);
    expect(secretsEqual("abc", "abc")).toBe(true);
    expect(secretsEqual("", "")).toBe(false);
  });

  it("ends a refused Session stream with its real status at once: NOT_FOUND for an unknown worker, UNAUTHENTICATED for a stale token", async () => {
    const logger = recordingLogger([]);
    const { registry, jobs } = await startServer(logger);
    const registered = await callUnary(client.register.bind(client), {
      protocolVersion: PROTOCOL_VERSION, joinToken: "the-real-join-token-0123456789", nodeName: "node-a", slots: 1, resources: {},
    }, new grpc.Metadata(), { timeoutMs: 5_000 });
    const open = (workerId: string, token: string) => new Promise<grpc.ServiceError | "no status">((resolveStatus) => {
      const metadata = new grpc.Metadata();
      metadata.set("x-drover-worker-id", workerId);
      metadata.set("x-drover-session-token", token);
      const stream = client!.session(metadata);
      // Without a status the stream would stay open: fail after a generous bound instead.
      const timer = setTimeout(() => { stream.cancel(); resolveStatus("no status"); }, 10_000);
      stream.on("error", (error: grpc.ServiceError) => { clearTimeout(timer); resolveStatus(error); });
      stream.on("data", () => undefined);
    });
    const unknown = await open("w-nobody", "whatever");
    expect(unknown).not.toBe("no status");
    expect((unknown as grpc.ServiceError).code).toBe(grpc.status.NOT_FOUND);
    expect((unknown as grpc.ServiceError).details).toBe("unknown worker w-nobody; register again");
    const stale = await open(registered.workerId, "not-the-session-token");
    expect((stale as grpc.ServiceError).code).toBe(grpc.status.UNAUTHENTICATED);
    jobs.dispose();
    registry.stop();
  });
});
