// What a cluster's leases cost, checked against the Akash simulator's books: `drover up`
// of a one-node spec against `drover akash-sim` (blocks every 300 ms), then cost.json,
// `drover status` and /metrics must show each lease's spend as price per block x blocks,
// and that figure must be what the simulated escrow drew, compared at the same height;
// a small deposit's escrow must show how long it lasts and raise the escrow alert.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { StateDirectory } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startAkashSimulator, type AkashSimulatorProcess } from "./akash-simulator-process.js";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");

let work: string;
let stateDir: string;
let walletFile: string;
let simulator: AkashSimulatorProcess;
let rpcUrl: string;
let owner: string;

const env = () => ({ ...process.env, DROVER_STATE_DIR: stateDir, DROVER_AKASH_MNEMONIC_FILE: walletFile });

function drover(args: string[], timeoutMs = 60_000) {
  const result = spawnSync(process.execPath, [cli, ...args], { env: env(), encoding: "utf8", timeout: timeoutMs });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}

interface Books {
  height: number;
  deployments: Array<{ dseq: string; escrow: string; transferred: string; denom: string }>;
  leases: Array<{ dseq: string; provider: string; price: string; denom: string; createdHeight: number }>;
}

async function books(): Promise<Books> {
  const response = await fetch(`${rpcUrl}/simulator/books?owner=${owner}`, { signal: AbortSignal.timeout(5_000) });
  expect(response.status).toBe(200);
  return (await response.json()) as Books;
}

interface CostFile {
  computedAtMs: number;
  chain: { height: number; blockTimeMs: number };
  leases: Array<{ provider: string; dseq: string; denom: string; pricePerBlock: string; createdHeight: number; blocks: number; spent: string; escrowLeft?: string; escrowMinutesLeft?: number }>;
  totals: Array<{ denom: string; spent: string }>;
}

describe("lease cost against the Akash simulator's books", { timeout: 90_000 }, () => {
  beforeAll(async () => {
    work = await mkdtemp(join(os.tmpdir(), "drover-cost-e2e-"));
    stateDir = join(work, "state");
    simulator = await startAkashSimulator(work, stateDir, ["--block-time", "300ms"]);
    ({ walletFile, rpcUrl, owner } = simulator);
  });

  afterAll(async () => {
    if (existsSync(join(stateDir, "head.json"))) drover(["down"]);
    await simulator.stop();
    await rm(work, { recursive: true, force: true });
  });

  it("shows spent = price per block x blocks for each lease, as the escrow drew it, in cost.json, status and /metrics", async () => {
    const specFile = join(work, "cost.yaml");
    // One node of the example's RTX group: one lease, one fake container.
    await writeFile(specFile, [
      "name: cost-e2e", "provisioner: akash", "akash:", `  rpc: ${rpcUrl}`, "  bidWindow: 800ms", "  pollInterval: 100ms", "  leaseReadyTimeout: 30s", "  groups:",
      "    - { name: sim-4090, nodes: 1, gpu: { model: [4090, rtx3090], perNode: 1 }, cpu: 2, memory: 8Gi, ephemeralStorage: 10Gi, shm: 1Gi, image: ghcr.io/drover/worker:0.1.0, maxPrice: { amount: 1000 } }",
    ].join("\n"));
    const up = drover(["up", specFile]);
    try {
      expect(up.code, up.stdout + up.stderr).toBe(0);
      const state = new StateDirectory(stateDir);
      // The head prices its leases as soon as they are up.
      await waitFor(async () => ((await state.readJson<CostFile>("cost.json"))?.leases.length ?? 0) > 0, 20_000, "cost.json with the lease");
      const cost = (await state.readJson<CostFile>("cost.json"))!;
      const onChain = await books();
      expect(cost.leases).toHaveLength(1);
      expect(onChain.leases).toHaveLength(1);
      const [lease] = cost.leases;
      const [booked] = onChain.leases;
      expect({ provider: lease!.provider, dseq: lease!.dseq, denom: lease!.denom, pricePerBlock: lease!.pricePerBlock, createdHeight: lease!.createdHeight })
        .toEqual({ provider: booked!.provider, dseq: booked!.dseq, denom: booked!.denom, pricePerBlock: booked!.price, createdHeight: booked!.createdHeight });
      // At cost.json's height the books say price x (height - the lease's height) ...
      const price = BigInt(booked!.price);
      expect(lease!.blocks).toBe(cost.chain.height - booked!.createdHeight);
      expect(BigInt(lease!.spent)).toBe(price * BigInt(cost.chain.height - booked!.createdHeight));
      // ... and the escrow drew exactly that, plus the price of each block since.
      const escrow = onChain.deployments.find((deployment) => deployment.dseq === booked!.dseq)!;
      expect(onChain.height).toBeGreaterThanOrEqual(cost.chain.height);
      expect(BigInt(escrow.transferred)).toBe(BigInt(lease!.spent) + price * BigInt(onChain.height - cost.chain.height));
      expect(cost.totals).toEqual([expect.objectContaining({ denom: booked!.denom, spent: lease!.spent })]);

      const status = drover(["status"]);
      expect(status.code, status.stderr).toBe(0);
      expect(status.stdout).toMatch(/^cost: as the head computed it \d+s ago at height \d+, block time \d+\.\d\ds/m);
      expect(status.stdout).toMatch(new RegExp(`lease sim-4090 ${booked!.provider} dseq ${booked!.dseq}: ${booked!.price} ${booked!.denom}/block x \\d+ blocks = \\d+ ${booked!.denom}, burning \\d+`));
      expect(status.stdout).toContain("per checkpoint: n/a (none committed)");

      const { url } = (await state.readJson<{ url: string }>("metrics.json"))!;
      const metrics = await (await fetch(url, { signal: AbortSignal.timeout(5_000) })).text();
      expect(metrics).toMatch(new RegExp(`^drover_lease_spend_total\\{provider="${booked!.provider}",dseq="${booked!.dseq}",denom="${booked!.denom}"\\} \\d+$`, "m"));
      expect(metrics).toContain(`drover_lease_price_per_block{provider="${booked!.provider}",dseq="${booked!.dseq}",denom="${booked!.denom}"} ${booked!.price}`);
    } finally {
      const down = drover(["down"]);
      expect(down.code, down.stdout + down.stderr).toBe(0);
    }
    // The figures outlive the head: its last report, taken before the leases closed.
    const after = drover(["status"]);
    expect(after.stdout).toMatch(/^cost: as the head computed it \d+s ago at height \d+/m);
    expect((await books()).leases).toEqual([]);
  });

  it("warns in status, the head log and cost.json when a lease's escrow runs out within head.alerts.escrowMinutes", async () => {
    // A state directory of its own: the first test's cost.json must not answer for this cluster.
    stateDir = join(work, "state-escrow");
    const specFile = join(work, "escrow.yaml");
    // 1 ACT of deposit lasts minutes at 300 ms blocks. The escrow keeper checks again only
    // after its 5 minute interval (its first check, at the nominal 6 s block time, saw
    // hours), so here the escrow drains as it does when the wallet cannot pay a top-up.
    // The threshold is above what the first report says at the nominal block time too.
    await writeFile(specFile, [
      "name: escrow-e2e", "provisioner: akash", "head:", "  alerts:", "    escrowMinutes: 600",
      "akash:", `  rpc: ${rpcUrl}`, "  bidWindow: 800ms", "  pollInterval: 100ms", "  leaseReadyTimeout: 30s", "  deposit: { amount: 1000000, denom: uact }", "  groups:",
      "    - { name: sim-4090, nodes: 1, gpu: { model: [4090, rtx3090], perNode: 1 }, cpu: 2, memory: 8Gi, ephemeralStorage: 10Gi, shm: 1Gi, image: ghcr.io/drover/worker:0.1.0, maxPrice: { amount: 1000 } }",
    ].join("\n"));
    const up = drover(["up", specFile]);
    try {
      expect(up.code, up.stdout + up.stderr).toBe(0);
      const state = new StateDirectory(stateDir);
      await waitFor(async () => (await state.readJson<CostFile>("cost.json"))?.leases[0]?.escrowLeft !== undefined, 20_000, "cost.json with the lease's escrow");
      const cost = (await state.readJson<CostFile>("cost.json"))!;
      const onChain = await books();
      const [lease] = cost.leases;
      const booked = onChain.leases.find((candidate) => candidate.dseq === lease!.dseq)!;
      const escrow = onChain.deployments.find((deployment) => deployment.dseq === lease!.dseq)!;
      // What the escrow held at cost.json's height: what it holds now plus the blocks drawn since.
      const price = BigInt(booked.price);
      expect(BigInt(lease!.escrowLeft!)).toBe(BigInt(escrow.escrow) + price * BigInt(onChain.height - cost.chain.height));
      // At most the deposit: the first report may come at the lease's own height, before any block drew on it.
      expect(BigInt(lease!.escrowLeft!)).toBeLessThanOrEqual(1_000_000n);
      // balance / price blocks of the report's block time, in tenths of a minute.
      const blockMs = BigInt(Math.round(cost.chain.blockTimeMs));
      expect(lease!.escrowMinutesLeft).toBe(Number((BigInt(lease!.escrowLeft!) * blockMs) / (price * 6_000n)) / 10);
      expect(lease!.escrowMinutesLeft).toBeLessThan(600);

      const warning = new RegExp(`^warning: lease sim-4090 dseq ${booked.dseq} \\(${booked.provider}\\): its escrow runs out in about \\d+\\.\\d min \\(\\d+ uact left at \\d+ uact/h; threshold 600 min\\)\\. The head tops escrows up when the wallet can pay, so the wallet is likely empty`, "m");
      const status = drover(["status"]);
      expect(status.code, status.stderr).toBe(0);
      expect(status.stdout).toMatch(warning);
      expect(status.stdout).toMatch(new RegExp(`lease sim-4090 ${booked.provider} dseq ${booked.dseq}: .*; escrow left \\d+ uact \\(~\\d+\\.\\d (min|h)\\)`));
      // The head logs it once when raised (it checks every 5 s).
      await waitFor(async () => (await readFile(join(stateDir, "head.log"), "utf8").catch(() => "")).includes(`alert: lease sim-4090 dseq ${booked.dseq}`), 15_000, "the alert in head.log");
      const raised = (await readFile(join(stateDir, "head.log"), "utf8")).split("\n").filter((line) => line.includes(`alert: lease sim-4090 dseq ${booked.dseq}`));
      expect(raised).toHaveLength(1);
    } finally {
      const down = drover(["down"]);
      expect(down.code, down.stdout + down.stderr).toBe(0);
    }
    // The head is gone and its leases closed: the last report's escrow warns no more.
    expect(drover(["status"]).stdout).not.toMatch(/^warning: lease /m);
  });
});
