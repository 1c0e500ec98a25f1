import type { IJobTopology, IStartJob } from "@drover/proto";
import { TrainerLaunchError } from "./errors.js";

/** A StartJob's topology, checked: what the trainer environment is built from. */
export interface JobTopologyView {
  group: string;
  groupIndex: number;
  groups: Array<{ name: string; worldSize: number; nodeCount: number; globalRankOffset: number }>;
  globalWorldSize: number;
  /** Global rank of this node's local rank 0. */
  globalRankOffset: number;
}

/**
 * Reads and checks the typed topology of a StartJob. A head too old to send one has a
 * single group: this node's torch world is the whole job. Inconsistent numbers are
 * refused naming the field, before any trainer starts on them.
 */
export function readTopology(job: IStartJob): JobTopologyView {
  const group = job.group ?? "";
  const worldSize = job.worldSize ?? 1;
  const topology: IJobTopology | null | undefined = job.topology;
  if (!topology || (topology.groups ?? []).length === 0) {
    // Without a topology the node count is unknown; this node is the one known.
    return { group, groupIndex: 0, groups: [{ name: group, worldSize, nodeCount: 1, globalRankOffset: 0 }], globalWorldSize: worldSize, globalRankOffset: job.rankOffset ?? 0 };
  }
  const groups = (topology.groups ?? []).map((entry) => ({ name: entry.name ?? "", worldSize: entry.worldSize ?? 0, nodeCount: entry.nodeCount ?? 0, globalRankOffset: entry.globalRankOffset ?? 0 }));
  const groupIndex = topology.groupIndex ?? 0;
  const globalWorldSize = topology.globalWorldSize ?? 0;
  const globalRankOffset = topology.globalRankOffset ?? 0;
  const problem = (field: string, message: string) => new TrainerLaunchError(`StartJob topology.${field}: ${message}`, { jobId: job.jobId });
  if (groupIndex >= groups.length) throw problem("group_index", `${groupIndex} but the job has ${groups.length} groups`);
  const own = groups[groupIndex]!;
  if (own.name !== group) throw problem(`groups[${groupIndex}].name`, `is ${own.name}, but this node's group is ${group}`);
  if (own.worldSize !== worldSize) throw problem(`groups[${groupIndex}].world_size`, `is ${own.worldSize}, but the node's world_size is ${worldSize}`);
  const total = groups.reduce((sum, entry) => sum + entry.worldSize, 0);
  if (total !== globalWorldSize) throw problem("global_world_size", `is ${globalWorldSize}, but the groups add up to ${total}`);
  if (globalRankOffset + (job.localWorldSize ?? 1) > globalWorldSize) throw problem("global_rank_offset", `${globalRankOffset} + ${job.localWorldSize ?? 1} local ranks exceeds the global world size ${globalWorldSize}`);
  if (globalRankOffset - own.globalRankOffset !== (job.rankOffset ?? 0)) throw problem("global_rank_offset", `${globalRankOffset} does not match group offset ${own.globalRankOffset} + rank_offset ${job.rankOffset ?? 0}`);
  return { group, groupIndex, groups, globalWorldSize, globalRankOffset };
}

/** The job-wide topology variables of the trainer contract (per-rank ones are added at spawn). */
export function topologyEnvironment(topology: JobTopologyView): Record<string, string> {
  return {
    DROVER_GROUP: topology.group,
    DROVER_GROUP_INDEX: String(topology.groupIndex),
    DROVER_GROUP_COUNT: String(topology.groups.length),
    DROVER_GROUPS: topology.groups.map((entry) => `${entry.name}:${entry.worldSize}`).join(","),
    DROVER_GLOBAL_WORLD_SIZE: String(topology.globalWorldSize),
  };
}
