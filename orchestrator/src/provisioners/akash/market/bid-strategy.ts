// How Drover asks the Akash market for GPUs. Pure: no I/O, the clock is injected; the
// driver (the Akash provisioner) turns each action into chain transactions and feeds
// back what it observes (bids, provider advertisements, failed leases).
//
// The behaviour is AT-1's hand-learned recipe, made systematic:
// - Start with a one-node ask: it learns who bids at all, cheaply, and at a price that
//   starts below the user's maximum and rises step by step only while nobody bids.
// - Grow the ask (doubling, then bisecting) towards the group's size: providers whose
//   free GPUs are spread over machines bid on small asks but not on large ones, and
//   dashboards overestimate what fits in one lease.
// - When no single provider fits the rest, split it into parts of the largest size that
//   drew a bid (splitGroup); when not even one node of the wanted shape fits anywhere but
//   providers advertise smaller free slices, reshape to fewer GPUs per node (reshapeGroup).
// - Different wanted groups prefer different providers (AT-1: A100s at one provider,
//   RTX 8000s at another), so losing one provider loses one group only.
// - When bids never come, say why from what providers advertise: nobody publishes the
//   model (or publishes it under another tag), the price is too low, the ram storage
//   class needed for /dev/shm is missing, capacity, filters.

import { isProviderAllowed, normalizeGpuModel, reshapeGroup, splitGroup, type CompiledAkashGroup } from "@drover/sdl";
import { compareDecimal, scaleDecimal } from "./decimal-price.js";
import type { AdvertisedGpu, ObservedBid, ProviderAdvertisement } from "./market-observations.js";

export interface BidStrategyOptions {
  /** Injected clock, milliseconds. */
  readonly now: () => number;
  /** How long an ask stays open collecting bids before it is judged. */
  readonly bidWindowMs?: number;
  /** Ceilings tried from the first to the user's maximum, inclusive (>= 1). */
  readonly priceSteps?: number;
  /** First ceiling as a percentage of the user's maximum (1..100). */
  readonly initialPricePercent?: number;
  /** What providers advertise; more can be given later with observeProviders. */
  readonly providers?: readonly ProviderAdvertisement[];
}

export const DEFAULT_BID_WINDOW_MS = 60_000;
export const DEFAULT_PRICE_STEPS = 4;
export const DEFAULT_INITIAL_PRICE_PERCENT = 50;

/** Why an ask was posted: to learn who bids, to learn how large a lease fits, or to lease. */
export type AskPurpose = "probe" | "grow" | "place";

export type BidAction =
  | {
      readonly kind: "post-ask";
      readonly askId: string;
      /** The wanted group (cluster spec name) this ask serves. */
      readonly wanted: string;
      readonly purpose: AskPurpose;
      /** The group to deploy; its maxPrice.amount is the ceiling. */
      readonly group: CompiledAkashGroup;
      readonly priceCeiling: string;
      readonly closesAtMs: number;
    }
  | { readonly kind: "wait"; readonly untilMs: number }
  | { readonly kind: "accept-bid"; readonly askId: string; readonly wanted: string; readonly part: CompiledAkashGroup; readonly bid: ObservedBid }
  | { readonly kind: "close-ask"; readonly askId: string; readonly reason: string }
  | { readonly kind: "give-up"; readonly wanted: string; readonly diagnosis: readonly NoBidDiagnosis[]; readonly message: string }
  | { readonly kind: "done"; readonly placements: readonly Placement[] };

export interface Placement {
  readonly wanted: string;
  readonly askId: string;
  /** The deployed group: a whole wanted group, a part of it, or a reshaped part. */
  readonly part: CompiledAkashGroup;
  readonly provider: string;
  readonly price: string;
}

export interface RejectedBid {
  readonly provider: string;
  readonly askId: string;
  readonly why: string;
}

/** One reason bids did not come, with the evidence. */
export type NoBidDiagnosis =
  | { readonly reason: "no-provider-advertises-model"; readonly models: readonly string[] }
  /** Nothing was learned about providers, so no cause can be named. */
  | { readonly reason: "no-advertisements" }
  | { readonly reason: "model-published-under-other-tag"; readonly model: string; readonly providers: ReadonlyArray<{ provider: string; tag: string }> }
  | { readonly reason: "providers-excluded"; readonly providers: ReadonlyArray<{ provider: string; why: string }> }
  | { readonly reason: "insufficient-capacity"; readonly gpusPerNode: number; readonly providers: ReadonlyArray<{ provider: string; largestFreePerMachine: number }> }
  | { readonly reason: "storage-class-unsupported"; readonly storageClass: "ram"; readonly providers: readonly string[] }
  | { readonly reason: "price-too-low"; readonly maxPrice: string; readonly denom: string; readonly certain: boolean; readonly providers: ReadonlyArray<{ provider: string; askingPricePerNode?: string }> }
  | { readonly reason: "silent-providers"; readonly providers: readonly string[] }
  | { readonly reason: "bids-rejected"; readonly rejections: readonly RejectedBid[] };

interface GroupProgress {
  readonly wanted: CompiledAkashGroup;
  shape: CompiledAkashGroup;
  remainingNodes: number;
  ceilings: string[];
  priceStep: number;
  /** Largest ask size (nodes of `shape`) each provider is believed to fit: raised by bids, lowered by asks nobody bid on. */
  readonly fitByProvider: Map<string, number>;
  smallestFailedSize: number | undefined;
  partsPlaced: number;
  readonly rejections: RejectedBid[];
  readonly reshapedFrom: number[];
}

interface OpenAsk {
  readonly askId: string;
  readonly purpose: AskPurpose;
  readonly group: CompiledAkashGroup;
  readonly ceiling: string;
  closesAtMs: number;
  readonly bids: ObservedBid[];
}

export class BidStrategy {
  private readonly progress: GroupProgress[];
  private readonly options: Required<Omit<BidStrategyOptions, "providers">>;
  private readonly advertisements = new Map<string, ProviderAdvertisement>();
  private readonly placed: Placement[] = [];
  private current = 0;
  private openAsk: OpenAsk | undefined;
  private askCounter = 0;
  private finished: BidAction | undefined;

  constructor(wanted: readonly CompiledAkashGroup[], options: BidStrategyOptions) {
    this.options = {
      now: options.now,
      bidWindowMs: options.bidWindowMs ?? DEFAULT_BID_WINDOW_MS,
      priceSteps: Math.max(1, Math.floor(options.priceSteps ?? DEFAULT_PRICE_STEPS)),
      initialPricePercent: Math.min(100, Math.max(1, options.initialPricePercent ?? DEFAULT_INITIAL_PRICE_PERCENT)),
    };
    this.observeProviders(options.providers ?? []);
    // Hardest first: the largest group has the fewest providers that can take it, and
    // should get first pick before smaller groups occupy those providers.
    const ordered = [...wanted].sort((a, b) => totalGpus(b) - totalGpus(a));
    this.progress = ordered.map((group) => ({
      wanted: group,
      shape: group,
      remainingNodes: group.nodes,
      ceilings: this.priceLadder(group.maxPrice.amount),
      priceStep: 0,
      fitByProvider: new Map(),
      smallestFailedSize: undefined,
      partsPlaced: 0,
      rejections: [],
      reshapedFrom: [],
    }));
  }

  /** Bids seen on chain; bids for asks other than the open one are ignored (they are closed or judged). */
  observeBids(bids: readonly ObservedBid[]): void {
    const ask = this.openAsk;
    if (ask === undefined) return;
    for (const bid of bids) {
      if (bid.askId !== ask.askId) continue;
      const known = ask.bids.findIndex((seen) => seen.provider === bid.provider);
      if (known >= 0) ask.bids[known] = bid;
      else ask.bids.push(bid);
    }
  }

  /**
   * The ask is on chain now: its bid window starts here rather than when post-ask was
   * returned, so a slow transaction does not eat the time providers have to bid.
   */
  askOpened(askId: string): void {
    const ask = this.openAsk;
    if (ask === undefined || ask.askId !== askId) return;
    ask.closesAtMs = this.options.now() + this.options.bidWindowMs;
  }

  /** Provider advertisements (replacing earlier ones of the same provider). */
  observeProviders(advertisements: readonly ProviderAdvertisement[]): void {
    for (const advertisement of advertisements) this.advertisements.set(advertisement.provider, advertisement);
  }

  /**
   * The lease for an accepted bid could not be created (the bid was closed, the
   * provider vanished): the part goes back to the market and the provider is not trusted
   * with that size again.
   */
  acceptFailed(askId: string): void {
    const index = this.placed.findIndex((placement) => placement.askId === askId);
    if (index < 0) return;
    const [placement] = this.placed.splice(index, 1);
    const group = this.progress.find((progress) => progress.wanted.name === placement!.wanted);
    if (group === undefined) return;
    group.remainingNodes += placement!.part.nodes;
    group.partsPlaced -= 1;
    group.fitByProvider.delete(placement!.provider);
    this.current = Math.min(this.current, this.progress.indexOf(group));
    if (this.finished?.kind === "done") this.finished = undefined;
  }

  placements(): readonly Placement[] {
    return [...this.placed];
  }

  /** The next thing to do. Call again after doing it (or after `wait.untilMs`). */
  next(): BidAction {
    if (this.finished !== undefined) return this.finished;
    const ask = this.openAsk;
    if (ask !== undefined) {
      const now = this.options.now();
      if (now < ask.closesAtMs) return { kind: "wait", untilMs: ask.closesAtMs };
      this.openAsk = undefined;
      return this.judge(ask);
    }
    const group = this.progress[this.current];
    if (group === undefined) {
      this.finished = { kind: "done", placements: this.placements() };
      return this.finished;
    }
    return this.post(group);
  }

  private post(group: GroupProgress): BidAction {
    const knownFit = largestFit(group);
    let purpose: AskPurpose;
    let nodes: number;
    if (knownFit === 0) {
      purpose = "probe";
      nodes = 1;
    } else if (knownFit >= group.remainingNodes) {
      purpose = "place";
      nodes = group.remainingNodes;
    } else if (group.smallestFailedSize === undefined || group.smallestFailedSize - knownFit > 1) {
      const ceiling = group.smallestFailedSize === undefined ? knownFit * 2 : Math.floor((knownFit + group.smallestFailedSize) / 2);
      nodes = Math.min(group.remainingNodes, ceiling);
      purpose = nodes === group.remainingNodes ? "place" : "grow";
    } else {
      // No provider fits more than knownFit nodes: lease the rest in parts of about that size.
      const parts = Math.ceil(group.remainingNodes / knownFit);
      nodes = splitGroup({ ...group.shape, nodes: group.remainingNodes }, parts)[0]!.nodes;
      purpose = "place";
    }
    // A probe of a one-node group is already the whole group: lease it if a bid comes.
    if (purpose === "probe" && group.remainingNodes === 1) purpose = "place";
    const ceiling = group.ceilings[group.priceStep]!;
    const askId = `${group.wanted.name}#${++this.askCounter}`;
    const name = purpose === "place" && nodes === group.remainingNodes && group.partsPlaced === 0
      ? group.wanted.name
      : `${group.wanted.name}-p${group.partsPlaced + 1}`;
    const deployed: CompiledAkashGroup = { ...group.shape, name, nodes, maxPrice: { ...group.shape.maxPrice, amount: ceiling } };
    const closesAtMs = this.options.now() + this.options.bidWindowMs;
    this.openAsk = { askId, purpose, group: deployed, ceiling, closesAtMs, bids: [] };
    return { kind: "post-ask", askId, wanted: group.wanted.name, purpose, group: deployed, priceCeiling: ceiling, closesAtMs };
  }

  private judge(ask: OpenAsk): BidAction {
    const group = this.progress[this.current]!;
    const eligible: ObservedBid[] = [];
    for (const bid of ask.bids) {
      const why = whyBidRejected(bid, ask.group, ask.ceiling);
      if (why === undefined) eligible.push(bid);
      else group.rejections.push({ provider: bid.provider, askId: ask.askId, why });
    }
    const size = ask.group.nodes;

    if (eligible.length === 0) {
      group.smallestFailedSize = Math.min(group.smallestFailedSize ?? Infinity, size);
      for (const [provider, fit] of group.fitByProvider) {
        if (fit >= size) {
          if (size - 1 > 0) group.fitByProvider.set(provider, size - 1);
          else group.fitByProvider.delete(provider);
        }
      }
      if (size === 1) {
        // Nobody takes a single node: the price, or this node shape, is the problem.
        group.smallestFailedSize = undefined;
        if (group.priceStep < group.ceilings.length - 1) {
          group.priceStep += 1;
        } else if (!this.reshape(group)) {
          return this.giveUp(group, ask);
        }
      }
      return { kind: "close-ask", askId: ask.askId, reason: `no acceptable bid on ${size} node(s) at ${ask.ceiling} ${ask.group.maxPrice.denom}` };
    }

    for (const bid of eligible) group.fitByProvider.set(bid.provider, Math.max(group.fitByProvider.get(bid.provider) ?? 0, size));
    if (ask.purpose !== "place") {
      return { kind: "close-ask", askId: ask.askId, reason: `${ask.purpose} ask of ${size} node(s) drew ${eligible.length} bid(s); growing` };
    }

    const usedElsewhere = new Set(this.placed.filter((placement) => placement.wanted !== group.wanted.name).map((placement) => placement.provider));
    const chosen = [...eligible].sort(
      (a, b) =>
        Number(usedElsewhere.has(a.provider)) - Number(usedElsewhere.has(b.provider)) ||
        compareDecimal(a.price, b.price) ||
        a.provider.localeCompare(b.provider),
    )[0]!;
    this.placed.push({ wanted: group.wanted.name, askId: ask.askId, part: ask.group, provider: chosen.provider, price: chosen.price });
    group.partsPlaced += 1;
    group.remainingNodes -= size;
    // The chosen provider's fit is kept, optimistically: it may have room for another
    // part, and if not, the failed ask lowers what we believe it fits.
    group.smallestFailedSize = undefined;
    if (group.remainingNodes === 0) this.current += 1;
    return { kind: "accept-bid", askId: ask.askId, wanted: group.wanted.name, part: ask.group, bid: chosen };
  }

  /**
   * Nodes of fewer GPUs, when providers advertise the model with free GPUs on a machine
   * fewer than a node needs (fragmentation inside providers). Only on evidence: without
   * advertisements a reshape is a guess, and a wrong one doubles the nodes to coordinate.
   */
  private reshape(group: GroupProgress): boolean {
    const perNode = group.shape.gpu.perNode;
    const largestSlice = Math.max(
      0,
      ...this.matchingGpus(group.shape).map(({ gpu }) => gpu.largestFreePerMachine).filter((free) => free < perNode),
    );
    for (let candidate = Math.min(largestSlice, perNode - 1); candidate >= 1; candidate -= 1) {
      if (perNode % candidate !== 0) continue;
      try {
        const reshaped = reshapeGroup({ ...group.shape, nodes: group.remainingNodes }, candidate);
        group.reshapedFrom.push(perNode);
        group.shape = reshaped;
        group.remainingNodes = reshaped.nodes;
        group.ceilings = this.priceLadder(reshaped.maxPrice.amount);
        group.priceStep = group.ceilings.length - 1;
        group.fitByProvider.clear();
        group.smallestFailedSize = undefined;
        return true;
      } catch {
        continue;
      }
    }
    return false;
  }

  private giveUp(group: GroupProgress, ask: OpenAsk): BidAction {
    const shape = group.reshapedFrom.length > 0 ? { ...group.shape, gpu: { ...group.shape.gpu, perNode: group.reshapedFrom[0]! } } : group.shape;
    const diagnosis = this.diagnose(shape, group.rejections);
    const message =
      `no provider bid on group "${group.wanted.name}" (${shape.gpu.perNode}x ${modelList(shape)} per node) up to ` +
      `${shape.maxPrice.amount} ${shape.maxPrice.denom} per node per block: ${diagnosis.map(describeDiagnosis).join("; ")}`;
    this.finished = { kind: "give-up", wanted: group.wanted.name, diagnosis, message };
    // The open ask still exists on chain; close it first, then report the give-up.
    return { kind: "close-ask", askId: ask.askId, reason: message };
  }

  /** Why no provider bids on one node of `group`, from what providers advertise. */
  diagnose(group: CompiledAkashGroup, rejections: readonly RejectedBid[] = []): NoBidDiagnosis[] {
    const diagnosis: NoBidDiagnosis[] = [];
    const matching = this.matchingGpus(group);
    if (this.advertisements.size === 0) {
      diagnosis.push({ reason: "no-advertisements" });
    } else if (matching.length === 0) {
      for (const wanted of group.gpu.models) {
        const otherTags: Array<{ provider: string; tag: string }> = [];
        for (const advertisement of this.advertisements.values()) {
          for (const gpu of advertisement.gpus) {
            if (gpu.tag !== wanted.model && slugOf(gpu.tag) === wanted.model) otherTags.push({ provider: advertisement.provider, tag: gpu.tag });
          }
        }
        if (otherTags.length > 0) diagnosis.push({ reason: "model-published-under-other-tag", model: wanted.model, providers: otherTags });
      }
      if (diagnosis.length === 0) diagnosis.push({ reason: "no-provider-advertises-model", models: group.gpu.models.map((model) => model.model) });
    } else {
      const excluded: Array<{ provider: string; why: string }> = [];
      const withoutRam: string[] = [];
      const tooSmall: Array<{ provider: string; largestFreePerMachine: number }> = [];
      const shouldBid: Array<{ advertisement: ProviderAdvertisement; askingPricePerNode?: string }> = [];
      const byProvider = new Map<string, { advertisement: ProviderAdvertisement; largestFree: number }>();
      for (const { advertisement, gpu } of matching) {
        const seen = byProvider.get(advertisement.provider);
        byProvider.set(advertisement.provider, { advertisement, largestFree: Math.max(seen?.largestFree ?? 0, gpu.largestFreePerMachine) });
      }
      for (const { advertisement, largestFree } of byProvider.values()) {
        const why = whyExcluded(group, advertisement);
        if (why !== undefined) excluded.push({ provider: advertisement.provider, why });
        else if (!advertisement.storageClasses.includes("ram")) withoutRam.push(advertisement.provider);
        else if (largestFree < group.gpu.perNode) tooSmall.push({ provider: advertisement.provider, largestFreePerMachine: largestFree });
        else {
          const asking = advertisement.askingPricePerGpu === undefined ? undefined : scaleDecimal(advertisement.askingPricePerGpu, group.gpu.perNode, 1);
          shouldBid.push({ advertisement, ...(asking === undefined ? {} : { askingPricePerNode: asking }) });
        }
      }
      if (excluded.length > 0) diagnosis.push({ reason: "providers-excluded", providers: excluded });
      if (withoutRam.length > 0) diagnosis.push({ reason: "storage-class-unsupported", storageClass: "ram", providers: withoutRam });
      if (tooSmall.length > 0) diagnosis.push({ reason: "insufficient-capacity", gpusPerNode: group.gpu.perNode, providers: tooSmall });
      const max = group.maxPrice.amount;
      const overMax = shouldBid.filter((entry) => entry.askingPricePerNode !== undefined && compareDecimal(entry.askingPricePerNode, max) > 0);
      const unpriced = shouldBid.filter((entry) => entry.askingPricePerNode === undefined);
      const cheapEnough = shouldBid.filter((entry) => entry.askingPricePerNode !== undefined && compareDecimal(entry.askingPricePerNode, max) <= 0);
      if (overMax.length > 0 || unpriced.length > 0) {
        diagnosis.push({
          reason: "price-too-low",
          maxPrice: max,
          denom: group.maxPrice.denom,
          // Certain only when every provider that could bid has told us a higher price.
          certain: unpriced.length === 0 && cheapEnough.length === 0,
          providers: [...overMax, ...unpriced].map((entry) => ({
            provider: entry.advertisement.provider,
            ...(entry.askingPricePerNode === undefined ? {} : { askingPricePerNode: entry.askingPricePerNode }),
          })),
        });
      }
      if (cheapEnough.length > 0) diagnosis.push({ reason: "silent-providers", providers: cheapEnough.map((entry) => entry.advertisement.provider) });
    }
    if (rejections.length > 0) diagnosis.push({ reason: "bids-rejected", rejections: [...rejections] });
    return diagnosis;
  }

  private matchingGpus(group: CompiledAkashGroup): Array<{ advertisement: ProviderAdvertisement; gpu: AdvertisedGpu }> {
    const matches: Array<{ advertisement: ProviderAdvertisement; gpu: AdvertisedGpu }> = [];
    for (const advertisement of this.advertisements.values()) {
      for (const gpu of advertisement.gpus) {
        if (gpuSatisfies(group, gpu.tag, gpu.ram, gpu.interface)) matches.push({ advertisement, gpu });
      }
    }
    return matches;
  }

  private priceLadder(maxAmount: string): string[] {
    const steps = this.options.priceSteps;
    const first = this.options.initialPricePercent;
    if (steps === 1) return [maxAmount];
    // Evenly from first% to 100% of the maximum; the last step is the maximum itself, exactly.
    return Array.from({ length: steps }, (_, step) => {
      if (step === steps - 1) return maxAmount;
      const percentTimesSteps = first * (steps - 1) + (100 - first) * step;
      return scaleDecimal(maxAmount, percentTimesSteps, 100 * (steps - 1));
    });
  }
}

function totalGpus(group: CompiledAkashGroup): number {
  return group.nodes * group.gpu.perNode;
}

function largestFit(group: GroupProgress): number {
  return Math.max(0, ...group.fitByProvider.values());
}

function slugOf(tag: string): string | undefined {
  try {
    return normalizeGpuModel(tag).model;
  } catch {
    return undefined;
  }
}

/** Providers match SDL GPU attributes literally; ram/interface only count when both sides name them. */
function gpuSatisfies(group: CompiledAkashGroup, tag: string, ram: string | undefined, gpuInterface: string | undefined): boolean {
  return group.gpu.models.some(
    (model) =>
      model.model === tag &&
      (model.ram === undefined || ram === undefined || model.ram === ram) &&
      (model.interface === undefined || gpuInterface === undefined || model.interface === gpuInterface),
  );
}

/** Why a bid is not acceptable for `group` at `ceiling` (filters, audit, GPU, price); undefined when it is. */
export function whyBidRejected(bid: ObservedBid, group: CompiledAkashGroup, ceiling: string): string | undefined {
  if (bid.denom !== group.maxPrice.denom) return `bid in ${bid.denom}, the group pays in ${group.maxPrice.denom}`;
  if (group.providers.deny.includes(bid.provider)) return "provider is in providers.deny";
  if (!isProviderAllowed(group, bid.provider)) return "provider is not in providers.allow";
  if (group.auditors.length > 0 && !bid.audited) return "provider is not audited by any of the group's auditors";
  if (!gpuSatisfies(group, bid.gpuModel, bid.gpuRam, bid.gpuInterface)) {
    const offered = [bid.gpuModel, bid.gpuRam, bid.gpuInterface].filter((part) => part !== undefined).join(" ");
    return `offers ${offered}, not ${modelList(group)}`;
  }
  if (compareDecimal(bid.price, ceiling) > 0) return `price ${bid.price} is above the ceiling ${ceiling}`;
  return undefined;
}

function whyExcluded(group: CompiledAkashGroup, advertisement: ProviderAdvertisement): string | undefined {
  if (group.providers.deny.includes(advertisement.provider)) return "in providers.deny";
  if (!isProviderAllowed(group, advertisement.provider)) return "not in providers.allow";
  if (group.auditors.length > 0 && !group.auditors.some((auditor) => advertisement.auditedBy.includes(auditor))) {
    return "not audited by any of the group's auditors";
  }
  for (const [key, value] of Object.entries(group.attributes)) {
    if (advertisement.attributes[key] !== value) return `attribute ${key}=${value} not advertised`;
  }
  return undefined;
}

function modelList(group: CompiledAkashGroup): string {
  return group.gpu.models.map((model) => [model.model, model.ram, model.interface].filter((part) => part !== undefined).join(" ")).join(" or ");
}

export function describeDiagnosis(diagnosis: NoBidDiagnosis): string {
  switch (diagnosis.reason) {
    case "no-provider-advertises-model":
      return `no provider advertises ${diagnosis.models.join(" or ")}`;
    case "no-advertisements":
      return "no provider advertisement was observed, so the cause is unknown (check the GPU model tag, the price and the ram storage class by hand)";
    case "model-published-under-other-tag":
      return `${diagnosis.providers.map((entry) => `${entry.provider} publishes "${entry.tag}"`).join(", ")}, not the tag "${diagnosis.model}" the SDL asks for, so they never match; ask them to publish "${diagnosis.model}"`;
    case "providers-excluded":
      return `providers with the model are excluded: ${diagnosis.providers.map((entry) => `${entry.provider} (${entry.why})`).join(", ")}`;
    case "insufficient-capacity":
      return `no machine has ${diagnosis.gpusPerNode} free GPUs: ${diagnosis.providers.map((entry) => `${entry.provider} has at most ${entry.largestFreePerMachine}`).join(", ")}`;
    case "storage-class-unsupported":
      return `${diagnosis.providers.join(", ")} do not offer the ram storage class that /dev/shm needs`;
    case "price-too-low": {
      const quoted = diagnosis.providers.filter((entry) => entry.askingPricePerNode !== undefined).map((entry) => `${entry.provider} asks ${entry.askingPricePerNode}`);
      const hedge = diagnosis.certain ? "the maximum price is too low" : "the maximum price is likely too low";
      return `${hedge} (${diagnosis.maxPrice} ${diagnosis.denom} per node per block${quoted.length > 0 ? `; ${quoted.join(", ")}` : ""}); raise maxPrice.amount`;
    }
    case "silent-providers":
      return `${diagnosis.providers.join(", ")} advertise enough capacity at an acceptable price but did not bid (offline, or their own limits)`;
    case "bids-rejected":
      return `bids were rejected: ${diagnosis.rejections.map((entry) => `${entry.provider} (${entry.why})`).join(", ")}`;
  }
}
