import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { DirectSecp256k1HdWallet } from "@cosmjs/proto-signing";
import { parseAkashGroups, type AkashGroupInput } from "@drover/sdl";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { AkashSimulator } from "./simulator/akash-simulator.js";
import type { SimulatedProviderConfig } from "./simulator/simulated-provider.js";
import { ProvisionError } from "../../errors.js";
import { costReport } from "../../cost/run-cost.js";
import { LeaseLedger } from "./lease-ledger.js";
import { silentLogger, type Logger } from "../../logger.js";
import { StateDirectory } from "../../state-store.js";
import { AkashProvisioner, BlockTimeEstimate, akashBackend, planTopUp, resolveAkashMnemonic, type AkashProvisionerConfig } from "./akash-provisioner.js";
import { JoinTokenBook } from "../../join-tokens.js";

const A100_PROVIDER = "akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc";
const RTX_PROVIDER = "akash17gqmzu0lnh2uclx9flm755arylrhgqy7udj3el";
let simulator: AkashSimulator | undefined;
let root: string;
let state: StateDirectory;
let mnemonic: string;
let owner: string;

const base = { cpu: 16, memory: "64Gi", image: "ghcr.io/drover/worker:0.1.0" };
const at1Groups = () =>
  parseAkashGroups([
    { ...base, name: "a100", nodes: 2, gpu: { model: "a100", perNode: 8 }, maxPrice: { amount: 2000, denom: "uact" } },
    { ...base, name: "rtx8000", nodes: 2, gpu: { model: "rtx8000", perNode: 4 }, maxPrice: { amount: 600, denom: "uact" } },
  ] satisfies AkashGroupInput[]);

const providers: SimulatedProviderConfig[] = [
  { address: A100_PROVIDER, gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }], pricePerGpu: "150" },
  { address: RTX_PROVIDER, gpuTag: "rtx8000", machines: [{ gpus: 4 }, { gpus: 4 }], pricePerGpu: "100" },
];

async function start(configs: SimulatedProviderConfig[], blockTimeMs?: number): Promise<AkashSimulator> {
  // These tests run no head for workers to join; services count as running once the manifest is in.
  simulator = await AkashSimulator.start({ providers: configs, containers: "none", ...(blockTimeMs === undefined ? {} : { blockTimeMs }) });
  simulator.chain.fund(owner, 10n ** 12n);
  return simulator;
}

function provisioner(sim: AkashSimulator, groups = at1Groups(), overrides: Partial<AkashProvisionerConfig> = {}): AkashProvisioner {
  return new AkashProvisioner(
    {
      groups,
      rpcUrl: sim.rpcUrl,
      deposit: { amount: "5000000", denom: "uact" },
      bidWindowMs: 150,
      pollIntervalMs: 20,
      broadcastPollIntervalMs: 5,
      providerStatusUrls: Object.fromEntries([...sim.providers.entries()].map(([address, entry]) => [address, `${entry.url}/status`])),
      ...overrides,
    },
    async () => mnemonic,
  );
}

const context = (signal: AbortSignal = AbortSignal.timeout(25_000), logger: Logger = silentLogger) => ({
  headAddress: "head.example:7070", joinTokens: new JoinTokenBook(), agentEnv: {}, state, logger, signal,
});

beforeEach(async () => {
  root = await mkdtemp(join(os.tmpdir(), "drover-akash-"));
  state = new StateDirectory(root);
  const wallet = await DirectSecp256k1HdWallet.generate(24, { prefix: "akash" });
  mnemonic = wallet.mnemonic;
  owner = (await wallet.getAccounts())[0]!.address;
});

afterEach(async () => {
  await simulator?.stop();
  simulator = undefined;
  await rm(root, { recursive: true, force: true });
});

describe("AkashProvisioner against the simulator", () => {
  it("leases AT-1's two groups at two providers, starts them, and closes everything on shutdown", async () => {
    const sim = await start(providers);
    const akash = provisioner(sim);
    const nodes = await akash.provision(context());
    expect(nodes.map((node) => [node.id.replace(/-\d+-(\d+)$/, "-$1"), node.group])).toEqual([
      ["a100-leader-0", "a100"], ["a100-worker-0", "a100"], ["rtx8000-leader-0", "rtx8000"], ["rtx8000-worker-0", "rtx8000"],
    ]);
    // Each group's leader publishes its bridge: the port the provider forwards to 7447.
    for (const node of nodes) {
      expect(node.ports).toEqual(node.id.includes("-leader-") ? [{ name: "bridge", inside: 7447, outside: expect.stringMatching(/^127\.0\.0\.1:\d+$/) }] : []);
    }
    expect(await akash.nodes()).toEqual(nodes);
    const books = sim.chain.books(owner);
    expect(books.leases.map((lease) => [lease.provider, lease.nodes, lease.gpusPerNode])).toEqual([[A100_PROVIDER, 2, 8], [RTX_PROVIDER, 2, 4]]);
    // Probes and grow asks were closed; only the leased deployments remain.
    expect(books.deployments.map((d) => d.dseq).sort()).toEqual(books.leases.map((l) => l.dseq).sort());
    const manifest = sim.providers.get(A100_PROVIDER)!.server.manifests.get(`${owner}/${books.leases[0]!.dseq}`);
    expect(manifest?.[0]?.services.map((service) => service.name)).toEqual(["a100-leader", "a100-worker"]);
    // The leader is told the name the head knows its node (and forwarded bridge port) by; a
    // real provider's container is named by its pod, which the head cannot predict.
    const leaderId = nodes.find((node) => node.group === "a100" && node.id.includes("-leader-"))!.id;
    expect(manifest![0]!.services[0]!.env).toContain(`DROVER_NODE_NAME=${leaderId}`);
    expect(manifest![0]!.services[1]!.env?.some((entry) => entry.startsWith("DROVER_NODE_NAME="))).toBe(false);
    expect((await LeaseLedger.open(state)).pending()).toEqual([]);

    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
    expect(sim.chain.books(owner)).toMatchObject({ deployments: [], leases: [] });
    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
  });

  it("reads its leases' price and creation height from the chain, and their cost is what the escrow paid", async () => {
    const sim = await start(providers, 0);
    const akash = provisioner(sim, at1Groups(), { escrow: false });
    await akash.provision(context());
    for (let block = 0; block < 5; block += 1) sim.chain.produceBlock();
    const { latest, leases } = await akash.leasesOnChain(AbortSignal.timeout(10_000));
    expect(latest.height).toBe(sim.chain.latestHeight);
    expect(leases.map((lease) => [lease.group, lease.provider, lease.pricePerBlock, lease.denom])).toEqual([["a100", A100_PROVIDER, "1200", "uact"], ["rtx8000", RTX_PROVIDER, "400", "uact"]]);
    const report = costReport({ computedAtMs: Date.now(), chain: { latest }, leases, training: { images: 0, committedCheckpoints: 0 } });
    for (const lease of report.leases) {
      expect(lease.blocks).toBeGreaterThanOrEqual(5);
      expect(lease.spent).toBe(sim.chain.deployment(owner, lease.dseq)!.escrow.transferred.toString());
      // The deposit less what the leases drew: the escrow the chain's deployment query reports.
      expect(lease.escrowLeft).toBe(sim.chain.deployment(owner, lease.dseq)!.escrow.amount.toString());
      expect(lease.escrowMinutesLeft).toBeGreaterThan(0);
    }
    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
  });

  it("gives up with the diagnosis when the price is too low, leaving nothing open", async () => {
    const sim = await start([{ ...providers[0]!, publishesPrice: true }]);
    const groups = parseAkashGroups([{ ...base, name: "a100", nodes: 1, gpu: { model: "a100", perNode: 8 }, maxPrice: { amount: 800, denom: "uact" } }]);
    const failure = await provisioner(sim, groups, { priceSteps: 2 }).provision(context()).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(ProvisionError);
    expect((failure as ProvisionError).retryable).toBe(false);
    expect((failure as ProvisionError).message).toMatch(/the maximum price is too low .*asks 1200/);
    expect(sim.chain.books(owner).deployments).toEqual([]);
  });

  it("a head killed mid-provision leaves nothing orphaned: the next head's shutdown closes it all from the ledger", async () => {
    const sim = await start(providers);
    const abort = new AbortController();
    const killOnFirstLease: Logger = {
      ...silentLogger,
      info(message) {
        if (message === "lease created") abort.abort(new Error("head killed"));
      },
      child() {
        return killOnFirstLease;
      },
    };
    await expect(provisioner(sim).provision(context(abort.signal, killOnFirstLease))).rejects.toThrow("head killed");
    expect(sim.chain.books(owner).leases).toHaveLength(1);

    await provisioner(sim).shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
    expect(sim.chain.books(owner)).toMatchObject({ deployments: [], leases: [] });
  });

  it("reap closes a crashed head's deployments from the state directory and the wallet in the environment", async () => {
    const sim = await start(providers);
    const abort = new AbortController();
    const killOnFirstLease: Logger = { ...silentLogger, info: (message) => void (message === "lease created" && abort.abort(new Error("head killed"))), child: () => killOnFirstLease };
    await expect(provisioner(sim).provision(context(abort.signal, killOnFirstLease))).rejects.toThrow("head killed");
    const leased = sim.chain.books(owner).leases.map((lease) => lease.dseq);
    expect(leased).toHaveLength(1);
    process.env.DROVER_AKASH_MNEMONIC = mnemonic;
    try {
      const reaped = await akashBackend.reap(state, silentLogger, AbortSignal.timeout(10_000));
      expect(reaped).toContain(`akash deployment ${leased[0]}`);
    } finally {
      delete process.env.DROVER_AKASH_MNEMONIC;
    }
    expect(sim.chain.books(owner)).toMatchObject({ deployments: [], leases: [] });
  });

  it("refuses to start without a wallet, naming the variables", async () => {
    await expect(resolveAkashMnemonic({})).rejects.toThrow(/DROVER_AKASH_MNEMONIC or DROVER_AKASH_MNEMONIC_FILE/);
    await expect(resolveAkashMnemonic({ DROVER_AKASH_MNEMONIC: " words here \n" })).resolves.toBe("words here");
  });
});

describe("escrow keeper", () => {
  // One 4-GPU node at 100 per GPU: the lease draws 400 per block, a block every 50 ms.
  const BLOCK_MS = 50;
  const rtxGroup = () => parseAkashGroups([{ ...base, name: "rtx", nodes: 1, gpu: { model: "rtx8000", perNode: 4 }, maxPrice: { amount: 400, denom: "uact" } }]);
  // 12000 lasts 30 blocks: about 1.5 s.
  const smallDeposit = { amount: "12000", denom: "uact" };
  const fastKeeper = { checkIntervalMs: 100, minRemainingMs: 1_000, targetMs: 2_500 };
  const market = { initialPricePercent: 100, priceSteps: 1, deposit: smallDeposit };

  type Line = { level: "info" | "warn" | "error"; message: string; fields: Record<string, unknown> | undefined };
  function recordingLogger(lines: Line[]): Logger {
    const logger: Logger = {
      info: (message, fields) => void lines.push({ level: "info", message, fields }),
      warn: (message, fields) => void lines.push({ level: "warn", message, fields }),
      error: (message, fields) => void lines.push({ level: "error", message, fields }),
      child: () => logger,
    };
    return logger;
  }

  async function until(condition: () => boolean | Promise<boolean>, withinMs: number, what: string): Promise<void> {
    const deadline = Date.now() + withinMs;
    while (!(await condition())) {
      if (Date.now() > deadline) throw new Error(`not within ${withinMs} ms: ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  it("without it, a small deposit runs dry: the chain closes the lease (insufficient_funds)", async () => {
    const sim = await start([providers[1]!], BLOCK_MS);
    const akash = provisioner(sim, rtxGroup(), { ...market, escrow: false });
    await akash.provision(context());
    const leasedAt = Date.now();
    const [lease] = sim.chain.books(owner).leases;
    expect(lease).toMatchObject({ provider: RTX_PROVIDER, price: "400", state: "active" });
    await until(() => lease!.state !== "active", 5_000, "the lease to end");
    expect(lease!.state).toBe("insufficient_funds");
    expect(Date.now() - leasedAt).toBeLessThan(3_000);
    expect(sim.chain.books(owner).deployments).toEqual([]);
    expect((await LeaseLedger.open(state)).entries().some((entry) => entry.kind === "intent" && entry.operation.op === "deposit")).toBe(false);
    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
  });

  it("tops the escrow up through the ledger before it runs dry, keeping the lease for several deposits' lifetimes", async () => {
    const sim = await start([providers[1]!], BLOCK_MS);
    const lines: Line[] = [];
    const akash = provisioner(sim, rtxGroup(), { ...market, escrow: fastKeeper });
    await akash.provision(context(AbortSignal.timeout(25_000), recordingLogger(lines)));
    const [lease] = sim.chain.books(owner).leases;
    const deployment = sim.chain.deployment(owner, lease!.dseq)!;
    let lowest = deployment.escrow.amount;
    // Three times as long as the first deposit lasts without the keeper.
    const watchUntil = Date.now() + 4_500;
    while (Date.now() < watchUntil) {
      lowest = deployment.escrow.amount < lowest ? deployment.escrow.amount : lowest;
      expect(lease!.state).toBe("active");
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    expect(lowest).toBeGreaterThan(0n);
    expect(deployment.escrow.transferred).toBeGreaterThan(12_000n);

    const ledger = await LeaseLedger.open(state);
    const deposits = ledger.entries().filter((entry) => entry.kind === "intent" && entry.operation.op === "deposit");
    expect(deposits.length).toBeGreaterThanOrEqual(2);
    for (const deposit of deposits) {
      expect(deposit).toMatchObject({ operation: { op: "deposit", dseq: lease!.dseq, denom: "uact" } });
      expect(ledger.entries().find((entry) => entry.kind === "result" && entry.id === deposit.id)).toMatchObject({ outcome: "ok" });
    }
    const topUps = lines.filter((line) => line.message === "escrow topped up");
    expect(topUps.length).toBe(deposits.length);
    expect(topUps[0]!.fields).toMatchObject({ dseq: lease!.dseq, denom: "uact", remainingBefore: expect.any(String), remainingAfter: expect.any(String) });
    expect(JSON.stringify(lines)).not.toContain(mnemonic);

    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
    expect(sim.chain.books(owner)).toMatchObject({ deployments: [], leases: [] });
    // Stopped with the shutdown: no deposit after it.
    const entriesAfterShutdown = (await LeaseLedger.open(state)).entries().length;
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect((await LeaseLedger.open(state)).entries().length).toBe(entriesAfterShutdown);
  });

  it("warns, naming the deployment, when the wallet cannot pay a top-up; stops with the head's signal", async () => {
    const sim = await start([providers[1]!], BLOCK_MS);
    const lines: Line[] = [];
    const head = new AbortController();
    const akash = provisioner(sim, rtxGroup(), { ...market, escrow: fastKeeper });
    await akash.provision(context(head.signal, recordingLogger(lines)));
    const [lease] = sim.chain.books(owner).leases;
    sim.chain.setBalance(owner, 10n);
    await until(() => lines.some((line) => line.level === "warn" && line.message.includes("cannot pay")), 5_000, "a warning that the wallet cannot pay");
    const warning = lines.find((line) => line.message.includes("cannot pay"))!;
    expect(warning.message).toContain(`deployment ${lease!.dseq}`);
    expect(warning.message).toMatch(/fund it, or the chain closes the deployment in about/);
    expect(warning.fields).toMatchObject({ dseq: lease!.dseq, owner });
    const ledger = await LeaseLedger.open(state);
    const refused = ledger.entries().find((entry) => entry.kind === "intent" && entry.operation.op === "deposit")!;
    expect(ledger.entries().find((entry) => entry.kind === "result" && entry.id === refused.id)).toMatchObject({ outcome: "failed", error: expect.stringMatching(/insufficient funds/) });

    head.abort(new Error("head stopping"));
    await new Promise((resolve) => setTimeout(resolve, 100));
    const count = lines.length;
    await new Promise((resolve) => setTimeout(resolve, 400));
    expect(lines.length).toBe(count);
    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
  });

  it("plans a deposit only below minRemaining, enough to reach the target, in whole units", () => {
    const plan = (balance: string, pricePerBlock = "400") => planTopUp({ balance, pricePerBlock, blockTimeMs: 50, minRemainingMs: 1_000, targetMs: 2_500 });
    expect(plan("12000")).toEqual({ remainingMs: 1_500, deposit: 0n, remainingAfterMs: 1_500 });
    expect(plan("4000")).toEqual({ remainingMs: 500, deposit: 16_000n, remainingAfterMs: 2_500 });
    // Overdrawn accounts report negative funds; real escrow balances carry 18 decimals.
    expect(plan("-3.5").deposit).toBe(20_000n);
    expect(plan("100.000000000000000000", "0.3")).toMatchObject({ deposit: 0n });
    // 1 / 0.3 blocks of 50 ms; 50 blocks at 0.3 cost 15, of which 1 is there.
    expect(plan("1", "0.3")).toEqual({ remainingMs: 166.65, deposit: 14n, remainingAfterMs: 2_500 });
    expect(plan("0", "0")).toMatchObject({ remainingMs: Number.POSITIVE_INFINITY, deposit: 0n });
  });

  it("assumes the configured block time until it has measured a few blocks, then takes the shorter", () => {
    const estimate = new BlockTimeEstimate(6_000);
    expect(estimate.valueMs()).toBe(6_000);
    estimate.observe({ height: 10, timeMs: 0 });
    estimate.observe({ height: 12, timeMs: 100 });
    expect(estimate.valueMs()).toBe(6_000);
    estimate.observe({ height: 20, timeMs: 500 });
    expect(estimate.valueMs()).toBe(50);
    const slowChain = new BlockTimeEstimate(6_000);
    slowChain.observe({ height: 1, timeMs: 0 });
    slowChain.observe({ height: 11, timeMs: 70_000 });
    expect(slowChain.valueMs()).toBe(6_000);
  });
});
