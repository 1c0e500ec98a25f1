// What a cluster has cost so far, from what the chain and the head know. Money is exact
// here: prices are decimal strings of a denomination's smallest unit (uakt, uact, or
// whatever unit a spec's node-hour price is written in), kept as bigints scaled by 1e18
// (decimal-price.ts); only the block time and image counts, which are measurements, are
// numbers. Pure: the head gathers the inputs (cost-tracker.ts) and writes the result.

import { CostInputError } from "../errors.js";
import { formatDecimal, parseDecimal, type ScaledDecimal } from "../provisioners/akash/market/decimal-price.js";

/** `<state>/cost.json`: the head's newest cost report (what `drover status` shows); the state store adds its formatVersion. */
export const COST_FILE = "cost.json";
/** Akash's nominal block time, used for the burn rate until two blocks far enough apart were seen. */
export const NOMINAL_BLOCK_TIME_MS = 6_000;
/** Fewer blocks between two samples than this measure the block time poorly (one block per tx in a burst). */
const MIN_BLOCKS_TO_MEASURE = 3;
const HOUR_MS = 3_600_000n;

export interface Price {
  /** Decimal string, at most 18 fractional digits. */
  readonly amount: string;
  readonly denom: string;
}

/** One Akash lease as the chain holds it. */
export interface LeaseOnChain {
  readonly provider: string;
  readonly dseq: string;
  readonly group: string;
  /** Per block, in `denom`. */
  readonly pricePerBlock: string;
  readonly denom: string;
  /** The height of the block that created the lease: it pays from the next block on. */
  readonly createdHeight: number;
  /**
   * What is left in the escrow of the lease's deployment, in `denom` (decimal string;
   * negative when overdrawn). The deployment's leases all draw from it.
   */
  readonly escrowLeft?: string;
}

export interface ChainBlock {
  readonly height: number;
  readonly timeMs: number;
}

/** A local or Kubernetes node, with the time it was up (registered to last seen, or now). */
export interface NodeUptime {
  readonly node: string;
  readonly group: string;
  readonly upMs: number;
}

/** What the cluster's jobs produced: images trained (an estimate when from img/s) and checkpoints committed. */
export interface TrainingOutput {
  readonly images: number;
  readonly committedCheckpoints: number;
}

export interface LeaseCost {
  readonly provider: string;
  readonly dseq: string;
  readonly group: string;
  readonly denom: string;
  readonly pricePerBlock: string;
  readonly createdHeight: number;
  readonly blocks: number;
  /** pricePerBlock x blocks, exact. */
  readonly spent: string;
  /** pricePerBlock x blocks per hour at the measured block time (rounded down). */
  readonly burnPerHour: string;
  /** The deployment's escrow left at the report's height, when the chain said. */
  readonly escrowLeft?: string;
  /**
   * Minutes until the deployment's leases drain escrowLeft at the measured block time
   * (rounded down to 0.1), as of the report; absent when nothing was said or nothing draws.
   */
  readonly escrowMinutesLeft?: number;
}

export interface NodeCost {
  readonly node: string;
  readonly group: string;
  readonly denom: string;
  readonly pricePerHour: string;
  readonly hours: number;
  readonly spent: string;
  readonly burnPerHour: string;
}

export interface DenomTotal {
  readonly denom: string;
  readonly spent: string;
  readonly burnPerHour: string;
  /** spent x 1000 / images; absent while no image was counted. */
  readonly per1kImages?: string;
  /** spent / committed checkpoints; absent while none was committed. */
  readonly perCheckpoint?: string;
}

/** What the heads before this one over the same state directory spent and trained, from their last report. */
export interface EarlierHeads {
  readonly spent: ReadonlyArray<{ readonly denom: string; readonly spent: string }>;
  readonly training: TrainingOutput;
}

export interface CostReport {
  readonly computedAtMs: number;
  /** Carried from heads that died under this cluster (a crash, kill -9): already in totals and training. */
  readonly earlier?: EarlierHeads;
  /** The chain's latest block when the lease figures were computed (Akash only). */
  readonly chain?: ChainBlock & { readonly blockTimeMs: number; readonly blockTimeMeasured: boolean };
  readonly leases: readonly LeaseCost[];
  readonly nodes: readonly NodeCost[];
  readonly totals: readonly DenomTotal[];
  readonly training: TrainingOutput;
}

/**
 * The chain's average block time from two of its blocks, or undefined when they are too
 * close to say (then the caller assumes NOMINAL_BLOCK_TIME_MS).
 */
export function measuredBlockTimeMs(earlier: ChainBlock | undefined, latest: ChainBlock): number | undefined {
  if (earlier === undefined || latest.height - earlier.height < MIN_BLOCKS_TO_MEASURE || latest.timeMs <= earlier.timeMs) return undefined;
  return (latest.timeMs - earlier.timeMs) / (latest.height - earlier.height);
}

/**
 * How long an escrow lasts: balance / (price per block x blocks per hour), i.e. balance /
 * price blocks of `blockTimeMs` each, in minutes rounded down to a tenth. Exact up to
 * that rounding (integers throughout); an overdrawn (negative) balance lasts 0; a price
 * of 0 never drains it (undefined).
 */
export function escrowMinutesLeft(balance: string, pricePerBlock: string, blockTimeMs: number): number | undefined {
  if (!(blockTimeMs > 0)) throw new CostInputError(`block time must be positive, got ${blockTimeMs}`);
  const price = parseDecimal(pricePerBlock);
  if (price === 0n) return undefined;
  const funds = balance.trim().startsWith("-") ? 0n : parseDecimal(balance);
  const blockMs = BigInt(Math.max(1, Math.round(blockTimeMs)));
  // Tenths of a minute: funds / price blocks x blockMs ms / 6000 ms.
  return Number((funds * blockMs) / (price * 6_000n)) / 10;
}

/** price x blocks, exact; a lease created at or after `height` has paid nothing yet. */
export function leaseCost(lease: LeaseOnChain, height: number, blockTimeMs: number, deploymentPricePerBlock?: string): LeaseCost {
  if (!Number.isInteger(height) || !Number.isInteger(lease.createdHeight)) throw new CostInputError(`heights must be integers (lease ${lease.dseq}: created ${lease.createdHeight}, now ${height})`);
  if (!(blockTimeMs > 0)) throw new CostInputError(`block time must be positive, got ${blockTimeMs}`);
  const price = parseDecimal(lease.pricePerBlock);
  const blocks = Math.max(0, height - lease.createdHeight);
  // Rounded to whole milliseconds so the rate stays integer math: 1 ms in 6 s is 0.02%.
  const blockMs = BigInt(Math.max(1, Math.round(blockTimeMs)));
  return {
    provider: lease.provider, dseq: lease.dseq, group: lease.group, denom: lease.denom,
    pricePerBlock: formatDecimal(price), createdHeight: lease.createdHeight, blocks,
    spent: formatDecimal(price * BigInt(blocks)),
    burnPerHour: formatDecimal((price * HOUR_MS) / blockMs),
    ...escrowFields(lease, deploymentPricePerBlock ?? formatDecimal(price), blockTimeMs),
  };
}

function escrowFields(lease: LeaseOnChain, deploymentPricePerBlock: string, blockTimeMs: number): Pick<LeaseCost, "escrowLeft" | "escrowMinutesLeft"> {
  if (lease.escrowLeft === undefined) return {};
  const minutes = escrowMinutesLeft(lease.escrowLeft, deploymentPricePerBlock, blockTimeMs);
  return { escrowLeft: formatSignedDecimal(lease.escrowLeft), ...(minutes === undefined ? {} : { escrowMinutesLeft: minutes }) };
}

/** A decimal string kept exact, its sign too (an overdrawn escrow is negative). */
function formatSignedDecimal(text: string): string {
  const trimmed = text.trim();
  return trimmed.startsWith("-") ? `-${formatDecimal(parseDecimal(trimmed.slice(1)))}` : formatDecimal(parseDecimal(trimmed));
}

/** Each deployment's price per block: the sum of its leases' (they all draw from its escrow). */
function deploymentPrices(leases: readonly LeaseOnChain[]): Map<string, string> {
  const sums = new Map<string, ScaledDecimal>();
  for (const lease of leases) sums.set(`${lease.dseq}/${lease.denom}`, (sums.get(`${lease.dseq}/${lease.denom}`) ?? 0n) + parseDecimal(lease.pricePerBlock));
  return new Map([...sums].map(([key, sum]) => [key, formatDecimal(sum)]));
}

/** pricePerHour x the node's up time (whole milliseconds), rounded down. */
export function nodeCost(node: NodeUptime, pricePerHour: Price, running: boolean): NodeCost {
  if (!Number.isFinite(node.upMs) || node.upMs < 0) throw new CostInputError(`node ${node.node}: up time must be >= 0, got ${node.upMs}`);
  const price = parseDecimal(pricePerHour.amount);
  const upMs = BigInt(Math.floor(node.upMs));
  return {
    node: node.node, group: node.group, denom: pricePerHour.denom, pricePerHour: formatDecimal(price),
    hours: node.upMs / 3_600_000,
    spent: formatDecimal((price * upMs) / HOUR_MS),
    burnPerHour: running ? formatDecimal(price) : "0",
  };
}

/** Everything per denomination: what was spent, what is burning, and what it bought. */
export function costReport(input: {
  computedAtMs: number;
  chain?: { latest: ChainBlock; earlier?: ChainBlock };
  leases?: readonly LeaseOnChain[];
  nodes?: ReadonlyArray<NodeUptime & { running: boolean }>;
  pricePerNodeHour?: Price;
  training: TrainingOutput;
  earlier?: EarlierHeads;
}): CostReport {
  const measured = input.chain && measuredBlockTimeMs(input.chain.earlier, input.chain.latest);
  const blockTimeMs = measured ?? NOMINAL_BLOCK_TIME_MS;
  const onChain = input.leases ?? [];
  const perDeployment = deploymentPrices(onChain);
  const leases = input.chain === undefined ? [] : onChain.map((lease) => leaseCost(lease, input.chain!.latest.height, blockTimeMs, perDeployment.get(`${lease.dseq}/${lease.denom}`)));
  const pricePerNodeHour = input.pricePerNodeHour;
  const nodes = pricePerNodeHour === undefined ? [] : (input.nodes ?? []).map((node) => nodeCost(node, pricePerNodeHour, node.running));
  const sums = new Map<string, { spent: ScaledDecimal; burn: ScaledDecimal }>();
  // What earlier heads paid is paid: it counts toward the totals, with no burn of its own.
  for (const item of [...(input.earlier?.spent ?? []).map((spent) => ({ ...spent, burnPerHour: "0" })), ...leases, ...nodes]) {
    const sum = sums.get(item.denom) ?? { spent: 0n, burn: 0n };
    sum.spent += parseDecimal(item.spent);
    sum.burn += parseDecimal(item.burnPerHour);
    sums.set(item.denom, sum);
  }
  const images = Math.floor(input.training.images + (input.earlier?.training.images ?? 0));
  const checkpoints = input.training.committedCheckpoints + (input.earlier?.training.committedCheckpoints ?? 0);
  const totals = [...sums.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([denom, sum]): DenomTotal => ({
    denom, spent: formatDecimal(sum.spent), burnPerHour: formatDecimal(sum.burn),
    ...(images > 0 ? { per1kImages: formatDecimal((sum.spent * 1_000n) / BigInt(images)) } : {}),
    ...(checkpoints > 0 ? { perCheckpoint: formatDecimal(sum.spent / BigInt(checkpoints)) } : {}),
  }));
  return {
    computedAtMs: input.computedAtMs,
    ...(input.earlier === undefined ? {} : { earlier: input.earlier }),
    ...(input.chain === undefined ? {} : { chain: { ...input.chain.latest, blockTimeMs, blockTimeMeasured: measured !== undefined } }),
    leases, nodes, totals,
    training: { images, committedCheckpoints: checkpoints },
  };
}

/** A decimal shortened for people (at most `digits` fractional digits, rounded down); the report keeps the exact one. */
export function shortDecimal(text: string, digits = 4): string {
  const [whole, fraction = ""] = text.split(".");
  const kept = fraction.slice(0, digits).replace(/0+$/, "");
  return kept === "" ? whole! : `${whole}.${kept}`;
}

function escrowText(lease: LeaseCost): string {
  if (lease.escrowLeft === undefined) return "";
  return `; escrow left ${shortDecimal(lease.escrowLeft)} ${lease.denom}${lease.escrowMinutesLeft === undefined ? "" : ` (~${formatMinutes(lease.escrowMinutesLeft)})`}`;
}

/** Minutes for people: "42.5 min", "3.2 h". */
export function formatMinutes(minutes: number): string {
  return minutes < 120 ? `${minutes.toFixed(1)} min` : `${(minutes / 60).toFixed(1)} h`;
}

/** The cost section of `drover status`, from a cost.json report. */
export function costLines(report: CostReport, nowMs: number): string[] {
  // A cluster with nothing priced (local nodes without cost.pricePerNodeHour) has no section.
  if (report.leases.length === 0 && report.nodes.length === 0 && (report.earlier?.spent.length ?? 0) === 0) return [];
  const age = Math.max(0, Math.round((nowMs - report.computedAtMs) / 1000));
  const lines: string[] = [];
  const chain = report.chain;
  const when = chain ? ` at height ${chain.height}, block time ${(chain.blockTimeMs / 1000).toFixed(2)}s${chain.blockTimeMeasured ? "" : " (assumed)"}` : "";
  lines.push(`cost: as the head computed it ${age}s ago${when}`);
  for (const lease of report.leases) {
    lines.push(`  lease ${lease.group} ${lease.provider} dseq ${lease.dseq}: ${lease.pricePerBlock} ${lease.denom}/block x ${lease.blocks} blocks = ${lease.spent} ${lease.denom}, burning ${shortDecimal(lease.burnPerHour)} ${lease.denom}/h${escrowText(lease)}`);
  }
  for (const node of report.nodes) {
    lines.push(`  node ${node.node} (${node.group}): ${node.pricePerHour} ${node.denom}/h x ${node.hours.toFixed(3)} h = ${shortDecimal(node.spent)} ${node.denom}`);
  }
  const earlier = report.earlier;
  if (earlier && earlier.spent.length > 0) {
    lines.push(`  earlier heads of this cluster (they died; their last report): ${earlier.spent.map((entry) => `${shortDecimal(entry.spent)} ${entry.denom}`).join(", ")}, ~${Math.floor(earlier.training.images)} images, ${earlier.training.committedCheckpoints} checkpoint(s)`);
  }
  const images = report.training.images;
  for (const total of report.totals) {
    const perImages = total.per1kImages === undefined ? "per 1k images: n/a (no images_per_s reported)" : `per 1k images ${shortDecimal(total.per1kImages)}`;
    const perCheckpoint = total.perCheckpoint === undefined ? "per checkpoint: n/a (none committed)" : `per checkpoint ${shortDecimal(total.perCheckpoint)}`;
    lines.push(`  total ${shortDecimal(total.spent)} ${total.denom}, burning ${shortDecimal(total.burnPerHour)} ${total.denom}/h; ${perImages}; ${perCheckpoint}`);
  }
  if (report.totals.length > 0) lines.push(`  trained ~${images} images, ${report.training.committedCheckpoints} checkpoint(s) committed`);
  return lines;
}
