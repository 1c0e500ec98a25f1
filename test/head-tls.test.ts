import { mkdtemp, rm, stat, unlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { ControlServer, HeadAuthority, JobController, JoinTokenBook, StateDirectory, WorkerRegistry, silentLogger, type Logger } from "@drover/orchestrator";
import { ControlClient, PROTOCOL_VERSION, callUnary, controlChannelOptions } from "@drover/proto";
import { HeadTrustError, headChannel, headTrustFrom } from "@drover/worker";
import { afterEach, describe, expect, it } from "vitest";

/**
 * The control plane's TLS, with the real pieces: the head's CA in a state directory, the
 * control server listening with the certificate it issues, and the agent's own path to
 * the head (pin the CA by fingerprint from the handshake, then gRPC over TLS).
 */

let joinTokens = new JoinTokenBook();

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function stateDir(): Promise<StateDirectory> {
  const root = await mkdtemp(join(tmpdir(), "drover-tls-"));
  cleanups.push(() => rm(root, { recursive: true, force: true }));
  return new StateDirectory(root);
}

/** A control server as the head runs it: TLS with the CA's chain, or plaintext when `tls` is undefined. */
async function controlServer(tls: { chainPem: string; keyPem: string } | undefined, logger: Logger = silentLogger, host = "127.0.0.1") {
  const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, logger });
  joinTokens = new JoinTokenBook();
  const jobs = new JobController({ registry, allocateMasterPort: async () => 29500, workerWaitTimeoutMs: 1_000, stopGraceMs: 100, logger });
  const server = new ControlServer({
    registry, jobs, logger, joinTokens, adminToken: "admin-token-0123456789abcdef",
    heartbeatIntervalMs: 1_000, heartbeatTimeoutMs: 5_000, onShutdownRequested: () => {},
    submitJob: async (request) => jobs.submit({ ...request, nodes: request.nodes ?? 1 }),
  });
  await server.listen(host, 0, tls);
  cleanups.push(async () => {
    jobs.dispose();
    registry.stop();
    await server.close(100);
  });
  return { registry, address: `127.0.0.1:${server.controlPort}` };
}

async function register(address: string, channel: { credentials: grpc.ChannelCredentials; options?: Record<string, string> }) {
  const client = new ControlClient(address, channel.credentials, { ...controlChannelOptions, ...channel.options });
  cleanups.push(() => client.close());
  return callUnary(client.register.bind(client), {
    protocolVersion: PROTOCOL_VERSION, joinToken: joinTokens.mint({ group: "" }), nodeName: "node-a", slots: 1, resources: {},
  }, new grpc.Metadata(), { timeoutMs: 5_000 });
}

describe("the head's CA", () => {
  it("is created once per state directory, with its key readable by the owner only, and reused by a later head", async () => {
    const state = await stateDir();
    const first = await HeadAuthority.open(state, "tls-test");
    expect(first.fingerprint).toMatch(/^[0-9a-f]{64}$/);
    expect((await stat(state.path("tls/ca.key"))).mode & 0o777).toBe(0o600);
    const again = await HeadAuthority.open(state, "tls-test");
    expect(again.fingerprint).toBe(first.fingerprint);
    // A different state directory is a different CA: its workers trust nothing of this one.
    expect((await HeadAuthority.open(await stateDir(), "tls-test")).fingerprint).not.toBe(first.fingerprint);
  });

  it("refuses a half-written CA instead of quietly making a new one the workers do not pin", async () => {
    const state = await stateDir();
    await HeadAuthority.open(state, "tls-test");
    await unlink(state.path("tls/ca.pem"));
    await expect(HeadAuthority.open(state, "tls-test")).rejects.toThrow(/tls.*incomplete/);
  });
});

describe("control plane TLS", () => {
  it("lets a worker that pins the head's CA register over TLS, naming the dialled address in the certificate", async () => {
    const authority = await HeadAuthority.open(await stateDir(), "tls-test");
    const { registry, address } = await controlServer(await authority.issueHeadCertificate(["127.0.0.1"]));
    const trust = headTrustFrom(authority.fingerprint.toUpperCase().replace(/(..)(?!$)/g, "$1:"), undefined);
    const registered = await register(address, await headChannel(address, trust, AbortSignal.timeout(10_000)));
    expect(registered.workerId).toMatch(/^w-/);
    expect(registry.all().map((worker) => worker.nodeName)).toEqual(["node-a"]);
  });

  it("refuses a head whose chain lacks the pinned CA (an impostor with its own CA) before sending it anything", async () => {
    const ours = await HeadAuthority.open(await stateDir(), "ours");
    const impostor = await HeadAuthority.open(await stateDir(), "impostor");
    const lines: string[] = [];
    const { registry, address } = await controlServer(await impostor.issueHeadCertificate(["127.0.0.1"]), recordingLogger(lines));
    const failure = await headChannel(address, { kind: "pinned", caSha256: ours.fingerprint }, AbortSignal.timeout(10_000)).then(() => undefined, (error: Error) => error);
    expect(failure).toBeInstanceOf(HeadTrustError);
    expect(failure?.message).toMatch(/does not present the CA this worker pins/);
    expect(registry.all()).toEqual([]);
    expect(lines.filter((line) => line.includes("worker refused"))).toEqual([]);
  });

  it("refuses a plaintext worker at a TLS head: nothing registers", async () => {
    const authority = await HeadAuthority.open(await stateDir(), "tls-test");
    const { registry, address } = await controlServer(await authority.issueHeadCertificate([]));
    const failure = await register(address, { credentials: grpc.credentials.createInsecure() }).then(() => undefined, (error: grpc.ServiceError) => error);
    expect(failure?.code).toBe(grpc.status.UNAVAILABLE);
    expect(registry.all()).toEqual([]);
  });

  it("refuses to talk to a plaintext head when the worker pins a CA", async () => {
    const authority = await HeadAuthority.open(await stateDir(), "tls-test");
    const { registry, address } = await controlServer(undefined);
    const failure = await headChannel(address, { kind: "pinned", caSha256: authority.fingerprint }, AbortSignal.timeout(10_000)).then(() => undefined, (error: Error) => error);
    expect(failure).toBeInstanceOf(HeadTrustError);
    expect(failure?.message).toMatch(/does not speak TLS/);
    expect(registry.all()).toEqual([]);
  });

  it("asks for an explicit choice: no fingerprint and no insecure flag is an error, a malformed fingerprint too", () => {
    expect(() => headTrustFrom(undefined, undefined)).toThrow(/DROVER_HEAD_CA_SHA256/);
    expect(() => headTrustFrom("abc", undefined)).toThrow(/64 hex digits/);
    expect(headTrustFrom(undefined, "1")).toEqual({ kind: "insecure" });
  });

  it("verifies the head's name, not the address dialled: any address of the head works, a bridge certificate of the same CA does not pass as the head", async () => {
    const authority = await HeadAuthority.open(await stateDir(), "tls-test");
    // 127.0.0.2 is in no certificate (as a veth or NAT address the head never saw).
    const { address } = await controlServer(await authority.issueHeadCertificate([]), silentLogger, "0.0.0.0");
    const port = address.split(":")[1];
    const unnamed = `127.0.0.2:${port}`;
    const pinned = { kind: "pinned" as const, caSha256: authority.fingerprint };
    expect((await register(unnamed, await headChannel(unnamed, pinned, AbortSignal.timeout(10_000)))).workerId).toMatch(/^w-/);

    // A group leader holds a certificate of the same CA for the bridge: serving the
    // control plane with it (CA in the chain, so the pin passes) must still be refused.
    const bridge = await authority.issueBridgeCertificate("job-1", "a100", 60_000);
    const impostor = await controlServer({ chainPem: bridge.certPem + authority.caPem, keyPem: bridge.keyPem });
    const failure = await register(impostor.address, await headChannel(impostor.address, pinned, AbortSignal.timeout(10_000))).then(() => undefined, (error: grpc.ServiceError) => error);
    expect(failure?.code).toBe(grpc.status.UNAVAILABLE);
    expect(impostor.registry.all()).toEqual([]);
  });
});
