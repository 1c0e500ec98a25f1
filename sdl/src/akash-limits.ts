// Hard limits the Akash chain puts on every deployment. They come from the chain's
// validation config: akash-network/akash-api go/node/deployment/v1beta4/validation_config.go
// (and the same constants behind go/node/deployment/v1beta5/resourceunit.go in
// akash-network/chain-sdk): "a hard limit on what the network accepts for deployments ...
// the same across all members of the network". An SDL over any of them is refused by the
// chain at MsgCreateDeployment, after the deposit is spent on gas, so we refuse it first.

import { MEBIBYTE, TEBIBYTE } from './quantity.js';

export const AKASH_LIMITS = Object.freeze({
  /** maxUnitCPU = 384 * 1000 millicores per replica. */
  maxCpuMillisPerUnit: 384_000,
  /** Min Limits.CPU = 10 millicores. */
  minCpuMillisPerUnit: 10,
  /** maxUnitGPU = 24 GPUs per replica: one replica is one pod on one node. */
  maxGpusPerUnit: 24,
  /** maxUnitMemory = 2Ti per replica. */
  maxMemoryBytesPerUnit: 2 * TEBIBYTE,
  /** Min Limits.Memory = 1Mi. */
  minMemoryBytesPerUnit: MEBIBYTE,
  /** maxUnitStorage = 32Ti per volume (checked per volume in validateStorage). */
  maxStorageBytesPerVolume: 32 * TEBIBYTE,
  /** Min Limits.Storage = 5Mi per volume. */
  minStorageBytesPerVolume: 5 * MEBIBYTE,
  /** maxUnitCount = 50 replicas of one resource unit (the SDL's deployment count). */
  maxCountPerUnit: 50,
  /** maxGroupCount = 20 placement groups per deployment. */
  maxGroupsPerDeployment: 20,
  /** maxGroupUnits = 20 resource units (distinct compute profiles) per group. */
  maxUnitsPerGroup: 20,
  /** maxUnitPrice = 10000000 (the chain's comment: "10akt") per replica per block. */
  maxPricePerUnit: 10_000_000,
});

/** Denominations chain-sdk's SDL schema accepts for pricing (src/sdl ... priceCoin.denom). */
export const PRICE_DENOM_PATTERN = /^(uakt|uact|ibc\/.+)$/;
