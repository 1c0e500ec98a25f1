import type { ClusterSpec } from "../cluster-spec.js";
import { SpecError } from "../errors.js";
import { akashBackend } from "./akash-provisioner.js";
import { localBackend } from "./local-provisioner.js";
import type { ProvisionerBackend } from "./provisioner.js";

/** The one place concrete backends are registered; the head only sees the interface. */
export const provisionerBackends: Record<ClusterSpec["provisioner"], ProvisionerBackend> = {
  local: localBackend,
  akash: akashBackend((spec) => {
    const akash = spec.akash;
    // compileClusterSpec guarantees the section; a hand-built spec may not.
    if (akash === undefined) throw new SpecError(`cluster spec ${spec.source}: provisioner akash needs an akash: section`, { source: spec.source });
    return {
      groups: akash.groups,
      rpcUrl: akash.rpcUrl,
      deposit: akash.deposit,
      gasPrice: akash.gasPrice,
      bidWindowMs: akash.bidWindowMs,
      pollIntervalMs: akash.pollIntervalMs,
      // Inclusion is checked as often as bids: a second poll cadence would be one more knob.
      broadcastPollIntervalMs: akash.pollIntervalMs,
      leaseReadyTimeoutMs: akash.leaseReadyTimeoutMs,
      // A hand-built spec may leave it out: the keeper's defaults then apply.
      ...(akash.escrow === undefined ? {} : { escrow: akash.escrow }),
      ...(akash.priceSteps === undefined ? {} : { priceSteps: akash.priceSteps }),
      ...(akash.initialPricePercent === undefined ? {} : { initialPricePercent: akash.initialPricePercent }),
      ...(akash.masterPort === undefined ? {} : { masterPort: akash.masterPort }),
      ...(akash.providerStatusUrls === undefined ? {} : { providerStatusUrls: akash.providerStatusUrls }),
    };
  }),
};

export type { Provisioner, ProvisionerBackend, ProvisionContext, ProvisionedNode } from "./provisioner.js";
