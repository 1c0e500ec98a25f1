// A local stand-in for an Akash node, for tests: the CometBFT JSON-RPC subset that
// cosmjs's SigningStargateClient (the tx transport of @akashnetwork/chain-sdk) uses
// (status, abci_query, broadcast_tx_sync, tx_search), over HTTP on loopback.
//
// What is real: every tx is a real Cosmos TxRaw. The simulator decodes it with
// chain-sdk's generated protobufs, recomputes the SIGN_MODE_DIRECT sign bytes, checks
// the secp256k1 signature against the signer's public key and its address, enforces the
// account sequence, then applies MsgCreateDeployment (v1beta4), MsgCreateLease
// (market v1beta5), MsgCloseDeployment and MsgAccountDeposit (escrow v1). Queries are
// answered as protobuf over abci_query, on the gRPC query paths a real node serves.
// LegacyDec amounts (prices, escrow funds) cross the wire as 18-digit atomics, as on a
// real node: chain-sdk's generated DecCoin and Balance convert in encode/decode, so the
// books in here hold plain decimals (legacy-dec-wire.test.ts pins the bytes).
// What is simulated: consensus (a block per tx, and one every `blockTimeMs` of wall
// time), gas (a constant), fees (not charged), balances (one per account, whatever the
// denomination), and the providers' bid engines (SimulatedProvider).
//
// Escrow: at every block each active lease draws its price per block (rounded up to whole
// units) from its deployment's escrow account, and when the account cannot pay, the
// deployment's leases go insufficient_funds and the deployment closes, as on Akash. A
// deposit moves funds from the wallet's balance into the escrow; closing a deployment
// returns what is left of it.

import type { IncomingMessage, Server, ServerResponse } from "node:http";
import { Secp256k1, Secp256k1Signature, ripemd160, sha256 } from "@cosmjs/crypto";
import { fromBase64, fromHex, toBase64, toBech32, toHex } from "@cosmjs/encoding";
import { Deployment_State, Lease_State, MsgAccountDeposit, Scope, Types_State } from "@akashnetwork/chain-sdk/private-types/akash.v1";
import { MsgCloseDeployment, MsgCreateDeployment, QueryDeploymentRequest, QueryDeploymentResponse, QueryDeploymentsRequest, QueryDeploymentsResponse, type GroupSpec } from "@akashnetwork/chain-sdk/private-types/akash.v1beta4";
import { Bid_State, MsgCreateLease, QueryBidsRequest, QueryBidsResponse, QueryLeasesRequest, QueryLeasesResponse } from "@akashnetwork/chain-sdk/private-types/akash.v1beta5";
import { QueryProviderRequest, QueryProviderResponse } from "@akashnetwork/chain-sdk/private-types/akash.v1beta4";
import { PubKey } from "@akashnetwork/chain-sdk/private-types/cosmos.secp256k1";
import { AuthInfo, BaseAccount, QueryAccountRequest, QueryAccountResponse, SignDoc, SimulateResponse, TxBody, TxRaw } from "@akashnetwork/chain-sdk/private-types/cosmos.v1beta1";
import { parseDecimal } from "../market/decimal-price.js";
import type { SimulatedAsk, SimulatedProvider } from "./simulated-provider.js";
import { listenOnLoopback } from "./loopback-http.js";

export const SIMULATED_GAS_USED = 200_000;
/** Akash's block time, roughly. */
export const DEFAULT_BLOCK_TIME_MS = 6_000;

/** Cosmos SDK error codes (codespace "sdk") the client may switch on. */
export const TxCode = {
  ok: 0,
  unauthorized: 4,
  insufficientFunds: 5,
  unknownAddress: 9,
  invalidRequest: 18,
  wrongSequence: 32,
  /** Akash module errors, codespace as named. */
  moduleError: 1,
} as const;

export interface SimulatedDeployment {
  readonly owner: string;
  readonly dseq: string;
  state: "active" | "closed";
  readonly hash: Uint8Array;
  readonly groups: Array<{ readonly gseq: number; readonly spec: GroupSpec; readonly ask: SimulatedAsk; orderState: "open" | "active" | "closed" }>;
  /** The escrow account: what is left (`amount`), what the leases drew so far, and whether it ran dry. */
  escrow: { amount: bigint; denom: string; transferred: bigint; state: "open" | "closed" | "overdrawn"; settledHeight: number };
  readonly createdHeight: number;
}

export interface SimulatedBid {
  readonly owner: string;
  readonly dseq: string;
  readonly gseq: number;
  readonly oseq: number;
  readonly provider: string;
  state: "open" | "active" | "lost" | "closed";
  readonly price: string;
  readonly denom: string;
  readonly gpuModel: string;
  readonly createdHeight: number;
}

export interface SimulatedLease {
  readonly owner: string;
  readonly dseq: string;
  readonly gseq: number;
  readonly oseq: number;
  readonly provider: string;
  state: "active" | "closed" | "insufficient_funds";
  readonly price: string;
  readonly denom: string;
  readonly nodes: number;
  readonly gpusPerNode: number;
  readonly createdHeight: number;
}

interface SimulatedAccount {
  readonly address: string;
  readonly accountNumber: number;
  sequence: number;
  pubkey: Uint8Array | undefined;
  balance: bigint;
}

interface IndexedTx {
  readonly hash: string;
  readonly height: number;
  readonly tx: Uint8Array;
  readonly code: number;
  readonly log: string;
  readonly codespace: string;
}

class TxRejected extends Error {
  constructor(readonly code: number, message: string, readonly codespace = "sdk") {
    super(message);
  }
}

export interface ChainSimulatorOptions {
  readonly chainId?: string;
  readonly providers: readonly SimulatedProvider[];
  /** Host URI each provider publishes on chain (its endpoint server). */
  readonly providerHostUri?: (provider: string) => string;
  /**
   * Wall time between blocks (default 6 s, like Akash); 0: blocks only come with txs.
   * Leases draw their price from the escrow at every block.
   */
  readonly blockTimeMs?: number;
}

/** Open deployments and leases of one owner, as the chain holds them. */
export interface OwnerBooks {
  readonly deployments: readonly SimulatedDeployment[];
  readonly leases: readonly SimulatedLease[];
  readonly bids: readonly SimulatedBid[];
}

export class ChainSimulator {
  readonly chainId: string;
  private readonly accounts = new Map<string, SimulatedAccount>();
  private readonly deployments = new Map<string, SimulatedDeployment>();
  private readonly bidList: SimulatedBid[] = [];
  private readonly leaseList: SimulatedLease[] = [];
  private readonly txIndex = new Map<string, IndexedTx>();
  private readonly providers: Map<string, SimulatedProvider>;
  private readonly timers = new Set<NodeJS.Timeout>();
  private height = 1;
  private lastBlockAtMs = Date.now();
  private blockClock: NodeJS.Timeout | undefined;
  readonly blockTimeMs: number;
  private server: Server | undefined;
  private dropBroadcasts = 0;
  /** Every tx hash seen by broadcast_tx_sync, in order, included or not. */
  readonly broadcastLog: string[] = [];
  private readonly leaseClosedListeners = new Set<(lease: SimulatedLease) => void>();
  /**
   * Simulator-only HTTP routes under /simulator/ on the RPC port (inspection and fault
   * injection for tests and the `drover akash-sim` user); nothing a real node serves.
   */
  inspector: ((method: string, url: URL) => Promise<unknown>) | undefined;

  constructor(private readonly options: ChainSimulatorOptions) {
    this.chainId = options.chainId ?? "akash-simulator-1";
    this.providers = new Map(options.providers.map((provider) => [provider.address, provider]));
    this.blockTimeMs = options.blockTimeMs ?? DEFAULT_BLOCK_TIME_MS;
    if (!Number.isFinite(this.blockTimeMs) || this.blockTimeMs < 0) throw new RangeError(`chain simulator: blockTimeMs must be a finite number >= 0, got ${this.blockTimeMs}`);
  }

  /** The latest block's height. */
  get latestHeight(): number {
    return this.height;
  }

  /**
   * Produces one block: every active lease draws its price from its deployment's escrow.
   * Called by the block clock, after each tx, and by tests that want a block now.
   */
  produceBlock(): void {
    this.height += 1;
    this.lastBlockAtMs = Date.now();
    this.settleEscrows();
  }

  private settleEscrows(): void {
    for (const deployment of this.deployments.values()) {
      if (deployment.state !== "active") continue;
      // A lease pays from the block after the one that created it (Akash settles a new
      // payment from its creation height), so price x (height - createdHeight) is its bill.
      const leases = this.leaseList.filter((lease) => lease.owner === deployment.owner && lease.dseq === deployment.dseq && lease.state === "active" && lease.createdHeight < this.height);
      if (leases.length === 0) continue;
      const owed = leases.reduce((sum, lease) => sum + wholeUnitsUp(lease.price), 0n);
      if (deployment.escrow.amount >= owed) {
        deployment.escrow.amount -= owed;
        deployment.escrow.transferred += owed;
        deployment.escrow.settledHeight = this.height;
        continue;
      }
      // Overdrawn: the providers get what is left and the chain closes the deployment.
      deployment.escrow.transferred += deployment.escrow.amount;
      deployment.escrow.amount = 0n;
      deployment.escrow.state = "overdrawn";
      deployment.escrow.settledHeight = this.height;
      this.closeDeployment(deployment, "insufficient_funds");
    }
  }

  /** Listens on 127.0.0.1 (port 0: any free one); returns the RPC URL. */
  async listen(port = 0): Promise<string> {
    const { server, url } = await listenOnLoopback((request, response) => void this.handleHttp(request, response), port);
    this.server = server;
    if (this.blockTimeMs > 0 && this.blockClock === undefined) {
      this.blockClock = setInterval(() => this.produceBlock(), this.blockTimeMs);
      // The clock alone must not keep a test or the CLI's process alive.
      this.blockClock.unref();
    }
    return url;
  }

  async close(): Promise<void> {
    if (this.blockClock !== undefined) clearInterval(this.blockClock);
    this.blockClock = undefined;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    const server = this.server;
    if (server === undefined) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  /** Creates (or tops up) an account; a real chain only knows funded accounts. */
  fund(address: string, amount: bigint): void {
    const existing = this.accounts.get(address);
    if (existing) existing.balance += amount;
    else this.accounts.set(address, { address, accountNumber: this.accounts.size + 7, sequence: 0, pubkey: undefined, balance: amount });
  }

  /** Fault: the account's balance becomes `amount` (a wallet spent elsewhere, too poor for the next deposit). */
  setBalance(address: string, amount: bigint): void {
    const account = this.accounts.get(address);
    if (account === undefined) this.fund(address, amount);
    else account.balance = amount;
  }

  /** The account's spendable balance (one balance per account in the simulator, whatever the denomination). */
  balance(address: string): bigint {
    return this.accounts.get(address)?.balance ?? 0n;
  }

  accountSequence(address: string): number {
    return this.accounts.get(address)?.sequence ?? 0;
  }

  /** The public key the chain learned from the account's first signed tx. */
  accountPubkey(address: string): Uint8Array | undefined {
    return this.accounts.get(address)?.pubkey;
  }

  books(owner: string): OwnerBooks {
    return {
      deployments: [...this.deployments.values()].filter((deployment) => deployment.owner === owner && deployment.state === "active"),
      leases: this.leaseList.filter((lease) => lease.owner === owner && lease.state === "active"),
      bids: this.bidList.filter((bid) => bid.owner === owner),
    };
  }

  deployment(owner: string, dseq: string): SimulatedDeployment | undefined {
    return this.deployments.get(`${owner}/${dseq}`);
  }

  activeLease(owner: string, dseq: string, gseq: number, oseq: number, provider?: string): SimulatedLease | undefined {
    return this.leaseList.find(
      (lease) => lease.owner === owner && lease.dseq === dseq && lease.gseq === gseq && lease.oseq === oseq && lease.state === "active" && (provider === undefined || lease.provider === provider),
    );
  }

  txLanded(hash: string): boolean {
    return this.txIndex.has(hash.toUpperCase());
  }

  /** Fault: the next `count` broadcasts pass CheckTx but never make it into a block (sequence unused). */
  dropNextBroadcasts(count: number): void {
    this.dropBroadcasts += count;
  }

  /** Fault: the provider closes the lease (machine lost, provider restart): its GPUs come back to it. */
  loseLease(owner: string, dseq: string): void {
    for (const lease of this.leaseList) {
      if (lease.owner !== owner || lease.dseq !== dseq || lease.state !== "active") continue;
      this.closeLease(lease);
    }
  }

  /** Called for every lease that stops being active, whatever the cause: providers stop its containers. */
  onLeaseClosed(listener: (lease: SimulatedLease) => void): () => void {
    this.leaseClosedListeners.add(listener);
    return () => this.leaseClosedListeners.delete(listener);
  }

  private closeDeployment(deployment: SimulatedDeployment, leaseState: "closed" | "insufficient_funds"): void {
    deployment.state = "closed";
    for (const group of deployment.groups) group.orderState = "closed";
    for (const bid of this.bidList) if (bid.owner === deployment.owner && bid.dseq === deployment.dseq && bid.state === "open") bid.state = "closed";
    for (const lease of this.leaseList) {
      if (lease.owner !== deployment.owner || lease.dseq !== deployment.dseq || lease.state !== "active") continue;
      this.closeLease(lease, leaseState);
    }
  }

  private closeLease(lease: SimulatedLease, state: "closed" | "insufficient_funds" = "closed"): void {
    lease.state = state;
    this.providers.get(lease.provider)?.release(lease.nodes, lease.gpusPerNode);
    for (const listener of this.leaseClosedListeners) listener(lease);
  }

  // ---- JSON-RPC -------------------------------------------------------------------

  private async handleHttp(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of request) chunks.push(chunk as Buffer);
    const url = new URL(request.url ?? "/", "http://simulator");
    if (url.pathname.startsWith("/simulator/")) {
      try {
        const answer = this.inspector === undefined ? undefined : await this.inspector(request.method ?? "GET", url);
        if (answer === undefined) response.writeHead(404, { "content-type": "application/json" }).end(JSON.stringify({ error: `no simulator route ${request.method} ${url.pathname}` }));
        else response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
      } catch (error) {
        response.writeHead(400, { "content-type": "application/json" }).end(JSON.stringify({ error: (error as Error).message }));
      }
      return;
    }
    let id: unknown = -1;
    try {
      const call = JSON.parse(Buffer.concat(chunks).toString("utf8")) as { id: unknown; method: string; params: Record<string, unknown> };
      id = call.id;
      const result = await this.dispatch(call.method, call.params ?? {});
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ jsonrpc: "2.0", id, result }));
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ jsonrpc: "2.0", id, error: { code: -32603, message: "Internal error", data: message } }));
    }
  }

  private async dispatch(method: string, params: Record<string, unknown>): Promise<unknown> {
    switch (method) {
      case "status":
        return this.status();
      case "abci_query":
        return this.abciQuery(String(params.path), fromHex(String(params.data ?? "")));
      case "broadcast_tx_sync":
        return this.broadcastTxSync(fromBase64(String(params.tx)));
      case "tx_search":
        return this.txSearch(String(params.query));
      default:
        throw new Error(`method ${method} is not simulated`);
    }
  }

  private status(): unknown {
    const fakeHash = toHex(sha256(new TextEncoder().encode(`block-${this.height}`))).toUpperCase();
    return {
      node_info: {
        protocol_version: { p2p: "8", block: "11", app: "0" },
        id: "0".repeat(40),
        listen_addr: "tcp://127.0.0.1:26656",
        network: this.chainId,
        version: "0.38.17",
        channels: "40202122233038606100",
        moniker: "drover-akash-simulator",
        other: { tx_index: "on", rpc_address: "tcp://127.0.0.1:26657" },
      },
      sync_info: {
        latest_block_hash: fakeHash,
        latest_app_hash: fakeHash,
        latest_block_height: String(this.height),
        latest_block_time: new Date(this.lastBlockAtMs).toISOString(),
        catching_up: false,
      },
      validator_info: { address: "0".repeat(40), pub_key: { type: "tendermint/PubKeyEd25519", value: toBase64(new Uint8Array(32)) }, voting_power: "10" },
    };
  }

  private abciQuery(path: string, data: Uint8Array): unknown {
    const answer = (value: Uint8Array) => ({ response: { code: 0, log: "", info: "", index: "0", key: "", value: toBase64(value), height: String(this.height), codespace: "" } });
    const failure = (code: number, log: string) => ({ response: { code, log, info: "", index: "0", key: "", value: "", height: String(this.height), codespace: "sdk" } });
    switch (path) {
      case "/cosmos.auth.v1beta1.Query/Account": {
        const { address } = QueryAccountRequest.decode(data);
        const account = this.accounts.get(address);
        if (account === undefined) return failure(22, `account ${address} not found: key not found`);
        const base = BaseAccount.encode(
          BaseAccount.fromPartial({
            address,
            accountNumber: account.accountNumber,
            sequence: account.sequence,
            ...(account.pubkey ? { pubKey: { typeUrl: "/cosmos.crypto.secp256k1.PubKey", value: PubKey.encode(PubKey.fromPartial({ key: account.pubkey })).finish() } } : {}),
          }),
        ).finish();
        return answer(QueryAccountResponse.encode(QueryAccountResponse.fromPartial({ account: { typeUrl: "/cosmos.auth.v1beta1.BaseAccount", value: base } })).finish());
      }
      case "/cosmos.tx.v1beta1.Service/Simulate":
        return answer(SimulateResponse.encode(SimulateResponse.fromPartial({ gasInfo: { gasWanted: SIMULATED_GAS_USED, gasUsed: SIMULATED_GAS_USED } })).finish());
      case "/akash.deployment.v1beta4.Query/Deployments": {
        const { filters } = QueryDeploymentsRequest.decode(data);
        const wantedState = filters?.state ?? "";
        const dseq = filters?.dseq?.toString() ?? "0";
        const deployments = [...this.deployments.values()].filter(
          (deployment) => (!filters?.owner || deployment.owner === filters.owner) && (wantedState === "" || deployment.state === wantedState) && (dseq === "0" || deployment.dseq === dseq),
        );
        return answer(
          QueryDeploymentsResponse.encode(
            QueryDeploymentsResponse.fromPartial({
              deployments: deployments.map(deploymentAnswerOf),
            }),
          ).finish(),
        );
      }
      case "/akash.deployment.v1beta4.Query/Deployment": {
        const { id } = QueryDeploymentRequest.decode(data);
        const deployment = this.deployments.get(`${id?.owner ?? ""}/${id?.dseq?.toString() ?? "0"}`);
        // The code and log a real node answers for an unknown deployment (x/deployment ErrDeploymentNotFound).
        if (deployment === undefined) return failure(2, "deployment not found");
        return answer(
          QueryDeploymentResponse.encode(
            QueryDeploymentResponse.fromPartial(deploymentAnswerOf(deployment)),
          ).finish(),
        );
      }
      case "/akash.market.v1beta5.Query/Bids": {
        const { filters } = QueryBidsRequest.decode(data);
        const dseq = filters?.dseq?.toString() ?? "0";
        const bids = this.bidList.filter(
          (bid) => (!filters?.owner || bid.owner === filters.owner) && (dseq === "0" || bid.dseq === dseq) && (!filters?.state || bid.state === filters.state) && (!filters?.provider || bid.provider === filters.provider),
        );
        return answer(
          QueryBidsResponse.encode(
            QueryBidsResponse.fromPartial({
              bids: bids.map((bid) => ({
                bid: {
                  id: { owner: bid.owner, dseq: bid.dseq, gseq: bid.gseq, oseq: bid.oseq, provider: bid.provider, bseq: 0 },
                  state: { open: Bid_State.open, active: Bid_State.active, lost: Bid_State.lost, closed: Bid_State.closed }[bid.state],
                  price: { denom: bid.denom, amount: bid.price },
                  createdAt: bid.createdHeight,
                  resourcesOffer: [this.offerFor(bid)],
                },
              })),
            }),
          ).finish(),
        );
      }
      case "/akash.market.v1beta5.Query/Leases": {
        const { filters } = QueryLeasesRequest.decode(data);
        const dseq = filters?.dseq?.toString() ?? "0";
        const leases = this.leaseList.filter(
          (lease) => (!filters?.owner || lease.owner === filters.owner) && (dseq === "0" || lease.dseq === dseq) && (!filters?.state || lease.state === filters.state),
        );
        return answer(
          QueryLeasesResponse.encode(
            QueryLeasesResponse.fromPartial({
              leases: leases.map((lease) => ({
                lease: {
                  id: { owner: lease.owner, dseq: lease.dseq, gseq: lease.gseq, oseq: lease.oseq, provider: lease.provider, bseq: 0 },
                  state: { active: Lease_State.active, closed: Lease_State.closed, insufficient_funds: Lease_State.insufficient_funds }[lease.state],
                  price: { denom: lease.denom, amount: lease.price },
                  createdAt: lease.createdHeight,
                },
              })),
            }),
          ).finish(),
        );
      }
      case "/akash.provider.v1beta4.Query/Provider": {
        const { owner } = QueryProviderRequest.decode(data);
        const provider = this.providers.get(owner);
        if (provider === undefined) return failure(1, `provider ${owner} not found`);
        return answer(
          QueryProviderResponse.encode(
            QueryProviderResponse.fromPartial({
              provider: {
                owner,
                hostUri: this.options.providerHostUri?.(owner) ?? "",
                attributes: [
                  ...Object.entries(provider.config.attributes ?? {}).map(([key, value]) => ({ key, value })),
                  ...provider.gpuTags.map((tag) => ({ key: `capabilities/gpu/vendor/nvidia/model/${tag}`, value: "true" })),
                ],
              },
            }),
          ).finish(),
        );
      }
      default:
        return failure(6, `unknown query path ${path}`);
    }
  }

  private offerFor(bid: SimulatedBid) {
    const deployment = this.deployments.get(`${bid.owner}/${bid.dseq}`);
    const group = deployment?.groups.find((candidate) => candidate.gseq === bid.gseq);
    const ask = group?.ask;
    return {
      count: ask?.nodes ?? 0,
      resources: {
        id: 1,
        gpu: {
          units: { val: new TextEncoder().encode(String(ask?.gpusPerNode ?? 0)) },
          attributes: [{ key: `vendor/nvidia/model/${bid.gpuModel}`, value: "true" }],
        },
      },
    };
  }

  private txSearch(query: string): unknown {
    const match = /tx\.hash\s*=\s*'([0-9A-Fa-f]{64})'/.exec(query);
    const indexed = match ? this.txIndex.get(match[1]!.toUpperCase()) : undefined;
    const txs = indexed
      ? [{
          hash: indexed.hash,
          height: String(indexed.height),
          index: 0,
          tx_result: { code: indexed.code, log: indexed.log, codespace: indexed.codespace, gas_wanted: String(SIMULATED_GAS_USED), gas_used: String(SIMULATED_GAS_USED), events: [] },
          tx: toBase64(indexed.tx),
        }]
      : [];
    return { txs, total_count: String(txs.length) };
  }

  // ---- Transactions ---------------------------------------------------------------

  private async broadcastTxSync(txBytes: Uint8Array): Promise<unknown> {
    const hash = toHex(sha256(txBytes)).toUpperCase();
    this.broadcastLog.push(hash);
    const reply = (code: number, log: string, codespace = "") => ({ code, data: "", log, codespace, hash, gas_wanted: "0", gas_used: "0" });
    if (this.txIndex.has(hash)) return reply(19, "tx already exists in cache", "sdk");
    let signer: SimulatedAccount;
    let body: ReturnType<typeof TxBody.decode>;
    try {
      ({ signer, body } = await this.checkTx(txBytes));
    } catch (error) {
      if (error instanceof TxRejected) return reply(error.code, error.message, error.codespace);
      throw error;
    }
    if (this.dropBroadcasts > 0) {
      // Accepted into the mempool and then lost: the sequence stays unused.
      this.dropBroadcasts -= 1;
      return reply(0, "[]");
    }
    signer.sequence += 1;
    // The tx's block: applied first, then the leases draw (a deposit in it counts at once).
    this.height += 1;
    this.lastBlockAtMs = Date.now();
    let code: number = TxCode.ok;
    let log = "[]";
    let codespace = "";
    try {
      this.deliver(signer.address, body);
    } catch (error) {
      if (!(error instanceof TxRejected)) throw error;
      ({ code, codespace } = error);
      log = `failed to execute message; message index: 0: ${error.message}`;
    }
    this.txIndex.set(hash, { hash, height: this.height, tx: txBytes, code, log, codespace });
    this.settleEscrows();
    return reply(0, "[]");
  }

  /** The ante handler: decoding, signature, sequence. */
  private async checkTx(txBytes: Uint8Array): Promise<{ signer: SimulatedAccount; body: ReturnType<typeof TxBody.decode> }> {
    let raw: ReturnType<typeof TxRaw.decode>;
    let body: ReturnType<typeof TxBody.decode>;
    let authInfo: ReturnType<typeof AuthInfo.decode>;
    try {
      raw = TxRaw.decode(txBytes);
      body = TxBody.decode(raw.bodyBytes);
      authInfo = AuthInfo.decode(raw.authInfoBytes);
    } catch (error) {
      throw new TxRejected(2, `tx parse error: ${(error as Error).message}`);
    }
    if (authInfo.signerInfos.length !== 1 || raw.signatures.length !== 1) throw new TxRejected(TxCode.unauthorized, "exactly one signer is simulated");
    const signerInfo = authInfo.signerInfos[0]!;
    if (signerInfo.publicKey?.typeUrl !== "/cosmos.crypto.secp256k1.PubKey") throw new TxRejected(TxCode.unauthorized, `unsupported public key ${signerInfo.publicKey?.typeUrl}`);
    const pubkey = PubKey.decode(signerInfo.publicKey.value).key;
    const address = toBech32("akash", ripemd160(sha256(pubkey)));
    const account = this.accounts.get(address);
    if (account === undefined) throw new TxRejected(TxCode.unknownAddress, `account ${address} does not exist`);
    const sequence = Number(signerInfo.sequence.toString());
    const signBytes = SignDoc.encode(
      SignDoc.fromPartial({ bodyBytes: raw.bodyBytes, authInfoBytes: raw.authInfoBytes, chainId: this.chainId, accountNumber: account.accountNumber }),
    ).finish();
    const signature = Secp256k1Signature.fromFixedLength(raw.signatures[0]!);
    if (!(await Secp256k1.verifySignature(signature, sha256(signBytes), pubkey))) {
      throw new TxRejected(TxCode.unauthorized, `signature verification failed; please verify account number (${account.accountNumber}) and chain-id (${this.chainId}): unauthorized`);
    }
    // Checked after the await: from here to the sequence bump nothing yields, so two txs
    // signed with one sequence cannot both pass.
    if (sequence !== account.sequence) {
      throw new TxRejected(TxCode.wrongSequence, `account sequence mismatch, expected ${account.sequence}, got ${sequence}: incorrect account sequence`);
    }
    account.pubkey = pubkey;
    return { signer: account, body };
  }

  /** Applies the messages all or nothing. */
  private deliver(signer: string, body: ReturnType<typeof TxBody.decode>): void {
    const effects: Array<() => void> = [];
    for (const message of body.messages) effects.push(this.prepareMessage(signer, message.typeUrl, message.value));
    for (const apply of effects) apply();
  }

  /** Validates one message against the current state and returns its effect. */
  private prepareMessage(signer: string, typeUrl: string, value: Uint8Array): () => void {
    switch (typeUrl) {
      case "/akash.deployment.v1beta4.MsgCreateDeployment": {
        const message = MsgCreateDeployment.decode(value);
        const owner = message.id?.owner ?? "";
        const dseq = message.id?.dseq?.toString() ?? "0";
        if (owner !== signer) throw new TxRejected(TxCode.unauthorized, `owner ${owner} is not the signer ${signer}`);
        if (dseq === "0") throw new TxRejected(TxCode.invalidRequest, "dseq must be set");
        if (this.deployments.has(`${owner}/${dseq}`)) throw new TxRejected(TxCode.moduleError, "deployment exists", "deployment");
        if (message.groups.length === 0) throw new TxRejected(TxCode.moduleError, "invalid deployment: no groups", "deployment");
        if (message.hash.length !== 32) throw new TxRejected(TxCode.moduleError, "invalid deployment hash", "deployment");
        const amount = BigInt(message.deposit?.amount?.amount ?? "0");
        const denom = message.deposit?.amount?.denom ?? "";
        if (amount <= 0n) throw new TxRejected(TxCode.insufficientFunds, "deployment deposit is required");
        const account = this.spendable(signer, amount, denom);
        const asks = message.groups.map((group) => askFromGroupSpec(group));
        return () => {
          account.balance -= amount;
          const deployment: SimulatedDeployment = {
            owner,
            dseq,
            state: "active",
            hash: message.hash,
            groups: message.groups.map((spec, index) => ({ gseq: index + 1, spec, ask: asks[index]!, orderState: "open" })),
            escrow: { amount, denom, transferred: 0n, state: "open", settledHeight: this.height },
            createdHeight: this.height,
          };
          this.deployments.set(`${owner}/${dseq}`, deployment);
          for (const group of deployment.groups) this.solicitBids(deployment, group.gseq, group.ask);
        };
      }
      case "/akash.market.v1beta5.MsgCreateLease": {
        const { bidId } = MsgCreateLease.decode(value);
        const owner = bidId?.owner ?? "";
        if (owner !== signer) throw new TxRejected(TxCode.unauthorized, `owner ${owner} is not the signer ${signer}`);
        const dseq = bidId?.dseq?.toString() ?? "0";
        const bid = this.bidList.find((candidate) => candidate.owner === owner && candidate.dseq === dseq && candidate.gseq === bidId?.gseq && candidate.oseq === bidId?.oseq && candidate.provider === bidId?.provider);
        if (bid === undefined || bid.state !== "open") throw new TxRejected(TxCode.moduleError, "bid not open", "market");
        const deployment = this.deployments.get(`${owner}/${dseq}`);
        const group = deployment?.groups.find((candidate) => candidate.gseq === bid.gseq);
        if (deployment?.state !== "active" || group === undefined || group.orderState !== "open") throw new TxRejected(TxCode.moduleError, "order not open", "market");
        const provider = this.providers.get(bid.provider);
        if (provider === undefined) throw new TxRejected(TxCode.moduleError, "unknown provider", "market");
        return () => {
          if (!provider.allocate(group.ask.nodes, group.ask.gpusPerNode)) {
            // The provider's capacity went elsewhere; it would fail to deploy and close the lease.
            bid.state = "closed";
            return;
          }
          bid.state = "active";
          group.orderState = "active";
          for (const other of this.bidList) {
            if (other !== bid && other.owner === owner && other.dseq === dseq && other.gseq === bid.gseq && other.state === "open") other.state = "lost";
          }
          this.leaseList.push({
            owner, dseq, gseq: bid.gseq, oseq: bid.oseq, provider: bid.provider, state: "active",
            price: bid.price, denom: bid.denom, nodes: group.ask.nodes, gpusPerNode: group.ask.gpusPerNode, createdHeight: this.height,
          });
        };
      }
      case "/akash.deployment.v1beta4.MsgCloseDeployment": {
        const message = MsgCloseDeployment.decode(value);
        const owner = message.id?.owner ?? "";
        const dseq = message.id?.dseq?.toString() ?? "0";
        if (owner !== signer) throw new TxRejected(TxCode.unauthorized, `owner ${owner} is not the signer ${signer}`);
        const deployment = this.deployments.get(`${owner}/${dseq}`);
        if (deployment === undefined) throw new TxRejected(TxCode.moduleError, "deployment not found", "deployment");
        if (deployment.state !== "active") throw new TxRejected(TxCode.moduleError, "deployment closed", "deployment");
        return () => {
          // What the leases did not draw goes back to the owner.
          const account = this.accounts.get(owner);
          if (account !== undefined) account.balance += deployment.escrow.amount;
          deployment.escrow.amount = 0n;
          deployment.escrow.state = "closed";
          this.closeDeployment(deployment, "closed");
        };
      }
      case "/akash.escrow.v1.MsgAccountDeposit": {
        const message = MsgAccountDeposit.decode(value);
        if (message.signer !== signer) throw new TxRejected(TxCode.unauthorized, `signer ${message.signer} did not sign`);
        const deployment = this.deployments.get(message.id?.xid ?? "");
        if (deployment === undefined || deployment.state !== "active") throw new TxRejected(TxCode.moduleError, "escrow account not found or closed", "escrow");
        const amount = BigInt(message.deposit?.amount?.amount ?? "0");
        if (amount <= 0n) throw new TxRejected(TxCode.invalidRequest, "deposit amount must be positive");
        if (message.deposit?.amount?.denom !== deployment.escrow.denom) throw new TxRejected(TxCode.invalidRequest, `deposit denom ${message.deposit?.amount?.denom} does not match ${deployment.escrow.denom}`);
        const account = this.spendable(signer, amount, deployment.escrow.denom);
        return () => {
          account.balance -= amount;
          deployment.escrow.amount += amount;
        };
      }
      default:
        throw new TxRejected(TxCode.invalidRequest, `message ${typeUrl} is not simulated`);
    }
  }

  /** The signer's account when it can pay `amount`; the bank module's error otherwise. */
  private spendable(address: string, amount: bigint, denom: string): SimulatedAccount {
    const account = this.accounts.get(address);
    const balance = account?.balance ?? 0n;
    if (account === undefined || balance < amount) throw new TxRejected(TxCode.insufficientFunds, `spendable balance ${balance}${denom} is smaller than ${amount}${denom}: insufficient funds`);
    return account;
  }

  private solicitBids(deployment: SimulatedDeployment, gseq: number, ask: SimulatedAsk): void {
    for (const provider of this.providers.values()) {
      const decision = provider.decide(ask);
      if ("declined" in decision) continue;
      const place = () => {
        const group = deployment.groups.find((candidate) => candidate.gseq === gseq);
        if (deployment.state !== "active" || group?.orderState !== "open") return;
        this.bidList.push({
          owner: deployment.owner, dseq: deployment.dseq, gseq, oseq: 1, provider: provider.address, state: "open",
          price: decision.price, denom: ask.denom, gpuModel: decision.gpuModel, createdHeight: this.height,
        });
      };
      if (decision.delayMs <= 0) {
        place();
        continue;
      }
      const timer = setTimeout(() => {
        this.timers.delete(timer);
        place();
      }, decision.delayMs);
      timer.unref();
      this.timers.add(timer);
    }
  }
}

const DECIMAL_SCALE = 10n ** 18n;

/** A lease price (decimal string) in whole units, rounded up: a simulated escrow errs towards running dry sooner. */
function wholeUnitsUp(price: string): bigint {
  return (parseDecimal(price) + DECIMAL_SCALE - 1n) / DECIMAL_SCALE;
}

/** One deployment as the deployment queries answer it (groups are not modelled). */
function deploymentAnswerOf(deployment: SimulatedDeployment) {
  return {
    deployment: {
      id: { owner: deployment.owner, dseq: deployment.dseq },
      state: deployment.state === "active" ? Deployment_State.active : Deployment_State.closed,
      hash: deployment.hash,
      createdAt: deployment.createdHeight,
    },
    groups: [],
    escrowAccount: escrowAccountOf(deployment),
  };
}

/** A deployment's escrow account as QueryDeploymentResponse.escrowAccount (akash.escrow.types.v1.Account) carries it. */
function escrowAccountOf(deployment: SimulatedDeployment) {
  const { escrow } = deployment;
  return {
    id: { scope: Scope.deployment, xid: `${deployment.owner}/${deployment.dseq}` },
    state: {
      owner: deployment.owner,
      state: { open: Types_State.open, closed: Types_State.closed, overdrawn: Types_State.overdrawn }[escrow.state],
      transferred: [{ denom: escrow.denom, amount: escrow.transferred.toString() }],
      settledAt: escrow.settledHeight,
      funds: [{ denom: escrow.denom, amount: escrow.amount.toString() }],
      deposits: [],
    },
  };
}

/** What a provider's bid engine reads from an order's GroupSpec. */
export function askFromGroupSpec(spec: GroupSpec): SimulatedAsk {
  let nodes = 0;
  let gpusPerNode = 0;
  const gpuModels = new Map<string, { model: string; ram?: string; interface?: string }>();
  const storageClasses = new Set<string>();
  let priceCeiling = "0";
  let denom = "";
  for (const unit of spec.resources) {
    nodes += unit.count;
    const units = Number(new TextDecoder().decode(unit.resource?.gpu?.units?.val ?? new Uint8Array()) || "0");
    gpusPerNode = Math.max(gpusPerNode, units);
    for (const attribute of unit.resource?.gpu?.attributes ?? []) {
      // vendor/nvidia/model/<model>[/ram/<size>][/interface/<pcie|sxm>]
      const parts = attribute.key.split("/");
      if (parts[0] !== "vendor" || parts[2] !== "model" || parts[3] === undefined) continue;
      const model: { model: string; ram?: string; interface?: string } = { model: parts[3] };
      for (let index = 4; index + 1 < parts.length; index += 2) {
        if (parts[index] === "ram") model.ram = parts[index + 1]!;
        if (parts[index] === "interface") model.interface = parts[index + 1]!;
      }
      gpuModels.set(attribute.key, model);
    }
    for (const volume of unit.resource?.storage ?? []) {
      const storageClass = volume.attributes.find((attribute) => attribute.key === "class")?.value;
      if (storageClass !== undefined) storageClasses.add(storageClass);
    }
    priceCeiling = unit.price?.amount ?? priceCeiling;
    denom = unit.price?.denom ?? denom;
  }
  return {
    nodes,
    gpusPerNode,
    gpuModels: [...gpuModels.values()],
    attributes: Object.fromEntries((spec.requirements?.attributes ?? []).map((attribute) => [attribute.key, attribute.value])),
    auditors: spec.requirements?.signedBy?.anyOf ?? [],
    storageClasses: [...storageClasses],
    priceCeiling,
    denom,
  };
}
