import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { silentLogger, type Logger } from "../logger.js";
import { BridgeLink } from "./bridge-link.js";
import { BridgeEndpoint, splitHostPort, type JobBridge } from "./job-bridge.js";
import { encodeOuterMessage, OuterSyncSocketServer, readOuterStepHeader, type OuterSyncHandlers } from "./outer-sync-socket.js";

function handlersOf(bridge: JobBridge): OuterSyncHandlers {
  return { exchange: (request) => bridge.exchange(request), join: (request) => bridge.join(request), shareState: (request) => bridge.shareState(request) };
}

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
  const tensorBytes = (answerHeader: Record<string, unknown>) => (answerHeader.tensors as Array<{ shape: number[] }>).reduce((sum, tensor) => sum + tensor.shape.reduce((a, b) => a * b, 1) * 4, 0);
  const expectedBytes = (answerHeader: Record<string, unknown>) => answerHeader.kind === "outer_result" ? tensorBytes(answerHeader)
    : answerHeader.kind === "join_result" && answerHeader.mode === "state" ? 2 * tensorBytes(answerHeader) : 0;
  let received = 0;
  socket.on("data", (chunk: Buffer) => { received += chunk.length; });
  // How many bytes the answer has, as far as what arrived tells; copied together once
  // that many are in (answers of tens of MiB arrive in 64 KiB chunks).
  let wanted = 4;
  for (;;) {
    while (received < wanted && !socket.destroyed) await Promise.race([new Promise((resolve) => socket.once("data", resolve)), closed]);
    if (received < wanted) throw new Error(`socket closed after ${received} bytes`);
    const all = Buffer.concat(chunks);
    chunks.splice(0, chunks.length, all);
    const length = all.readUInt32LE(0);
    if (all.length < 4 + length) {
      wanted = 4 + length;
      continue;
    }
    const answer = JSON.parse(all.toString("utf8", 4, 4 + length)) as Record<string, unknown>;
    const bytes = expectedBytes(answer);
    if (all.length < 4 + length + bytes) {
      wanted = 4 + length + bytes;
      continue;
    }
    socket.destroy();
    const body = Buffer.from(all.subarray(4 + length, 4 + length + bytes));
    return { header: answer, payload: new Float32Array(body.buffer, body.byteOffset, bytes / 4) };
  }
}

async function waitUntil(condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > until) throw new Error("condition not met in time");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * A TCP relay in front of one leader's bridge port for one dialer: the link between two
 * groups runs through it, and a test cuts it (mid-transfer, after so many bytes) and
 * keeps it cut (new connections are refused), while every other link stays up.
 */
class CuttableRelay {
  private readonly sockets = new Set<net.Socket>();
  private cut = false;
  private bytes = 0;
  private readonly marks: Array<{ at: number; reached: () => void }> = [];

  private constructor(private readonly server: net.Server) {}

  static async start(target: string): Promise<CuttableRelay> {
    const [host, port] = splitHostPort(target);
    let relay: CuttableRelay | undefined;
    const server = net.createServer((inbound) => relay!.relay(inbound, host, port));
    relay = new CuttableRelay(server);
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    return relay;
  }

  get address(): string {
    return `127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
  }

  private relay(inbound: net.Socket, host: string, port: number): void {
    if (this.cut) {
      inbound.destroy();
      return;
    }
    const outbound = net.connect(port, host);
    for (const [from, to] of [[inbound, outbound], [outbound, inbound]] as const) {
      this.sockets.add(from);
      from.on("data", (chunk: Buffer) => {
        if (this.cut) return;
        this.bytes += chunk.length;
        to.write(chunk);
        for (const mark of this.marks.filter((candidate) => this.bytes >= candidate.at)) {
          this.marks.splice(this.marks.indexOf(mark), 1);
          mark.reached();
        }
      });
      from.on("error", () => undefined);
      from.on("close", () => { this.sockets.delete(from); to.destroy(); });
    }
  }

  /** Resolves once `bytes` more have gone through, either way. */
  passed(bytes: number): Promise<void> {
    return new Promise((resolve) => this.marks.push({ at: this.bytes + bytes, reached: resolve }));
  }

  /** Cuts every connection once `bytes` more have gone through, and refuses new ones. */
  async cutAfter(bytes: number): Promise<void> {
    await this.passed(bytes);
    this.cutNow();
  }

  cutNow(): void {
    this.cut = true;
    for (const socket of this.sockets) socket.destroy();
  }

  close(): Promise<void> {
    this.cutNow();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

describe("JobBridge and the outer-step socket", () => {
  const cleanups: Array<() => Promise<void> | void> = [];
  const events: string[] = [];
  afterEach(async () => {
    events.length = 0;
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  async function twoGroups(options: { betaAddress?: string } = {}) {
    const alphaEndpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    const betaEndpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    cleanups.push(() => alphaEndpoint.close(), () => betaEndpoint.close());
    const peers = [{ group: "alpha", index: 0, address: alphaEndpoint.advertised }, { group: "beta", index: 1, address: options.betaAddress ?? betaEndpoint.advertised }];
    const open = (endpoint: BridgeEndpoint, index: number): JobBridge => endpoint.open({ job: JOB, group: peers[index]!.group, groupIndex: index, key: KEY, peers: peers.filter((_, at) => at !== index), logger: silentLogger, onEvent: (line) => events.push(`${peers[index]!.group}: ${line}`) });
    const alpha = open(alphaEndpoint, 0);
    const beta = open(betaEndpoint, 1);
    cleanups.push(() => alpha.close(), () => beta.close());
    return { alpha, beta, alphaEndpoint, betaEndpoint };
  }

  /**
   * Leaders of groups `names` (index = position), each with its trainer socket; a link
   * listed in `relayed` ("alpha-gamma": the lower index dials) runs through a relay.
   */
  async function manyGroups(names: string[], options: { relayed?: string[]; logger?: Logger } = {}) {
    const endpoints = await Promise.all(names.map(() => BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger })));
    cleanups.push(...endpoints.map((endpoint) => () => endpoint.close()));
    const relays = new Map<string, CuttableRelay>();
    for (const pair of options.relayed ?? []) {
      const [, accepter] = pair.split("-");
      const relay = await CuttableRelay.start(endpoints[names.indexOf(accepter!)]!.advertised);
      cleanups.push(() => relay.close());
      relays.set(pair, relay);
    }
    const bridges = names.map((group, index) => endpoints[index]!.open({
      job: JOB,
      group,
      groupIndex: index,
      key: KEY,
      peers: names.flatMap((peer, at) => at === index ? [] : [{ group: peer, index: at, address: relays.get(`${group}-${peer}`)?.address ?? endpoints[at]!.advertised }]),
      logger: options.logger ?? silentLogger,
      onEvent: (line) => events.push(`${group}: ${line}`),
    }));
    cleanups.push(...bridges.map((bridge) => () => bridge.close()));
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const servers = await Promise.all(bridges.map((bridge, index) => OuterSyncSocketServer.listen(join(dir, `${index}.sock`), handlersOf(bridge), silentLogger)));
    cleanups.push(...servers.map((server) => () => server.close()));
    return { bridges, endpoints, relays, servers };
  }

  /** 2 frames of 4 MiB per group and peer: long enough to cut a link in the middle. */
  const LARGE_ELEMENTS = 2 << 20;
  const LARGE = [{ name: "w", shape: [LARGE_ELEMENTS] }, { name: "b", shape: [7] }];
  const largeValues = new Map<number, Float32Array>();
  const large = (seed: number) => {
    if (!largeValues.has(seed)) largeValues.set(seed, values(LARGE_ELEMENTS, seed));
    return largeValues.get(seed)!;
  };
  const largeStep = (path: string, outer: number, seed: number, weight = 10, timeoutMs = 10_000) =>
    outerStep(path, { kind: "outer_step", outer_step: outer, weight, codec: "fp32", timeout_ms: timeoutMs, tensors: LARGE }, [large(seed), values(7, seed + 1)]);
  const sameBits = (a: { payload: Float32Array }, b: { payload: Float32Array }) => Buffer.from(a.payload.buffer, a.payload.byteOffset, a.payload.byteLength).equals(Buffer.from(b.payload.buffer, b.payload.byteOffset, b.payload.byteLength));

  it("three groups: a link between two of them breaks mid-step; the two that still link to all agree, the third takes their state", async () => {
    const names = ["alpha", "beta", "gamma"];
    const { servers, relays } = await manyGroups(names, { relayed: ["alpha-gamma"] });
    const first = await Promise.all(servers.map((server, index) => largeStep(server.path, 1, index + 1)));
    for (const answer of first) expect(answer.header.groups, JSON.stringify(answer.header)).toEqual(names);
    expect(sameBits(first[0]!, first[1]!) && sameBits(first[0]!, first[2]!)).toBe(true);

    // Alpha-gamma breaks 5 MiB into step 2 (of 16 both ways) and stays broken; beta still reaches both.
    const cut = relays.get("alpha-gamma")!.cutAfter(5 << 20);
    const second = await Promise.all(servers.map((server, index) => largeStep(server.path, 2, 10 + index, 10 + index)));
    await cut;
    const [alpha, beta, gamma] = second;
    expect(alpha!.header, JSON.stringify(alpha!.header)).toMatchObject({ kind: "outer_result", groups: ["alpha", "beta"], weights: { alpha: 10, beta: 11 }, rejoin: false });
    expect(beta!.header, JSON.stringify(beta!.header)).toMatchObject({ kind: "outer_result", groups: ["alpha", "beta"], rejoin: false });
    expect(sameBits(alpha!, beta!)).toBe(true);
    const mineA = large(10);
    const mineB = large(11);
    for (const at of [0, 12345, LARGE_ELEMENTS - 1]) expect(alpha!.payload[at]).toBeCloseTo((10 * mineA[at]! + 11 * mineB[at]!) / 21, 7);
    // Gamma is left out: its step is its own, and it takes the agreed groups' state after.
    expect(gamma!.header, JSON.stringify(gamma!.header)).toMatchObject({ kind: "outer_result", groups: ["gamma"], rejoin: true });
    const log = events.join("\n");
    expect(log).toMatch(/alpha: outer step 2: group gamma left the outer steps \([^)]*\); going on with alpha\+beta/);
    expect(log).toMatch(/beta: outer step 2: group gamma left the outer steps \(the in-step groups agreed on alpha\+beta; it is not linked with all of them/);
    expect(log).toMatch(/gamma: group gamma is out of step with group beta; it takes that group's state/);
  });

  it("four groups: one link breaks mid-step; the three linked to one another agree and go on with the same bits", async () => {
    const names = ["alpha", "beta", "gamma", "delta"];
    const { servers, relays } = await manyGroups(names, { relayed: ["alpha-gamma"] });
    const cut = relays.get("alpha-gamma")!.cutAfter(5 << 20);
    const answers = await Promise.all(servers.map((server, index) => largeStep(server.path, 1, 20 + index)));
    await cut;
    const [alpha, beta, gamma, delta] = answers;
    for (const answer of [alpha, beta, delta]) expect(answer!.header, JSON.stringify(answer!.header)).toMatchObject({ kind: "outer_result", groups: ["alpha", "beta", "delta"], rejoin: false });
    expect(sameBits(alpha!, beta!) && sameBits(alpha!, delta!)).toBe(true);
    expect(gamma!.header, JSON.stringify(gamma!.header)).toMatchObject({ kind: "outer_result", groups: ["gamma"], rejoin: true });
    const log = events.join("\n");
    for (const group of ["alpha", "beta", "delta"]) expect(log).toMatch(new RegExp(`${group}: outer step 1: group gamma left the outer steps \\([^\\n]*\\); going on with`));
  });

  it("three groups: one killed mid-step; the other two agree and go on, and count it in again once it took their state", async () => {
    const names = ["alpha", "beta", "gamma"];
    const { bridges, endpoints, servers, relays } = await manyGroups(names, { relayed: ["alpha-gamma"] });
    const first = await Promise.all(servers.map((server, index) => largeStep(server.path, 1, 30 + index)));
    for (const answer of first) expect(answer.header.groups).toEqual(names);

    // Gamma's agent dies 5 MiB into step 2: its leader's links and port are gone.
    const killed = relays.get("alpha-gamma")!.passed(5 << 20).then(async () => {
      bridges[2]!.close();
      await endpoints[2]!.close();
    });
    const [alpha, beta, gamma] = await Promise.all(servers.map((server, index) => largeStep(server.path, 2, 40 + index).catch((error: Error) => ({ header: { kind: "failed", error: error.message }, payload: new Float32Array() }))));
    await killed;
    expect(alpha!.header, JSON.stringify(alpha!.header)).toMatchObject({ kind: "outer_result", groups: ["alpha", "beta"], rejoin: false });
    expect(beta!.header, JSON.stringify(beta!.header)).toMatchObject({ kind: "outer_result", groups: ["alpha", "beta"], rejoin: false });
    expect(sameBits(alpha!, beta!)).toBe(true);
    expect(gamma!.header.kind).not.toBe("outer_result");
    const log = events.join("\n");
    expect(log).toMatch(/alpha: outer step 2: group gamma left the outer steps/);
    expect(log).toMatch(/beta: outer step 2: group gamma left the outer steps/);

    // Gamma comes back on another node, restored at outer step 1, and asks to join: the
    // two go on at step 3 without it, alpha sends it their state, and beta counts it in.
    const newEndpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    cleanups.push(() => newEndpoint.close());
    const newGamma = newEndpoint.open({ job: JOB, group: "gamma", groupIndex: 2, key: KEY, peers: [{ group: "alpha", index: 0, address: "" }, { group: "beta", index: 1, address: "" }], logger: silentLogger, onEvent: (line) => events.push(`gamma: ${line}`) });
    cleanups.push(() => newGamma.close());
    for (const bridge of bridges.slice(0, 2)) bridge.updatePeers([{ group: "gamma", index: 2, address: newEndpoint.advertised }]);
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const gammaServer = await OuterSyncSocketServer.listen(join(dir, "g2.sock"), handlersOf(newGamma), silentLogger);
    cleanups.push(() => gammaServer.close());
    const joined = outerStep(gammaServer.path, { kind: "join", outer_step: 1, inner_step: 10, timeout_ms: 20_000, tensors: LARGE }, []);
    await waitUntil(() => events.some((line) => line.includes("gamma: group gamma (at outer step 1) asks group alpha")));
    const third = await Promise.all(servers.slice(0, 2).map((server, index) => largeStep(server.path, 3, 50 + index)));
    expect(third.map((answer) => answer.header.groups)).toEqual([["alpha", "beta"], ["alpha", "beta"]]);
    expect(third[0]!.header.send_state_to).toEqual(["gamma"]);
    const momentum = [large(70), values(7, 71)];
    const shared = await outerStep(servers[0]!.path, { kind: "state", outer_step: 3, inner_step: 30, tensors: LARGE }, [third[0]!.payload.subarray(0, LARGE_ELEMENTS), third[0]!.payload.subarray(LARGE_ELEMENTS), ...momentum]);
    expect(shared.header).toMatchObject({ kind: "state_sent", groups: ["gamma"] });
    const taken = await joined;
    expect(taken.header).toMatchObject({ kind: "join_result", mode: "state", from: "alpha", outer_step: 3, groups: ["gamma", "alpha", "beta"] });
    expect(events.join("\n")).toMatch(/beta: group gamma takes group alpha's outer state at outer step 3; in step with beta\+alpha\+gamma/);

    // All three are one model again.
    const fourth = await Promise.all([servers[0]!.path, servers[1]!.path, gammaServer.path].map((path, index) => largeStep(path, 4, 80 + index)));
    for (const answer of fourth) expect(answer.header.groups, JSON.stringify(answer.header)).toEqual(names);
    expect(sameBits(fourth[0]!, fourth[1]!) && sameBits(fourth[0]!, fourth[2]!)).toBe(true);
  });

  it("four groups: two crossing links break (two pairings as good); the lower pair wins, the others take its state", async () => {
    // Left: alpha-beta, alpha-delta, beta-gamma, gamma-delta. Both {alpha, beta} and
    // {gamma, delta} could go on as pairs; the agreement picks one lineage whatever the timing.
    const names = ["alpha", "beta", "gamma", "delta"];
    const { servers, relays } = await manyGroups(names, { relayed: ["alpha-gamma", "beta-delta"] });
    const cut = relays.get("alpha-gamma")!.cutAfter(5 << 20).then(() => relays.get("beta-delta")!.cutNow());
    const answers = await Promise.all(servers.map((server, index) => largeStep(server.path, 1, 60 + index)));
    await cut;
    const [alpha, beta, gamma, delta] = answers;
    expect(alpha!.header, JSON.stringify(alpha!.header)).toMatchObject({ groups: ["alpha", "beta"], rejoin: false });
    expect(beta!.header, JSON.stringify(beta!.header)).toMatchObject({ groups: ["alpha", "beta"], rejoin: false });
    expect(sameBits(alpha!, beta!)).toBe(true);
    expect(gamma!.header, JSON.stringify(gamma!.header)).toMatchObject({ groups: ["gamma"], rejoin: true });
    expect(delta!.header, JSON.stringify(delta!.header)).toMatchObject({ groups: ["delta"], rejoin: true });
    const log = events.join("\n");
    expect(log).toMatch(/gamma: group gamma is out of step with group beta; it takes that group's state/);
    expect(log).toMatch(/delta: group delta is out of step with group alpha; it takes that group's state/);
  });

  it("closes a link that sends a malformed members proposal, completion or admission, naming the peer and field", async () => {
    const endpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    cleanups.push(() => endpoint.close());
    const warnings: string[] = [];
    const logger: Logger = { debug() {}, info() {}, error() {}, warn(message, fields) { warnings.push(`${message}: ${String(fields?.error)}`); }, child() { return logger; } };
    const beta = endpoint.open({ job: JOB, group: "beta", groupIndex: 1, key: KEY, peers: [{ group: "alpha", index: 0, address: "" }, { group: "gamma", index: 2, address: "" }], logger });
    cleanups.push(() => beta.close());
    const malformed = [
      { kind: "members", outerStep: 1, groups: ["alpha", "omega"] },
      { kind: "members", outerStep: "1", groups: ["alpha"] },
      { kind: "done", outerStep: 1, members: ["alpha", "beta"], groups: ["alpha", "gamma"] },
      { kind: "admitted", group: "alpha", outerStep: 1 },
    ];
    for (const message of malformed) {
      const link = await BridgeLink.dial({ host: "127.0.0.1", port: endpoint.port, self: { job: JOB, group: "alpha" }, key: KEY, signal: AbortSignal.timeout(5_000) });
      cleanups.push(() => link.destroy());
      const closed = new Promise((resolve) => link.once("close", resolve));
      await link.sendControl(message);
      await closed;
    }
    expect(warnings.join("\n")).toMatch(/bridge peer alpha: members proposal groups\[1\] "omega" is not a group of this job/);
    expect(warnings.join("\n")).toMatch(/bridge peer alpha: members proposal outerStep "1" is not an outer step/);
    expect(warnings.join("\n")).toMatch(/bridge peer alpha: completion groups name gamma, not one of its members/);
    expect(warnings.join("\n")).toMatch(/bridge peer alpha: admitted group "alpha" at outer step 1 is not another group of this job/);
  });

  it("measures what the agreement adds to an outer step on loopback (logged, not asserted)", async () => {
    const timings: Array<{ groups: number; agreementMs: number; confirmMs: number; seconds: number }> = [];
    const logger: Logger = {
      debug() {}, warn() {}, error() {},
      info(message, fields) {
        if (message === "outer step exchanged" && typeof fields?.agreementMs === "number") timings.push({ groups: (fields.groups as string[]).length, agreementMs: fields.agreementMs, confirmMs: fields.confirmMs as number, seconds: fields.seconds as number });
      },
      child() { return logger; },
    };
    const tensors = [{ name: "w", shape: [1000] }];
    for (const count of [3, 4]) {
      const { servers } = await manyGroups(["alpha", "beta", "gamma", "delta"].slice(0, count), { logger });
      for (let step = 1; step <= 20; step++) {
        await Promise.all(servers.map((server, index) => outerStep(server.path, { kind: "outer_step", outer_step: step, weight: 1, codec: "fp32", timeout_ms: 10_000, tensors }, [values(1000, index)])));
      }
    }
    const median = (list: number[]) => [...list].sort((a, b) => a - b)[Math.floor(list.length / 2)]!;
    for (const count of [3, 4]) {
      // The first steps wait for links and warm up; the rest are what a step costs.
      const steady = timings.filter((timing) => timing.groups === count).slice(count * 5);
      process.stderr.write(`agreement overhead, ${count} groups on loopback, ${steady.length / count} steps of 4 KB: median agreement ${median(steady.map((timing) => timing.agreementMs)).toFixed(2)} ms, median completion check ${median(steady.map((timing) => timing.confirmMs)).toFixed(2)} ms, median whole exchange ${(median(steady.map((timing) => timing.seconds)) * 1000).toFixed(2)} ms\n`);
    }
    expect(timings.length).toBe(20 * 3 + 20 * 4);
  });

  it("averages two groups' tensors by weight through the trainers' sockets, the same bits in both", async () => {
    const { alpha, beta } = await twoGroups();
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const servers = await Promise.all([alpha, beta].map((bridge, index) => OuterSyncSocketServer.listen(join(dir, `${index}.sock`), handlersOf(bridge), silentLogger)));
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

  it("answers a malformed request with an error naming the field, and goes on alone when a peer never links", async () => {
    const { alpha } = await twoGroups({ betaAddress: "127.0.0.1:1" });
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const server = await OuterSyncSocketServer.listen(join(dir, "a.sock"), handlersOf(alpha), silentLogger);
    cleanups.push(() => server.close());

    const bad = await outerStep(server.path, { kind: "outer_step", outer_step: 1, weight: -3, codec: "fp32", timeout_ms: 1000, tensors: [{ name: "w", shape: [2] }] }, []);
    expect(bad.header).toMatchObject({ kind: "outer_error", error: expect.stringContaining("weight") });

    const lonely = await outerStep(server.path, { kind: "outer_step", outer_step: 1, weight: 8, codec: "int8", timeout_ms: 500, tensors: [{ name: "w", shape: [2] }] }, [Float32Array.of(0.25, -1.5)]);
    // Alone, the mean is the group's own contribution, untouched by the codec.
    expect(lonely.header).toMatchObject({ kind: "outer_result", groups: ["alpha"], weights: { alpha: 8 } });
    expect([...lonely.payload]).toEqual([0.25, -1.5]);
    expect(events.join("\n")).toMatch(/outer step 1: group beta left the outer steps \(no bridge link to 127\.0\.0\.1:1 within 0\.5s\); going on with alpha/);
  });

  it("keeps exchanging when the groups reach their outer steps seconds apart, whoever comes first", async () => {
    // A finished step's timers must not touch the next step's receive: before a fix, the
    // timeout of step N, firing during step N+1, detached step N+1's consumer.
    const { alpha, beta } = await twoGroups();
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const servers = await Promise.all([alpha, beta].map((bridge, index) => OuterSyncSocketServer.listen(join(dir, `${index}.sock`), handlersOf(bridge), silentLogger)));
    cleanups.push(...servers.map((server) => () => server.close()));
    const tensors = Array.from({ length: 12 }, (_, index) => ({ name: `t${index}`, shape: [index % 3 === 0 ? 4000 : 100] }));
    const payload = tensors.map((tensor, index) => values(tensor.shape[0]!, index));
    for (let step = 1; step <= 4; step++) {
      const request = { kind: "outer_step", outer_step: step, weight: 1, codec: "fp32", timeout_ms: 1_500, tensors };
      const [first, second] = step % 2 ? [servers[1]!, servers[0]!] : [servers[0]!, servers[1]!];
      const early = outerStep(first.path, request, payload);
      await new Promise((resolveDelay) => setTimeout(resolveDelay, 700));
      const [a, b] = await Promise.all([early, outerStep(second.path, request, payload)]);
      expect([step, a.header.groups, b.header.groups], JSON.stringify([a.header.error, b.header.error])).toEqual([step, ["alpha", "beta"], ["alpha", "beta"]]);
    }
  });

  it("drops a group that goes away, and gives it the live outer state when it comes back elsewhere", async () => {
    const { alpha, beta, betaEndpoint } = await twoGroups();
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const alphaServer = await OuterSyncSocketServer.listen(join(dir, "a.sock"), handlersOf(alpha), silentLogger);
    const betaServer = await OuterSyncSocketServer.listen(join(dir, "b.sock"), handlersOf(beta), silentLogger);
    cleanups.push(() => alphaServer.close(), () => betaServer.close());
    const tensors = [{ name: "w", shape: [5000] }, { name: "b", shape: [3] }];
    const step = (path: string, outer: number, seed: number, timeoutMs = 10_000) =>
      outerStep(path, { kind: "outer_step", outer_step: outer, weight: 10, codec: "fp32", timeout_ms: timeoutMs, tensors }, [values(5000, seed), values(3, seed + 1)]);
    const joinAt = (path: string, outer: number) => outerStep(path, { kind: "join", outer_step: outer, inner_step: outer * 10, timeout_ms: 10_000, tensors }, []);

    // Both start together at outer step 0, then take one step as one model.
    const [joinedA, joinedB] = await Promise.all([joinAt(alphaServer.path, 0), joinAt(betaServer.path, 0)]);
    expect(joinedA.header).toMatchObject({ kind: "join_result", mode: "own", groups: ["alpha", "beta"] });
    expect(joinedB.header).toMatchObject({ kind: "join_result", mode: "own", groups: ["beta", "alpha"] });
    const [one, oneB] = await Promise.all([step(alphaServer.path, 1, 1), step(betaServer.path, 1, 5)]);
    expect(one.header.groups).toEqual(["alpha", "beta"]);
    expect(Buffer.from(one.payload.buffer).equals(Buffer.from(oneB.payload.buffer))).toBe(true);

    // Beta's leader dies (its agent and endpoint gone): alpha's next step goes on alone
    // after the step's timeout, saying so.
    beta.close();
    await betaEndpoint.close();
    const two = await step(alphaServer.path, 2, 2, 800);
    expect(two.header).toMatchObject({ kind: "outer_result", groups: ["alpha"], send_state_to: [], rejoin: false });
    expect(events.join("\n")).toMatch(/alpha: outer step 2: group beta left the outer steps/);

    // Beta comes back on another node (a new endpoint, a new address the head passes on),
    // restored from its checkpoint at outer step 1, and asks to join.
    const newEndpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    cleanups.push(() => newEndpoint.close());
    const newBeta = newEndpoint.open({ job: JOB, group: "beta", groupIndex: 1, key: KEY, peers: [{ group: "alpha", index: 0, address: "" }], logger: silentLogger, onEvent: (line) => events.push(`beta: ${line}`) });
    cleanups.push(() => newBeta.close());
    alpha.updatePeers([{ group: "beta", index: 1, address: newEndpoint.advertised }]);
    const newBetaServer = await OuterSyncSocketServer.listen(join(dir, "b2.sock"), handlersOf(newBeta), silentLogger);
    cleanups.push(() => newBetaServer.close());
    const rejoined = joinAt(newBetaServer.path, 1);

    // Alpha's next step still runs without beta (it is not in step yet) and asks alpha's
    // trainer for its state, which goes to beta.
    await waitUntil(() => events.some((line) => line.includes("asks group alpha")));
    const three = await step(alphaServer.path, 3, 3);
    expect(three.header).toMatchObject({ groups: ["alpha"], send_state_to: ["beta"] });
    const params = [values(5000, 11), values(3, 12)];
    const momentum = [values(5000, 13), values(3, 14)];
    const shared = await outerStep(alphaServer.path, { kind: "state", outer_step: 3, inner_step: 30, tensors }, [...params, ...momentum]);
    expect(shared.header).toMatchObject({ kind: "state_sent", groups: ["beta"] });
    const taken = await rejoined;
    expect(taken.header).toMatchObject({ kind: "join_result", mode: "state", from: "alpha", outer_step: 3, inner_step: 30, groups: ["beta", "alpha"] });
    const sentBytes = Buffer.concat([...params, ...momentum].map((tensor) => Buffer.from(tensor.buffer)));
    expect(Buffer.from(taken.payload.buffer, taken.payload.byteOffset, taken.payload.byteLength).equals(sentBytes)).toBe(true);
    expect(events.join("\n")).toMatch(/beta: group beta took group alpha's live outer state at outer step 3 \(inner step 30\)/);

    // From here on they are one model again.
    const [four, fourB] = await Promise.all([step(alphaServer.path, 4, 4), step(newBetaServer.path, 4, 8)]);
    expect(four.header.groups).toEqual(["alpha", "beta"]);
    expect(Buffer.from(four.payload.buffer).equals(Buffer.from(fourB.payload.buffer))).toBe(true);
  });

  it("refuses a state whose tensors do not fit the model, naming the peer and tensor, and one nobody asked for", async () => {
    const endpoint = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    cleanups.push(() => endpoint.close());
    const beta = endpoint.open({ job: JOB, group: "beta", groupIndex: 1, key: KEY, peers: [{ group: "alpha", index: 0, address: "" }], logger: silentLogger });
    cleanups.push(() => beta.close());
    const dir = await mkdtemp(join(os.tmpdir(), "drover-outer-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const server = await OuterSyncSocketServer.listen(join(dir, "b.sock"), handlersOf(beta), silentLogger);
    cleanups.push(() => server.close());

    // A hand-driven "alpha": live at outer step 5, it answers beta's want-state with a
    // state of another shape.
    const fakeAlpha = async () => {
      const link = await BridgeLink.dial({ host: "127.0.0.1", port: endpoint.port, self: { job: JOB, group: "alpha" }, key: KEY, signal: AbortSignal.timeout(5_000) });
      cleanups.push(() => link.destroy());
      const asked = new Promise<Record<string, unknown>>((resolve) => link.receive((message) => {
        if (message.kind === "control" && message.control.kind === "want-state") resolve(message.control);
      }));
      await link.sendControl({ kind: "hello", phase: "live", outerStep: 5, reply: false });
      return { link, asked };
    };
    const first = await fakeAlpha();
    const joining = outerStep(server.path, { kind: "join", outer_step: 2, inner_step: 20, timeout_ms: 5_000, tensors: [{ name: "w", shape: [4] }] }, []);
    expect(await first.asked).toMatchObject({ outerStep: 2 });
    await first.link.sendControl({ kind: "state", outerStep: 5, innerStep: 50, tensors: [{ name: "w", shape: [5] }] });
    const refused = await joining;
    expect(refused.header).toMatchObject({ kind: "outer_error" });
    expect(String(refused.header.error)).toMatch(/group alpha's state has tensor w \[5\] where this model has w \[4\]/);

    // A state beta did not ask for breaks the link; beta's next join starts clean.
    const second = await fakeAlpha();
    const closed = new Promise((resolve) => second.link.once("close", resolve));
    await second.link.sendControl({ kind: "state", outerStep: 5, innerStep: 50, tensors: [{ name: "w", shape: [4] }] });
    await closed;
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
