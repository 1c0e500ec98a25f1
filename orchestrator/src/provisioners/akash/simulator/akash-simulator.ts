// One simulated Akash network: a chain node (CometBFT RPC) and one endpoint server per
// provider, all on 127.0.0.1 (ports chosen by the OS unless `port` is given), and a FAKE
// container runtime (fake-container-runtime.ts) that runs leased groups as local
// drover-worker processes.
//
// Besides what a real node serves, the RPC port answers a few simulator-only routes:
//   GET  /simulator/books?owner=ADDR               the latest height, open deployments (escrow
//                                                  left and drawn) and leases (price, height)
//                                                  of ADDR, and every fake container started for it
//   POST /simulator/fund?address=ADDR&amount=N     create or top up an account (uakt)
//   POST /simulator/lose-lease?owner=ADDR&dseq=N   fault: the provider loses the lease
//   GET  /simulator/manifests?owner=ADDR           every manifest the providers received from
//                                                  ADDR, as sent (what a provider's operator sees)

import { ChainSimulator } from "./chain-simulator.js";
import { FakeContainerRuntime } from "./fake-container-runtime.js";
import { ProviderServer } from "./provider-server.js";
import { SimulatedProvider, type SimulatedProviderConfig } from "./simulated-provider.js";

export interface AkashSimulatorOptions {
  readonly chainId?: string;
  readonly providers: readonly SimulatedProviderConfig[];
  /** RPC port; providers then listen on the ports after it, in order. 0 or absent: any free ports. */
  readonly port?: number;
  /**
   * "fake-runtime" (default): a manifest starts worker processes; "none": services count as
   * running as soon as the manifest is accepted (tests of the market that run no head).
   */
  readonly containers?: "fake-runtime" | "none";
  /** Where fake containers keep their state and logs; default a temporary directory. */
  readonly containerRoot?: string;
  /** Wall time between blocks, at each of which leases draw from their escrow (default 6 s; 0: a block per tx only). */
  readonly blockTimeMs?: number;
}

export interface SimulatedProviderEntry {
  readonly simulated: SimulatedProvider;
  readonly server: ProviderServer;
  readonly url: string;
}

export class AkashSimulator {
  private constructor(
    readonly chain: ChainSimulator,
    readonly rpcUrl: string,
    readonly providers: ReadonlyMap<string, SimulatedProviderEntry>,
    readonly runtime: FakeContainerRuntime | undefined,
  ) {
    chain.inspector = (method, url) => this.inspect(method, url);
  }

  static async start(options: AkashSimulatorOptions): Promise<AkashSimulator> {
    const simulated = options.providers.map((config) => new SimulatedProvider(config));
    const urls = new Map<string, string>();
    const chain = new ChainSimulator({
      chainId: options.chainId, providers: simulated, providerHostUri: (address) => urls.get(address) ?? "",
      ...(options.blockTimeMs === undefined ? {} : { blockTimeMs: options.blockTimeMs }),
    });
    const runtime = options.containers === "none" ? undefined : await FakeContainerRuntime.create(options.containerRoot === undefined ? {} : { root: options.containerRoot });
    const providers = new Map<string, SimulatedProviderEntry>();
    const basePort = options.port ?? 0;
    try {
      const rpcUrl = await chain.listen(basePort);
      for (const [index, provider] of simulated.entries()) {
        const server = new ProviderServer(provider, chain, Date.now, runtime);
        const url = await server.listen(basePort === 0 ? 0 : basePort + 1 + index);
        urls.set(provider.address, url);
        providers.set(provider.address, { simulated: provider, server, url });
      }
      return new AkashSimulator(chain, rpcUrl, providers, runtime);
    } catch (error) {
      await Promise.allSettled([chain.close(), ...[...providers.values()].map((entry) => entry.server.close()), runtime?.stop()]);
      throw error;
    }
  }

  providerUrl(address: string): string {
    const entry = this.providers.get(address);
    if (entry === undefined) throw new Error(`no simulated provider ${address}`);
    return entry.url;
  }

  /** Resolves once the containers of every lease closed so far have stopped. */
  async settled(): Promise<void> {
    await Promise.all([...this.providers.values()].map((entry) => entry.server.settled()));
  }

  /** Stops the servers and every fake container (SIGTERM, then SIGKILL). */
  async stop(): Promise<void> {
    await Promise.allSettled([this.chain.close(), ...[...this.providers.values()].map((entry) => entry.server.close())]);
    await this.runtime?.stop();
  }

  private async inspect(method: string, url: URL): Promise<unknown> {
    const param = (name: string) => {
      const value = url.searchParams.get(name);
      if (value === null || value === "") throw new Error(`missing query parameter ${name}`);
      return value;
    };
    if (method === "GET" && url.pathname === "/simulator/books") {
      const owner = param("owner");
      const books = this.chain.books(owner);
      return {
        height: this.chain.latestHeight,
        deployments: books.deployments.map((deployment) => ({
          dseq: deployment.dseq, escrow: deployment.escrow.amount.toString(), denom: deployment.escrow.denom,
          transferred: deployment.escrow.transferred.toString(), settledHeight: deployment.escrow.settledHeight,
        })),
        leases: books.leases.map(({ dseq, gseq, oseq, provider, price, denom, nodes, createdHeight }) => ({ dseq, gseq, oseq, provider, price, denom, nodes, createdHeight })),
        containers: (this.runtime?.containers() ?? []).filter((container) => container.owner === owner),
      };
    }
    if (method === "GET" && url.pathname === "/simulator/manifests") {
      const owner = param("owner");
      return [...this.providers.values()].flatMap((entry) => [...entry.server.manifests.entries()]
        .filter(([key]) => key.startsWith(`${owner}/`))
        .map(([key, groups]) => ({ provider: entry.server.provider.address, dseq: key.slice(owner.length + 1), groups })));
    }
    if (method === "POST" && url.pathname === "/simulator/fund") {
      this.chain.fund(param("address"), BigInt(param("amount")));
      return { funded: url.searchParams.get("address") };
    }
    if (method === "POST" && url.pathname === "/simulator/lose-lease") {
      this.chain.loseLease(param("owner"), param("dseq"));
      await this.settled();
      return { lost: url.searchParams.get("dseq") };
    }
    return undefined;
  }
}
