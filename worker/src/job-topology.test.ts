import { describe, expect, it } from "vitest";
import type { IStartJob } from "@drover/proto";
import { readTopology, topologyEnvironment } from "./job-topology.js";

const twoGroups: IStartJob = {
  jobId: "job-1",
  group: "rtx8000",
  worldSize: 4,
  rankOffset: 2,
  localWorldSize: 2,
  topology: {
    groupIndex: 1,
    globalWorldSize: 20,
    globalRankOffset: 18,
    groups: [
      { name: "a100", index: 0, worldSize: 16, nodeCount: 2, globalRankOffset: 0 },
      { name: "rtx8000", index: 1, worldSize: 4, nodeCount: 2, globalRankOffset: 16 },
    ],
  },
};

describe("StartJob topology", () => {
  it("becomes the trainer contract's variables", () => {
    expect(topologyEnvironment(readTopology(twoGroups))).toEqual({
      DROVER_GROUP: "rtx8000",
      DROVER_GROUP_INDEX: "1",
      DROVER_GROUP_COUNT: "2",
      DROVER_GROUPS: "a100:16,rtx8000:4",
      DROVER_GLOBAL_WORLD_SIZE: "20",
    });
    expect(readTopology(twoGroups).globalRankOffset).toBe(18);
  });

  it("is one group when a head sends none", () => {
    expect(readTopology({ group: "local", worldSize: 4, rankOffset: 2, localWorldSize: 2 })).toEqual({
      group: "local", groupIndex: 0, groups: [{ name: "local", worldSize: 4, nodeCount: 1, globalRankOffset: 0 }], globalWorldSize: 4, globalRankOffset: 2,
    });
  });

  it("refuses inconsistent numbers, naming the field", () => {
    const topology = twoGroups.topology!;
    const broken = (change: object): IStartJob => ({ ...twoGroups, topology: { ...topology, ...change } });
    expect(() => readTopology(broken({ groupIndex: 2 }))).toThrow("StartJob topology.group_index: 2 but the job has 2 groups");
    expect(() => readTopology(broken({ groupIndex: 0 }))).toThrow("topology.groups[0].name: is a100, but this node's group is rtx8000");
    expect(() => readTopology(broken({ globalWorldSize: 21 }))).toThrow("topology.global_world_size: is 21, but the groups add up to 20");
    expect(() => readTopology(broken({ globalRankOffset: 19 }))).toThrow("topology.global_rank_offset: 19 + 2 local ranks exceeds the global world size 20");
    expect(() => readTopology(broken({ globalRankOffset: 17 }))).toThrow("topology.global_rank_offset: 17 does not match group offset 16 + rank_offset 2");
    expect(() => readTopology({ ...twoGroups, worldSize: 8 })).toThrow("topology.groups[1].world_size: is 4, but the node's world_size is 8");
  });
});
