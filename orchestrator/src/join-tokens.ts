import { createHash, randomBytes } from "node:crypto";
import { registerSecretValue } from "@drover/storage";

/**
 * Join tokens that are worth nothing once used. The head mints one per node it asks a
 * backend for (one per replica where a backend starts several from one environment),
 * bound to the node's group and, when the backend names its nodes, to that name. A
 * Register spends it; any later use is refused and logged without the value. So whoever
 * can read a container's environment (the provider's operator) finds only a token that
 * has already been spent by the time the agent runs.
 *
 * Only SHA-256 digests are kept: the book holds nothing an attacker could replay.
 */

export interface JoinTokenBinding {
  readonly group: string;
  /** The node name the agent must register with; undefined when the backend cannot know it (Akash replicas). */
  readonly nodeName?: string;
}

interface Entry extends JoinTokenBinding {
  readonly mintedAtMs: number;
  spent?: { readonly byNode: string; readonly atMs: number };
}

export type SpendVerdict =
  | { readonly ok: true }
  | { readonly ok: false; readonly reason: "unknown" | "spent" | "wrong-group" | "wrong-node"; readonly detail: string };

const digest = (token: string) => createHash("sha256").update(token).digest("hex");

export class JoinTokenBook {
  private readonly entries = new Map<string, Entry>();
  private revoked = false;

  constructor(private readonly now: () => number = Date.now) {}

  /** A new single-use token for one node of `binding.group`. */
  mint(binding: JoinTokenBinding): string {
    const token = randomBytes(24).toString("base64url");
    // Redacted from every log line from now on, as every other secret is.
    registerSecretValue(token);
    if (!this.revoked) this.entries.set(digest(token), { ...binding, mintedAtMs: this.now() });
    return token;
  }

  /** Would `spend` accept this token for this node? (Checked before the rest of a Register is.) */
  check(token: string, node: { nodeName: string; group: string }): SpendVerdict {
    const entry = token === "" ? undefined : this.entries.get(digest(token));
    if (!entry) return { ok: false, reason: "unknown", detail: this.revoked ? "join tokens are revoked (the cluster is going down)" : "invalid join token" };
    if (entry.spent) {
      return { ok: false, reason: "spent", detail: `join token already used (by node ${entry.spent.byNode}, ${Math.round((this.now() - entry.spent.atMs) / 1000)}s ago)` };
    }
    if (entry.group !== node.group) return { ok: false, reason: "wrong-group", detail: `join token is for group ${entry.group}, not ${node.group || "(none)"}` };
    if (entry.nodeName !== undefined && entry.nodeName !== node.nodeName) {
      return { ok: false, reason: "wrong-node", detail: `join token is for node ${entry.nodeName}, not ${node.nodeName}` };
    }
    return { ok: true };
  }

  /** Spends the token on this node, or says why not; a token is spent at most once. */
  spend(token: string, node: { nodeName: string; group: string }): SpendVerdict {
    const verdict = this.check(token, node);
    if (verdict.ok) this.entries.get(digest(token))!.spent = { byNode: node.nodeName, atMs: this.now() };
    return verdict;
  }

  /** Forgets a token that will never be delivered (an ask closed without a lease). */
  discard(token: string): void {
    this.entries.delete(digest(token));
  }

  /** Every token, spent or not, is worthless from now on; later mints are born revoked. */
  revokeAll(): void {
    this.revoked = true;
    this.entries.clear();
  }

  /** How many tokens were minted and not spent yet (for status and tests). */
  get unspent(): number {
    return [...this.entries.values()].filter((entry) => !entry.spent).length;
  }
}
