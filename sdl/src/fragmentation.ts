// Reshaping a group so that fragmented providers can bid on it. A provider with 8 free
// A100s spread over two machines cannot take a 1 x 8 unit; AT-1 learned to start small
// and grow. The bid strategy (orchestrator) decides when to use these; here they are pure
// arithmetic over compiled groups, keeping the total GPU count fixed.

import { AKASH_LIMITS } from './akash-limits.js';
import { FragmentationError } from './errors.js';
import type { CompiledAkashGroup } from './group-spec.js';
import { MEBIBYTE } from './quantity.js';

/**
 * Splits a group's nodes over `parts` groups, each its own placement (own order, own
 * provider). Nodes are spread as evenly as possible, larger parts first: 5 nodes in 2
 * parts gives 3 + 2. Parts are named `<name>-p1`, `<name>-p2`, ...; everything per node
 * (resources, price, image, filters) is unchanged.
 */
export function splitGroup(group: CompiledAkashGroup, parts: number): CompiledAkashGroup[] {
  if (!Number.isInteger(parts) || parts < 1) {
    throw new FragmentationError(`cannot split group "${group.name}" into ${parts} parts: parts must be a whole number of at least 1`, { group: group.name, parts });
  }
  if (parts > group.nodes) {
    throw new FragmentationError(`cannot split group "${group.name}" of ${group.nodes} nodes into ${parts} parts: each part needs a node`, { group: group.name, parts, nodes: group.nodes });
  }
  if (parts === 1) return [group];
  const base = Math.floor(group.nodes / parts);
  const remainder = group.nodes % parts;
  return Array.from({ length: parts }, (_, index) => ({
    ...group,
    name: `${group.name}-p${index + 1}`,
    nodes: base + (index < remainder ? 1 : 0),
  }));
}

/**
 * The same GPUs on nodes of `gpusPerNode` each (8 x 4 -> 4 x 8 or 16 x 2). CPU, memory,
 * disk, shm and price per node scale with the GPU count per node, rounded down (memory
 * to whole MiB), so the group asks for no more in total than before.
 */
export function reshapeGroup(group: CompiledAkashGroup, gpusPerNode: number): CompiledAkashGroup {
  const totalGpus = group.nodes * group.gpu.perNode;
  const context = { group: group.name, gpusPerNode, totalGpus };
  if (!Number.isInteger(gpusPerNode) || gpusPerNode < 1 || gpusPerNode > AKASH_LIMITS.maxGpusPerUnit) {
    throw new FragmentationError(`gpusPerNode must be a whole number from 1 to ${AKASH_LIMITS.maxGpusPerUnit}, got ${gpusPerNode}`, context);
  }
  if (totalGpus % gpusPerNode !== 0) {
    throw new FragmentationError(`group "${group.name}" has ${totalGpus} GPUs, which do not divide into nodes of ${gpusPerNode}`, context);
  }
  const nodes = totalGpus / gpusPerNode;
  if (nodes > AKASH_LIMITS.maxCountPerUnit) {
    throw new FragmentationError(`group "${group.name}" would need ${nodes} nodes of ${gpusPerNode} GPUs; Akash allows ${AKASH_LIMITS.maxCountPerUnit} replicas per group`, context);
  }
  const ratio = gpusPerNode / group.gpu.perNode;
  const scaleBytes = (bytes: number) => Math.floor((bytes * ratio) / MEBIBYTE) * MEBIBYTE;
  const cpuMillis = Math.floor(group.cpuMillis * ratio);
  if (cpuMillis > AKASH_LIMITS.maxCpuMillisPerUnit || scaleBytes(group.memoryBytes) > AKASH_LIMITS.maxMemoryBytesPerUnit) {
    throw new FragmentationError(`group "${group.name}" on nodes of ${gpusPerNode} GPUs would exceed Akash's per-node CPU or memory limit`, context);
  }
  const amount = Number(group.maxPrice.amount) * ratio;
  return {
    ...group,
    nodes,
    gpu: { ...group.gpu, perNode: gpusPerNode },
    cpuMillis: Math.max(cpuMillis, AKASH_LIMITS.minCpuMillisPerUnit),
    memoryBytes: scaleBytes(group.memoryBytes),
    ephemeralStorageBytes: scaleBytes(group.ephemeralStorageBytes),
    shmBytes: Math.max(scaleBytes(group.shmBytes), 64 * MEBIBYTE),
    maxPrice: { ...group.maxPrice, amount: amount.toLocaleString('en-US', { useGrouping: false, maximumFractionDigits: 18 }) },
  };
}

/** Whether the group's provider filters let `provider` through (allow list empty = anyone not denied). */
export function isProviderAllowed(group: Pick<CompiledAkashGroup, 'providers'>, provider: string): boolean {
  if (group.providers.deny.includes(provider)) return false;
  return group.providers.allow.length === 0 || group.providers.allow.includes(provider);
}
