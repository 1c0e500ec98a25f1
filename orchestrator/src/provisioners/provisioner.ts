import type { ClusterSpec } from "../cluster-spec.js";
import type { Logger } from "../logger.js";
import type { StateDirectory } from "../state-store.js";

/** What a provisioner needs to make nodes that join this head. */
export interface ProvisionContext {
  /** host:port workers dial. */
  headAddress: string;
  joinToken: string;
  /** Extra environment every node's agent gets (storage config); may hold secrets. */
  agentEnv: Record<string, string>;
  state: StateDirectory;
  logger: Logger;
  signal: AbortSignal;
}

export interface ProvisionedNode {
  nodeName: string;
  group: string;
  /** Backend-specific handle (pid, lease id), for `drover status`. */
  handle: string;
}

/**
 * One backend family (local processes, Akash leases, Kubernetes pods). A backend makes
 * one attempt per call and reports typed errors (ProvisionError.retryable); retries and
 * cleanup after a failed provision are the head's, written once.
 */
export interface Provisioner {
  readonly name: string;
  /**
   * Whether nodes see the head's filesystem (local processes): a job's working directory
   * is then used in place; otherwise it is shipped to them as a code bundle.
   */
  readonly sharesFilesystem?: boolean;
  /** Nodes a job on the whole cluster runs on. */
  expectedNodes(): number;
  provision(context: ProvisionContext): Promise<ProvisionedNode[]>;
  /** Releases every node; idempotent. */
  shutdown(context: Pick<ProvisionContext, "state" | "logger" | "signal">): Promise<void>;
  /** Rendezvous port of a group at its first node (MASTER_PORT). */
  allocateMasterPort(nodeAddress: string): Promise<number>;
}

/** Registration of one backend. `reap` releases what a crashed head left behind, from its state directory alone. */
export interface ProvisionerBackend {
  create(spec: ClusterSpec): Provisioner;
  reap(state: StateDirectory, logger: Logger, signal: AbortSignal): Promise<string[]>;
}
