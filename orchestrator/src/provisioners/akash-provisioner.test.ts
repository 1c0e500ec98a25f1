import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { DirectSecp256k1HdWallet } from "@cosmjs/proto-signing";
import { parseAkashGroups, type AkashGroupInput } from "@drover/sdl";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { AkashSimulator } from "../akash-simulator/akash-simulator.js";
import type { SimulatedProviderConfig } from "../akash-simulator/simulated-provider.js";
import { ProvisionError } from "../errors.js";
import { LeaseLedger } from "../lease-ledger.js";
import { silentLogger, type Logger } from "../logger.js";
import { StateDirectory } from "../state-store.js";
import { AkashProvisioner, akashBackend, resolveAkashMnemonic, type AkashProvisionerConfig } from "./akash-provisioner.js";

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

async function start(configs: SimulatedProviderConfig[]): Promise<AkashSimulator> {
  // These tests run no head for workers to join; services count as running once the manifest is in.
  simulator = await AkashSimulator.start({ providers: configs, containers: "none" });
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
  headAddress: "head.example:7070", joinToken: "join-secret", agentEnv: {}, state, logger, signal,
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
    expect(nodes.map((node) => [node.nodeName, node.group])).toEqual([
      ["a100-0", "a100"], ["a100-1", "a100"], ["rtx8000-0", "rtx8000"], ["rtx8000-1", "rtx8000"],
    ]);
    const books = sim.chain.books(owner);
    expect(books.leases.map((lease) => [lease.provider, lease.nodes, lease.gpusPerNode])).toEqual([[A100_PROVIDER, 2, 8], [RTX_PROVIDER, 2, 4]]);
    // Probes and grow asks were closed; only the leased deployments remain.
    expect(books.deployments.map((d) => d.dseq).sort()).toEqual(books.leases.map((l) => l.dseq).sort());
    const manifest = sim.providers.get(A100_PROVIDER)!.server.manifests.get(`${owner}/${books.leases[0]!.dseq}`);
    expect(manifest?.[0]?.services.map((service) => service.name)).toEqual(["a100-leader", "a100-worker"]);
    expect((await LeaseLedger.open(state)).pending()).toEqual([]);

    await akash.shutdown({ state, logger: silentLogger, signal: AbortSignal.timeout(10_000) });
    expect(sim.chain.books(owner)).toMatchObject({ deployments: [], leases: [] });
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
      const reaped = await akashBackend(() => { throw new Error("reap needs no spec"); }).reap(state, silentLogger, AbortSignal.timeout(10_000));
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
