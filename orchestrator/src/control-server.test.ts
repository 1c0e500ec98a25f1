import * as grpc from "@grpc/grpc-js";
import { ControlClient, PROTOCOL_VERSION, callUnary, controlChannelOptions } from "@drover/proto";
import { afterEach, describe, expect, it } from "vitest";
import { ControlServer, secretsEqual } from "./control-server.js";
import { JobController } from "./job-controller.js";
import { JoinTokenBook } from "./join-tokens.js";
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

  let joinTokens = new JoinTokenBook();

  /** A real control server on a loopback port and a client of it. */
  async function startServer(logger: Logger, sessionTtlMs?: number) {
    joinTokens = new JoinTokenBook();
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, logger, ...(sessionTtlMs === undefined ? {} : { sessionTtlMs }) });
    const jobs = new JobController({ registry, allocateMasterPort: async () => 29500, workerWaitTimeoutMs: 1_000, stopGraceMs: 100, logger });
    server = new ControlServer({
      registry, jobs, logger, joinTokens, adminToken: "admin-token-0123456789",
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
    expect(registry.all()).toEqual([]);

    const accepted = await callUnary(client.register.bind(client), {
      protocolVersion: PROTOCOL_VERSION, joinToken: joinTokens.mint({ group: "", nodeName: "node-a" }), nodeName: "node-a", slots: 2, resources: {},
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
      protocolVersion: PROTOCOL_VERSION, joinToken: joinTokens.mint({ group: "", nodeName: "node-a" }), nodeName: "node-a", slots: 1, resources: {},
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

  const registerAs = (request: { joinToken?: string; sessionToken?: string; nodeName: string; group?: string }) =>
    callUnary(client!.register.bind(client!), { protocolVersion: PROTOCOL_VERSION, slots: 1, resources: {}, ...request }, new grpc.Metadata(), { timeoutMs: 5_000 })
      .then((response) => ({ ok: true as const, response }), (error: grpc.ServiceError) => ({ ok: false as const, error }));

  it("spends a join token on its first Register: a replay is refused UNAUTHENTICATED and logged without the value", async () => {
    const lines: string[] = [];
    const { registry, jobs } = await startServer(recordingLogger(lines));
    const token = joinTokens.mint({ group: "a100", nodeName: "node-a" });
    expect((await registerAs({ joinToken: token, nodeName: "node-a", group: "a100" })).ok).toBe(true);
    const replay = await registerAs({ joinToken: token, nodeName: "node-a", group: "a100" });
    expect(replay.ok).toBe(false);
    if (!replay.ok) {
      expect(replay.error.code).toBe(grpc.status.UNAUTHENTICATED);
      expect(replay.error.details).toMatch(/join token already used \(by node node-a/);
    }
    expect(lines.some((line) => line.includes("worker refused: join token already used"))).toBe(true);
    expect(lines.join("\n")).not.toContain(token);
    jobs.dispose();
    registry.stop();
  });

  it("holds a token to its group and node name, and refuses every token once revoked", async () => {
    const { registry, jobs } = await startServer(recordingLogger([]));
    const forA100 = joinTokens.mint({ group: "a100", nodeName: "node-a" });
    const wrongGroup = await registerAs({ joinToken: forA100, nodeName: "node-a", group: "rtx" });
    expect(!wrongGroup.ok && wrongGroup.error.details).toBe("join token is for group a100, not rtx");
    const wrongNode = await registerAs({ joinToken: forA100, nodeName: "node-b", group: "a100" });
    expect(!wrongNode.ok && wrongNode.error.details).toBe("join token is for node node-a, not node-b");
    // Neither refusal spent it: the node it was minted for still joins with it.
    expect((await registerAs({ joinToken: forA100, nodeName: "node-a", group: "a100" })).ok).toBe(true);
    // A replica token (no node name) fits any node of its group.
    expect((await registerAs({ joinToken: joinTokens.mint({ group: "a100" }), nodeName: "a100-worker-x", group: "a100" })).ok).toBe(true);
    const unspent = joinTokens.mint({ group: "a100" });
    joinTokens.revokeAll();
    const revoked = await registerAs({ joinToken: unspent, nodeName: "node-c", group: "a100" });
    expect(!revoked.ok && revoked.error.code).toBe(grpc.status.UNAUTHENTICATED);
    jobs.dispose();
    registry.stop();
  });

  it("lets a registered node re-register with its session credential, renewed on the Session stream, and refuses a made-up or expired one", async () => {
    const { registry, jobs } = await startServer(recordingLogger([]), 1_500);
    const first = await registerAs({ joinToken: joinTokens.mint({ group: "", nodeName: "node-a" }), nodeName: "node-a" });
    if (!first.ok) throw first.error;
    expect(Number(first.response.sessionExpiresAtMs)).toBeGreaterThan(Date.now());
    const again = await registerAs({ sessionToken: first.response.sessionToken!, nodeName: "node-a" });
    if (!again.ok) throw again.error;
    expect(again.response.workerId).toBe(first.response.workerId);
    expect(again.response.sessionToken).not.toBe(first.response.sessionToken);
    // The credential a re-registration replaced is void; so is one for another node.
    expect((await registerAs({ sessionToken: first.response.sessionToken!, nodeName: "node-a" })).ok).toBe(false);
    expect((await registerAs({ sessionToken: again.response.sessionToken!, nodeName: "node-b" })).ok).toBe(false);
    expect((await registerAs({ sessionToken: "made-up-session-credential-0123", nodeName: "node-a" })).ok).toBe(false);

    // On the stream: renewals every third of the TTL (1.5 s here, 500 ms floor of 1 s).
    const metadata = new grpc.Metadata();
    metadata.set("x-drover-worker-id", again.response.workerId!);
    metadata.set("x-drover-session-token", again.response.sessionToken!);
    const stream = client!.session(metadata);
    const renewed = await new Promise<{ sessionToken?: string | null; expiresAtMs?: unknown }>((resolveRenewal, reject) => {
      stream.on("data", (message: { sessionRenewal?: { sessionToken?: string | null; expiresAtMs?: unknown } }) => {
        if (message.sessionRenewal) resolveRenewal(message.sessionRenewal);
      });
      stream.on("error", reject);
    });
    stream.cancel();
    expect(renewed.sessionToken).toMatch(/^[A-Za-z0-9_-]{32}$/);
    expect(Number(renewed.expiresAtMs)).toBeGreaterThan(Date.now());
    // Without a renewal the credential expires: the renewed one outlives the one it replaced.
    await new Promise((resolveWait) => setTimeout(resolveWait, 1_700));
    const expired = await registerAs({ sessionToken: again.response.sessionToken!, nodeName: "node-a" });
    expect(!expired.ok && expired.error.details).toMatch(/unknown or expired/);
    jobs.dispose();
    registry.stop();
  });
});
