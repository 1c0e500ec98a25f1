import { readFile } from "node:fs/promises";
import net from "node:net";
import { manifestToSortedJSON } from "@akashnetwork/chain-sdk";
import { TxRaw } from "@akashnetwork/chain-sdk/private-types/cosmos.v1beta1";
import { DirectSecp256k1HdWallet } from "@cosmjs/proto-signing";
import { buildManifest, deploymentVersion, parseAkashGroups, renderGroupSdlYaml } from "@drover/sdl";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ProvisionError } from "../../../errors.js";
import { AkashChainClient } from "../market/akash-chain-client.js";
import { AkashSimulator } from "./akash-simulator.js";

const PROVIDER = "akash1providerfrag";
const signal = AbortSignal.timeout(20_000);
let simulator: AkashSimulator;
let client: AkashChainClient;

const [group] = parseAkashGroups([
  { name: "a100", nodes: 2, gpu: { model: "a100", perNode: 8 }, cpu: 64, memory: "256Gi", image: "ghcr.io/drover/worker:0.1.0", maxPrice: { amount: 1000, denom: "uact" } },
]);
const yaml = renderGroupSdlYaml(group!);

async function connect(mnemonic: string): Promise<AkashChainClient> {
  return AkashChainClient.connect({ rpcUrl: simulator.rpcUrl, mnemonic, signal, gasPrice: "0.025uakt", broadcastPollIntervalMs: 10, broadcastTimeoutMs: 5_000 });
}

beforeEach(async () => {
  simulator = await AkashSimulator.start({
    providers: [{ address: PROVIDER, gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }, { gpus: 8 }], pricePerGpu: "100" }],
    // The fake container runtime has a describe of its own below.
    containers: "none",
  });
  const wallet = await DirectSecp256k1HdWallet.generate(24, { prefix: "akash" });
  const [account] = await wallet.getAccounts();
  simulator.chain.fund(account!.address, 10n ** 12n);
  client = await connect(wallet.mnemonic);
});

afterEach(async () => {
  client.disconnect();
  await simulator.stop();
});

async function createDeployment(dseq: string) {
  const { groupSpecs } = buildManifest(yaml);
  const tx = await client.sign([client.createDeploymentMessage({ dseq, groupSpecs, hash: await deploymentVersion(yaml), deposit: { amount: "5000000", denom: "uact" } })], signal);
  return { tx, result: await client.broadcast(tx, signal) };
}

describe("Akash simulator through chain-sdk's tx client", () => {
  it("verifies, applies and indexes a signed MsgCreateDeployment; the provider bids", async () => {
    const { tx } = await createDeployment("1001");
    expect(await client.txLanded(tx.hash, signal)).toBe(true);
    expect(await client.accountSequence(signal)).toMatchObject({ sequence: 1 });
    expect(await client.deployments(signal)).toEqual([{ dseq: "1001", state: "active" }]);
    const bids = await client.bids("1001", signal);
    expect(bids).toEqual([{ dseq: "1001", gseq: 1, oseq: 1, provider: PROVIDER, state: "open", price: "800", denom: "uact", gpuModels: ["a100"] }]);
    expect(simulator.chain.books(client.owner).deployments.map((d) => d.dseq)).toEqual(["1001"]);
  });

  it("leases, takes the manifest with a real JWT, reports lease status, and closes", async () => {
    await createDeployment("1002");
    const leaseTx = await client.sign([client.createLeaseMessage({ dseq: "1002", gseq: 1, oseq: 1, provider: PROVIDER })], signal);
    await client.broadcast(leaseTx, signal);
    expect(await client.leases(signal)).toMatchObject([{ dseq: "1002", provider: PROVIDER, state: "active", price: "800" }]);
    // Two of three machines are now taken.
    expect(simulator.providers.get(PROVIDER)!.simulated.advertisement().gpus[0]!.freeGpus).toBe(8);

    const hostUri = await client.providerHostUri(PROVIDER, signal);
    expect(hostUri).toBe(simulator.providerUrl(PROVIDER));
    const jwt = await client.providerJwt(Date.now());
    const manifestBody = manifestToSortedJSON(buildManifest(yaml).groups);
    const put = await fetch(`${hostUri}/deployment/1002/manifest`, { method: "PUT", body: manifestBody, headers: { authorization: `Bearer ${jwt}` }, signal });
    expect(put.status).toBe(200);
    const status = await fetch(`${hostUri}/lease/1002/1/1/status`, { headers: { authorization: `Bearer ${jwt}` }, signal });
    expect(status.status).toBe(200);
    const body = (await status.json()) as { forwarded_ports: Record<string, Array<{ port: number; externalPort: number }>> };
    expect(body.forwarded_ports["a100-leader"]).toEqual([
      expect.objectContaining({ port: 7077, externalPort: expect.any(Number) }),
      expect.objectContaining({ port: 7447, externalPort: expect.any(Number) }),
    ]);

    await client.broadcast(await client.sign([client.depositMessage("1002", { amount: "1000000", denom: "uact" })], signal), signal);
    // The lease draws its 800 per block from the escrow from the block after its own, as on
    // Akash: price x (height - the lease's height), whatever blocks the clock added.
    const escrow = simulator.chain.deployment(client.owner, "1002")!.escrow;
    const lease = simulator.chain.books(client.owner).leases.find((candidate) => candidate.dseq === "1002")!;
    expect(escrow.amount + escrow.transferred).toBe(6_000_000n);
    expect(escrow.transferred).toBe(800n * BigInt(simulator.chain.latestHeight - lease.createdHeight));
    expect(escrow.transferred).toBeGreaterThanOrEqual(800n);
    expect(simulator.chain.balance(client.owner)).toBe(10n ** 12n - 6_000_000n);

    await client.broadcast(await client.sign([client.closeDeploymentMessage("1002")], signal), signal);
    expect(simulator.chain.books(client.owner)).toMatchObject({ deployments: [], leases: [] });
    // What the lease did not draw comes back to the wallet.
    expect(simulator.chain.balance(client.owner)).toBe(10n ** 12n - escrow.transferred);
    expect(simulator.providers.get(PROVIDER)!.simulated.advertisement().gpus[0]!.freeGpus).toBe(24);
  });

  it("refuses a manifest whose hash differs from the deployment, and a forged JWT", async () => {
    await createDeployment("1003");
    await client.broadcast(await client.sign([client.createLeaseMessage({ dseq: "1003", gseq: 1, oseq: 1, provider: PROVIDER })], signal), signal);
    const url = simulator.providerUrl(PROVIDER);
    const jwt = await client.providerJwt(Date.now());
    const other = parseAkashGroups([{ ...{ name: "a100", nodes: 2, gpu: { model: "a100", perNode: 8 }, cpu: 64, memory: "256Gi", maxPrice: { amount: 1000, denom: "uact" } }, image: "evil:1" }]);
    const wrong = await fetch(`${url}/deployment/1003/manifest`, { method: "PUT", body: manifestToSortedJSON(buildManifest(renderGroupSdlYaml(other[0]!)).groups), headers: { authorization: `Bearer ${jwt}` }, signal });
    expect(wrong.status).toBe(422);

    const [header, payload, signature] = jwt.split(".") as [string, string, string];
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as { exp: number };
    const tampered = `${header}.${Buffer.from(JSON.stringify({ ...claims, exp: claims.exp + 3600 })).toString("base64url")}.${signature}`;
    const forged = await fetch(`${url}/lease/1003/1/1/status`, { headers: { authorization: `Bearer ${tampered}` }, signal });
    expect(forged.status).toBe(401);
    const anonymous = await fetch(`${url}/lease/1003/1/1/status`, { signal });
    expect(anonymous.status).toBe(401);
  });

  it("rejects a tx whose signature does not match its bytes, and a replay", async () => {
    const { groupSpecs } = buildManifest(yaml);
    const signed = await client.sign([client.createDeploymentMessage({ dseq: "1004", groupSpecs, hash: await deploymentVersion(yaml), deposit: { amount: "5000000", denom: "uact" } })], signal);
    const raw = TxRaw.decode(signed.bytes);
    const forgedSignature = Uint8Array.from(raw.signatures[0]!);
    forgedSignature[10] = forgedSignature[10]! ^ 0xff;
    const forged = { ...signed, bytes: TxRaw.encode(TxRaw.fromPartial({ ...raw, signatures: [forgedSignature] })).finish() };
    await expect(client.broadcast(forged, signal)).rejects.toThrow(/signature verification failed/);
    expect(simulator.chain.books(client.owner).deployments).toEqual([]);

    await client.broadcast(signed, signal);
    const replay = client.broadcast(signed, signal);
    await expect(replay).rejects.toBeInstanceOf(ProvisionError);
    expect(simulator.chain.accountSequence(client.owner)).toBe(1);
  });

  it("fails a lease on a bid that is not open, with the chain's error code, and never double-leases", async () => {
    await createDeployment("1005");
    const lease = client.createLeaseMessage({ dseq: "1005", gseq: 1, oseq: 1, provider: PROVIDER });
    await client.broadcast(await client.sign([lease], signal), signal);
    const second = client.broadcast(await client.sign([lease], signal), signal);
    await expect(second).rejects.toThrow(/bid not open/);
    expect(simulator.chain.books(client.owner).leases).toHaveLength(1);
  });

  it("keeps a dropped broadcast's sequence unused, so the same signed bytes can be sent again", async () => {
    const { groupSpecs } = buildManifest(yaml);
    const signed = await client.sign([client.createDeploymentMessage({ dseq: "1006", groupSpecs, hash: await deploymentVersion(yaml), deposit: { amount: "5000000", denom: "uact" } })], signal);
    simulator.chain.dropNextBroadcasts(1);
    // The tx is never found in a block; the caller gives up waiting.
    await expect(client.broadcast(signed, AbortSignal.timeout(300))).rejects.toMatchObject({ name: "TimeoutError" });
    expect(simulator.chain.txLanded(signed.hash)).toBe(false);
    expect((await client.accountSequence(signal)).sequence).toBe(0);
    await client.broadcast(signed, signal);
    expect(simulator.chain.txLanded(signed.hash)).toBe(true);
  });

  it("loses a lease on demand (provider failure) and gives the GPUs back", async () => {
    await createDeployment("1007");
    await client.broadcast(await client.sign([client.createLeaseMessage({ dseq: "1007", gseq: 1, oseq: 1, provider: PROVIDER })], signal), signal);
    simulator.chain.loseLease(client.owner, "1007");
    expect(await client.leases(signal)).toMatchObject([{ dseq: "1007", state: "closed" }]);
    expect(simulator.chain.books(client.owner).deployments.map((d) => d.dseq)).toEqual(["1007"]);
  });
});

describe("escrow on the block clock", () => {
  let clocked: AkashSimulator;
  let clockedClient: AkashChainClient;

  beforeEach(async () => {
    clocked = await AkashSimulator.start({ providers: [{ address: PROVIDER, gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }], pricePerGpu: "100" }], containers: "none", blockTimeMs: 50 });
    const wallet = await DirectSecp256k1HdWallet.generate(24, { prefix: "akash" });
    clocked.chain.fund((await wallet.getAccounts())[0]!.address, 10n ** 9n);
    clockedClient = await AkashChainClient.connect({ rpcUrl: clocked.rpcUrl, mnemonic: wallet.mnemonic, signal, broadcastPollIntervalMs: 10, broadcastTimeoutMs: 5_000 });
  });

  afterEach(async () => {
    clockedClient.disconnect();
    await clocked.stop();
  });

  async function leased(dseq: string, deposit: string): Promise<void> {
    const { groupSpecs } = buildManifest(yaml);
    await clockedClient.broadcast(await clockedClient.sign([clockedClient.createDeploymentMessage({ dseq, groupSpecs, hash: await deploymentVersion(yaml), deposit: { amount: deposit, denom: "uact" } })], signal), signal);
    await clockedClient.broadcast(await clockedClient.sign([clockedClient.createLeaseMessage({ dseq, gseq: 1, oseq: 1, provider: PROVIDER })], signal), signal);
  }

  it("blocks come with wall time; each draws the lease's price until the escrow cannot pay, then the lease is insufficient_funds and the deployment closed", async () => {
    const closed: Array<{ dseq: string; state: string }> = [];
    clocked.chain.onLeaseClosed((lease) => closed.push({ dseq: lease.dseq, state: lease.state }));
    const startedAt = Date.now();
    // The bid (8 GPUs at 100) is 800 per block: 8000 lasts 10 blocks, about 0.5 s at 50 ms.
    await leased("3001", "8000");
    const early = await clockedClient.deploymentEscrow("3001", signal);
    expect(early).toMatchObject({ dseq: "3001", deploymentState: "active", escrowState: "open", pricePerBlock: [{ denom: "uact", amount: "800" }] });
    // Nothing is drawn in the lease's own block (Akash settles from the next one).
    expect(Number(early.funds[0]!.amount)).toBeLessThanOrEqual(8_000);
    expect(Number(early.funds[0]!.amount) % 800).toBe(0);

    const heightBefore = (await clockedClient.latestBlock(signal)).height;
    for (;;) {
      const [lease] = await clockedClient.leases(signal, "3001");
      if (lease?.state !== "active") {
        expect(lease?.state).toBe("insufficient_funds");
        break;
      }
      expect(Date.now() - startedAt).toBeLessThan(5_000);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    // The wall clock made the blocks: no tx was sent while waiting.
    expect((await clockedClient.latestBlock(signal)).height).toBeGreaterThan(heightBefore);
    expect(await clockedClient.deploymentEscrow("3001", signal)).toMatchObject({ deploymentState: "closed", escrowState: "overdrawn", funds: [{ denom: "uact", amount: "0" }], pricePerBlock: [] });
    expect(await clockedClient.deployments(signal)).toEqual([]);
    // The providers hear of it as of any lost lease (the fake runtime stops containers on this).
    expect(closed).toEqual([{ dseq: "3001", state: "insufficient_funds" }]);
    expect(clocked.chain.deployment(clockedClient.owner, "3001")!.escrow.transferred).toBe(8_000n);
  });

  it("a deposit moves funds from the wallet to the escrow; a wallet that cannot pay is refused with the bank's code 5", async () => {
    await leased("3002", "1000000");
    await clockedClient.broadcast(await clockedClient.sign([clockedClient.depositMessage("3002", { amount: "500000", denom: "uact" })], signal), signal);
    const escrow = clocked.chain.deployment(clockedClient.owner, "3002")!.escrow;
    expect(escrow.amount + escrow.transferred).toBe(1_500_000n);
    expect(clocked.chain.balance(clockedClient.owner)).toBe(10n ** 9n - 1_500_000n);

    clocked.chain.setBalance(clockedClient.owner, 1_000n);
    const refused = await clockedClient.broadcast(await clockedClient.sign([clockedClient.depositMessage("3002", { amount: "500000", denom: "uact" })], signal), signal).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(ProvisionError);
    expect((refused as ProvisionError).context.code).toBe(5);
    expect((refused as ProvisionError).message).toMatch(/insufficient funds/);
    expect(clocked.chain.balance(clockedClient.owner)).toBe(1_000n);
  });
});

describe("the fake container runtime", () => {
  let runtimeSimulator: AkashSimulator;
  let owner: string;
  let runtimeClient: AkashChainClient;
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };

  beforeEach(async () => {
    runtimeSimulator = await AkashSimulator.start({
      providers: [{ address: PROVIDER, gpuTag: "a100", machines: [{ gpus: 8 }, { gpus: 8 }, { gpus: 8 }, { gpus: 8 }], pricePerGpu: "100" }],
    });
    const wallet = await DirectSecp256k1HdWallet.generate(24, { prefix: "akash" });
    owner = (await wallet.getAccounts())[0]!.address;
    runtimeSimulator.chain.fund(owner, 10n ** 12n);
    runtimeClient = await AkashChainClient.connect({ rpcUrl: runtimeSimulator.rpcUrl, mnemonic: wallet.mnemonic, signal, broadcastPollIntervalMs: 10 });
  });

  afterEach(async () => {
    runtimeClient.disconnect();
    await runtimeSimulator.stop();
  });

  /** A head address nothing listens on: the workers keep dialling it, which keeps them alive. */
  async function deadHeadAddress(): Promise<string> {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    return `127.0.0.1:${port}`;
  }

  async function leaseAndSendManifest(dseq: string, head: string) {
    const withEnv = renderGroupSdlYaml(group!, { extraEnv: { DROVER_HEAD: head, DROVER_JOIN_TOKEN: "join-secret" } });
    const { groupSpecs, groups } = buildManifest(withEnv);
    await runtimeClient.broadcast(await runtimeClient.sign([runtimeClient.createDeploymentMessage({ dseq, groupSpecs, hash: await deploymentVersion(withEnv), deposit: { amount: "5000000", denom: "uact" } })], signal), signal);
    await runtimeClient.broadcast(await runtimeClient.sign([runtimeClient.createLeaseMessage({ dseq, gseq: 1, oseq: 1, provider: PROVIDER })], signal), signal);
    const jwt = await runtimeClient.providerJwt(Date.now());
    const url = runtimeSimulator.providerUrl(PROVIDER);
    const put = await fetch(`${url}/deployment/${dseq}/manifest`, { method: "PUT", body: manifestToSortedJSON(groups), headers: { authorization: `Bearer ${jwt}` }, signal });
    expect(put.status).toBe(200);
    const status = await fetch(`${url}/lease/${dseq}/1/1/status`, { headers: { authorization: `Bearer ${jwt}` }, signal });
    return (await status.json()) as { services: Record<string, { available: number; total: number }>; forwarded_ports: Record<string, Array<{ port: number; externalPort: number }>> };
  }

  async function books(): Promise<{ deployments: unknown[]; leases: unknown[]; containers: Array<{ node: string; pid: number; running: boolean; dseq: string }> }> {
    return (await (await fetch(`${runtimeSimulator.rpcUrl}/simulator/books?owner=${owner}`, { signal })).json()) as never;
  }

  it("runs one drover-worker per replica with the manifest's env and a container's identity, and stops them when the lease is lost", async () => {
    process.env.DROVER_AKASH_MNEMONIC = "must never reach a container";
    let status;
    try {
      status = await leaseAndSendManifest("2001", await deadHeadAddress());
    } finally {
      delete process.env.DROVER_AKASH_MNEMONIC;
    }
    expect(status.services).toMatchObject({ "a100-leader": { available: 1, total: 1 }, "a100-worker": { available: 1, total: 1 } });
    const containers = (await books()).containers;
    expect(containers.map((container) => [container.node, container.running])).toEqual([["a100-leader-2001-0", true], ["a100-worker-2001-0", true]]);
    for (const container of containers) expect(alive(container.pid)).toBe(true);

    const environ = (await readFile(`/proc/${containers[0]!.pid}/environ`, "utf8")).split("\0");
    expect(environ).toEqual(expect.arrayContaining(["DROVER_NODE_NAME=a100-leader-2001-0", "DROVER_GROUP=a100", "DROVER_JOIN_TOKEN=join-secret", "DROVER_SLOTS=8", "DROVER_ADVERTISE_ADDRESS=127.0.0.1"]));
    expect(environ.some((entry) => entry.startsWith("DROVER_STATE_DIR=") && entry.includes("a100-leader-2001-0"))).toBe(true);
    expect(environ.some((entry) => entry.startsWith("DROVER_AKASH_MNEMONIC"))).toBe(false);
    // The SDL's bridge port (7447) is a real loopback port per container here, reported as the forwarded one.
    const bridgePort = Number(environ.find((entry) => entry.startsWith("DROVER_BRIDGE_PORT="))!.split("=")[1]);
    expect(bridgePort).not.toBe(7447);
    expect(status.forwarded_ports["a100-leader"]).toContainEqual(expect.objectContaining({ port: 7447, externalPort: bridgePort }));

    const lost = await fetch(`${runtimeSimulator.rpcUrl}/simulator/lose-lease?owner=${owner}&dseq=2001`, { method: "POST", signal });
    expect(lost.status).toBe(200);
    for (const container of containers) expect(alive(container.pid)).toBe(false);
    expect((await books()).containers.every((container) => !container.running)).toBe(true);
  });

  it("stops the containers when the escrow runs dry (lease insufficient_funds)", async () => {
    await leaseAndSendManifest("2004", await deadHeadAddress());
    const containers = (await books()).containers.filter((container) => container.dseq === "2004");
    expect(containers.map((container) => alive(container.pid))).toEqual([true, true]);
    // 5000000 at 800 per block: 6250 blocks, produced here rather than waited for.
    for (let block = 0; block < 10_000 && runtimeSimulator.chain.activeLease(owner, "2004", 1, 1) !== undefined; block += 1) runtimeSimulator.chain.produceBlock();
    expect((await runtimeClient.leases(signal, "2004")).map((lease) => lease.state)).toEqual(["insufficient_funds"]);
    await runtimeSimulator.settled();
    for (const container of containers) expect(alive(container.pid)).toBe(false);
  });

  it("stops the containers when the deployment is closed, and every container when the simulator stops", async () => {
    const head = await deadHeadAddress();
    await leaseAndSendManifest("2002", head);
    await leaseAndSendManifest("2003", head);
    const [first, second] = [(await books()).containers.filter((c) => c.dseq === "2002"), (await books()).containers.filter((c) => c.dseq === "2003")];
    await runtimeClient.broadcast(await runtimeClient.sign([runtimeClient.closeDeploymentMessage("2002")], signal), signal);
    await runtimeSimulator.settled();
    for (const container of first) expect(alive(container.pid)).toBe(false);
    for (const container of second) expect(alive(container.pid)).toBe(true);
    await runtimeSimulator.stop();
    for (const container of second) expect(alive(container.pid)).toBe(false);
  });
});
