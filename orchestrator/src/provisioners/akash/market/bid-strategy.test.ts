import { parseAkashGroups, type AkashGroupInput, type CompiledAkashGroup } from "@drover/sdl";
import { describe, expect, it } from "vitest";
import { SimulatedProvider, askFromGroup, type SimulatedProviderConfig } from "../simulator/simulated-provider.js";
import { BidStrategy, describeDiagnosis, type BidAction, type BidStrategyOptions, type NoBidDiagnosis } from "./bid-strategy.js";
import { compareDecimal } from "./decimal-price.js";

const EUROPLOTS = "akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc";
const FOUNDRY = "akash17gqmzu0lnh2uclx9flm755arylrhgqy7udj3el";
const OVERCLOCK_AUDITOR = "akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63";
const WINDOW_MS = 30_000;

function group(overrides: Partial<AkashGroupInput> & { name: string }): AkashGroupInput {
  return {
    nodes: 1,
    gpu: { model: "a100", perNode: 8 },
    cpu: 64,
    memory: "256Gi",
    image: "ghcr.io/drover/worker:0.1.0",
    maxPrice: { amount: 1000, denom: "uact" },
    ...overrides,
  } as AkashGroupInput;
}

function groups(...inputs: AkashGroupInput[]): CompiledAkashGroup[] {
  return parseAkashGroups(inputs, "akash.groups");
}

function provider(address: string, config: Omit<SimulatedProviderConfig, "address">): SimulatedProvider {
  return new SimulatedProvider({ address, ...config });
}

/** Runs the strategy against simulated providers the way the provisioner would against the chain. */
function runMarket(wanted: CompiledAkashGroup[], providers: SimulatedProvider[], options: Partial<BidStrategyOptions> = {}) {
  let now = 1_000_000;
  const strategy = new BidStrategy(wanted, {
    now: () => now,
    bidWindowMs: WINDOW_MS,
    providers: providers.map((p) => p.advertisement()),
    ...options,
  });
  const actions: BidAction[] = [];
  for (let step = 0; step < 1_000; step += 1) {
    const action = strategy.next();
    actions.push(action);
    switch (action.kind) {
      case "post-ask":
        for (const candidate of providers) {
          const decision = candidate.decide(askFromGroup(action.group));
          if ("declined" in decision || decision.delayMs >= WINDOW_MS) continue;
          strategy.observeBids([{ askId: action.askId, provider: candidate.address, denom: action.group.maxPrice.denom, audited: true, ...decision }]);
        }
        break;
      case "wait":
        expect(action.untilMs).toBeGreaterThan(now);
        now = action.untilMs;
        break;
      case "accept-bid": {
        const winner = providers.find((p) => p.address === action.bid.provider)!;
        if (!winner.allocate(action.part.nodes, action.part.gpu.perNode)) strategy.acceptFailed(action.askId);
        break;
      }
      case "close-ask":
        break;
      case "done":
      case "give-up":
        return { outcome: action, actions, strategy };
    }
  }
  throw new Error("strategy did not finish in 1000 steps");
}

const posts = (actions: BidAction[]) => actions.filter((a): a is Extract<BidAction, { kind: "post-ask" }> => a.kind === "post-ask");

function reasons(outcome: BidAction): NoBidDiagnosis["reason"][] {
  if (outcome.kind !== "give-up") throw new Error(`expected give-up, got ${outcome.kind}`);
  return outcome.diagnosis.map((d) => d.reason);
}

describe("BidStrategy on a fragmented market", () => {
  it("reaches 48 GPUs by splitting the group over providers none of which fits it whole", () => {
    const wanted = groups(group({ name: "a100", nodes: 6 }));
    const market = [
      provider("akash1provx", { gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }], pricePerGpu: "50" }),
      provider("akash1provy", { gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }, { gpus: 8 }], pricePerGpu: "60" }),
      provider("akash1provz", { gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }], pricePerGpu: "55" }),
    ];
    const { outcome, actions } = runMarket(wanted, market);
    expect(outcome.kind).toBe("done");
    if (outcome.kind !== "done") return;
    const gpus = outcome.placements.reduce((sum, p) => sum + p.part.nodes * p.part.gpu.perNode, 0);
    expect(gpus).toBe(48);
    expect(new Set(outcome.placements.map((p) => p.provider)).size).toBe(3);
    expect(outcome.placements.map((p) => p.part.name)).toEqual(["a100-p1", "a100-p2", "a100-p3"]);
    // The ramp starts with one node and grows; it never asks for more than the group.
    const sizes = posts(actions).map((a) => a.group.nodes);
    expect(sizes[0]).toBe(1);
    expect(Math.max(...sizes)).toBeLessThanOrEqual(6);
    expect(posts(actions)[0]!.purpose).toBe("probe");
  });

  it("places AT-1's 32x A100 and 16x RTX 8000 at two providers", () => {
    const wanted = groups(
      group({ name: "rtx8000", nodes: 4, gpu: { model: "RTX 8000", perNode: 4 }, maxPrice: { amount: 3000, denom: "uact" } }),
      group({ name: "a100", nodes: 4, gpu: { model: "a100", ram: "80Gi", interface: "pcie", perNode: 8 }, maxPrice: { amount: 20000, denom: "uact" }, auditors: [OVERCLOCK_AUDITOR] }),
    );
    const market = [
      provider(EUROPLOTS, { gpuTag: "a100", gpuRam: "80Gi", gpuInterface: "pcie", auditedBy: [OVERCLOCK_AUDITOR], machines: Array.from({ length: 4 }, () => ({ gpus: 8 })), pricePerGpu: "1500" }),
      provider(FOUNDRY, { gpuTag: "rtx8000", gpuRam: "48Gi", auditedBy: [OVERCLOCK_AUDITOR], machines: Array.from({ length: 4 }, () => ({ gpus: 4 })), pricePerGpu: "500" }),
    ];
    const { outcome } = runMarket(wanted, market);
    expect(outcome.kind).toBe("done");
    if (outcome.kind !== "done") return;
    // Hardest (most GPUs) first, each whole at its own provider.
    expect(outcome.placements.map((p) => [p.part.name, p.part.nodes, p.provider])).toEqual([
      ["a100", 4, EUROPLOTS],
      ["rtx8000", 4, FOUNDRY],
    ]);
  });

  it("reshapes to fewer GPUs per node when machines only have smaller free slices", () => {
    const wanted = groups(group({ name: "a100", nodes: 4, cpu: 64, memory: "512Gi" }));
    const market = [provider("akash1provx", { gpuTag: "a100", machines: Array.from({ length: 8 }, () => ({ gpus: 4 })), pricePerGpu: "50" })];
    const { outcome } = runMarket(wanted, market);
    expect(outcome.kind).toBe("done");
    if (outcome.kind !== "done") return;
    const [placement] = outcome.placements;
    expect(outcome.placements).toHaveLength(1);
    expect(placement!.part.gpu.perNode).toBe(4);
    expect(placement!.part.nodes).toBe(8);
    expect(placement!.part.memoryBytes).toBe(256 * 1024 ** 3);
  });

  it("prefers a provider no other group uses, even when another is cheaper", () => {
    const wanted = groups(group({ name: "big", nodes: 2 }), group({ name: "small", nodes: 1 }));
    const market = [
      provider("akash1cheap", { gpuTag: "a100", machines: Array.from({ length: 4 }, () => ({ gpus: 8 })), pricePerGpu: "10" }),
      provider("akash1dear", { gpuTag: "a100", machines: [{ gpus: 8 }], pricePerGpu: "50" }),
    ];
    const { outcome } = runMarket(wanted, market);
    expect(outcome.kind).toBe("done");
    if (outcome.kind !== "done") return;
    expect(outcome.placements.map((p) => [p.wanted, p.provider])).toEqual([
      ["big", "akash1cheap"],
      ["small", "akash1dear"],
    ]);
  });
});

describe("BidStrategy ramp", () => {
  it("gets a large group from a provider that only bids on small asks", () => {
    const wanted = groups(group({ name: "a100", nodes: 4 }));
    const market = [provider("akash1wary", { gpuTag: "a100", machines: Array.from({ length: 4 }, () => ({ gpus: 8 })), pricePerGpu: "50", maxAskNodes: 2 })];
    const { outcome, actions } = runMarket(wanted, market);
    expect(outcome.kind).toBe("done");
    if (outcome.kind !== "done") return;
    expect(outcome.placements.map((p) => p.part.nodes)).toEqual([2, 2]);
    expect(posts(actions).map((a) => [a.purpose, a.group.nodes])).toEqual([
      ["probe", 1],
      ["grow", 2],
      ["place", 4],
      ["grow", 3],
      ["place", 2],
      ["place", 2],
    ]);
  });

  it("misses bids slower than the window and gives up only after the maximum price", () => {
    const wanted = groups(group({ name: "a100", nodes: 1 }));
    const market = [provider("akash1slow", { gpuTag: "a100", machines: [{ gpus: 8 }], pricePerGpu: "50", bidDelayMs: WINDOW_MS * 2, publishesPrice: true })];
    const { outcome, actions } = runMarket(wanted, market);
    expect(posts(actions).map((a) => a.priceCeiling)).toEqual(["500", "666.666666666666666666", "833.333333333333333333", "1000"]);
    expect(reasons(outcome)).toEqual(["silent-providers"]);
  });
});

describe("BidStrategy price ceiling", () => {
  it("raises the ceiling step by step, never past the maximum, and pays what was bid", () => {
    const wanted = groups(group({ name: "a100", nodes: 2, maxPrice: { amount: "1000", denom: "uact" } }));
    const market = [provider("akash1provx", { gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }], pricePerGpu: "100" })];
    const { outcome, actions } = runMarket(wanted, market);
    expect(outcome.kind).toBe("done");
    if (outcome.kind !== "done") return;
    const ceilings = posts(actions).map((a) => a.priceCeiling);
    expect(ceilings.slice(0, 3)).toEqual(["500", "666.666666666666666666", "833.333333333333333333"]);
    for (const ceiling of ceilings) expect(compareDecimal(ceiling, "1000")).toBeLessThanOrEqual(0);
    for (const post of posts(actions)) expect(post.group.maxPrice.amount).toBe(post.priceCeiling);
    expect(outcome.placements[0]!.price).toBe("800");
  });

  it("rejects a bid above the ceiling, for the wrong model, from a denied or unaudited provider", () => {
    let now = 0;
    const [wanted] = groups(group({ name: "a100", nodes: 1, providers: { allow: [], deny: [FOUNDRY] }, auditors: [OVERCLOCK_AUDITOR] }));
    const strategy = new BidStrategy([wanted!], { now: () => now, bidWindowMs: 10, priceSteps: 1 });
    const post = strategy.next();
    if (post.kind !== "post-ask") throw new Error("expected post-ask");
    const base = { askId: post.askId, denom: "uact", gpuModel: "a100", audited: true };
    strategy.observeBids([
      { ...base, provider: "akash1pricey", price: "1000.000000000000000001" },
      { ...base, provider: "akash1gaming", price: "10", gpuModel: "rtx4090" },
      { ...base, provider: FOUNDRY, price: "10" },
      { ...base, provider: "akash1unaudited", price: "10", audited: false },
      { ...base, provider: "akash1wrongdenom", price: "10", denom: "uakt" },
    ]);
    now = 10;
    expect(strategy.next().kind).toBe("close-ask");
    const outcome = strategy.next();
    expect(reasons(outcome)).toEqual(["no-advertisements", "bids-rejected"]);
    if (outcome.kind !== "give-up") return;
    const rejected = outcome.diagnosis.find((d) => d.reason === "bids-rejected");
    expect(rejected && "rejections" in rejected ? rejected.rejections.map((r) => r.why) : []).toEqual([
      "price 1000.000000000000000001 is above the ceiling 1000",
      "offers rtx4090, not a100",
      "provider is in providers.deny",
      "provider is not audited by any of the group's auditors",
      "bid in uakt, the group pays in uact",
    ]);
  });

  it("starts the bid window when the ask is on chain, not when it was decided", () => {
    let now = 0;
    const [wanted] = groups(group({ name: "a100", nodes: 1 }));
    const strategy = new BidStrategy([wanted!], { now: () => now, bidWindowMs: 100, priceSteps: 1 });
    const post = strategy.next();
    if (post.kind !== "post-ask") throw new Error("expected post-ask");
    now = 250; // the create-deployment tx took longer than the window
    strategy.askOpened(post.askId);
    expect(strategy.next()).toEqual({ kind: "wait", untilMs: 350 });
  });

  it("puts a lease that could not be created back on the market", () => {
    let now = 0;
    const [wanted] = groups(group({ name: "a100", nodes: 1 }));
    const strategy = new BidStrategy([wanted!], { now: () => now, bidWindowMs: 10, priceSteps: 1 });
    const first = strategy.next();
    if (first.kind !== "post-ask") throw new Error("expected post-ask");
    strategy.observeBids([{ askId: first.askId, provider: "akash1gone", price: "5", denom: "uact", gpuModel: "a100", audited: true }]);
    now = 10;
    const accept = strategy.next();
    expect(accept.kind).toBe("accept-bid");
    expect(strategy.next().kind).toBe("done");
    strategy.acceptFailed(first.askId);
    const again = strategy.next();
    expect(again.kind).toBe("post-ask");
    expect(strategy.placements()).toEqual([]);
  });
});

describe("BidStrategy diagnosis when no bid comes", () => {
  const oneNode = () => groups(group({ name: "a100", nodes: 1 }));

  it("no provider advertises the model", () => {
    const market = [provider("akash1gamer", { gpuTag: "rtx4090", machines: [{ gpus: 8 }], pricePerGpu: "1" })];
    const { outcome } = runMarket(oneNode(), market);
    expect(reasons(outcome)).toEqual(["no-provider-advertises-model"]);
    if (outcome.kind === "give-up") expect(outcome.message).toContain("no provider advertises a100");
  });

  it("a provider publishes the model under another tag (nvidia-a100, not a100)", () => {
    const market = [provider("akash1tagged", { gpuTag: "nvidia-a100", machines: [{ gpus: 8 }], pricePerGpu: "1" })];
    const { outcome } = runMarket(oneNode(), market);
    expect(reasons(outcome)).toEqual(["model-published-under-other-tag"]);
    if (outcome.kind === "give-up") expect(outcome.message).toContain('akash1tagged publishes "nvidia-a100"');
  });

  it("the price is too low (certain when the provider states its price)", () => {
    const market = [provider("akash1dear", { gpuTag: "a100", machines: [{ gpus: 8 }], pricePerGpu: "200", publishesPrice: true })];
    const { outcome } = runMarket(oneNode(), market);
    expect(reasons(outcome)).toEqual(["price-too-low"]);
    if (outcome.kind !== "give-up") return;
    expect(outcome.diagnosis[0]).toMatchObject({ certain: true, providers: [{ provider: "akash1dear", askingPricePerNode: "1600" }] });
    expect(outcome.message).toContain("the maximum price is too low");
  });

  it("the price is likely too low when the provider does not state it", () => {
    const market = [provider("akash1dear", { gpuTag: "a100", machines: [{ gpus: 8 }], pricePerGpu: "200" })];
    const { outcome } = runMarket(oneNode(), market);
    expect(outcome.kind === "give-up" && outcome.diagnosis[0]).toMatchObject({ reason: "price-too-low", certain: false });
  });

  it("the bidders do not offer the ram storage class /dev/shm needs", () => {
    const market = [provider("akash1noshm", { gpuTag: "a100", machines: [{ gpus: 8 }], pricePerGpu: "1", storageClasses: ["beta3"] })];
    const { outcome } = runMarket(oneNode(), market);
    expect(reasons(outcome)).toEqual(["storage-class-unsupported"]);
    if (outcome.kind === "give-up") expect(describeDiagnosis(outcome.diagnosis[0]!)).toContain("ram storage class");
  });

  it("the only providers with the model are filtered out, or have too little free per machine", () => {
    const wanted = groups(group({ name: "a100", nodes: 1, gpu: { model: "a100", perNode: 3 }, providers: { allow: [], deny: [EUROPLOTS] } }));
    const freshMarket = () => [
      provider(EUROPLOTS, { gpuTag: "a100", machines: [{ gpus: 8 }], pricePerGpu: "1" }),
      provider("akash1tiny", { gpuTag: "a100", machines: [{ gpus: 2 }, { gpus: 2 }], pricePerGpu: "1" }),
    ];
    // 3 GPUs per node fit on no machine of akash1tiny; nodes of 1 GPU do (3 does not divide into 2).
    const { outcome } = runMarket(wanted, freshMarket());
    expect(outcome.kind).toBe("done");
    if (outcome.kind === "done") expect(outcome.placements.map((p) => [p.provider, p.part.gpu.perNode, p.part.nodes])).toEqual([["akash1tiny", 1, 3]]);

    const strict = groups(group({ name: "a100", nodes: 1, gpu: { model: "a100", perNode: 8 }, providers: { allow: [], deny: [EUROPLOTS] } }));
    const strategy = new BidStrategy(strict, { now: () => 0, providers: freshMarket().map((p) => p.advertisement()) });
    expect(strategy.diagnose(strict[0]!)).toEqual([
      { reason: "providers-excluded", providers: [{ provider: EUROPLOTS, why: "in providers.deny" }] },
      { reason: "insufficient-capacity", gpusPerNode: 8, providers: [{ provider: "akash1tiny", largestFreePerMachine: 2 }] },
    ]);
  });
});
