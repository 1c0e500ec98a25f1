import type { IJobTopology } from "@drover/proto";

/** A node that can take part in a job. */
export interface RankCandidate {
  workerId: string;
  nodeName: string;
  group: string;
  address: string;
  slots: number;
  /** host:port of the node's bridge as other groups reach it; "" without one. */
  bridgeAddress?: string;
}

export interface NodeAssignment {
  workerId: string;
  nodeName: string;
  group: string;
  /** Index of the group in the job and the number of groups (DiLoCo-style outer sync). */
  groupIndex: number;
  groupCount: number;
  /** Within the node's process group (its provider group): what torch sees. */
  rankOffset: number;
  worldSize: number;
  groupRank: number;
  localWorldSize: number;
  masterAddr: string;
  bridgeAddress: string;
  /** Across the whole job. */
  globalRankOffset: number;
  globalWorldSize: number;
}

/**
 * Assigns ranks deterministically: groups by name, nodes by name within a group.
 * Ranks talk NCCL/gloo only inside a provider group (only there is a pod network), so
 * each group is its own torch world with its own rendezvous at its first node; global
 * ranks number every rank of the job for cross-group sync. A single group is an
 * ordinary torchrun world.
 */
export function assignRanks(candidates: readonly RankCandidate[]): NodeAssignment[] {
  const byGroup = new Map<string, RankCandidate[]>();
  for (const candidate of [...candidates].sort((a, b) => a.group.localeCompare(b.group) || a.nodeName.localeCompare(b.nodeName))) {
    const members = byGroup.get(candidate.group) ?? [];
    members.push(candidate);
    byGroup.set(candidate.group, members);
  }
  const globalWorldSize = candidates.reduce((sum, candidate) => sum + candidate.slots, 0);
  const assignments: NodeAssignment[] = [];
  let globalRankOffset = 0;
  let groupIndex = 0;
  for (const [group, members] of byGroup) {
    const worldSize = members.reduce((sum, member) => sum + member.slots, 0);
    const masterAddr = members[0]!.address;
    let rankOffset = 0;
    members.forEach((member, groupRank) => {
      assignments.push({
        workerId: member.workerId,
        nodeName: member.nodeName,
        group,
        groupIndex,
        groupCount: byGroup.size,
        rankOffset,
        worldSize,
        groupRank,
        localWorldSize: member.slots,
        masterAddr,
        bridgeAddress: member.bridgeAddress ?? "",
        globalRankOffset,
        globalWorldSize,
      });
      rankOffset += member.slots;
      globalRankOffset += member.slots;
    });
    groupIndex += 1;
  }
  return assignments;
}

/**
 * What StartJob tells one node about the whole job: every group (size, nodes, global
 * rank offset, leader and its address) and where this node's ranks sit globally.
 */
export function topologyFor(assignments: readonly NodeAssignment[], node: NodeAssignment): IJobTopology {
  const leaders = assignments.filter((assignment) => assignment.groupRank === 0).sort((a, b) => a.groupIndex - b.groupIndex);
  return {
    groupIndex: node.groupIndex,
    globalWorldSize: node.globalWorldSize,
    globalRankOffset: node.globalRankOffset,
    groups: leaders.map((leader) => ({
      name: leader.group,
      index: leader.groupIndex,
      worldSize: leader.worldSize,
      nodeCount: assignments.filter((assignment) => assignment.group === leader.group).length,
      globalRankOffset: leader.globalRankOffset,
      leaderNode: leader.nodeName,
      leaderAddress: leader.masterAddr,
      bridgeAddress: leader.bridgeAddress,
    })),
  };
}
