import { z } from "zod";

/** Local mode runs at most this many nodes (worker processes) in all. */
export const MAX_LOCAL_NODES = 16;
/** Groups a job may span (the cross-provider bridge is designed for up to 8). */
const MAX_GROUPS = 8;

const localGroupSchema = z.object({
  name: z.string().regex(/^[a-z][a-z0-9-]{0,31}$/, "lower-case letters, digits and '-', starting with a letter, at most 32"),
  nodes: z.number().int().min(1).max(MAX_LOCAL_NODES),
  ranksPerNode: z.number().int().min(1).max(64),
}).strict();

export interface LocalGroup {
  name: string;
  nodes: number;
  ranksPerNode: number;
}

/**
 * The `local:` section. `nodes` x `ranksPerNode` is one group named `local`; `groups`
 * lists several, each its own torch world as a provider group is (cross-group training
 * goes through the bridge).
 */
export const localSpecSchema = z.object({
  nodes: z.number().int().min(1).max(MAX_LOCAL_NODES).optional(),
  ranksPerNode: z.number().int().min(1).max(64).optional(),
  groups: z.array(localGroupSchema).min(1).max(MAX_GROUPS).optional(),
  /**
   * Each group in a network namespace of its own, joined to the head by a veth pair and
   * to the other groups only through a forwarding "wan" namespace, as separate providers
   * are: `auto` (the default) when there are several groups and this runs as root with
   * `ip netns` and `tc`, else loopback (and says why); `true` requires it; `false` never.
   */
  isolateGroups: z.union([z.boolean(), z.literal("auto")]).default("auto"),
  /** tc tbf rate of each group's link to the others, each way ("1gbit", "100mbit"), as a WAN uplink; unlimited when unset. */
  interGroupRate: z.string().regex(/^\d+(?:\.\d+)?(?:bit|kbit|mbit|gbit)$/, "a tc rate such as 1gbit, 200mbit or 500kbit").optional(),
}).strict().superRefine((local, ctx) => {
  if (local.groups === undefined) return;
  for (const field of ["nodes", "ranksPerNode"] as const) {
    if (local[field] !== undefined) ctx.addIssue({ code: "custom", path: [field], message: "is the one-group shorthand; with groups, give each group its own" });
  }
  const seen = new Set<string>();
  local.groups.forEach((group, index) => {
    if (seen.has(group.name)) ctx.addIssue({ code: "custom", path: ["groups", index, "name"], message: `${group.name} is used by an earlier group; group names must be unique` });
    seen.add(group.name);
  });
  const total = local.groups.reduce((sum, group) => sum + group.nodes, 0);
  if (total > MAX_LOCAL_NODES) ctx.addIssue({ code: "custom", path: ["groups"], message: `has ${total} nodes in all; local mode runs at most ${MAX_LOCAL_NODES}` });
}).transform((local): { groups: LocalGroup[]; isolateGroups: boolean | "auto"; interGroupRate?: string } => ({
  groups: local.groups ?? [{ name: "local", nodes: local.nodes ?? 2, ranksPerNode: local.ranksPerNode ?? 2 }],
  isolateGroups: local.isolateGroups,
  ...(local.interGroupRate === undefined ? {} : { interGroupRate: local.interGroupRate }),
}));

export type LocalSpec = z.output<typeof localSpecSchema>;

/** Node names of a local group: `<group>-<i>` (`local-<i>` for the shorthand); unique because group names are. */
export function localNodeName(group: string, index: number): string {
  return `${group}-${index}`;
}
