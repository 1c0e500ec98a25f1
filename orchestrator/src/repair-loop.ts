import { sleep } from "./abortable-sleep.js";
import { ProvisionError } from "./errors.js";
import type { Logger } from "./logger.js";
import { BRIDGE_PORT_NAME, type NodeGroup, type NodeRecord, type Provisioner } from "./provisioners/provisioner.js";

/** One replacement, for the log and `drover status`. */
export interface NodeReplacement {
  readonly group: string;
  readonly nodeIds: readonly string[];
  readonly reason: string;
  readonly atMs: number;
  /** Ids of the nodes launched in their place; empty when the launch failed for good. */
  readonly replacements: readonly string[];
  readonly error?: string;
}

export interface RepairLoopOptions {
  readonly provisioner: Provisioner;
  readonly groups: readonly NodeGroup[];
  readonly logger: Logger;
  /** Launch attempts per call before giving up on retryable errors. */
  readonly launchAttempts?: number;
  /** Backoff between attempts: `initialMs`, doubling, at most `maxMs`. */
  readonly backoff?: { readonly initialMs: number; readonly maxMs: number };
  /** Replacements per group over the cluster's life; default 5 per node of the group. */
  readonly maxReplacementsPerGroup?: (group: NodeGroup) => number;
  /** How often nodes() is read besides the backend's change notifications. */
  readonly pollIntervalMs?: number;
  readonly now?: () => number;
  readonly sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
}

const DEFAULT_ATTEMPTS = 5;
const DEFAULT_BACKOFF = { initialMs: 1_000, maxMs: 30_000 };
const DEFAULT_POLL_MS = 2_000;
/** A registry loss with this reason needs no replacement: a new agent already registered under the name. */
const AGENT_RESTARTED = "its agent restarted";

/**
 * The head's one repair loop, the same for every backend (SkyPilot's bulk_provision is
 * the model): launches each group, retrying retryable failures with backoff and failing
 * on unrecoverable ones (the head then tears everything down), and afterwards replaces
 * nodes that the backend reports lost (process exited, pod failed or deleted) or that the
 * registry reports lost (heartbeat timeout), bounded per group, each replacement logged
 * with its reason. The job controller restarts the job from its newest checkpoint once
 * enough nodes are connected again.
 */
export class RepairLoop {
  private readonly replaced = new Map<string, number>();
  /** Node id -> when it was launched (a registry loss older than that is about an earlier node of that name). */
  private readonly launchedAt = new Map<string, number>();
  /** Nodes the registry reported lost, with why; replaced at the next pass. */
  private readonly condemned = new Map<string, string>();
  /** Groups whose budget ran out: said once. */
  private readonly exhausted = new Set<string>();
  private latest: readonly NodeRecord[] = [];
  readonly history: NodeReplacement[] = [];
  private signal: AbortSignal | undefined;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private again = false;

  constructor(private readonly options: RepairLoopOptions) {}

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  /** The nodes as last read (by a pass or a launch). */
  nodes(): readonly NodeRecord[] {
    return this.latest;
  }

  /**
   * Launches every group, less the nodes `adopted` from a dead head (still running);
   * rejects with the first unrecoverable (or retried-out) failure.
   */
  async provisionAll(signal: AbortSignal, adopted: readonly NodeRecord[] = []): Promise<void> {
    for (const group of this.options.groups) {
      const missing = group.nodes - adopted.filter((node) => node.group === group.name).length;
      if (missing > 0) await this.launchWithRetry(group.name, missing, `provisioning group ${group.name}`, signal);
    }
    this.latest = await this.options.provisioner.nodes(signal);
  }

  /** Starts replacing lost nodes until `signal` aborts. */
  start(signal: AbortSignal): void {
    this.signal = signal;
    this.options.provisioner.onNodesChanged?.(() => this.schedule());
    this.timer = setInterval(() => this.schedule(), this.options.pollIntervalMs ?? DEFAULT_POLL_MS);
    this.timer.unref();
    signal.addEventListener("abort", () => clearInterval(this.timer), { once: true });
  }

  /** Resolves when no pass is running (tests, shutdown). */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  /**
   * The registry lost a node's agent. `registeredAtMs` tells an agent of an earlier node
   * of the same name (already replaced) from the current one.
   */
  nodeLost(nodeName: string, reason: string, registeredAtMs: number): void {
    if (reason === AGENT_RESTARTED) return;
    const launched = this.launchedAt.get(nodeName);
    if (launched !== undefined && launched > registeredAtMs) return;
    this.condemned.set(nodeName, `its agent is lost (${reason})`);
    this.schedule();
  }

  /** host:port other groups dial for this node's bridge, when the backend publishes one. */
  bridgeOutside(nodeName: string): string | undefined {
    const node = this.latest.find((candidate) => candidate.id === nodeName);
    const outside = node?.ports.find((port) => port.name === BRIDGE_PORT_NAME)?.outside;
    return outside ? outside : undefined;
  }

  private schedule(): void {
    const signal = this.signal;
    if (signal === undefined || signal.aborted) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = (async () => {
      try {
        do {
          this.again = false;
          await this.pass(signal);
        } while (this.again && !signal.aborted);
      } catch (error) {
        if (!signal.aborted) this.options.logger.error("repair pass failed", { error: (error as Error).message });
      } finally {
        this.running = undefined;
      }
    })();
  }

  private async pass(signal: AbortSignal): Promise<void> {
    const nodes = await this.options.provisioner.nodes(signal);
    this.latest = nodes;
    const lostByGroup = new Map<string, Array<{ id: string; reason: string }>>();
    for (const node of nodes) {
      const reason = node.state === "lost" ? node.reason ?? "the backend reports it lost" : this.condemned.get(node.id);
      if (reason === undefined) continue;
      const list = lostByGroup.get(node.group) ?? [];
      list.push({ id: node.id, reason });
      lostByGroup.set(node.group, list);
    }
    // A condemned node the backend no longer lists is gone already: nothing to replace twice.
    for (const id of this.condemned.keys()) if (!nodes.some((node) => node.id === id)) this.condemned.delete(id);
    for (const [groupName, lost] of lostByGroup) {
      const group = this.options.groups.find((candidate) => candidate.name === groupName);
      if (group === undefined) continue;
      const budget = this.options.maxReplacementsPerGroup?.(group) ?? 5 * group.nodes;
      const used = this.replaced.get(groupName) ?? 0;
      if (used + lost.length > budget) {
        if (!this.exhausted.has(groupName)) {
          this.exhausted.add(groupName);
          this.options.logger.error("node lost; not replacing it: the group has used its replacements", { group: groupName, nodes: lost.map((node) => node.id), reasons: lost.map((node) => node.reason), replaced: used, budget });
        }
        continue;
      }
      this.replaced.set(groupName, used + lost.length);
      const ids = lost.map((node) => node.id);
      const reason = [...new Set(lost.map((node) => node.reason))].join("; ");
      this.options.logger.warn("replacing lost node", { group: groupName, nodes: ids, reason, replacement: used + lost.length, of: budget });
      for (const id of ids) this.condemned.delete(id);
      let replacements: string[] = [];
      let failure: string | undefined;
      try {
        const healthy = (list: readonly NodeRecord[]) => list.filter((node) => node.group === groupName && node.state !== "lost" && !ids.includes(node.id)).length;
        const before = healthy(nodes);
        await this.options.provisioner.terminate(ids, signal);
        // A backend may release more than it was asked to (an Akash lease holds several
        // nodes): those are replaced too, or the group would shrink.
        const alongside = Math.max(0, before - healthy(await this.options.provisioner.nodes(signal)));
        if (alongside > 0) this.options.logger.warn("terminating the lost node released others with it; replacing them too", { group: groupName, nodes: ids, alongside });
        const launched = await this.launchWithRetry(groupName, ids.length + alongside, `replacing ${ids.join(", ")}`, signal);
        replacements = launched.map((node) => node.id);
        this.options.logger.info("lost node replaced", { group: groupName, lost: ids, replacements, reason });
      } catch (error) {
        if (signal.aborted) throw error;
        failure = (error as Error).message;
        this.options.logger.error("could not replace lost node", { group: groupName, nodes: ids, reason, error: failure });
      }
      this.history.push({ group: groupName, nodeIds: ids, reason, atMs: this.now(), replacements, ...(failure ? { error: failure } : {}) });
      this.latest = await this.options.provisioner.nodes(signal);
    }
  }

  /** One launch, retried while the backend says trying again may help. */
  private async launchWithRetry(group: string, count: number, what: string, signal: AbortSignal): Promise<NodeRecord[]> {
    const attempts = this.options.launchAttempts ?? DEFAULT_ATTEMPTS;
    const backoff = this.options.backoff ?? DEFAULT_BACKOFF;
    for (let attempt = 1; ; attempt++) {
      signal.throwIfAborted();
      try {
        const nodes = await this.options.provisioner.launch(group, count, signal);
        const at = this.now();
        for (const node of nodes) this.launchedAt.set(node.id, at);
        return nodes;
      } catch (error) {
        if (signal.aborted) throw error;
        const retryable = error instanceof ProvisionError && error.retryable;
        if (!retryable || attempt >= attempts) {
          if (retryable) throw new ProvisionError(`${what}: gave up after ${attempt} attempts: ${(error as Error).message}`, false, { group, attempts: attempt }, { cause: error });
          throw error;
        }
        const delayMs = Math.min(backoff.maxMs, backoff.initialMs * 2 ** (attempt - 1));
        this.options.logger.warn("launch failed; trying again", { group, count, what, attempt, of: attempts, inMs: delayMs, error: (error as Error).message });
        await (this.options.sleep ?? sleep)(delayMs, signal);
      }
    }
  }
}
