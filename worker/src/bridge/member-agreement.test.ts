import { describe, expect, it } from "vitest";
import { largestAgreeingSet, outranks, readCompletion, readMembersProposal } from "./member-agreement.js";

const INDEXES = new Map([["alpha", 0], ["beta", 1], ["gamma", 2], ["delta", 3]]);

/** Each group's proposal from the links it has: "alpha-beta" links both ways. */
function proposalsFrom(links: string[], groups: string[]): Map<string, Set<string>> {
  const proposals = new Map(groups.map((group) => [group, new Set([group])]));
  for (const link of links) {
    const [a, b] = link.split("-") as [string, string];
    proposals.get(a)?.add(b);
    proposals.get(b)?.add(a);
  }
  return proposals;
}

/** What `self` proposes next, given everyone's proposals. */
function next(self: string, proposals: Map<string, Set<string>>): string[] {
  const others = new Map([...proposals].filter(([group]) => group !== self));
  return largestAgreeingSet(self, [...proposals.get(self)!], others, INDEXES);
}

/** Runs the narrowing among all groups until no proposal changes (what the bridges do over links). */
function settle(proposals: Map<string, Set<string>>): Map<string, string[]> {
  for (let round = 0; round < 16; round++) {
    const nextRound = new Map([...proposals.keys()].map((group) => [group, new Set(next(group, proposals))]));
    if ([...nextRound].every(([group, set]) => set.size === proposals.get(group)!.size)) break;
    proposals = nextRound;
  }
  return new Map([...proposals].map(([group, set]) => [group, [...set].sort((a, b) => INDEXES.get(a)! - INDEXES.get(b)!)]));
}

describe("member agreement", () => {
  it("keeps everyone when every link is up", () => {
    const all = ["alpha", "beta", "gamma", "delta"];
    const links = ["alpha-beta", "alpha-gamma", "alpha-delta", "beta-gamma", "beta-delta", "gamma-delta"];
    expect(next("gamma", proposalsFrom(links, all))).toEqual(all);
  });

  it("leaves out one end of a broken link, the higher index, and every survivor proposes the same set", () => {
    const settled = settle(proposalsFrom(["alpha-beta", "beta-gamma"], ["alpha", "beta", "gamma"]));
    expect(settled.get("alpha")).toEqual(["alpha", "beta"]);
    expect(settled.get("beta")).toEqual(["alpha", "beta"]);
    expect(settled.get("gamma")).toEqual(["gamma"]);
  });

  it("prefers the larger set to the lower indexes: alpha cut from beta and gamma goes alone", () => {
    const settled = settle(proposalsFrom(["alpha-delta", "beta-gamma", "beta-delta", "gamma-delta"], ["alpha", "beta", "gamma", "delta"]));
    expect(settled.get("beta")).toEqual(["beta", "gamma", "delta"]);
    expect(settled.get("delta")).toEqual(["beta", "gamma", "delta"]);
    expect(settled.get("alpha")).toEqual(["alpha"]);
  });

  it("resolves two equally good pairings by index, the same way from every side", () => {
    const settled = settle(proposalsFrom(["alpha-beta", "alpha-delta", "beta-gamma", "gamma-delta"], ["alpha", "beta", "gamma", "delta"]));
    expect(settled.get("alpha")).toEqual(["alpha", "beta"]);
    expect(settled.get("beta")).toEqual(["alpha", "beta"]);
    expect(settled.get("gamma")).toEqual(["gamma"]);
    expect(settled.get("delta")).toEqual(["delta"]);
    expect(outranks(["alpha", "beta"], ["gamma", "delta"], INDEXES)).toBe(true);
    expect(outranks(["gamma"], ["alpha"], INDEXES)).toBe(false);
    expect(outranks(["beta", "gamma"], ["alpha"], INDEXES)).toBe(true);
  });

  it("refuses malformed proposals and completions, naming the peer and the field", () => {
    expect(readMembersProposal({ kind: "members", outerStep: 3, groups: ["gamma", "alpha"] }, "gamma", INDEXES)).toEqual({ outerStep: 3, groups: ["alpha", "gamma"] });
    expect(() => readMembersProposal({ kind: "members", outerStep: -1, groups: ["gamma"] }, "gamma", INDEXES)).toThrow(/bridge peer gamma: members proposal outerStep -1/);
    expect(() => readMembersProposal({ kind: "members", outerStep: 1.5, groups: ["gamma"] }, "gamma", INDEXES)).toThrow(/outerStep 1\.5/);
    expect(() => readMembersProposal({ kind: "members", outerStep: 1, groups: "gamma" }, "gamma", INDEXES)).toThrow(/groups is not a list of 1 to 4 groups/);
    expect(() => readMembersProposal({ kind: "members", outerStep: 1, groups: new Array(5).fill("gamma") }, "gamma", INDEXES)).toThrow(/groups is not a list/);
    expect(() => readMembersProposal({ kind: "members", outerStep: 1, groups: ["gamma", "omega"] }, "gamma", INDEXES)).toThrow(/groups\[1\] "omega" is not a group of this job/);
    expect(() => readMembersProposal({ kind: "members", outerStep: 1, groups: ["gamma", "gamma"] }, "gamma", INDEXES)).toThrow(/groups\[1\] gamma is listed twice/);
    expect(() => readMembersProposal({ kind: "members", outerStep: 1, groups: ["alpha"] }, "gamma", INDEXES)).toThrow(/leave out the sender gamma/);
    expect(readCompletion({ kind: "done", outerStep: 2, members: ["alpha", "beta", "gamma"], groups: ["beta", "gamma"] }, "beta", INDEXES))
      .toEqual({ outerStep: 2, members: ["alpha", "beta", "gamma"], done: ["beta", "gamma"] });
    expect(() => readCompletion({ kind: "done", outerStep: 2, members: ["alpha", "beta"], groups: ["beta", "gamma"] }, "beta", INDEXES)).toThrow(/completion groups name gamma, not one of its members/);
    expect(() => readCompletion({ kind: "done", outerStep: 2, members: ["alpha", "gamma"], groups: ["alpha"] }, "beta", INDEXES)).toThrow(/bridge peer beta: completion groups leave out the sender beta/);
  });
});
