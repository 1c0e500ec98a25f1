// The LegacyDec wire format, pinned at the bytes. A cosmossdk.io/math.LegacyDec (the amount
// of a cosmos.base.v1beta1.DecCoin, and of akash.escrow.types.v1.Balance) travels as its
// 18-digit atomics: 1.5 as "1500000000000000000". chain-sdk's generated types (the
// `private-types/*` exports we encode and decode with) already convert: their DecCoin and
// Balance are `patched(...)` (dist/esm/chunk-ESEV5MX6.js, chunk-CT7AHZAH.js) with
// LegacyDec encode/decode (chunk-WEZWIYX4.js), and nested messages call the patched ones.
// So our code keeps plain decimals and must NOT scale by hand (that would send 10^36).
// The client and the simulator both go through those types, so a round trip alone would
// pass with any symmetric mistake; these tests look at the bytes between them.

import { DirectSecp256k1HdWallet } from "@cosmjs/proto-signing";
import { QueryDeploymentRequest } from "@akashnetwork/chain-sdk/private-types/akash.v1beta4";
import { QueryBidsRequest, QueryLeasesRequest } from "@akashnetwork/chain-sdk/private-types/akash.v1beta5";
import { TxBody, TxRaw } from "@akashnetwork/chain-sdk/private-types/cosmos.v1beta1";
import { toHex } from "@cosmjs/encoding";
import { buildManifest, deploymentVersion, parseAkashGroups, renderGroupSdlYaml } from "@drover/sdl";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { AkashChainClient } from "../market/akash-chain-client.js";
import { AkashSimulator } from "./akash-simulator.js";

const PROVIDER = "akash1providerlegacydec";
const signal = AbortSignal.timeout(20_000);
let simulator: AkashSimulator;
let client: AkashChainClient;

// One node with one GPU: the group's ceiling is 2.25 per block, the provider asks 1.5.
const [group] = parseAkashGroups([{ name: "one", nodes: 1, gpu: { model: "a100", perNode: 1 }, cpu: 8, memory: "32Gi", image: "ghcr.io/drover/worker:0.1.0", maxPrice: { amount: "2.25", denom: "uact" } }]);
const yaml = renderGroupSdlYaml(group!);

/** A length-delimited protobuf string field (lengths below 128, one varint byte). */
function stringField(field: number, text: string): Buffer {
  const data = Buffer.from(text, "utf8");
  if (data.length >= 128) throw new RangeError(`test helper: ${text} is too long for a one-byte length`);
  return Buffer.concat([Buffer.from([(field << 3) | 2, data.length]), data]);
}

/** Coin, DecCoin and escrow Balance share one layout: denom = 1, amount = 2. */
function coinBytes(denom: string, amount: string): Buffer {
  return Buffer.concat([stringField(1, denom), stringField(2, amount)]);
}

/** The protobuf value a real node's abci_query answers, fetched from the simulator without our client. */
async function rawQuery(path: string, request: Uint8Array): Promise<Buffer> {
  const response = await fetch(simulator.rpcUrl, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "abci_query", params: { path, data: toHex(request), prove: false } }),
    signal,
  });
  const answer = (await response.json()) as { result: { response: { code: number; value: string } } };
  expect(answer.result.response.code).toBe(0);
  return Buffer.from(answer.result.response.value, "base64");
}

beforeEach(async () => {
  // No block clock: the escrow moves only with our txs, so raw and decoded reads agree.
  simulator = await AkashSimulator.start({ providers: [{ address: PROVIDER, gpuTag: "a100", machines: [{ gpus: 1 }], pricePerGpu: "1.5" }], containers: "none", blockTimeMs: 0 });
  const wallet = await DirectSecp256k1HdWallet.generate(24, { prefix: "akash" });
  simulator.chain.fund((await wallet.getAccounts())[0]!.address, 10n ** 12n);
  client = await AkashChainClient.connect({ rpcUrl: simulator.rpcUrl, mnemonic: wallet.mnemonic, signal, broadcastPollIntervalMs: 10, broadcastTimeoutMs: 5_000 });
});

afterEach(async () => {
  client.disconnect();
  await simulator.stop();
});

async function deploy(dseq: string): Promise<Uint8Array> {
  const { groupSpecs } = buildManifest(yaml);
  const tx = await client.sign([client.createDeploymentMessage({ dseq, groupSpecs, hash: await deploymentVersion(yaml), deposit: { amount: "5000000", denom: "uact" } })], signal);
  await client.broadcast(tx, signal);
  return tx.bytes;
}

describe("LegacyDec amounts on the wire (18-digit atomics)", () => {
  it("MsgCreateDeployment carries the group price as atomics and the deposit Coin as whole units", async () => {
    // chain-sdk's SDL helpers give plain decimals: scaling is left to the protobuf types.
    const { groupSpecs } = buildManifest(yaml);
    expect(groupSpecs.flatMap((spec) => spec.resources.map((unit) => unit.price))).toEqual([{ denom: "uact", amount: "2.25" }]);

    const bytes = await deploy("7001");
    const [message] = TxBody.decode(TxRaw.decode(bytes).bodyBytes).messages;
    expect(message?.typeUrl).toBe("/akash.deployment.v1beta4.MsgCreateDeployment");
    const value = Buffer.from(message!.value);
    expect(value.includes(coinBytes("uact", "2250000000000000000"))).toBe(true);
    expect(value.includes(coinBytes("uact", "2.25"))).toBe(false);
    // akash.base.deposit.v1 Deposit.amount is a Coin (an integer), not a DecCoin.
    expect(value.includes(coinBytes("uact", "5000000"))).toBe(true);
    // The simulator reads the ceiling back as a real node would.
    expect(simulator.chain.deployment(client.owner, "7001")!.groups[0]!.ask.priceCeiling).toBe("2.25");
  });

  it("a bid and a lease at 1.5 cross the wire as 1500000000000000000 and reach the client as 1.5", async () => {
    await deploy("7002");
    const bids = await rawQuery("/akash.market.v1beta5.Query/Bids", QueryBidsRequest.encode(QueryBidsRequest.fromPartial({ filters: { owner: client.owner, dseq: "7002" } })).finish());
    expect(bids.includes(coinBytes("uact", "1500000000000000000"))).toBe(true);
    expect(await client.bids("7002", signal)).toMatchObject([{ provider: PROVIDER, state: "open", price: "1.5", denom: "uact" }]);

    await client.broadcast(await client.sign([client.createLeaseMessage({ dseq: "7002", gseq: 1, oseq: 1, provider: PROVIDER })], signal), signal);
    const leases = await rawQuery("/akash.market.v1beta5.Query/Leases", QueryLeasesRequest.encode(QueryLeasesRequest.fromPartial({ filters: { owner: client.owner, dseq: "7002" } })).finish());
    expect(leases.includes(coinBytes("uact", "1500000000000000000"))).toBe(true);
    expect(await client.leases(signal, "7002")).toMatchObject([{ provider: PROVIDER, state: "active", price: "1.5", denom: "uact" }]);
  });

  it("the escrow account's funds and transferred cross the wire as atomics and reach the client as plain decimals", async () => {
    await deploy("7003");
    await client.broadcast(await client.sign([client.createLeaseMessage({ dseq: "7003", gseq: 1, oseq: 1, provider: PROVIDER })], signal), signal);
    const depositTx = await client.sign([client.depositMessage("7003", { amount: "1000000", denom: "uact" })], signal);
    // MsgAccountDeposit's deposit is a Coin too: whole units, unscaled.
    expect(Buffer.from(TxBody.decode(TxRaw.decode(depositTx.bytes).bodyBytes).messages[0]!.value).includes(coinBytes("uact", "1000000"))).toBe(true);
    await client.broadcast(depositTx, signal);

    const { amount, transferred } = simulator.chain.deployment(client.owner, "7003")!.escrow;
    // The lease drew 1.5 (2 whole units in the simulator) at the one block after its own
    // (the deposit's): Akash settles a lease from the block after the one that created it.
    expect(transferred).toBe(2n);
    expect(amount).toBe(6_000_000n - 2n);
    const raw = await rawQuery("/akash.deployment.v1beta4.Query/Deployment", QueryDeploymentRequest.encode(QueryDeploymentRequest.fromPartial({ id: { owner: client.owner, dseq: "7003" } })).finish());
    expect(raw.includes(coinBytes("uact", `${amount}${"0".repeat(18)}`))).toBe(true);
    expect(raw.includes(coinBytes("uact", `${transferred}${"0".repeat(18)}`))).toBe(true);
    expect(await client.deploymentEscrow("7003", signal)).toMatchObject({
      escrowState: "open",
      funds: [{ denom: "uact", amount: amount.toString() }],
      pricePerBlock: [{ denom: "uact", amount: "1.5" }],
    });
  });
});
