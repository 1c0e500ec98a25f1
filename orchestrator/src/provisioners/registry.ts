import { akashBackend } from "./akash/akash-provisioner.js";
import { kubernetesBackend } from "./kubernetes/kubernetes-provisioner.js";
import { localBackend } from "./local/local-provisioner.js";
import type { BackendContext, Provisioner, ProvisionerBackend } from "./provisioner.js";

/**
 * The one place concrete backends are registered, one line each; the spec schema, the
 * head and `drover down` see only these entries (by `provisioner:` name).
 */
export const provisionerBackends = {
  local: localBackend,
  akash: akashBackend,
  kubernetes: kubernetesBackend,
} as const;

export type BackendName = keyof typeof provisionerBackends;

/** The registered backend called `name`, or undefined for a name no backend has (an old head.json). */
export function backendNamed(name: string): ProvisionerBackend | undefined {
  return Object.hasOwn(provisionerBackends, name) ? (provisionerBackends[name as BackendName] as unknown as ProvisionerBackend) : undefined;
}

/** The provisioner of a compiled spec's backend, given its compiled section. */
export function createProvisioner(spec: { provisioner: string }, context: BackendContext): Provisioner {
  const backend = backendNamed(spec.provisioner);
  if (backend === undefined) throw new Error(`no provisioner backend named ${spec.provisioner}`);
  return backend.create((spec as unknown as Record<string, { groups: [] }>)[spec.provisioner]!, context);
}

export type { BackendContext, NodePort, NodeRecord, NodeState, Provisioner, ProvisionerBackend } from "./provisioner.js";
