// @drover/sdl: cluster-spec groups -> Akash SDL, the GPU catalog, SDL validation and the
// manifest hash. Pure: no I/O, no clocks, no network.

export * from './errors.js';
export { AKASH_LIMITS, PRICE_DENOM_PATTERN } from './akash-limits.js';
export {
  GPU_CATALOG,
  closestGpuSlug,
  describeUnknownGpuVariant,
  gpuCatalogEntry,
  isKnownGpuSlug,
  normalizeGpuModel,
  type GpuCatalogEntry,
  type GpuInterface,
  type GpuMemoryVariant,
  type NormalizedGpuModel,
} from './gpu-catalog.js';
export {
  DEFAULT_EPHEMERAL_STORAGE,
  DEFAULT_PRICE_DENOM,
  DEFAULT_SHM_FRACTION_OF_MEMORY,
  DEFAULT_WORKER_GRPC_PORT,
  MIN_SHM_BYTES,
  RESERVED_ENV_NAMES,
  akashGroupListSchema,
  akashGroupSchema,
  defaultShmBytes,
  formatIssuePath,
  parseAkashGroup,
  parseAkashGroups,
  zodIssuesToSdlIssues,
  type AkashGroup,
  type AkashGroupInput,
  type CompiledAkashGroup,
} from './group-spec.js';
export { formatSize, parseCpuMillis, parseSize } from './quantity.js';
export { sdlDocumentSchema, type SdlDocument } from './sdl-schema.js';
export { assertValidSdl, jsonPointerToPath, validateSdl, type SdlValidationOptions, type SdlValidationResult } from './sdl-validation.js';
export {
  BRIDGE_PORT,
  SHM_MOUNT_PATH,
  SHM_VOLUME_NAME,
  renderGroupSdlDocument,
  renderGroupSdlYaml,
  renderSdlDocument,
  renderSdlYaml,
  sdlToYaml,
  serviceName,
  type GroupRole,
  type RenderSdlOptions,
} from './sdl-render.js';
export {
  buildManifest,
  deploymentVersion,
  manifestHash,
  type ChainManifest,
  type DeploymentGroupSpecs,
  type ManifestGroups,
  type ManifestOptions,
} from './manifest.js';
export { isProviderAllowed, reshapeGroup, splitGroup } from './fragmentation.js';
