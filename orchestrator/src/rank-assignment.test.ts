import { describe, expect, it } from "vitest";
import { assignRanks, topologyFor } from "./rank-assignment.js";

describe("assignRanks", () => {
  it("numbers ranks by node name inside one group, rendezvous at the first node", () => {
    const result = assignRanks([
      { workerId: "b", nodeName: "local-1", group: "local", address: "10.0.0.2", slots: 2 },
      { workerId: "a", nodeName: "local-0", group: "local", address: "10.0.0.1", slots: 2 },
    ]);
    expect(result.map((a) => [a.nodeName, a.rankOffset, a.worldSize, a.groupRank, a.masterAddr])).toEqual([
      ["local-0", 0, 4, 0, "10.0.0.1"],
      ["local-1", 2, 4, 1, "10.0.0.1"],
    ]);
  });

  it("makes each provider group its own world with its own master, and numbers ranks globally", () => {
    const result = assignRanks([
      { workerId: "r0", nodeName: "rtx-0", group: "rtx8000", address: "10.1.0.1", slots: 4 },
      { workerId: "a0", nodeName: "a100-0", group: "a100", address: "10.2.0.1", slots: 8 },
      { workerId: "a1", nodeName: "a100-1", group: "a100", address: "10.2.0.2", slots: 8 },
    ]);
    expect(result.map((a) => [a.nodeName, a.rankOffset, a.worldSize, a.masterAddr, a.globalRankOffset, a.globalWorldSize, a.groupIndex, a.groupCount])).toEqual([
      ["a100-0", 0, 16, "10.2.0.1", 0, 20, 0, 2],
      ["a100-1", 8, 16, "10.2.0.1", 8, 20, 0, 2],
      ["rtx-0", 0, 4, "10.1.0.1", 16, 20, 1, 2],
    ]);
  });

  it("describes every group to every node in StartJob's typed topology", () => {
    const result = assignRanks([
      { workerId: "r0", nodeName: "rtx-0", group: "rtx8000", address: "203.0.113.7", slots: 4, bridgeAddress: "provider-b.example:31877" },
      { workerId: "a0", nodeName: "a100-0", group: "a100", address: "198.51.100.1", slots: 8, bridgeAddress: "provider-a.example:30412" },
      { workerId: "a1", nodeName: "a100-1", group: "a100", address: "198.51.100.2", slots: 8, bridgeAddress: "provider-a.example:30999" },
    ]);
    // The bridge each group's leader is dialed at is the leader's own (a100-0's, not a100-1's).
    const groups = [
      { name: "a100", index: 0, worldSize: 16, nodeCount: 2, globalRankOffset: 0, leaderNode: "a100-0", leaderAddress: "198.51.100.1", bridgeAddress: "provider-a.example:30412" },
      { name: "rtx8000", index: 1, worldSize: 4, nodeCount: 1, globalRankOffset: 16, leaderNode: "rtx-0", leaderAddress: "203.0.113.7", bridgeAddress: "provider-b.example:31877" },
    ];
    expect(topologyFor(result, result[1]!)).toEqual({ groupIndex: 0, globalWorldSize: 20, globalRankOffset: 8, groups });
    expect(topologyFor(result, result[2]!)).toEqual({ groupIndex: 1, globalWorldSize: 20, globalRankOffset: 16, groups });
  });
});
