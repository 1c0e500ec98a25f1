// A model of how an Akash provider decides to bid, close enough to the real provider's
// bid engine to exercise the bid strategy: literal GPU tag matching, placement attributes,
// auditor signatures, the ram storage class for /dev/shm, replicas packed onto machines
// (a node never spans machines), a price per GPU, and the quirks AT-1 met (bidding only
// on small asks, slow or missing bids). Pure: the HTTP simulator and the strategy tests
// share it.

import type { CompiledAkashGroup } from "@drover/sdl";
import { compareDecimal, multiplyDecimal } from "../market/decimal-price.js";
import type { ProviderAdvertisement } from "../market/market-observations.js";

export interface SimulatedMachine {
  /** Free GPUs on this machine. */
  gpus: number;
}

export interface SimulatedProviderConfig {
  readonly address: string;
  readonly auditedBy?: readonly string[];
  readonly attributes?: Readonly<Record<string, string>>;
  /**
   * GPU tags published, literally (e.g. "a100", or a provider's own "nvidia-a100"). A list
   * for a provider with several models; its machines are then modelled as taking any of them.
   */
  readonly gpuTag: string | readonly string[];
  readonly gpuRam?: string;
  readonly gpuInterface?: "pcie" | "sxm";
  readonly machines: readonly SimulatedMachine[];
  readonly storageClasses?: readonly string[];
  /** Asking price per GPU per block. */
  readonly pricePerGpu: string;
  /** Bids only on asks of at most this many nodes (providers wary of large leases). */
  readonly maxAskNodes?: number;
  /** Delay before the bid appears. */
  readonly bidDelayMs?: number;
  /** Never bids, although it advertises capacity (an offline bid engine). */
  readonly silent?: boolean;
  /** Whether its status endpoint states its price (for diagnosis only). */
  readonly publishesPrice?: boolean;
}

/** An order as a provider's bid engine sees it: from a compiled group, or from a GroupSpec on chain. */
export interface SimulatedAsk {
  readonly nodes: number;
  readonly gpusPerNode: number;
  readonly gpuModels: ReadonlyArray<{ readonly model: string; readonly ram?: string; readonly interface?: string }>;
  readonly attributes: Readonly<Record<string, string>>;
  readonly auditors: readonly string[];
  /** Storage classes the ask's volumes need ("ram" for /dev/shm). */
  readonly storageClasses: readonly string[];
  /** Per node per block. */
  readonly priceCeiling: string;
  readonly denom: string;
}

export function askFromGroup(group: CompiledAkashGroup): SimulatedAsk {
  return {
    nodes: group.nodes,
    gpusPerNode: group.gpu.perNode,
    gpuModels: group.gpu.models,
    attributes: group.attributes,
    auditors: group.auditors,
    storageClasses: ["ram"],
    priceCeiling: group.maxPrice.amount,
    denom: group.maxPrice.denom,
  };
}

export interface SimulatedBidDecision {
  readonly price: string;
  readonly gpuModel: string;
  readonly gpuRam?: string;
  readonly gpuInterface?: "pcie" | "sxm";
  readonly delayMs: number;
}

export class SimulatedProvider {
  readonly machines: SimulatedMachine[];

  constructor(readonly config: SimulatedProviderConfig) {
    this.machines = config.machines.map((machine) => ({ ...machine }));
  }

  get address(): string {
    return this.config.address;
  }

  get gpuTags(): readonly string[] {
    return typeof this.config.gpuTag === "string" ? [this.config.gpuTag] : this.config.gpuTag;
  }

  /** The bid this provider would place on `ask`, or why not. */
  decide(ask: SimulatedAsk): SimulatedBidDecision | { readonly declined: string } {
    const config = this.config;
    if (config.silent) return { declined: "bid engine offline" };
    const tags = this.gpuTags;
    const model = ask.gpuModels.find(
      (wanted) =>
        tags.includes(wanted.model) &&
        (wanted.ram === undefined || wanted.ram === config.gpuRam) &&
        (wanted.interface === undefined || wanted.interface === config.gpuInterface),
    );
    if (model === undefined) return { declined: `publishes ${tags.join(", ")}` };
    for (const [key, value] of Object.entries(ask.attributes)) {
      if (config.attributes?.[key] !== value) return { declined: `lacks attribute ${key}=${value}` };
    }
    if (ask.auditors.length > 0 && !ask.auditors.some((auditor) => config.auditedBy?.includes(auditor))) {
      return { declined: "not audited by a requested auditor" };
    }
    const offered = config.storageClasses ?? ["beta3", "ram"];
    const missing = ask.storageClasses.find((storageClass) => !offered.includes(storageClass));
    if (missing !== undefined) return { declined: `no ${missing} storage class` };
    if (config.maxAskNodes !== undefined && ask.nodes > config.maxAskNodes) return { declined: "ask too large for its policy" };
    if (this.replicasThatFit(ask.gpusPerNode) < ask.nodes) return { declined: "not enough free GPUs per machine" };
    const price = multiplyDecimal(config.pricePerGpu, ask.gpusPerNode);
    if (compareDecimal(price, ask.priceCeiling) > 0) return { declined: `asks ${price}, above ${ask.priceCeiling}` };
    return {
      price,
      gpuModel: model.model,
      ...(config.gpuRam === undefined ? {} : { gpuRam: config.gpuRam }),
      ...(config.gpuInterface === undefined ? {} : { gpuInterface: config.gpuInterface }),
      delayMs: config.bidDelayMs ?? 0,
    };
  }

  /** Takes the GPUs of a lease; false when they no longer fit (the market moved). */
  allocate(nodes: number, gpusPerNode: number): boolean {
    if (this.replicasThatFit(gpusPerNode) < nodes) return false;
    let left = nodes;
    for (const machine of this.machines) {
      while (left > 0 && machine.gpus >= gpusPerNode) {
        machine.gpus -= gpusPerNode;
        left -= 1;
      }
    }
    return true;
  }

  release(nodes: number, gpusPerNode: number): void {
    // Back to the machines with the fewest free GPUs first: they are where the lease was packed.
    let left = nodes;
    const original = this.config.machines;
    for (let index = 0; index < this.machines.length && left > 0; index += 1) {
      const machine = this.machines[index]!;
      while (left > 0 && machine.gpus + gpusPerNode <= original[index]!.gpus) {
        machine.gpus += gpusPerNode;
        left -= 1;
      }
    }
  }

  advertisement(): ProviderAdvertisement {
    const config = this.config;
    return {
      provider: config.address,
      auditedBy: config.auditedBy ?? [],
      attributes: config.attributes ?? {},
      gpus: this.gpuTags.map((tag) => ({
        tag,
        ...(config.gpuRam === undefined ? {} : { ram: config.gpuRam }),
        ...(config.gpuInterface === undefined ? {} : { interface: config.gpuInterface }),
        freeGpus: this.machines.reduce((sum, machine) => sum + machine.gpus, 0),
        largestFreePerMachine: Math.max(0, ...this.machines.map((machine) => machine.gpus)),
      })),
      storageClasses: config.storageClasses ?? ["beta3", "ram"],
      ...(config.publishesPrice ? { askingPricePerGpu: config.pricePerGpu } : {}),
    };
  }

  private replicasThatFit(gpusPerNode: number): number {
    return this.machines.reduce((sum, machine) => sum + Math.floor(machine.gpus / gpusPerNode), 0);
  }
}
