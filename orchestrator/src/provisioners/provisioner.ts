import type { z } from "zod";
import type { ChainBlock, LeaseOnChain } from "../cost/run-cost.js";
import type { Logger } from "../logger.js";
import type { StateDirectory } from "../state-store.js";

/**
 * The contract between the head and a backend family (local processes, Akash leases,
 * Kubernetes pods). A backend makes one attempt per call and reports typed errors
 * (ProvisionError.retryable); retries, replacement of lost nodes and teardown after an
 * unrecoverable failure are the head's repair loop (repair-loop.ts), written once.
 */

/** A port of a node. `outside` is host:port as reachable from OTHER groups ("" when none is). */
export interface NodePort {
  readonly name: string;
  readonly inside: number;
  readonly outside: string;
}

export type NodeState = "pending" | "running" | "lost";

/**
 * One node as the backend sees it. `id` is the node name its agent registers with
 * (`--node-name` / DROVER_NODE_NAME), so the head can join what the backend says with
 * what the registry says. A port named `bridge` is the node's cross-group bridge.
 */
export interface NodeRecord {
  readonly id: string;
  readonly group: string;
  readonly state: NodeState;
  /** Reachable by the head ("" while pending). */
  readonly address: string;
  readonly ports: readonly NodePort[];
  /** Why the node is lost (pod failed, process exited, lease closed). */
  readonly reason?: string;
  readonly lease?: { readonly provider: string; readonly dseq: string; readonly price: string };
  /** Backend-specific handle (pid, pod, lease), for `drover status` and people. */
  readonly handle?: string;
}

/** The port name the cross-group bridge is published under. */
export const BRIDGE_PORT_NAME = "bridge";

export interface Provisioner {
  readonly name: string;
  /** Starts `count` more nodes of `group`; one attempt. Resolves with the nodes it started. */
  launch(group: string, count: number, signal: AbortSignal): Promise<NodeRecord[]>;
  /** Non-terminated nodes. */
  nodes(signal: AbortSignal): Promise<NodeRecord[]>;
  /** Releases these nodes; unknown ids are ignored. */
  terminate(nodeIds: readonly string[], signal: AbortSignal): Promise<void>;
  /** Releases every node and whatever else the backend holds (watches, timers); idempotent. */
  close(signal: AbortSignal): Promise<void>;
  /** Rendezvous port of a group at its first node (MASTER_PORT). */
  allocateMasterPort(nodeAddress: string): Promise<number>;
  /**
   * The leases this backend pays for per block, as the chain holds them now, with the
   * chain's latest block (Akash); absent for backends the spec prices by the node-hour.
   */
  leasesOnChain?(signal: AbortSignal): Promise<{ latest: ChainBlock; leases: LeaseOnChain[] }>;
  /**
   * Takes over the nodes a head that died left running, instead of their being reaped:
   * their agents reconnect to this head (same address) and their trainers go on. Resolves
   * with the nodes it took; those it could not (gone meanwhile) are left to the repair loop.
   * Only called when the backend's `adoptable` said yes.
   */
  adopt?(signal: AbortSignal): Promise<NodeRecord[]>;
  /** Called whenever a node may have changed state (a watch event, a process exit), so the head need not poll. */
  onNodesChanged?(listener: () => void): void;
}

/** What a backend needs to make nodes that join this head. */
export interface BackendContext {
  readonly clusterName: string;
  /** host:port workers dial. */
  readonly headAddress: string;
  /**
   * Mints the single-use join token of one node (DROVER_JOIN_TOKEN): one per node
   * launched, bound to its group and, where the backend names its nodes, to the name.
   * A token that will never reach a node (an ask closed without a lease) is discarded.
   */
  readonly joinTokens: { mint(binding: { group: string; nodeName?: string }): string; discard(token: string): void };
  /** Extra environment every node's agent gets (storage config); may hold secrets. */
  readonly agentEnv: Readonly<Record<string, string>>;
  readonly heartbeatTimeoutMs: number;
  readonly state: StateDirectory;
  readonly logger: Logger;
}

/** A group of the compiled section: every backend's section lists its groups like this. */
export interface NodeGroup {
  readonly name: string;
  readonly nodes: number;
}

/**
 * Registration of one backend, under `name` (the spec's `provisioner:` value and the key
 * of its section). `specSchema` parses the section: `z.input` is what users write,
 * `z.output` the compiled section with defaults filled and durations as `...Ms`.
 */
export interface ProvisionerBackend<Schema extends z.ZodType<{ groups: readonly NodeGroup[] }> = z.ZodType<{ groups: readonly NodeGroup[] }>> {
  readonly name: string;
  readonly specSchema: Schema;
  /** Section used when the spec has none (local: two nodes); undefined: the section is required. */
  readonly defaultSection?: z.input<Schema>;
  /** Nodes see the head's filesystem: a job's working directory is used in place, not shipped. */
  readonly sharesFilesystem: boolean;
  create(section: z.output<Schema>, context: BackendContext): Provisioner;
  /** How long `drover up` waits for every node to join (default 60 s): Akash needs bid windows, pods may pull an image. */
  startDeadlineMs?(section: z.output<Schema>): number;
  /** A short clause on provisioning progress for `drover up` ("; 2 ask(s) posted, ..."), read from the state directory. */
  progress?(state: StateDirectory, sinceMs: number): Promise<string>;
  /**
   * Whether a new head can take over what a crashed head left (Provisioner.adopt), from
   * the state directory alone; the reason when not (the head then reaps and restarts the
   * jobs from their checkpoints). Absent: never.
   */
  adoptable?(state: StateDirectory): Promise<{ ok: true } | { ok: false; reason: string }>;
  /** Releases what a crashed head left behind, from its state directory alone; says what it stopped. */
  reap(state: StateDirectory, logger: Logger, signal: AbortSignal): Promise<string[]>;
}
