// What the orchestrator can observe of the Akash market: the bids on its own orders, and
// what providers advertise about themselves (on chain: provider attributes and audits;
// off chain: the provider's status endpoint with its free GPUs and storage classes).
// The bid strategy reasons only over these; who fetched them, and how, is not its concern.

/** One bid on one of our asks (an order of one of our deployments). */
export interface ObservedBid {
  readonly askId: string;
  readonly provider: string;
  /** Per node per block, decimal string, in the ask's denomination. */
  readonly price: string;
  readonly denom: string;
  /** GPU slug the provider offers (from the bid's resource offer), e.g. "a100". */
  readonly gpuModel: string;
  readonly gpuRam?: string;
  readonly gpuInterface?: "pcie" | "sxm";
  /** Audited by one of the group's auditors (signedBy); always true when the group names none. */
  readonly audited: boolean;
}

/** A GPU model as a provider publishes it. */
export interface AdvertisedGpu {
  /**
   * The model tag exactly as published (`capabilities/gpu/vendor/nvidia/model/<tag>`).
   * Providers match SDL models against this literally, so a provider publishing
   * "nvidia-a100" never bids on an SDL asking for "a100" (AT-1 learned this by hand).
   */
  readonly tag: string;
  readonly ram?: string;
  readonly interface?: "pcie" | "sxm";
  /** GPUs of this model not leased, over all machines. */
  readonly freeGpus: number;
  /** Most free GPUs of this model on any single machine (a node cannot span machines). */
  readonly largestFreePerMachine: number;
}

/** What one provider advertises about itself. */
export interface ProviderAdvertisement {
  readonly provider: string;
  /** Auditor addresses that signed this provider's attributes. */
  readonly auditedBy: readonly string[];
  /** Placement attributes (region, tier, ...). */
  readonly attributes: Readonly<Record<string, string>>;
  readonly gpus: readonly AdvertisedGpu[];
  /** Storage classes the provider offers, e.g. "beta3", "ram" (needed for /dev/shm). */
  readonly storageClasses: readonly string[];
  /**
   * Price per GPU per block the provider quoted or publishes, when known (price lists,
   * past bids). Used only to explain missing bids; never to pick one.
   */
  readonly askingPricePerGpu?: string;
}
