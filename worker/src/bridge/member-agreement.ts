import { BridgeFrameError } from "../errors.js";

// The member set of one outer step, agreed among three or more groups. Membership is
// pairwise (each leader knows which peers it is in step with and linked to), so after
// a failure two leaders can disagree: alpha lost its link to gamma, beta did not. Each
// in-step leader proposes a set (itself and the peers it can exchange with) to every
// linked leader, and narrows its proposal to the largest set in which every two groups
// count each other in, ties going to the set whose groups come first by index (the
// group that keeps a job's lineage elsewhere too: the lower index dials, and its state
// wins a split). Proposals only shrink, so repeating this ends; a leader goes ahead
// once every group of its proposal proposes exactly the same set. That set is then
// what each of them exchanges with, so they average the same contributions.

/** A peer's proposal for one outer step: the groups it would exchange with, itself included. */
export interface MembersProposal {
  outerStep: number;
  groups: string[];
}

/**
 * Checks a peer's `members` message: an outer step, and distinct groups of this job that
 * include the sender. `groupIndexes` holds every group of the job (this one too).
 */
export function readMembersProposal(message: Record<string, unknown>, peer: string, groupIndexes: ReadonlyMap<string, number>): MembersProposal {
  return readGroupList(message, "members proposal", peer, groupIndexes);
}

/**
 * Checks a peer's `done` message: the step's members (as it ran the exchange) and the
 * groups it knows to hold every contribution, itself among them.
 */
export function readCompletion(message: Record<string, unknown>, peer: string, groupIndexes: ReadonlyMap<string, number>): { outerStep: number; members: string[]; done: string[] } {
  const done = readGroupList(message, "completion", peer, groupIndexes);
  const members = readGroupList({ outerStep: message.outerStep, groups: message.members }, "completion members", peer, groupIndexes);
  const outside = done.groups.find((group) => !members.groups.includes(group));
  if (outside !== undefined) throw new BridgeFrameError(`bridge peer ${peer}: completion groups name ${outside}, not one of its members`, { peer, field: "groups" });
  return { outerStep: done.outerStep, members: members.groups, done: done.groups };
}

function readGroupList(message: Record<string, unknown>, what: string, peer: string, groupIndexes: ReadonlyMap<string, number>): MembersProposal {
  const fail = (field: string, problem: string) => new BridgeFrameError(`bridge peer ${peer}: ${what} ${field} ${problem}`, { peer, field });
  const { outerStep, groups } = message;
  if (typeof outerStep !== "number" || !Number.isInteger(outerStep) || outerStep < 0 || outerStep > 2 ** 40) throw fail("outerStep", `${JSON.stringify(outerStep)} is not an outer step`);
  if (!Array.isArray(groups) || groups.length === 0 || groups.length > groupIndexes.size) throw fail("groups", `is not a list of 1 to ${groupIndexes.size} groups`);
  const seen = new Set<string>();
  groups.forEach((group, at) => {
    if (typeof group !== "string" || !groupIndexes.has(group)) throw fail(`groups[${at}]`, `${JSON.stringify(group).slice(0, 80)} is not a group of this job`);
    if (seen.has(group)) throw fail(`groups[${at}]`, `${group} is listed twice`);
    seen.add(group);
  });
  if (!seen.has(peer)) throw fail("groups", `leave out the sender ${peer}`);
  return { outerStep, groups: byIndex(groups as string[], groupIndexes) };
}

/** Groups in index order: how proposals travel and compare. */
export function byIndex(groups: Iterable<string>, groupIndexes: ReadonlyMap<string, number>): string[] {
  return [...groups].sort((a, b) => groupIndexes.get(a)! - groupIndexes.get(b)!);
}

export function sameGroups(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((group, at) => group === b[at]);
}

/** True when `a` wins over `b` as the job's lineage: more groups, or the same number coming first by index. */
export function outranks(a: readonly string[], b: readonly string[], groupIndexes: ReadonlyMap<string, number>): boolean {
  if (a.length !== b.length) return a.length > b.length;
  for (let at = 0; at < a.length; at++) {
    const difference = groupIndexes.get(a[at]!)! - groupIndexes.get(b[at]!)!;
    if (difference !== 0) return difference < 0;
  }
  return false;
}

/**
 * The next proposal of group `self`: among `candidates` (`self` and the peers whose
 * proposals are in `proposals`), the largest set holding `self` in which every two
 * groups list each other; of equal sizes, the one whose groups come first by index.
 * Search with pruning: include-first in index order finds that set first among its size.
 */
export function largestAgreeingSet(self: string, candidates: readonly string[], proposals: ReadonlyMap<string, ReadonlySet<string>>, groupIndexes: ReadonlyMap<string, number>): string[] {
  const others = byIndex(candidates.filter((group) => group !== self && proposals.get(group)?.has(self)), groupIndexes);
  const linked = (a: string, b: string) => proposals.get(a)!.has(b) && proposals.get(b)!.has(a);
  let best: string[] = [];
  const chosen: string[] = [];
  const search = (from: number) => {
    if (chosen.length > best.length) best = [...chosen];
    if (chosen.length + (others.length - from) <= best.length) return;
    for (let at = from; at < others.length; at++) {
      const group = others[at]!;
      if (!chosen.every((member) => linked(member, group))) continue;
      chosen.push(group);
      search(at + 1);
      chosen.pop();
      if (chosen.length + (others.length - at - 1) <= best.length) return;
    }
  };
  search(0);
  return byIndex([self, ...best], groupIndexes);
}
