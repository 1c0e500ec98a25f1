// One simulated Akash network for tests: a chain node (CometBFT RPC) and one endpoint
// server per provider, all on 127.0.0.1 with ports chosen by the OS.

import { ChainSimulator } from "./chain-simulator.js";
import { ProviderServer } from "./provider-server.js";
import { SimulatedProvider, type SimulatedProviderConfig } from "./simulated-provider.js";

export interface AkashSimulatorOptions {
  readonly chainId?: string;
  readonly providers: readonly SimulatedProviderConfig[];
}

export class AkashSimulator {
  private constructor(
    readonly chain: ChainSimulator,
    readonly rpcUrl: string,
    readonly providers: ReadonlyMap<string, { readonly simulated: SimulatedProvider; readonly server: ProviderServer; readonly url: string }>,
  ) {}

  static async start(options: AkashSimulatorOptions): Promise<AkashSimulator> {
    const simulated = options.providers.map((config) => new SimulatedProvider(config));
    const urls = new Map<string, string>();
    const chain = new ChainSimulator({ chainId: options.chainId, providers: simulated, providerHostUri: (address) => urls.get(address) ?? "" });
    const providers = new Map<string, { simulated: SimulatedProvider; server: ProviderServer; url: string }>();
    try {
      const rpcUrl = await chain.listen();
      for (const provider of simulated) {
        const server = new ProviderServer(provider, chain);
        const url = await server.listen();
        urls.set(provider.address, url);
        providers.set(provider.address, { simulated: provider, server, url });
      }
      return new AkashSimulator(chain, rpcUrl, providers);
    } catch (error) {
      await Promise.allSettled([chain.close(), ...[...providers.values()].map((entry) => entry.server.close())]);
      throw error;
    }
  }

  providerUrl(address: string): string {
    const entry = this.providers.get(address);
    if (entry === undefined) throw new Error(`no simulated provider ${address}`);
    return entry.url;
  }

  async stop(): Promise<void> {
    await Promise.allSettled([this.chain.close(), ...[...this.providers.values()].map((entry) => entry.server.close())]);
  }
}
