// The orchestrator's connection to an Akash node: chain-sdk's tx client (cosmjs
// SigningStargateClient over CometBFT RPC) for signing and broadcasting, and protobuf
// queries over the same RPC (abci_query on the gRPC query paths), decoded with
// chain-sdk's generated types. Signing and broadcasting are separate steps so that the
// lease ledger can record the signed tx (sequence, hash, bytes) before it is sent.
//
// Prices and escrow balances (DecCoin, escrow Balance) are cosmossdk.io/math.LegacyDec,
// which travels as 18-digit atomics ("1.5" is "1500000000000000000"). chain-sdk's
// `private-types/*` already convert: their DecCoin and Balance are patched with LegacyDec
// encode/decode (dist/esm/chunk-ESEV5MX6.js, chunk-CT7AHZAH.js, chunk-WEZWIYX4.js), so we
// pass and read plain decimals and must not scale them again
// (akash-simulator/legacy-dec-wire.test.ts pins the bytes).
//
// cosmjs calls take no AbortSignal; every method checks the signal before and after
// each network step and races the step against it, so an abort returns promptly (the
// request itself may still complete on the node, which the ledger's reconcile handles).

import { JwtTokenManager, createStargateClient } from "@akashnetwork/chain-sdk";
import { Deployment_State, Lease_State, MsgAccountDeposit, Scope, Source, Types_State } from "@akashnetwork/chain-sdk/private-types/akash.v1";
import { MsgCloseDeployment, MsgCreateDeployment, QueryDeploymentRequest, QueryDeploymentResponse, QueryDeploymentsRequest, QueryDeploymentsResponse, QueryProviderRequest, QueryProviderResponse } from "@akashnetwork/chain-sdk/private-types/akash.v1beta4";
import { Bid_State, MsgCreateLease, QueryBidsRequest, QueryBidsResponse, QueryLeasesRequest, QueryLeasesResponse } from "@akashnetwork/chain-sdk/private-types/akash.v1beta5";
import { BaseAccount, QueryAccountRequest, QueryAccountResponse, TxRaw } from "@akashnetwork/chain-sdk/private-types/cosmos.v1beta1";
import { Secp256k1HdWallet } from "@cosmjs/amino";
import { sha256 } from "@cosmjs/crypto";
import { toHex } from "@cosmjs/encoding";
import { DirectSecp256k1HdWallet, type EncodeObject, type GeneratedType } from "@cosmjs/proto-signing";
import { GasPrice, QueryClient, calculateFee, type StdFee } from "@cosmjs/stargate";
import { connectComet, type CometClient } from "@cosmjs/tendermint-rpc";
import { registerSecretValue } from "@drover/storage";
import { ProvisionError } from "../../../errors.js";
import { formatDecimal, parseDecimal } from "./decimal-price.js";

type StargateTxClient = ReturnType<typeof createStargateClient>;

export interface AkashChainClientOptions {
  /** CometBFT RPC endpoint of an Akash node. */
  readonly rpcUrl: string;
  /** The wallet's BIP-39 mnemonic; kept only inside the wallets, never logged. */
  readonly mnemonic: string;
  readonly signal: AbortSignal;
  /** Gas price, e.g. "0.025uakt" (fees are paid in AKT even when deployments pay in ACT). */
  readonly gasPrice?: string;
  /** Gas per transaction; Akash deployment txs use well under this. */
  readonly gasLimit?: number;
  readonly broadcastPollIntervalMs?: number;
  readonly broadcastTimeoutMs?: number;
}

export interface SignedTx {
  readonly bytes: Uint8Array;
  /** Upper-case hex SHA-256 of the bytes: the chain's tx hash. */
  readonly hash: string;
  readonly sequence: number;
}

export interface ChainBid {
  readonly dseq: string;
  readonly gseq: number;
  readonly oseq: number;
  readonly provider: string;
  readonly state: "open" | "active" | "lost" | "closed" | "invalid";
  readonly price: string;
  readonly denom: string;
  /** GPU models in the bid's resource offer (`vendor/nvidia/model/<slug>...` attributes). */
  readonly gpuModels: readonly string[];
}

export interface ChainLease {
  readonly dseq: string;
  readonly gseq: number;
  readonly oseq: number;
  readonly provider: string;
  readonly state: "active" | "closed" | "insufficient_funds" | "invalid";
  readonly price: string;
  readonly denom: string;
  /** Height of the block that created the lease; it pays from the next block on. */
  readonly createdHeight: number;
}

/** A deployment's escrow account and what its leases draw from it per block. */
export interface DeploymentEscrow {
  readonly dseq: string;
  readonly deploymentState: "active" | "closed" | "invalid";
  /** escrowAccount.state.state: overdrawn once the leases drew more than it held. */
  readonly escrowState: "open" | "closed" | "overdrawn" | "invalid";
  /** escrowAccount.state.funds: unspent funds per denomination, as decimal strings (negative when overdrawn). */
  readonly funds: ReadonlyArray<{ readonly denom: string; readonly amount: string }>;
  /** Sum of the prices of the deployment's active leases (decimal string per block), per denomination. */
  readonly pricePerBlock: ReadonlyArray<{ readonly denom: string; readonly amount: string }>;
}

/** Cosmos SDK code for "insufficient funds" (bank): the wallet cannot pay a deposit. */
export const INSUFFICIENT_FUNDS_CODE = 5;

/** Cosmos SDK code for "account sequence mismatch": another tx of the wallet got in first. */
export const WRONG_SEQUENCE_CODE = 32;

export class AkashChainClient {
  private constructor(
    readonly owner: string,
    private readonly txClient: StargateTxClient,
    private readonly comet: CometClient,
    private readonly query: QueryClient,
    private readonly aminoWallet: Secp256k1HdWallet,
    private readonly chainId: string,
    private readonly fee: StdFee,
  ) {}

  static async connect(options: AkashChainClientOptions): Promise<AkashChainClient> {
    const { signal } = options;
    signal.throwIfAborted();
    registerSecretValue(options.mnemonic);
    const directWallet = await DirectSecp256k1HdWallet.fromMnemonic(options.mnemonic, { prefix: "akash" });
    // JwtTokenManager signs ADR-36 amino documents, which the direct wallet cannot.
    const aminoWallet = await Secp256k1HdWallet.fromMnemonic(options.mnemonic, { prefix: "akash" });
    const [account] = await directWallet.getAccounts();
    const txClient = createStargateClient({
      baseUrl: options.rpcUrl,
      signer: directWallet,
      // chain-sdk resolves message types lazily, as its generated SDK methods load them;
      // we build messages ourselves, so we register what we send up front.
      builtInTypes: [
        registryType(MsgCreateDeployment),
        registryType(MsgCloseDeployment),
        registryType(MsgCreateLease),
        registryType(MsgAccountDeposit),
        registryType(TxRaw),
      ],
      ...(options.gasPrice === undefined ? {} : { defaultGasPrice: options.gasPrice }),
      stargateOptions: {
        broadcastPollIntervalMs: options.broadcastPollIntervalMs ?? 3_000,
        broadcastTimeoutMs: options.broadcastTimeoutMs ?? 60_000,
      },
    });
    const comet = await abortable(connectComet(options.rpcUrl), signal);
    const status = await abortable(comet.status(), signal);
    const fee = calculateFee(options.gasLimit ?? 400_000, GasPrice.fromString(options.gasPrice ?? "0.025uakt"));
    return new AkashChainClient(account!.address, txClient, comet, new QueryClient(comet), aminoWallet, status.nodeInfo.network, fee);
  }

  disconnect(): void {
    void this.txClient.disconnect();
    this.comet.disconnect();
  }

  /** The next sequence the chain expects from the owner. */
  async accountSequence(signal: AbortSignal): Promise<{ accountNumber: number; sequence: number }> {
    const response = QueryAccountResponse.decode(await this.abciQuery("/cosmos.auth.v1beta1.Query/Account", QueryAccountRequest.encode(QueryAccountRequest.fromPartial({ address: this.owner })).finish(), signal));
    const account = BaseAccount.decode(response.account?.value ?? new Uint8Array());
    return { accountNumber: Number(account.accountNumber.toString()), sequence: Number(account.sequence.toString()) };
  }

  /** Signs without broadcasting: the ledger records the result before anything leaves. */
  async sign(messages: EncodeObject[], signal: AbortSignal): Promise<SignedTx> {
    const { accountNumber, sequence } = await this.accountSequence(signal);
    const raw = await abortable(this.txClient.sign(messages, this.fee, "drover", { accountNumber, sequence, chainId: this.chainId }), signal);
    const bytes = TxRaw.encode(TxRaw.fromPartial(raw)).finish();
    return { bytes, hash: toHex(sha256(bytes)).toUpperCase(), sequence };
  }

  /** Broadcasts and waits for inclusion; throws ProvisionError (context: code, txHash) when the chain refuses or fails it. */
  async broadcast(tx: SignedTx, signal: AbortSignal): Promise<{ height: number }> {
    signal.throwIfAborted();
    let result: Awaited<ReturnType<StargateTxClient["broadcast"]>>;
    try {
      result = await abortable(this.txClient.broadcast(TxRaw.decode(tx.bytes)), signal);
    } catch (error) {
      if (signal.aborted) throw error;
      const code = typeof (error as { code?: unknown }).code === "number" ? (error as { code: number }).code : -1;
      // Refused at CheckTx. A wrong sequence or a transport failure may pass when signed again.
      throw new ProvisionError(`broadcast of tx ${tx.hash} failed: ${(error as Error).message}`, code === WRONG_SEQUENCE_CODE || code === -1, { code, txHash: tx.hash }, { cause: error });
    }
    if (result.code !== 0) throw new ProvisionError(`tx ${tx.hash} failed on chain (code ${result.code}): ${result.rawLog ?? ""}`, false, { code: result.code, txHash: tx.hash });
    return { height: result.height };
  }

  async txLanded(hash: string, signal: AbortSignal): Promise<boolean> {
    const result = await abortable(this.comet.txSearchAll({ query: `tx.hash='${hash}'` }), signal);
    return result.txs.length > 0;
  }

  async deployments(signal: AbortSignal, state: "active" | "closed" | "" = "active"): Promise<Array<{ dseq: string; state: "active" | "closed" | "invalid" }>> {
    const request = QueryDeploymentsRequest.encode(QueryDeploymentsRequest.fromPartial({ filters: { owner: this.owner, state } })).finish();
    const response = QueryDeploymentsResponse.decode(await this.abciQuery("/akash.deployment.v1beta4.Query/Deployments", request, signal));
    return response.deployments.map(({ deployment }) => ({
      dseq: deployment?.id?.dseq.toString() ?? "0",
      state: deployment?.state === Deployment_State.active ? "active" : deployment?.state === Deployment_State.closed ? "closed" : "invalid",
    }));
  }

  /**
   * The deployment's escrow balance (QueryDeploymentResponse.escrowAccount, escrow types v1)
   * and the sum of its active leases' prices per block.
   */
  async deploymentEscrow(dseq: string, signal: AbortSignal): Promise<DeploymentEscrow> {
    const request = QueryDeploymentRequest.encode(QueryDeploymentRequest.fromPartial({ id: { owner: this.owner, dseq } })).finish();
    const response = QueryDeploymentResponse.decode(await this.abciQuery("/akash.deployment.v1beta4.Query/Deployment", request, signal));
    const account = response.escrowAccount?.state;
    const escrowStates: Record<number, DeploymentEscrow["escrowState"]> = { [Types_State.open]: "open", [Types_State.closed]: "closed", [Types_State.overdrawn]: "overdrawn" };
    const prices = new Map<string, bigint>();
    for (const lease of await this.leases(signal, dseq)) {
      if (lease.state !== "active") continue;
      prices.set(lease.denom, (prices.get(lease.denom) ?? 0n) + parseDecimal(lease.price));
    }
    return {
      dseq,
      deploymentState: response.deployment?.state === Deployment_State.active ? "active" : response.deployment?.state === Deployment_State.closed ? "closed" : "invalid",
      escrowState: escrowStates[account?.state ?? Types_State.invalid] ?? "invalid",
      funds: (account?.funds ?? []).map((balance) => ({ denom: balance.denom, amount: balance.amount })),
      pricePerBlock: [...prices.entries()].map(([denom, amount]) => ({ denom, amount: formatDecimal(amount) })),
    };
  }

  /** The latest block's height and time, from the node's status (the chain's own clock). */
  async latestBlock(signal: AbortSignal): Promise<{ height: number; timeMs: number }> {
    const status = await abortable(this.comet.status(), signal);
    return { height: status.syncInfo.latestBlockHeight, timeMs: status.syncInfo.latestBlockTime.getTime() };
  }

  async bids(dseq: string, signal: AbortSignal): Promise<ChainBid[]> {
    const request = QueryBidsRequest.encode(QueryBidsRequest.fromPartial({ filters: { owner: this.owner, dseq } })).finish();
    const response = QueryBidsResponse.decode(await this.abciQuery("/akash.market.v1beta5.Query/Bids", request, signal));
    const states: Record<number, ChainBid["state"]> = { [Bid_State.open]: "open", [Bid_State.active]: "active", [Bid_State.lost]: "lost", [Bid_State.closed]: "closed" };
    return response.bids.flatMap(({ bid }) => {
      if (bid?.id === undefined) return [];
      const gpuModels = bid.resourcesOffer.flatMap((offer) => offer.resources?.gpu?.attributes ?? []).map((attribute) => attribute.key.split("/")[3] ?? "").filter((model) => model !== "");
      return [{
        dseq: bid.id.dseq.toString(), gseq: bid.id.gseq, oseq: bid.id.oseq, provider: bid.id.provider,
        state: states[bid.state] ?? "invalid", price: bid.price?.amount ?? "0", denom: bid.price?.denom ?? "", gpuModels,
      }];
    });
  }

  async leases(signal: AbortSignal, dseq = "0"): Promise<ChainLease[]> {
    const request = QueryLeasesRequest.encode(QueryLeasesRequest.fromPartial({ filters: { owner: this.owner, dseq } })).finish();
    const response = QueryLeasesResponse.decode(await this.abciQuery("/akash.market.v1beta5.Query/Leases", request, signal));
    const states: Record<number, ChainLease["state"]> = { [Lease_State.active]: "active", [Lease_State.closed]: "closed", [Lease_State.insufficient_funds]: "insufficient_funds" };
    return response.leases.flatMap(({ lease }) => {
      if (lease?.id === undefined) return [];
      return [{ dseq: lease.id.dseq.toString(), gseq: lease.id.gseq, oseq: lease.id.oseq, provider: lease.id.provider, state: states[lease.state] ?? "invalid", price: lease.price?.amount ?? "0", denom: lease.price?.denom ?? "", createdHeight: Number(lease.createdAt.toString()) }];
    });
  }

  async providerHostUri(provider: string, signal: AbortSignal): Promise<string> {
    const request = QueryProviderRequest.encode(QueryProviderRequest.fromPartial({ owner: provider })).finish();
    return QueryProviderResponse.decode(await this.abciQuery("/akash.provider.v1beta4.Query/Provider", request, signal)).provider?.hostUri ?? "";
  }

  /** A short-lived JWT for the provider endpoints (chain-sdk's ES256KADR36 token). */
  async providerJwt(nowMs: number, lifetimeSeconds = 600): Promise<string> {
    const issuedAt = Math.floor(nowMs / 1000);
    return new JwtTokenManager(this.aminoWallet).generateToken({ version: "v1", iss: this.owner, iat: issuedAt, nbf: issuedAt, exp: issuedAt + lifetimeSeconds, leases: { access: "full" } });
  }

  createDeploymentMessage(input: { dseq: string; groupSpecs: unknown[]; hash: Uint8Array; deposit: { amount: string; denom: string } }): EncodeObject {
    return {
      typeUrl: "/akash.deployment.v1beta4.MsgCreateDeployment",
      value: MsgCreateDeployment.fromPartial({
        id: { owner: this.owner, dseq: input.dseq },
        groups: input.groupSpecs as never,
        hash: input.hash,
        deposit: { amount: input.deposit, sources: [Source.balance] },
      }),
    };
  }

  createLeaseMessage(bid: { dseq: string; gseq: number; oseq: number; provider: string }): EncodeObject {
    return { typeUrl: "/akash.market.v1beta5.MsgCreateLease", value: MsgCreateLease.fromPartial({ bidId: { owner: this.owner, ...bid, bseq: 0 } }) };
  }

  closeDeploymentMessage(dseq: string): EncodeObject {
    return { typeUrl: "/akash.deployment.v1beta4.MsgCloseDeployment", value: MsgCloseDeployment.fromPartial({ id: { owner: this.owner, dseq } }) };
  }

  depositMessage(dseq: string, amount: { amount: string; denom: string }): EncodeObject {
    return {
      typeUrl: "/akash.escrow.v1.MsgAccountDeposit",
      value: MsgAccountDeposit.fromPartial({ signer: this.owner, id: { scope: Scope.deployment, xid: `${this.owner}/${dseq}` }, deposit: { amount, sources: [Source.balance] } }),
    };
  }

  private async abciQuery(path: string, request: Uint8Array, signal: AbortSignal): Promise<Uint8Array> {
    signal.throwIfAborted();
    try {
      return (await abortable(this.query.queryAbci(path, request), signal)).value;
    } catch (error) {
      if (signal.aborted) throw error;
      throw new ProvisionError(`chain query ${path} failed: ${(error as Error).message}`, true, { path }, { cause: error });
    }
  }
}

/**
 * chain-sdk's ts-proto types write with @bufbuild's BinaryWriter, cosmjs's registry is
 * typed for protobufjs's Writer; cosmjs only calls encode(...).finish(), which both have.
 */
function registryType(type: { readonly $type: string }): GeneratedType & { typeUrl: string } {
  return { ...(type as unknown as GeneratedType), typeUrl: `/${type.$type}` };
}

function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      },
    );
  });
}
