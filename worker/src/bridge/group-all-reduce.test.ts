import { afterEach, describe, expect, it } from "vitest";
import { BridgeAuthError, BridgeExchangeError } from "../errors.js";
import type { Logger } from "../logger.js";
import { silentLogger } from "../logger.js";
import { BridgeLink, BridgeListener } from "./bridge-link.js";
import { allReduceAcrossGroups, type OuterStepContribution } from "./group-all-reduce.js";
import { decodeFrame, encodeFrame, encodeFrameParts, fp32PayloadView, readFrame } from "./tensor-frame.js";

const JOB = "job-bridge-a1";
const KEY = Buffer.from("per-job-bridge-secret-0123456789", "utf8");

function series(count: number, seed: number): Float32Array {
  let state = seed >>> 0;
  const out = new Float32Array(count);
  for (let index = 0; index < count; index++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    out[index] = (state / 2 ** 32 - 0.5) * 0.02;
  }
  return out;
}

function contribution(seed: number, weight: number, outerStep = 1): OuterStepContribution {
  return { outerStep, weight, tensors: [
    { name: "blocks.0.attn.qkv.weight", shape: [96, 32], values: series(96 * 32, seed) },
    { name: "final_norm.bias", shape: [32], values: series(32, seed + 100) },
  ] };
}

/** A full mesh of loopback links between groups: the lower group (by name) dials the higher. */
async function mesh(groups: string[], cleanups: Array<() => Promise<void> | void>, logger: Logger = silentLogger) {
  const listeners = new Map<string, BridgeListener>();
  const links = new Map<string, BridgeLink[]>(groups.map((group) => [group, []]));
  for (const group of groups) {
    const listener = await BridgeListener.listen({ host: "127.0.0.1", port: 0, jobs: (job) => (job === JOB ? { group, key: KEY } : undefined), logger });
    listener.on("link", (link) => links.get(group)!.push(link));
    listeners.set(group, listener);
    cleanups.push(() => listener.close());
  }
  for (const [index, group] of groups.entries()) {
    for (const other of groups.slice(index + 1)) {
      const link = await BridgeLink.dial({ host: "127.0.0.1", port: listeners.get(other)!.port, self: { job: JOB, group }, key: KEY, signal: AbortSignal.timeout(5_000) });
      links.get(group)!.push(link);
    }
  }
  await expect.poll(() => [...links.values()].every((list) => list.length === groups.length - 1)).toBe(true);
  for (const list of links.values()) cleanups.push(() => list.forEach((link) => link.destroy()));
  return links;
}

const options = (group: string, links: BridgeLink[], codec: "fp32" | "int8" = "fp32", timeoutMs = 10_000) =>
  ({ job: JOB, group, links, codec, chunkElements: 1000, timeoutMs, signal: AbortSignal.timeout(20_000) });

describe("all-reduce across group leaders over the bridge", () => {
  const cleanups: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  /** Every group's result for each tensor must be the same bits; returns them. */
  function expectIdentical(results: Array<{ tensors: Map<string, Float32Array> }>, names: string[]) {
    for (const name of names) {
      const first = Buffer.from(results[0]!.tensors.get(name)!.buffer, results[0]!.tensors.get(name)!.byteOffset, results[0]!.tensors.get(name)!.byteLength);
      for (const result of results.slice(1)) {
        const got = result.tensors.get(name)!;
        expect(Buffer.from(got.buffer, got.byteOffset, got.byteLength).equals(first), name).toBe(true);
      }
    }
  }

  /** The exact weighted mean of tensor `index` over the inputs, in float64. */
  function weightedMean(inputs: OuterStepContribution[], index: number): Float64Array {
    const total = inputs.reduce((sum, input) => sum + input.weight, 0);
    const out = new Float64Array(inputs[0]!.tensors[index]!.values.length);
    for (const input of inputs) input.tensors[index]!.values.forEach((value, at) => (out[at]! += (input.weight * value) / total));
    return out;
  }

  const names = ["blocks.0.attn.qkv.weight", "final_norm.bias"];
  const elements = 96 * 32 + 32;

  it("gives every group the same weighted mean, to the bit (3 groups: reduce-scatter + all-gather)", async () => {
    const groups = ["a100", "h100", "rtx8000"];
    const links = await mesh(groups, cleanups);
    const inputs = { a100: contribution(1, 512), h100: contribution(2, 256), rtx8000: contribution(3, 128) } as const;
    // A tensor with no elements, and one smaller than the group count (empty shards).
    const withSmall = (input: OuterStepContribution, seed: number): OuterStepContribution => ({ ...input, tensors: [...input.tensors,
      { name: "empty", shape: [0], values: new Float32Array(0) }, { name: "scalar", shape: [1], values: series(1, seed) }] });
    const results = await Promise.all(groups.map((group, at) => allReduceAcrossGroups(withSmall(inputs[group as keyof typeof inputs], 60 + at), options(group, links.get(group)!))));
    expectIdentical(results, ["empty", "scalar"]);
    expect(results[0]!.tensors.get("empty")!.length).toBe(0);
    expect(results[0]!.tensors.get("scalar")![0]).toBeCloseTo((512 * series(1, 60)[0]! + 256 * series(1, 61)[0]! + 128 * series(1, 62)[0]!) / 896, 9);
    for (const result of results) {
      expect(result.groups).toEqual(groups);
      expect(result.weights).toEqual({ a100: 512, h100: 256, rtx8000: 128 });
    }
    expectIdentical(results, names);
    for (const [index, name] of names.entries()) {
      const expected = weightedMean(Object.values(inputs), index);
      const got = results[0]!.tensors.get(name)!;
      for (let at = 0; at < got.length; at++) expect(Math.abs(got[at]! - expected[at]!)).toBeLessThan(1e-9);
    }
    // Each leader sent 2(G-1)/G = 4/3 of its own data (plus frame headers), not 2 copies.
    for (const result of results) {
      expect(result.bytesSent).toBeGreaterThan((4 / 3) * 4 * elements);
      expect(result.bytesSent).toBeLessThan((4 / 3) * 4 * elements + 20 * 200);
    }
  });

  it("with 5 groups and int8: identical bits everywhere, the weighted mean within the codec's error, 2(G-1)/G of the bytes all-to-all sends", async () => {
    const groups = ["a100", "h100", "l40s", "mi300", "rtx8000"];
    const inputs = groups.map((_, at) => contribution(11 + at, 100 * (at + 1)));
    const run = async (exchange: "all-to-all" | "reduce-scatter", codec: "fp32" | "int8") => {
      const links = await mesh(groups, cleanups);
      return Promise.all(groups.map((group, at) => allReduceAcrossGroups(inputs[at]!, { ...options(group, links.get(group)!, codec), exchange })));
    };
    for (const codec of ["fp32", "int8"] as const) {
      const ring = await run("reduce-scatter", codec);
      const allToAll = await run("all-to-all", codec);
      expectIdentical(ring, names);
      for (const result of ring) expect(result.weights).toEqual(Object.fromEntries(groups.map((group, at) => [group, 100 * (at + 1)])));
      for (const [index, name] of names.entries()) {
        const expected = weightedMean(inputs, index);
        const got = ring[0]!.tensors.get(name)!;
        // int8: each contribution quantised once (half a level of a chunk's 0.02 range),
        // the reduced chunk once more (half a level of its range, at most 0.02).
        const tolerance = codec === "fp32" ? 1e-9 : 0.02 / 255;
        let worst = 0;
        for (let at = 0; at < got.length; at++) worst = Math.max(worst, Math.abs(got[at]! - expected[at]!));
        expect(worst, `${codec} ${name}`).toBeLessThanOrEqual(tolerance);
      }
      const sent = ring.map((result) => result.bytesSent);
      const baseline = allToAll.map((result) => result.bytesSent);
      // G = 5: 2(G-1)/G = 1.6 copies against G-1 = 4, headers aside.
      for (const [at, bytes] of sent.entries()) expect(bytes / baseline[at]!, `${codec} ${groups[at]}`).toBeLessThan(1.6 / 4 + 0.05);
      const wire = (codec === "fp32" ? 4 : 1) * elements;
      for (const bytes of sent) expect(bytes).toBeGreaterThanOrEqual(1.6 * wire - 1);
    }
  });

  it("with 3 groups, fails the step naming the peer and tensor when a peer goes away mid-step", async () => {
    const groups = ["a100", "h100", "rtx8000"];
    const links = await mesh(groups, cleanups);
    // rtx8000 announces and then leaves without sending anything else.
    const rtx = links.get("rtx8000")!;
    await Promise.all(rtx.map((link) => link.sendControl({ kind: "step", outerStep: 1, group: "rtx8000", weight: 1, codec: "fp32", exchange: "reduce-scatter", groups, chunkElements: 1000,
      tensors: [{ name: "blocks.0.attn.qkv.weight", shape: [96, 32] }, { name: "final_norm.bias", shape: [32] }] })));
    const steps = ["a100", "h100"].map((group, at) => allReduceAcrossGroups(contribution(20 + at, 1), options(group, links.get(group)!)));
    for (const step of steps) step.catch(() => undefined); // each is awaited below, one after the other
    setTimeout(() => rtx.forEach((link) => link.destroy()), 50);
    for (const step of steps) {
      await expect(step).rejects.toThrow(BridgeExchangeError);
      await expect(step).rejects.toThrow(/bridge peer rtx8000 went away during outer step 1.*tensor blocks\.0\.attn\.qkv\.weight/);
      await expect(step).rejects.toMatchObject({ context: { peer: "rtx8000", gone: true } });
    }
  });

  it("refuses a peer that reduces among another set of groups", async () => {
    const groups = ["a100", "h100", "rtx8000"];
    const links = await mesh(groups, cleanups);
    const rtx = links.get("rtx8000")!.find((link) => link.peer.group === "a100")!;
    await rtx.sendControl({ kind: "step", outerStep: 1, group: "rtx8000", weight: 1, codec: "fp32", exchange: "reduce-scatter", groups: ["a100", "rtx8000"], chunkElements: 1000,
      tensors: [{ name: "blocks.0.attn.qkv.weight", shape: [96, 32] }, { name: "final_norm.bias", shape: [32] }] });
    await expect(allReduceAcrossGroups(contribution(1, 1), options("a100", links.get("a100")!))).rejects.toThrow(/bridge peer rtx8000: reduces among groups \["a100","rtx8000"\], this group among \["a100","h100","rtx8000"\]/);
  });

  it("with int8, still agrees to the bit everywhere and stays within the codec's error", async () => {
    const groups = ["a100", "rtx8000"];
    const links = await mesh(groups, cleanups);
    const [a, b] = [contribution(5, 1), contribution(6, 1)];
    const [ra, rb] = await Promise.all([allReduceAcrossGroups(a, options("a100", links.get("a100")!, "int8")), allReduceAcrossGroups(b, options("rtx8000", links.get("rtx8000")!, "int8"))]);
    const name = "blocks.0.attn.qkv.weight";
    expect(Buffer.from(ra!.tensors.get(name)!.buffer).equals(Buffer.from(rb!.tensors.get(name)!.buffer))).toBe(true);
    const exact = a.tensors[0]!.values.map((value, at) => (value + b.tensors[0]!.values[at]!) / 2);
    const worst = Math.max(...ra!.tensors.get(name)!.map((value, at) => Math.abs(value - exact[at]!)));
    expect(worst).toBeLessThanOrEqual(0.02 / 255); // half a level of each of two chunks' ranges
    expect(ra!.bytesSent).toBeLessThan(0.27 * 4 * (96 * 32 + 32) + 4096);
  });

  it("delivers a frame joined from several socket reads with its fp32 payload 4-byte aligned, readable in place", async () => {
    const links = await mesh(["a100", "rtx8000"], cleanups);
    const values = series(3 << 20, 31); // 12 MiB: many reads
    const received: boolean[] = [];
    const got = new Promise<void>((resolve) => links.get("rtx8000")![0]!.receive((message) => {
      if (message.kind !== "frame") return;
      const read = readFrame(message.frame);
      const view = fp32PayloadView(read);
      received.push(view !== undefined && Buffer.from(view.buffer, view.byteOffset, view.byteLength).equals(Buffer.from(values.buffer, 4 * read.header.elementOffset, 4 * read.header.elements)));
      if (received.length === 3) resolve();
    }));
    // Names of odd lengths put the payload at every offset modulo 4.
    for (const [chunkIndex, tensor] of ["w", "wx", "wxy"].entries()) {
      await links.get("a100")![0]!.sendFrame(encodeFrameParts({ job: JOB, outerStep: 1, tensor, shape: [values.length], chunkIndex, chunkCount: 3, elementOffset: chunkIndex << 20, codec: "fp32" }, values.subarray(chunkIndex << 20, (chunkIndex + 1) << 20)));
    }
    await got;
    expect(received).toEqual([true, true, true]);
  });

  it("with 2 groups and frames spanning many reads (summed in place), every group gets the same bits", async () => {
    const links = await mesh(["a100", "rtx8000"], cleanups);
    const big = (seed: number, weight: number): OuterStepContribution => ({ outerStep: 1, weight, tensors: [
      { name: "embed.weight", shape: [3 << 20], values: series(3 << 20, seed) },
      { name: "empty", shape: [0], values: new Float32Array(0) },
    ] });
    const [a, b] = [big(41, 3), big(42, 1)];
    const [ra, rb] = await Promise.all([
      allReduceAcrossGroups(a, { ...options("a100", links.get("a100")!), chunkElements: 1 << 20 }),
      allReduceAcrossGroups(b, { ...options("rtx8000", links.get("rtx8000")!), chunkElements: 1 << 20 }),
    ]);
    expectIdentical([ra, rb], ["embed.weight"]);
    expect(ra.tensors.get("empty")!.length).toBe(0);
    const mean = ra.tensors.get("embed.weight")!;
    for (let at = 0; at < mean.length; at += 4099) expect(mean[at]).toBe(Math.fround(0.75 * a.tensors[0]!.values[at]! + 0.25 * b.tensors[0]!.values[at]!));

    // int8, summed from a decoded chunk: the same bits as decoding every chunk first.
    const links8 = await mesh(["a100", "rtx8000"], cleanups);
    const [qa, qb] = await Promise.all([
      allReduceAcrossGroups({ ...a, outerStep: 2 }, { ...options("a100", links8.get("a100")!, "int8"), chunkElements: 1 << 20 }),
      allReduceAcrossGroups({ ...b, outerStep: 2 }, { ...options("rtx8000", links8.get("rtx8000")!, "int8"), chunkElements: 1 << 20 }),
    ]);
    expectIdentical([qa, qb], ["embed.weight"]);
    const decoded = (values: Float32Array) => {
      const out = new Float32Array(values.length);
      for (let chunk = 0; chunk < 3; chunk++) {
        const frame = decodeFrame(encodeFrame({ job: JOB, outerStep: 2, tensor: "embed.weight", shape: [values.length], chunkIndex: chunk, chunkCount: 3, elementOffset: chunk << 20, codec: "int8" }, values.subarray(chunk << 20, (chunk + 1) << 20)));
        out.set(frame.values, chunk << 20);
      }
      return out;
    };
    const [da, db] = [decoded(a.tensors[0]!.values), decoded(b.tensors[0]!.values)];
    const mean8 = qa.tensors.get("embed.weight")!;
    for (let at = 0; at < mean8.length; at += 4099) expect(mean8[at]).toBe(Math.fround(0.75 * da[at]! + 0.25 * db[at]!));
  });

  it("refuses a peer with a wrong job secret and logs it without the secret", async () => {
    const logged: Array<{ message: string; fields?: Record<string, unknown> }> = [];
    const logger: Logger = { ...silentLogger, warn: (message, fields) => logged.push({ message, ...(fields ? { fields } : {}) }), child: () => logger };
    const listener = await BridgeListener.listen({ host: "127.0.0.1", port: 0, jobs: (job) => (job === JOB ? { group: "a100", key: KEY } : undefined), logger });
    cleanups.push(() => listener.close());
    const wrong = Buffer.from("not-the-job-secret-at-all-000000", "utf8");
    await expect(BridgeLink.dial({ host: "127.0.0.1", port: listener.port, self: { job: JOB, group: "rogue" }, key: wrong, signal: AbortSignal.timeout(5_000) }))
      .rejects.toThrow(BridgeAuthError);
    await expect.poll(() => logged.length).toBe(1);
    expect(logged[0]!.message).toContain("bridge peer refused");
    expect(logged[0]!.fields).toMatchObject({ job: JOB, group: "rogue" });
    const text = JSON.stringify(logged);
    expect(text).not.toContain(KEY.toString("utf8"));
    expect(text).not.toContain(wrong.toString("utf8"));
    // A dialer that reaches a listener without the job's key cannot be fooled either.
    const impostor = await BridgeListener.listen({ host: "127.0.0.1", port: 0, jobs: () => ({ group: "fake", key: wrong }), logger: silentLogger });
    cleanups.push(() => impostor.close());
    await expect(BridgeLink.dial({ host: "127.0.0.1", port: impostor.port, self: { job: JOB, group: "a100" }, key: KEY, signal: AbortSignal.timeout(5_000) }))
      .rejects.toThrow(/refused this agent: authentication failed/);
  });

  it("fails the step naming the peer and tensor on a damaged frame, a wrong shape, a peer gone or silent", async () => {
    const groups = ["a100", "rtx8000"];
    const own = contribution(7, 1);
    const announce = (link: BridgeLink, shape = [96, 32]) => link.sendControl({ kind: "step", outerStep: 1, group: "rtx8000", weight: 1, codec: "fp32", tensors: [{ name: "blocks.0.attn.qkv.weight", shape }, { name: "final_norm.bias", shape: [32] }] });

    let links = await mesh(groups, cleanups);
    let peer = links.get("rtx8000")![0]!;
    await announce(peer);
    const damaged = encodeFrame({ job: JOB, outerStep: 1, tensor: "blocks.0.attn.qkv.weight", shape: [96, 32], chunkIndex: 0, chunkCount: 4, elementOffset: 0, codec: "fp32" }, series(1000, 9));
    damaged[damaged.length - 1]! ^= 0x01;
    await peer.sendFrame(damaged);
    await expect(allReduceAcrossGroups(own, options("a100", links.get("a100")!))).rejects.toThrow(/from group rtx8000: bridge frame: tensor blocks\.0\.attn\.qkv\.weight chunk 0: checksum mismatch/);

    links = await mesh(groups, cleanups);
    await announce(links.get("rtx8000")![0]!, [32, 96]);
    await expect(allReduceAcrossGroups(own, options("a100", links.get("a100")!))).rejects.toThrow(/bridge peer rtx8000: tensor blocks\.0\.attn\.qkv\.weight has shape \[32,96\], expected \[96,32\]/);

    links = await mesh(groups, cleanups);
    peer = links.get("rtx8000")![0]!;
    const gone = allReduceAcrossGroups(own, options("a100", links.get("a100")!));
    peer.destroy();
    await expect(gone).rejects.toThrow(BridgeExchangeError);
    await expect(gone).rejects.toThrow(/rtx8000|bridge link/);

    links = await mesh(groups, cleanups);
    await expect(allReduceAcrossGroups(own, options("a100", links.get("a100")!, "fp32", 300))).rejects.toThrow(/bridge peer rtx8000 did not deliver outer step 1 within 0\.3s/);
  });

  it("keeps a faster peer's next step for when this group gets there", async () => {
    const groups = ["a100", "rtx8000"];
    const links = await mesh(groups, cleanups);
    // rtx8000 runs steps 1 and 2 back to back; a100 joins step 2 only after step 1.
    const fast = (async () => {
      await allReduceAcrossGroups(contribution(1, 1, 1), options("rtx8000", links.get("rtx8000")!));
      return allReduceAcrossGroups(contribution(3, 1, 2), options("rtx8000", links.get("rtx8000")!));
    })();
    await allReduceAcrossGroups(contribution(2, 1, 1), options("a100", links.get("a100")!));
    await new Promise((resolve) => setTimeout(resolve, 100)); // step 2 arrives before a100 asks
    const slow = await allReduceAcrossGroups(contribution(4, 1, 2), options("a100", links.get("a100")!));
    const other = await fast;
    expect(Buffer.from(slow.tensors.get("final_norm.bias")!.buffer).equals(Buffer.from(other.tensors.get("final_norm.bias")!.buffer))).toBe(true);
  });
});

