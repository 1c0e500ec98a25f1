import { describe, expect, it } from "vitest";
import { CostInputError } from "../errors.js";
import { costLines, costReport, escrowMinutesLeft, leaseCost, measuredBlockTimeMs, nodeCost, NOMINAL_BLOCK_TIME_MS } from "./run-cost.js";

const lease = { provider: "akash1prov", dseq: "101", group: "a100", pricePerBlock: "1500", denom: "uact", createdHeight: 40 };

describe("lease cost", () => {
  it("is price per block x blocks since the lease's block, exactly", () => {
    const cost = leaseCost(lease, 52, 6_000);
    expect(cost.blocks).toBe(12);
    expect(cost.spent).toBe("18000");
    // 600 blocks an hour at 6 s.
    expect(cost.burnPerHour).toBe("900000");
  });

  it("keeps fractional prices exact where floats would not", () => {
    // 0.1 x 3 is 0.30000000000000004 in floating point.
    expect(leaseCost({ ...lease, pricePerBlock: "0.1" }, 43, 6_000).spent).toBe("0.3");
    const tiny = leaseCost({ ...lease, pricePerBlock: "0.000000000000000001" }, 40 + 1_000_000_007, 6_000);
    expect(tiny.spent).toBe("0.000000001000000007");
    // A price far beyond 2^53 uakt stays exact.
    expect(leaseCost({ ...lease, pricePerBlock: "9007199254740993" }, 42, 6_000).spent).toBe("18014398509481986");
  });

  it("charges nothing in the lease's own block, nor before it", () => {
    expect(leaseCost(lease, 40, 6_000)).toMatchObject({ blocks: 0, spent: "0" });
    expect(leaseCost(lease, 39, 6_000)).toMatchObject({ blocks: 0, spent: "0" });
  });

  it("refuses heights that are not integers and block times that are not positive", () => {
    expect(() => leaseCost(lease, 41.5, 6_000)).toThrow(CostInputError);
    expect(() => leaseCost(lease, 41, 0)).toThrow(/block time must be positive/);
  });
});

describe("escrow left", () => {
  it("lasts balance / (price per block x blocks per hour), in tenths of a minute rounded down", () => {
    // 900000 at 1500 a block: 600 blocks, an hour at 6 s blocks, 3 minutes at 300 ms.
    expect(escrowMinutesLeft("900000", "1500", 6_000)).toBe(60);
    expect(escrowMinutesLeft("900000", "1500", 300)).toBe(3);
    // 1 block short of 600: 599 x 6 s = 59.9 min; one unit short: still 59.9, not 60 rounded up.
    expect(escrowMinutesLeft("898500", "1500", 6_000)).toBe(59.9);
    expect(escrowMinutesLeft("899999", "1500", 6_000)).toBe(59.9);
    // Fractions stay exact: 0.3 at 0.1 a block is 3 blocks of 20 s, 1 minute (floats give 2.9999...).
    expect(escrowMinutesLeft("0.3", "0.1", 20_000)).toBe(1);
  });

  it("is 0 for an overdrawn escrow and undefined when nothing draws", () => {
    expect(escrowMinutesLeft("-25", "1500", 6_000)).toBe(0);
    expect(escrowMinutesLeft("900000", "0", 6_000)).toBeUndefined();
    expect(() => escrowMinutesLeft("1", "1", 0)).toThrow(CostInputError);
  });

  it("divides a deployment's escrow by all its leases' prices, and shows it in status", () => {
    const report = costReport({
      computedAtMs: 0,
      chain: { earlier: { height: 0, timeMs: 0 }, latest: { height: 60, timeMs: 360_000 } },
      // Two leases of one deployment draw 2000 a block together: 900000 lasts 450 blocks, 45 minutes.
      leases: [{ ...lease, escrowLeft: "900000" }, { ...lease, provider: "akash1other", pricePerBlock: "500", escrowLeft: "900000" }, { ...lease, dseq: "102" }],
      training: { images: 0, committedCheckpoints: 0 },
    });
    expect(report.leases.map((item) => [item.escrowLeft, item.escrowMinutesLeft])).toEqual([["900000", 45], ["900000", 45], [undefined, undefined]]);
    expect(costLines(report, 0).join("\n")).toContain("burning 900000 uact/h; escrow left 900000 uact (~45.0 min)");
  });
});

describe("a head after one that died", () => {
  it("counts the earlier heads' spend, images and checkpoints in its totals and per-unit figures, without their burn", () => {
    const earlier = { spent: [{ denom: "uact", spent: "1000000.5" }], training: { images: 3_000, committedCheckpoints: 2 } };
    const report = costReport({
      computedAtMs: 0,
      chain: { earlier: { height: 0, timeMs: 0 }, latest: { height: 60, timeMs: 360_000 } },
      leases: [lease],
      training: { images: 1_000, committedCheckpoints: 2 },
      earlier,
    });
    const own = report.leases[0]!.spent;
    const total = report.totals.find((entry) => entry.denom === "uact")!;
    // Exact decimal sum: the lease's own spend plus what the earlier heads paid.
    expect(total.spent).toBe((BigInt(own) * 10n + 10_000_005n).toString().replace(/(\d)$/, ".$1"));
    expect(total.burnPerHour).toBe(report.leases[0]!.burnPerHour);
    expect(report.training).toEqual({ images: 4_000, committedCheckpoints: 4 });
    expect(report.earlier).toEqual(earlier);
    expect(costLines(report, 0).join("\n")).toContain("earlier heads of this cluster (they died; their last report): 1000000.5 uact, ~3000 images, 2 checkpoint(s)");
    // A head with nothing of its own priced yet still shows what was spent before it.
    const alone = costReport({ computedAtMs: 0, training: { images: 0, committedCheckpoints: 0 }, earlier });
    expect(alone.totals.map((entry) => [entry.denom, entry.spent])).toEqual([["uact", "1000000.5"]]);
    expect(costLines(alone, 0).length).toBeGreaterThan(0);
  });
});

describe("block time", () => {
  it("is measured from two blocks far enough apart, else unknown", () => {
    expect(measuredBlockTimeMs({ height: 10, timeMs: 0 }, { height: 20, timeMs: 61_000 })).toBe(6_100);
    expect(measuredBlockTimeMs({ height: 10, timeMs: 0 }, { height: 12, timeMs: 12_000 })).toBeUndefined();
    expect(measuredBlockTimeMs(undefined, { height: 12, timeMs: 12_000 })).toBeUndefined();
  });

  it("sets the burn rate; the nominal 6 s is assumed until measured", () => {
    const assumed = costReport({ computedAtMs: 0, chain: { latest: { height: 50, timeMs: 0 } }, leases: [lease], training: { images: 0, committedCheckpoints: 0 } });
    expect(assumed.chain).toMatchObject({ height: 50, blockTimeMs: NOMINAL_BLOCK_TIME_MS, blockTimeMeasured: false });
    const measured = costReport({ computedAtMs: 0, chain: { earlier: { height: 40, timeMs: 0 }, latest: { height: 50, timeMs: 1_000 } }, leases: [lease], training: { images: 0, committedCheckpoints: 0 } });
    // 100 ms blocks: 36,000 an hour.
    expect(measured.leases[0]!.burnPerHour).toBe("54000000");
  });
});

describe("node-hour price", () => {
  it("prices a local node's up time, rounded down to the 18th digit", () => {
    const cost = nodeCost({ node: "local-0", group: "default", upMs: 90 * 60_000 }, { amount: "2.5", denom: "usd" }, true);
    expect(cost).toMatchObject({ spent: "3.75", burnPerHour: "2.5", hours: 1.5 });
    expect(nodeCost({ node: "n", group: "g", upMs: 1 }, { amount: "1", denom: "usd" }, false)).toMatchObject({ spent: "0.000000277777777777", burnPerHour: "0" });
    expect(() => nodeCost({ node: "n", group: "g", upMs: -1 }, { amount: "1", denom: "usd" }, true)).toThrow(CostInputError);
  });
});

describe("cost report", () => {
  it("totals per denomination and divides by images and committed checkpoints", () => {
    const report = costReport({
      computedAtMs: 1_000,
      chain: { earlier: { height: 0, timeMs: 0 }, latest: { height: 60, timeMs: 360_000 } },
      leases: [lease, { ...lease, dseq: "102", pricePerBlock: "500", createdHeight: 50 }, { ...lease, dseq: "103", denom: "uakt", pricePerBlock: "7", createdHeight: 59 }],
      training: { images: 4_000.7, committedCheckpoints: 3 },
    });
    expect(report.leases.map((item) => [item.dseq, item.blocks, item.spent])).toEqual([["101", 20, "30000"], ["102", 10, "5000"], ["103", 1, "7"]]);
    expect(report.totals).toEqual([
      { denom: "uact", spent: "35000", burnPerHour: "1200000", per1kImages: "8750", perCheckpoint: "11666.666666666666666666" },
      { denom: "uakt", spent: "7", burnPerHour: "4200", per1kImages: "1.75", perCheckpoint: "2.333333333333333333" },
    ]);
    expect(report.training).toEqual({ images: 4_000, committedCheckpoints: 3 });
  });

  it("leaves per-image and per-checkpoint figures out while there is nothing to divide by", () => {
    const report = costReport({ computedAtMs: 0, nodes: [{ node: "n0", group: "g", upMs: 3_600_000, running: true }], pricePerNodeHour: { amount: "3", denom: "usd" }, training: { images: 0, committedCheckpoints: 0 } });
    expect(report.totals).toEqual([{ denom: "usd", spent: "3", burnPerHour: "3" }]);
    expect(report.chain).toBeUndefined();
    const lines = costLines(report, 5_000);
    expect(lines[0]).toBe("cost: as the head computed it 5s ago");
    expect(lines.join("\n")).toContain("per 1k images: n/a");
  });

  it("prices nothing without leases or a node-hour price", () => {
    const report = costReport({ computedAtMs: 0, nodes: [{ node: "n0", group: "g", upMs: 3_600_000, running: true }], training: { images: 10, committedCheckpoints: 1 } });
    expect(report.nodes).toEqual([]);
    expect(report.totals).toEqual([]);
    expect(costLines(report, 0)).toEqual([]);
  });
});
