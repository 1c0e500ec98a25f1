import { appendFile, mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { StateError } from "../../errors.js";
import { LEASE_LEDGER_FILE, LeaseLedger, reconcile, type ChainView, type LedgerEntry } from "./lease-ledger.js";
import { StateDirectory } from "../../state-store.js";

const OWNER = "akash1owner";
const PROVIDER = "akash1provider";
let root: string;
let state: StateDirectory;
let clock = 1_700_000_000_000;
const now = () => clock++;

beforeEach(async () => {
  root = await mkdtemp(join(os.tmpdir(), "drover-ledger-"));
  state = new StateDirectory(root);
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

function chain(overrides: Partial<ChainView> = {}): ChainView {
  return { accountSequence: 10, landedTxHashes: new Set(), deployments: [], leases: [], openBids: [], ...overrides };
}

const lease = { dseq: "100", gseq: 1, oseq: 1, provider: PROVIDER };

describe("LeaseLedger file", () => {
  it("appends intents and results, survives a reopen, and lists pending intents", async () => {
    const ledger = await LeaseLedger.open(state, { now });
    const create = await ledger.recordIntent({ owner: OWNER, sequence: 3, txHash: "AA", operation: { op: "create-deployment", dseq: "100", group: "a100" } });
    await ledger.recordResult(create, { outcome: "ok", height: 55 });
    const leaseIntent = await ledger.recordIntent({ owner: OWNER, sequence: 4, txHash: "BB", operation: { op: "create-lease", group: "a100", ...lease } });
    expect(ledger.pending().map((intent) => intent.id)).toEqual([leaseIntent]);

    const reopened = await LeaseLedger.open(state, { now });
    expect(reopened.entries()).toEqual(ledger.entries());
    expect(reopened.pending().map((intent) => intent.operation.op)).toEqual(["create-lease"]);
    const text = await readFile(state.path(LEASE_LEDGER_FILE), "utf8");
    expect(text.trim().split("\n")).toHaveLength(3);
  });

  it("cuts a line torn by a crash mid-append, and keeps appending cleanly", async () => {
    const ledger = await LeaseLedger.open(state, { now });
    await ledger.recordIntent({ owner: OWNER, operation: { op: "create-deployment", dseq: "100", group: "a100" } });
    await appendFile(state.path(LEASE_LEDGER_FILE), '{"v":1,"kind":"intent","id":"torn","op');
    const reopened = await LeaseLedger.open(state, { now });
    expect(reopened.entries()).toHaveLength(1);
    await reopened.recordIntent({ owner: OWNER, operation: { op: "close-deployment", dseq: "100", reason: "test" } });
    expect((await LeaseLedger.open(state, { now })).entries()).toHaveLength(2);
  });

  it("refuses a ledger with a corrupt complete line rather than guess", async () => {
    await (await LeaseLedger.open(state, { now })).recordIntent({ owner: OWNER, operation: { op: "create-deployment", dseq: "1", group: "g" } });
    await appendFile(state.path(LEASE_LEDGER_FILE), "not json\n");
    await expect(LeaseLedger.open(state, { now })).rejects.toBeInstanceOf(StateError);
  });

  it("refuses a result for an unknown intent", async () => {
    const ledger = await LeaseLedger.open(state, { now });
    await expect(ledger.recordResult("nope", { outcome: "ok" })).rejects.toBeInstanceOf(StateError);
  });
});

/** A ledger as the provisioner writes it, built through the real file. */
async function ledgerWith(steps: (ledger: LeaseLedger) => Promise<void>): Promise<LedgerEntry[]> {
  const ledger = await LeaseLedger.open(state, { now });
  await steps(ledger);
  // Reopen: reconcile always runs on what survived on disk.
  return [...(await LeaseLedger.open(state, { now })).entries()];
}

async function deploymentCreated(ledger: LeaseLedger, dseq = "100"): Promise<void> {
  const id = await ledger.recordIntent({ owner: OWNER, sequence: 1, txHash: `D${dseq}`, operation: { op: "create-deployment", dseq, group: "a100" } });
  await ledger.recordResult(id, { outcome: "ok" });
}

describe("reconcile after a crash", () => {
  it("crash between a lease intent and its result, tx landed: adopts the lease, no second lease", async () => {
    const entries = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "L1", txBytes: "bGVhc2U=", operation: { op: "create-lease", group: "a100", ...lease } });
    });
    const decisions = reconcile(entries, chain({
      landedTxHashes: new Set(["L1"]),
      deployments: [{ dseq: "100", state: "active" }],
      leases: [{ ...lease, state: "active" }],
    }));
    expect(decisions).toEqual([
      { action: "mark-result", intentId: expect.any(String), outcome: "ok", why: expect.stringContaining("on chain") },
      { action: "adopt-lease", group: "a100", ...lease },
    ]);
    expect(decisions.some((d) => d.action === "retry-lease" || d.action === "rebroadcast")).toBe(false);
  });

  it("crash between a lease intent and its result, tx not landed, sequence unused: rebroadcasts the same bytes only", async () => {
    const entries = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "L1", txBytes: "bGVhc2U=", operation: { op: "create-lease", group: "a100", ...lease } });
    });
    const decisions = reconcile(entries, chain({ accountSequence: 2, deployments: [{ dseq: "100", state: "active" }], openBids: [lease] }));
    expect(decisions).toEqual([{ action: "rebroadcast", intentId: expect.any(String), txBytes: "bGVhc2U=" }]);
  });

  it("lease tx never landed and its sequence is used: retries the lease while the bid is open, else closes the deployment", async () => {
    const entries = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "L1", operation: { op: "create-lease", group: "a100", ...lease } });
    });
    const deployments = [{ dseq: "100", state: "active" as const }];
    expect(reconcile(entries, chain({ accountSequence: 3, deployments, openBids: [lease] })).map((d) => d.action)).toEqual(["mark-result", "retry-lease"]);
    expect(reconcile(entries, chain({ accountSequence: 3, deployments }))).toEqual([
      { action: "mark-result", intentId: expect.any(String), outcome: "abandoned", why: expect.stringContaining("sequence 2 is used") },
      { action: "close-deployment", dseq: "100", why: "the lease was never created and its bid is gone" },
    ]);
  });

  it("crash right after a create-deployment intent: closes the unleased ask if it landed, forgets it if not", async () => {
    const entries = await ledgerWith(async (ledger) => {
      await ledger.recordIntent({ owner: OWNER, sequence: 1, txHash: "D1", operation: { op: "create-deployment", dseq: "100", group: "a100" } });
    });
    expect(reconcile(entries, chain({ landedTxHashes: new Set(["D1"]), deployments: [{ dseq: "100", state: "active" }] })).map((d) => d.action)).toEqual([
      "mark-result",
      "close-deployment",
    ]);
    expect(reconcile(entries, chain({ accountSequence: 5 }))).toEqual([
      { action: "mark-result", intentId: expect.any(String), outcome: "abandoned", why: expect.any(String) },
    ]);
  });

  it("a close that did not land is sent again; one still in flight is only rebroadcast", async () => {
    const entries = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "C1", operation: { op: "close-deployment", dseq: "100", reason: "down" } });
    });
    const deployments = [{ dseq: "100", state: "active" as const }];
    expect(reconcile(entries, chain({ accountSequence: 3, deployments })).map((d) => d.action)).toEqual(["mark-result", "close-deployment"]);

    const inFlight = await ledgerWith(async (ledger) => {
      await ledger.recordIntent({ owner: OWNER, sequence: 3, txHash: "C2", txBytes: "Y2xvc2U=", operation: { op: "close-deployment", dseq: "100", reason: "down" } });
    });
    expect(reconcile(inFlight, chain({ accountSequence: 3, deployments })).map((d) => d.action)).toEqual(["mark-result", "rebroadcast"]);
  });

  it("reports a lease the provider or the chain closed as lost, and retries an abandoned deposit of a live lease", async () => {
    const lost = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      const id = await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "L1", operation: { op: "create-lease", group: "a100", ...lease } });
      await ledger.recordResult(id, { outcome: "ok" });
    });
    expect(reconcile(lost, chain({ deployments: [{ dseq: "100", state: "active" }], leases: [{ ...lease, state: "insufficient_funds" }] })).map((d) => d.action)).toEqual([
      "lease-lost",
      "close-deployment",
    ]);
    expect(reconcile(lost, chain()).map((d) => d.action)).toEqual(["lease-lost"]);

    await rm(state.path(LEASE_LEDGER_FILE));
    const withDeposit = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      const id = await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "L1", operation: { op: "create-lease", group: "a100", ...lease } });
      await ledger.recordResult(id, { outcome: "ok" });
      await ledger.recordIntent({ owner: OWNER, sequence: 3, txHash: "P1", operation: { op: "deposit", dseq: "100", amount: "5000000", denom: "uact" } });
    });
    expect(reconcile(withDeposit, chain({ accountSequence: 4, deployments: [{ dseq: "100", state: "active" }], leases: [{ ...lease, state: "active" }] })).map((d) => d.action)).toEqual([
      "mark-result",
      "adopt-lease",
      "retry-deposit",
    ]);
  });

  it("settles the escrow keeper's deposits: a landed one is ok, an unsent one is rebroadcast, one on a deployment that ran dry is abandoned", async () => {
    const deposits = await ledgerWith(async (ledger) => {
      await deploymentCreated(ledger);
      const id = await ledger.recordIntent({ owner: OWNER, sequence: 2, txHash: "L1", operation: { op: "create-lease", group: "a100", ...lease } });
      await ledger.recordResult(id, { outcome: "ok" });
      await ledger.recordIntent({ owner: OWNER, sequence: 3, txHash: "D1", txBytes: "ZDE=", operation: { op: "deposit", dseq: "100", amount: "20000", denom: "uact" } });
    });
    const live = { deployments: [{ dseq: "100", state: "active" as const }], leases: [{ ...lease, state: "active" as const }] };
    expect(reconcile(deposits, chain({ ...live, accountSequence: 4, landedTxHashes: new Set(["D1"]) }))).toEqual([
      { action: "mark-result", intentId: expect.any(String), outcome: "ok", why: expect.any(String) },
      { action: "adopt-lease", group: "a100", ...lease },
    ]);
    expect(reconcile(deposits, chain({ ...live, accountSequence: 3 })).map((d) => d.action)).toEqual(["rebroadcast", "adopt-lease"]);
    // The escrow ran dry before the top-up landed: the chain closed the deployment.
    const dry = reconcile(deposits, chain({ accountSequence: 3, leases: [{ ...lease, state: "insufficient_funds" }] }));
    expect(dry).toEqual([
      { action: "mark-result", intentId: expect.any(String), outcome: "abandoned", why: "deployment 100 is closed on chain; the deposit could only fail" },
      { action: "lease-lost", group: "a100", ...lease },
    ]);
  });

  it("leaves deployments it never made alone unless the wallet is dedicated", () => {
    const view = chain({ deployments: [{ dseq: "777", state: "active" }] });
    expect(reconcile([], view)).toEqual([{ action: "foreign-deployment", dseq: "777" }]);
    expect(reconcile([], view, { closeForeign: true })).toEqual([{ action: "close-deployment", dseq: "777", why: expect.any(String) }]);
  });
});
