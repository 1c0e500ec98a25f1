import type { ClusterSpec } from "../cluster-spec.js";
import { localBackend } from "./local-provisioner.js";
import type { ProvisionerBackend } from "./provisioner.js";

/** The one place concrete backends are registered; the head only sees the interface. */
export const provisionerBackends: Record<ClusterSpec["provisioner"], ProvisionerBackend> = {
  local: localBackend,
};

export type { Provisioner, ProvisionerBackend, ProvisionContext, ProvisionedNode } from "./provisioner.js";
