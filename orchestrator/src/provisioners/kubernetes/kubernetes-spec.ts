import { z } from "zod";

/** A Kubernetes quantity as users write it: "8", "500m", "64Gi", or a number. */
const quantity = z.union([z.number().positive(), z.string().regex(/^\d+(\.\d+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$/, 'expected a Kubernetes quantity like "8", "500m" or "64Gi"')]).transform(String);
const labelValue = z.string().max(63);
const envName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "not an environment variable name");

const tolerationSchema = z.object({
  key: z.string().optional(),
  operator: z.enum(["Exists", "Equal"]).optional(),
  value: z.string().optional(),
  effect: z.enum(["NoSchedule", "PreferNoSchedule", "NoExecute"]).optional(),
  tolerationSeconds: z.number().int().optional(),
}).strict();

/** The worker image Drover publishes (examples/worker-image); a group may name its own. */
export const DEFAULT_KUBERNETES_IMAGE = "ghcr.io/drover/worker:0.1.0";

const kubernetesGroupSchema = z.object({
  name: z.string().regex(/^[a-z][a-z0-9-]{0,23}$/, "lower-case letters, digits and '-', starting with a letter, at most 24"),
  nodes: z.number().int().min(1).max(256),
  /** GPUs per node (pod), as a limit on `gpuResource`; 0 for CPU pods. */
  gpus: z.number().int().min(0).max(16).default(0),
  gpuResource: z.string().regex(/^[a-z0-9.-]+\/[a-z0-9.-]+$/, 'expected an extended resource name like "nvidia.com/gpu"').default("nvidia.com/gpu"),
  /** Ranks per node; default one per GPU (one for CPU pods). */
  ranksPerNode: z.number().int().min(1).max(64).optional(),
  cpu: quantity.default("4"),
  memory: quantity.default("16Gi"),
  /** Size of the in-memory /dev/shm (emptyDir medium Memory); counts against the pod's memory. */
  shm: quantity.default("4Gi"),
  image: z.string().min(1).default(DEFAULT_KUBERNETES_IMAGE),
  nodeSelector: z.record(z.string(), labelValue).default({}),
  tolerations: z.array(tolerationSchema).default([]),
  env: z.record(envName, z.string()).default({}),
}).strict();

export type KubernetesGroup = z.output<typeof kubernetesGroupSchema>;

/**
 * The `kubernetes:` section. The kubeconfig comes from KUBECONFIG, ~/.kube/config or the
 * pod's service account (in-cluster), as kubectl finds it.
 */
export const kubernetesSpecSchema = z.object({
  /** kubeconfig context; default: the current one. */
  context: z.string().min(1).optional(),
  namespace: z.string().regex(/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/, "not a namespace name").default("default"),
  groups: z.array(kubernetesGroupSchema).min(1).max(8),
  /** MASTER_PORT inside every group (pods have their own network namespace). */
  masterPort: z.number().int().min(1).max(65_535).default(29_500),
  /** The port every worker's cross-group bridge listens on (DROVER_BRIDGE_PORT). */
  bridgePort: z.number().int().min(1).max(65_535).default(7447),
}).strict().superRefine((spec, ctx) => {
  const seen = new Set<string>();
  spec.groups.forEach((group, index) => {
    if (seen.has(group.name)) ctx.addIssue({ code: "custom", path: ["groups", index, "name"], message: `${group.name} is used by an earlier group; group names must be unique` });
    seen.add(group.name);
  });
  if (spec.masterPort === spec.bridgePort) ctx.addIssue({ code: "custom", path: ["bridgePort"], message: `must differ from masterPort (${spec.masterPort})` });
});

export type KubernetesSpec = z.output<typeof kubernetesSpecSchema>;
