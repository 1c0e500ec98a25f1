// The lease ledger: a write-ahead log of every Akash transaction the head sends, kept in
// its state directory (`akash/lease-ledger.ndjson`). Money is at stake: a deployment or
// lease the head forgets keeps draining escrow, and one it creates twice pays twice.
//
// Protocol, per transaction:
//   1. sign the tx (the account sequence is fixed then, and so is its hash);
//   2. append an intent {operation, sequence, txHash, txBytes} and fsync;
//   3. broadcast; 4. append the result and fsync.
// After a crash, `pending()` lists intents without a result, and `reconcile()` compares
// the ledger with what the chain says is open for the owner and decides, per deployment,
// what to adopt, close, rebroadcast or retry. Rebroadcasting the same signed bytes is
// always safe: a tx lands at most once, and a consumed sequence means it never will.

import { open, readFile, truncate } from "node:fs/promises";
import { mkdir } from "node:fs/promises";
import { dirname } from "node:path";
import { StateError } from "../../errors.js";
import type { StateDirectory } from "../../state-store.js";

export const LEASE_LEDGER_FILE = "akash/lease-ledger.ndjson";
const LEDGER_VERSION = 1;

export interface LeaseId {
  readonly dseq: string;
  readonly gseq: number;
  readonly oseq: number;
  readonly provider: string;
}

/** What a transaction does. dseq is chosen by us before the deployment exists, so it is known at intent time. */
export type LedgerOperation =
  | { readonly op: "create-deployment"; readonly dseq: string; readonly group: string; readonly askId?: string; readonly manifestHash?: string }
  | ({ readonly op: "create-lease"; readonly group: string } & LeaseId)
  | { readonly op: "deposit"; readonly dseq: string; readonly amount: string; readonly denom: string }
  | { readonly op: "close-deployment"; readonly dseq: string; readonly reason: string };

export interface LedgerIntent {
  readonly v: typeof LEDGER_VERSION;
  readonly kind: "intent";
  readonly id: string;
  readonly atMs: number;
  readonly owner: string;
  readonly operation: LedgerOperation;
  /** Account sequence the tx was signed with. */
  readonly sequence?: number;
  /** Upper-case hex SHA-256 of the signed tx bytes (the chain's tx hash). */
  readonly txHash?: string;
  /** The signed TxRaw bytes, base64, so the very same tx can be rebroadcast. */
  readonly txBytes?: string;
}

export type LedgerOutcome = "ok" | "failed" | "abandoned";

export interface LedgerResult {
  readonly v: typeof LEDGER_VERSION;
  readonly kind: "result";
  readonly id: string;
  readonly atMs: number;
  readonly outcome: LedgerOutcome;
  readonly height?: number;
  readonly error?: string;
}

export type LedgerEntry = LedgerIntent | LedgerResult;

export type NewIntent = Omit<LedgerIntent, "v" | "kind" | "id" | "atMs">;

export class LeaseLedger {
  private appendQueue: Promise<void> = Promise.resolve();
  private counter: number;

  private constructor(
    readonly path: string,
    private readonly entryList: LedgerEntry[],
    private readonly now: () => number,
  ) {
    this.counter = entryList.filter((entry) => entry.kind === "intent").length;
  }

  /**
   * Opens (or starts) the ledger. A last line torn by a crash mid-append is cut off: it
   * was never fsynced as a whole, so its transaction was never broadcast.
   */
  static async open(state: StateDirectory, options: { now?: () => number } = {}): Promise<LeaseLedger> {
    const path = state.path(LEASE_LEDGER_FILE);
    let text = "";
    try {
      text = await readFile(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw new StateError(`cannot read the lease ledger ${path}`, { path }, { cause: error });
    }
    const complete = text.lastIndexOf("\n") + 1;
    if (complete < text.length) await truncate(path, Buffer.byteLength(text.slice(0, complete)));
    const entries: LedgerEntry[] = [];
    text.slice(0, complete).split("\n").forEach((line, index) => {
      if (line.trim() === "") return;
      try {
        entries.push(JSON.parse(line) as LedgerEntry);
      } catch (error) {
        throw new StateError(`lease ledger ${path} line ${index + 1} is not JSON; refusing to guess which leases exist`, { path, line: index + 1 }, { cause: error });
      }
    });
    return new LeaseLedger(path, entries, options.now ?? Date.now);
  }

  entries(): readonly LedgerEntry[] {
    return [...this.entryList];
  }

  /** Appends the intent and fsyncs it before returning its id; only then may the tx be broadcast. */
  async recordIntent(intent: NewIntent): Promise<string> {
    this.counter += 1;
    const id = `${this.now().toString(36)}-${this.counter}`;
    await this.append({ v: LEDGER_VERSION, kind: "intent", id, atMs: this.now(), ...intent });
    return id;
  }

  async recordResult(id: string, result: { outcome: LedgerOutcome; height?: number; error?: string }): Promise<void> {
    if (!this.entryList.some((entry) => entry.kind === "intent" && entry.id === id)) {
      throw new StateError(`lease ledger has no intent ${id}`, { id });
    }
    await this.append({ v: LEDGER_VERSION, kind: "result", id, atMs: this.now(), ...result });
  }

  /** Intents without a result: the transactions a crash may have left in flight. */
  pending(): LedgerIntent[] {
    return pendingIntents(this.entryList);
  }

  private append(entry: LedgerEntry): Promise<void> {
    const write = this.appendQueue.then(async () => {
      await mkdir(dirname(this.path), { recursive: true });
      const handle = await open(this.path, "a", 0o600);
      try {
        await handle.write(JSON.stringify(entry) + "\n");
        await handle.sync();
      } finally {
        await handle.close();
      }
      this.entryList.push(entry);
    });
    this.appendQueue = write.catch(() => undefined);
    return write;
  }
}

export function pendingIntents(entries: readonly LedgerEntry[]): LedgerIntent[] {
  const resolved = new Set(entries.filter((entry) => entry.kind === "result").map((entry) => entry.id));
  return entries.filter((entry): entry is LedgerIntent => entry.kind === "intent" && !resolved.has(entry.id));
}

/** What the chain says, for one owner, at reconcile time. */
export interface ChainView {
  /** The owner's next account sequence: a pending tx signed with a lower one can never land. */
  readonly accountSequence: number;
  /** Which of the pending intents' tx hashes the chain has included (looked up by hash). */
  readonly landedTxHashes: ReadonlySet<string>;
  readonly deployments: ReadonlyArray<{ readonly dseq: string; readonly state: "active" | "closed" }>;
  readonly leases: ReadonlyArray<LeaseId & { readonly state: "active" | "closed" | "insufficient_funds" }>;
  /** Open bids on our orders, so an interrupted lease creation can be retried. */
  readonly openBids: readonly LeaseId[];
}

export type ReconcileDecision =
  | { readonly action: "mark-result"; readonly intentId: string; readonly outcome: "ok" | "abandoned"; readonly why: string }
  | { readonly action: "rebroadcast"; readonly intentId: string; readonly txBytes: string }
  | { readonly action: "wait-for-tx"; readonly intentId: string; readonly why: string }
  | ({ readonly action: "adopt-lease"; readonly group: string } & LeaseId)
  | ({ readonly action: "retry-lease"; readonly group: string } & LeaseId)
  | ({ readonly action: "lease-lost"; readonly group: string } & LeaseId)
  | { readonly action: "retry-deposit"; readonly dseq: string; readonly amount: string; readonly denom: string }
  | { readonly action: "close-deployment"; readonly dseq: string; readonly why: string }
  | { readonly action: "foreign-deployment"; readonly dseq: string };

export interface ReconcileOptions {
  /**
   * Close open deployments of the owner that the ledger does not know. Only for a wallet
   * dedicated to this cluster; by default they are reported and left alone.
   */
  readonly closeForeign?: boolean;
}

/**
 * Decides what to do with everything the ledger and the chain know, so that no lease is
 * orphaned (open on chain, unknown to the head) or created twice. Pure.
 */
export function reconcile(entries: readonly LedgerEntry[], chain: ChainView, options: ReconcileOptions = {}): ReconcileDecision[] {
  const decisions: ReconcileDecision[] = [];
  const results = new Map(entries.filter((entry): entry is LedgerResult => entry.kind === "result").map((entry) => [entry.id, entry.outcome]));
  const intents = entries.filter((entry): entry is LedgerIntent => entry.kind === "intent");

  const openDeployments = new Set(chain.deployments.filter((deployment) => deployment.state === "active").map((deployment) => deployment.dseq));

  // 1. Settle what was in flight. An intent is "effective" when its tx landed.
  const effective = new Set<string>();
  const stillInFlight = new Set<string>();
  const abandonedNow = new Set<string>();
  for (const intent of intents) {
    const outcome = results.get(intent.id);
    if (outcome !== undefined) {
      if (outcome === "ok") effective.add(intent.id);
      continue;
    }
    if (intent.txHash !== undefined && chain.landedTxHashes.has(intent.txHash)) {
      effective.add(intent.id);
      decisions.push({ action: "mark-result", intentId: intent.id, outcome: "ok", why: "the tx is on chain; the head stopped before recording it" });
    } else if (intent.sequence !== undefined && intent.sequence < chain.accountSequence) {
      abandonedNow.add(intent.id);
      decisions.push({ action: "mark-result", intentId: intent.id, outcome: "abandoned", why: `sequence ${intent.sequence} is used (account is at ${chain.accountSequence}) and the tx is not on chain` });
    } else if (intent.operation.op === "deposit" && !openDeployments.has(intent.operation.dseq)) {
      // An escrow top-up of a deployment that closed meanwhile (ran dry, or was closed)
      // can only fail on chain; sending it again would just cost a fee.
      abandonedNow.add(intent.id);
      decisions.push({ action: "mark-result", intentId: intent.id, outcome: "abandoned", why: `deployment ${intent.operation.dseq} is closed on chain; the deposit could only fail` });
    } else if (intent.txBytes !== undefined) {
      stillInFlight.add(intent.id);
      decisions.push({ action: "rebroadcast", intentId: intent.id, txBytes: intent.txBytes });
    } else {
      stillInFlight.add(intent.id);
      decisions.push({ action: "wait-for-tx", intentId: intent.id, why: "not on chain, sequence unused, and no signed bytes to rebroadcast" });
    }
  }

  // 2. Per deployment: what we meant, against what is open.
  const ours = new Map<string, { closeIntended: boolean; closes: LedgerIntent[]; leases: Array<{ intent: LedgerIntent; lease: LeaseId & { group: string } }>; deposits: LedgerIntent[] }>();
  for (const intent of intents) {
    const operation = intent.operation;
    const entry = ours.get(operation.dseq) ?? { closeIntended: false, closes: [], leases: [], deposits: [] };
    ours.set(operation.dseq, entry);
    if (operation.op === "close-deployment") {
      entry.closeIntended = true;
      entry.closes.push(intent);
    }
    else if (operation.op === "create-lease") {
      const { dseq, gseq, oseq, provider, group } = operation;
      entry.leases.push({ intent, lease: { dseq, gseq, oseq, provider, group } });
    }
    else if (operation.op === "deposit") entry.deposits.push(intent);
  }
  const sameLease = (a: LeaseId, b: LeaseId) => a.dseq === b.dseq && a.gseq === b.gseq && a.oseq === b.oseq && a.provider === b.provider;

  for (const [dseq, mine] of ours) {
    if (!openDeployments.has(dseq)) {
      // Closed on chain. A lease we had is lost (provider closed it, escrow ran dry): the group must be replaced.
      for (const { intent, lease } of mine.leases) {
        if (effective.has(intent.id) && !mine.closeIntended) decisions.push({ action: "lease-lost", ...lease });
      }
      continue;
    }
    if (mine.closeIntended) {
      // A close still in flight is being rebroadcast; a second close tx would only fail.
      if (!mine.closes.some((close) => stillInFlight.has(close.id))) {
        decisions.push({ action: "close-deployment", dseq, why: "we meant to close it; the close did not land" });
      }
      continue;
    }
    const activeLeases = chain.leases.filter((lease) => lease.dseq === dseq && lease.state === "active");
    const intendedLease = mine.leases.at(-1);
    if (intendedLease === undefined) {
      // An ask nobody leased (a probe, or the head stopped mid-ramp): its escrow is wasted.
      if (activeLeases.length > 0) decisions.push({ action: "close-deployment", dseq, why: "it has a lease the ledger never asked for" });
      else decisions.push({ action: "close-deployment", dseq, why: "no lease was created on it; the bid strategy starts over" });
      continue;
    }
    const { intent, lease } = intendedLease;
    if (activeLeases.some((active) => sameLease(active, lease))) {
      decisions.push({ action: "adopt-lease", ...lease });
      for (const deposit of mine.deposits) {
        // Only deposits this reconcile found abandoned: a retried one has a new intent of its own.
        if (abandonedNow.has(deposit.id) && deposit.operation.op === "deposit") {
          decisions.push({ action: "retry-deposit", dseq, amount: deposit.operation.amount, denom: deposit.operation.denom });
        }
      }
    } else if (stillInFlight.has(intent.id)) {
      // The lease tx may still land (it is being rebroadcast); decide after it settles.
    } else if (effective.has(intent.id)) {
      decisions.push({ action: "lease-lost", ...lease });
      decisions.push({ action: "close-deployment", dseq, why: "its lease was closed by the provider or the chain" });
    } else if (chain.openBids.some((bid) => sameLease(bid, lease))) {
      decisions.push({ action: "retry-lease", ...lease });
    } else {
      decisions.push({ action: "close-deployment", dseq, why: "the lease was never created and its bid is gone" });
    }
  }

  for (const dseq of openDeployments) {
    if (ours.has(dseq)) continue;
    decisions.push(options.closeForeign ? { action: "close-deployment", dseq, why: "not in the ledger, and the wallet is dedicated to this cluster" } : { action: "foreign-deployment", dseq });
  }
  return decisions;
}

/** A short clause on the market's progress from the head's lease ledger, for `drover up`. */
export async function ledgerProgress(state: StateDirectory, sinceMs = 0): Promise<string> {
  let text: string;
  try {
    text = await readFile(state.path(LEASE_LEDGER_FILE), "utf8");
  } catch {
    return "";
  }
  const entries = text.split("\n").filter((line) => line.trim() !== "").flatMap((line) => {
    try {
      return [JSON.parse(line) as LedgerEntry];
    } catch {
      return [];
    }
  });
  // The ledger outlives heads; only this head's transactions are its progress.
  const count = (op: string) => entries.filter((entry) => entry.kind === "intent" && entry.atMs >= sinceMs && entry.operation.op === op).length;
  return `; ${count("create-deployment")} ask(s) posted, ${count("close-deployment")} closed, ${count("create-lease")} lease(s)`;
}
