import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { silentLogger } from "../logger.js";
import { BridgeLink } from "./bridge-link.js";
import { BridgeEndpoint, splitHostPort, type JobBridge } from "./job-bridge.js";
import { encodeOuterMessage, OuterSyncSocketServer, readOuterStepHeader } from "./outer-sync-socket.js";

// The bridge as agents run it: one endpoint per agent, a JobBridge per led group that
// dials or waits for its peers, and the trainer's outer-step socket in front of it.
// Everything is real (TCP on loopback, a unix socket); only the trainer is this test.

const JOB = "job-7-a1";
const KEY = Buffer.from("0123456789abcdef0123456789abcdef");

function values(count: number, seed: number): Float32Array {
  const out = new Float32Array(count);
  for (let index = 0; index < count; index++) out[index] = Math.sin(seed * 1000 + index) * 0.01;
  return out;
}

/** What a trainer does: one request on the outer socket, the answer read back whole. */
async function outerStep(path: string, header: Record<string, unknown>, payload: Float32Array[]): Promise<{ header: Record<string, unknown>; payload: Float32Array }> {
  const socket = net.connect(path);
  const chunks: Buffer[] = [];
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()));
  socket.on("data", (chunk) => chunks.push(chunk));
  socket.write(encodeOuterMessage(header));
  for (const tensor of payload) socket.write(Buffer.from(tensor.buffer, tensor.byteOffset, tensor.byteLength));
  const expectedBytes = (answerHeader: Record<string, unknown>) => answerHeader.kind === "outer_result"
    ? (answerHeader.tensors as Array<{ shape: number[] }>).reduce((sum, tensor) => sum + tensor.shape.reduce((a, b) => a * b, 1) * 4, 0) : 0;
  for (;;) {
    const all = Buffer.concat(chunks);
    if (all.length >= 4) {
      const length = all.readUInt32LE(0);
      if (all.length >= 4 + length) {
        const answer = JSON.parse(all.toString("utf8", 4, 4 + length)) as Record<string, unknown>;
        const bytes = expectedBytes(answer);
        if (all.length >= 4 + length + bytes) {
          socket.destroy();
          const body = Buffer.from(all.subarray(4 + length, 4 + length + bytes));
          return { header: answer, payload: new Float32Array(body.buffer, body.byteOffset, bytes / 4) };
        }
      }
    }
    await Promise.race([new Promise((resolve) => socket.once("data", resolve)), closed]);
    if (socket.destroyed && Buffer.concat(chunks).length === all.length) throw new Error(`socket closed after ${all.length} bytes`);
  }
}

describe("JobBridge and the outer-step socket", () => {
  const cleanups: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  async function twoGroups(options: { betaAddress?: string } = {}) {
    const alphaEndpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", logger: silentLogger });
    const betaEndpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", logger: silentLogger });
    cleanups.push(() => alphaEndpoint.close(), () => betaEndpoint.close());
    const peers = [{ group: "alpha", index: 0, address: alphaEndpoint.advertised }, { group: "beta", index: 1, address: options.betaAddress ?? betaEndpoint.advertised }];
    const open = (endpoint: BridgeEndpoint, index: number): JobBridge => endpoint.open({ job: JOB, group: peers[index]!.group, groupIndex: index, key: KEY, peers: peers.filter((_, at) => at !== index), logger: silentLogger });
    const alpha = open(alphaEndpoint, 0);
    const beta = open(betaEndpoint, 1);
    cleanups.push(() => alpha.close(), () => beta.close());
    return { alpha, beta, alphaEndpoint, betaEndpoint };
  }

  it("averages two groups' tensors by weight through the trainers' sockets, the same bits in both", async () => {
    const { alpha, beta } = await twoGroups();
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const servers = await Promise.all([alpha, beta].map((bridge, index) => OuterSyncSocketServer.listen(join(dir, `${index}.sock`), (request) => bridge.exchange(request), silentLogger)));
    cleanups.push(...servers.map((server) => () => server.close()));

    const tensors = [{ name: "w", shape: [3, 1000] }, { name: "b", shape: [7] }];
    const request = (weight: number) => ({ kind: "outer_step", outer_step: 1, weight, codec: "fp32", timeout_ms: 10_000, tensors });
    const alphaValues = [values(3000, 1), values(7, 2)];
    const betaValues = [values(3000, 3), values(7, 4)];
    const [a, b] = await Promise.all([
      outerStep(servers[0]!.path, request(64), alphaValues),
      outerStep(servers[1]!.path, request(32), betaValues),
    ]);
    expect(a.header.kind, JSON.stringify(a.header)).toBe("outer_result");
    expect(a.header.groups).toEqual(["alpha", "beta"]);
    expect(a.header.weights).toEqual({ alpha: 64, beta: 32 });
    expect(Buffer.from(a.payload.buffer).equals(Buffer.from(b.payload.buffer))).toBe(true);
    const flatAlpha = [...alphaValues[0]!, ...alphaValues[1]!];
    const flatBeta = [...betaValues[0]!, ...betaValues[1]!];
    flatAlpha.forEach((value, index) => {
      expect(a.payload[index]).toBeCloseTo((2 / 3) * value + (1 / 3) * flatBeta[index]!, 7);
    });
  });

  it("answers a malformed request with an error naming the field, and a missing peer with an error naming the group", async () => {
    const { alpha } = await twoGroups({ betaAddress: "127.0.0.1:1" });
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const server = await OuterSyncSocketServer.listen(join(dir, "a.sock"), (request) => alpha.exchange(request), silentLogger);
    cleanups.push(() => server.close());

    const bad = await outerStep(server.path, { kind: "outer_step", outer_step: 1, weight: -3, codec: "fp32", timeout_ms: 1000, tensors: [{ name: "w", shape: [2] }] }, []);
    expect(bad.header).toMatchObject({ kind: "outer_error", error: expect.stringContaining("weight") });

    const lonely = await outerStep(server.path, { kind: "outer_step", outer_step: 1, weight: 8, codec: "fp32", timeout_ms: 500, tensors: [{ name: "w", shape: [2] }] }, [new Float32Array(2)]);
    expect(lonely.header).toMatchObject({ kind: "outer_error" });
    expect(String(lonely.header.error)).toMatch(/no bridge link to group beta \(127\.0\.0\.1:1\)/);
  });

  it("refuses a dialer of another job even with the right key, and checks request headers field by field", async () => {
    const { betaEndpoint } = await twoGroups();
    await expect(BridgeLink.dial({ host: "127.0.0.1", port: betaEndpoint.port, self: { job: "job-8-a1", group: "alpha" }, key: KEY, signal: AbortSignal.timeout(5_000) }))
      .rejects.toThrow();
    expect(() => readOuterStepHeader({ v: 1, kind: "outer_step", outer_step: 1, weight: 1, codec: "fp64", timeout_ms: 10, tensors: [] })).toThrow(/codec/);
    expect(() => readOuterStepHeader({ v: 1, kind: "outer_step", outer_step: 1, weight: 1, codec: "fp32", timeout_ms: 10, tensors: [{ name: "a", shape: [1] }, { name: "a", shape: [1] }] })).toThrow(/tensors\[1\]\.name: a is listed twice/);
    expect(() => readOuterStepHeader({ v: 1, kind: "outer_step", outer_step: 1, weight: 1, codec: "fp32", timeout_ms: 10, tensors: [{ name: "a", shape: [2 ** 31, 2 ** 31, 4] }] })).toThrow(/add up to more than/);
    expect(readOuterStepHeader({ v: 1, kind: "outer_step", outer_step: 2, weight: 5, codec: "int8", timeout_ms: 10, tensors: [{ name: "a", shape: [3, 2] }] }).payloadBytes).toBe(24);
    expect(splitHostPort("[::1]:7447")).toEqual(["::1", 7447]);
    expect(splitHostPort("")).toEqual(["", 0]);
  });
});
