import { z } from "zod";
import { akashGroupListSchema, type CompiledAkashGroup } from "@drover/sdl";
import { durationMs } from "../../duration.js";

const akashAddress = z.string().regex(/^akash1[02-9ac-hj-np-z]{38}$/, "must be an akash1... bech32 address");
const httpUrl = z.string().regex(/^https?:\/\/[^\s/]+/, "must be an http(s):// URL");

/**
 * Escrow top-ups while the cluster runs: the chain closes a deployment whose escrow runs
 * dry, so the head deposits before it does.
 */
const akashEscrowSchema = z.object({
  /** How often each leased deployment's escrow is read. */
  checkInterval: durationMs.default(5 * 60_000),
  /** Top up when the escrow would run dry within this. */
  minRemaining: durationMs.default(2 * 3_600_000),
  /** Each top-up deposits enough to last this long. */
  target: durationMs.default(6 * 3_600_000),
  /** Block time assumed until the head has measured the chain's (Akash: about 6 s). */
  blockTime: durationMs.default(6_000),
}).strict().superRefine((escrow, ctx) => {
  if (escrow.checkInterval <= 0) ctx.addIssue({ code: "custom", path: ["checkInterval"], message: "must be longer than 0" });
  if (escrow.blockTime <= 0) ctx.addIssue({ code: "custom", path: ["blockTime"], message: "must be longer than 0" });
  if (escrow.target <= escrow.minRemaining) {
    ctx.addIssue({ code: "custom", path: ["target"], message: `(${escrow.target} ms) must be longer than minRemaining (${escrow.minRemaining} ms): a top-up must lift the escrow above the line that triggers it` });
  }
  if (escrow.checkInterval >= escrow.minRemaining) {
    ctx.addIssue({ code: "custom", path: ["checkInterval"], message: `(${escrow.checkInterval} ms) must be shorter than minRemaining (${escrow.minRemaining} ms), or the escrow may run dry between two checks` });
  }
});

/** The compiled `akash:` section. */
export interface AkashSpec {
  rpcUrl: string;
  groups: CompiledAkashGroup[];
  deposit: { amount: string; denom: string };
  gasPrice: string;
  bidWindowMs: number;
  pollIntervalMs: number;
  leaseReadyTimeoutMs: number;
  priceSteps?: number;
  initialPricePercent?: number;
  masterPort?: number;
  providerStatusUrls?: Record<string, string>;
  /** Escrow top-ups while the cluster runs. */
  escrow: { checkIntervalMs: number; minRemainingMs: number; targetMs: number; blockTimeMs: number };
}

/** Akash: how to reach the chain, what to rent, and how patiently to ask (README, "Akash"). */
export const akashSpecSchema = z.object({
  /** CometBFT RPC of an Akash node, e.g. https://rpc.akashnet.net:443 (or the simulator's). */
  rpc: httpUrl,
  /** Worker groups: one placement, one lease, one provider each (sdl/README.md). */
  groups: akashGroupListSchema,
  /** First escrow deposit of every deployment; the chain's minimum is 5 ACT/AKT. */
  deposit: z.object({
    amount: z.union([z.number().int().positive(), z.string().regex(/^[1-9]\d*$/, "must be a whole number of the smallest unit")]).transform(String),
    denom: z.string().regex(/^(uakt|uact|ibc\/[0-9A-F]{64})$/, "must be uakt, uact or an ibc/<hash> denom").default("uact"),
  }).strict().default({ amount: "5000000", denom: "uact" }),
  /** Fees are paid in AKT even when deployments pay in ACT. */
  gasPrice: z.string().regex(/^\d+(\.\d+)?[a-z][a-z0-9/]*$/, 'expected a gas price like "0.025uakt"').default("0.025uakt"),
  /** How long each ask collects bids before it is judged. */
  bidWindow: durationMs.default(60_000),
  /** How often bids, lease status and transaction inclusion are polled (a block is ~6 s). */
  pollInterval: durationMs.default(3_000),
  /** How long a leased group may take to report its services running. */
  leaseReadyTimeout: durationMs.default(15 * 60_000),
  /** Price ceilings tried from initialPricePercent of maxPrice up to maxPrice. */
  priceSteps: z.number().int().min(1).max(20).optional(),
  initialPricePercent: z.number().int().min(1).max(100).optional(),
  /** MASTER_PORT inside a group; the group's ports must let it through leader <- workers. */
  masterPort: z.number().int().min(1).max(65_535).optional(),
  /** Provider status endpoints (address -> URL), read to explain missing bids. */
  providerStatusUrls: z.record(akashAddress, httpUrl).optional(),
  escrow: akashEscrowSchema.prefault({}),
}).strict().superRefine((akash, ctx) => {
  const payDenom = akash.groups[0]?.maxPrice.denom;
  if (payDenom !== undefined && akash.deposit.denom !== payDenom) {
    ctx.addIssue({ code: "custom", path: ["deposit", "denom"], message: `is ${akash.deposit.denom} but the groups pay in ${payDenom}; the escrow pays the leases, so they must match` });
  }
}).transform((akash): AkashSpec => ({
  rpcUrl: akash.rpc,
  groups: akash.groups,
  deposit: akash.deposit,
  gasPrice: akash.gasPrice,
  bidWindowMs: akash.bidWindow,
  pollIntervalMs: akash.pollInterval,
  leaseReadyTimeoutMs: akash.leaseReadyTimeout,
  ...(akash.priceSteps === undefined ? {} : { priceSteps: akash.priceSteps }),
  ...(akash.initialPricePercent === undefined ? {} : { initialPricePercent: akash.initialPricePercent }),
  ...(akash.masterPort === undefined ? {} : { masterPort: akash.masterPort }),
  ...(akash.providerStatusUrls === undefined ? {} : { providerStatusUrls: akash.providerStatusUrls }),
  escrow: {
    checkIntervalMs: akash.escrow.checkInterval,
    minRemainingMs: akash.escrow.minRemaining,
    targetMs: akash.escrow.target,
    blockTimeMs: akash.escrow.blockTime,
  },
}));
