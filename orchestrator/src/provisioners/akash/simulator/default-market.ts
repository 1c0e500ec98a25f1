// The provider set `drover akash-sim` starts with: a small market shaped like the one AT-1
// met, so that the bid strategy's paths show up against the simulator:
//   - an audited A100 80GB provider with room for whole 8-GPU nodes (Europlots' address);
//   - an RTX 4090 / 3090 provider for small, cheap groups;
//   - an A100 provider that only bids on one-node asks (wary of large leases);
//   - an A100 provider that advertises capacity but never bids (bid engine offline).
// Prices are per GPU per block in uact; examples/akash-sim.yaml and akash-at1.yaml clear them.

import { sha256 } from "@cosmjs/crypto";
import { toBech32 } from "@cosmjs/encoding";
import type { SimulatedProviderConfig } from "./simulated-provider.js";

/** Overclock Labs, the auditor AT-1's groups require. */
export const SIMULATED_AUDITOR = "akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63";

/** A valid-looking, deterministic provider address for a simulated provider's name. */
export function simulatedAddress(name: string): string {
  return toBech32("akash", sha256(new TextEncoder().encode(`drover-akash-sim/${name}`)).slice(0, 20));
}

export interface DescribedProvider {
  readonly description: string;
  readonly config: SimulatedProviderConfig;
}

export function defaultSimulatedMarket(): DescribedProvider[] {
  return [
    {
      description: "A100 80GB PCIe, 4 machines x 8 GPUs, audited, 2000 uact/GPU/block",
      config: {
        address: "akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc",
        auditedBy: [SIMULATED_AUDITOR],
        gpuTag: "a100",
        gpuRam: "80Gi",
        gpuInterface: "pcie",
        machines: [{ gpus: 8 }, { gpus: 8 }, { gpus: 8 }, { gpus: 8 }],
        pricePerGpu: "2000",
        bidDelayMs: 300,
        publishesPrice: true,
      },
    },
    {
      description: "RTX 4090 / RTX 3090, 4 machines x 4 GPUs, 300 uact/GPU/block",
      config: {
        address: simulatedAddress("rtx4090"),
        gpuTag: ["rtx4090", "rtx3090"],
        machines: [{ gpus: 4 }, { gpus: 4 }, { gpus: 4 }, { gpus: 4 }],
        pricePerGpu: "300",
        bidDelayMs: 200,
        publishesPrice: true,
      },
    },
    {
      description: "A100 80GB PCIe, 8 machines x 1 GPU, bids only on one-node asks, 2400 uact/GPU/block",
      config: {
        address: simulatedAddress("small-asks"),
        gpuTag: "a100",
        gpuRam: "80Gi",
        gpuInterface: "pcie",
        machines: Array.from({ length: 8 }, () => ({ gpus: 1 })),
        pricePerGpu: "2400",
        maxAskNodes: 1,
        bidDelayMs: 500,
      },
    },
    {
      description: "A100 80GB, 2 machines x 8 GPUs, never bids (bid engine offline)",
      config: {
        address: simulatedAddress("silent"),
        gpuTag: "a100",
        gpuRam: "80Gi",
        machines: [{ gpus: 8 }, { gpus: 8 }],
        pricePerGpu: "1500",
        silent: true,
      },
    },
  ];
}
