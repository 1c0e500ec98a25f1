// Validation of any SDL, generated or hand-written: structure (sdl-schema.ts), then what
// a schema cannot say (cross references, Akash limits, GPU slugs, shm volumes), then
// chain-sdk's own validator as a cross-check. Every issue names its path in dotted form,
// e.g. `profiles.compute.worker.resources.gpu.units`.

import { validateSDL, type NetworkId, type SDLInput } from '@akashnetwork/chain-sdk';
import { parse as parseYaml, YAMLParseError } from 'yaml';

import { AKASH_LIMITS, PRICE_DENOM_PATTERN } from './akash-limits.js';
import { SdlValidationError, type SdlIssue } from './errors.js';
import { closestGpuSlug, describeUnknownGpuVariant, isKnownGpuSlug, normalizeGpuModel } from './gpu-catalog.js';
import { formatIssuePath, zodIssuesToSdlIssues } from './group-spec.js';
import { parseCpuMillis, parseSize } from './quantity.js';
import { sdlDocumentSchema, type SdlDocument } from './sdl-schema.js';

export interface SdlValidationOptions {
  /** Which network's USDC denom is acceptable; chain-sdk's default, mainnet, when omitted. */
  readonly networkId?: NetworkId;
}

export type SdlValidationResult =
  | { readonly ok: true; readonly document: SDLInput }
  | { readonly ok: false; readonly issues: readonly SdlIssue[] };

/** Validates SDL YAML text or an already-parsed document. Never throws for bad input. */
export function validateSdl(sdl: string | unknown, options: SdlValidationOptions = {}): SdlValidationResult {
  let raw: unknown = sdl;
  if (typeof sdl === 'string') {
    try {
      raw = parseYaml(sdl);
    } catch (error) {
      const where = error instanceof YAMLParseError && error.linePos ? ` (line ${error.linePos[0].line})` : '';
      return { ok: false, issues: [{ path: '', message: `not valid YAML${where}: ${(error as Error).message}` }] };
    }
  }
  const parsed = sdlDocumentSchema.safeParse(raw);
  if (!parsed.success) return { ok: false, issues: zodIssuesToSdlIssues(parsed.error) };

  const issues = checkSemantics(parsed.data);
  if (issues.length > 0) return { ok: false, issues };

  // Our rules are meant to be a superset of chain-sdk's; if chain-sdk still objects, say so
  // in its words rather than let the deployment fail later.
  const document = raw as SDLInput;
  const chainErrors = validateSDL(document, options.networkId ?? 'mainnet') ?? [];
  if (chainErrors.length > 0) {
    return { ok: false, issues: chainErrors.map((e) => ({ path: jsonPointerToPath(e.instancePath), message: `chain-sdk: ${e.message}` })) };
  }
  return { ok: true, document };
}

/** Like validateSdl, but throws SdlValidationError listing every issue. */
export function assertValidSdl(sdl: string | unknown, options: SdlValidationOptions = {}): SDLInput {
  const result = validateSdl(sdl, options);
  if (!result.ok) throw new SdlValidationError(result.issues);
  return result.document;
}

/** `/services/web/expose/0/to/0` -> `services.web.expose[0].to[0]`. */
export function jsonPointerToPath(pointer: string): string {
  const segments = pointer
    .split('/')
    .slice(1)
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    .map((s) => (/^\d+$/.test(s) ? Number(s) : s));
  return formatIssuePath(segments);
}

function castArray<T>(value: T | T[]): T[] {
  return Array.isArray(value) ? value : [value];
}

function checkSemantics(sdl: SdlDocument): SdlIssue[] {
  const issues: SdlIssue[] = [];
  const add = (path: string, message: string) => issues.push({ path, message });
  const { services, profiles, deployment } = sdl;

  for (const name of Object.keys(services)) {
    if (!/^[a-z]([-a-z0-9]*[a-z0-9])?$/.test(name) || name.length > 63) {
      add(`services.${name}`, 'service names must be DNS labels: lower case letters, digits and dashes, at most 63 characters');
    }
    if (deployment[name] === undefined) add(`deployment`, `service "${name}" is defined but never deployed; add deployment.${name}`);
  }

  const placementNames = Object.keys(profiles.placement);
  if (placementNames.length > AKASH_LIMITS.maxGroupsPerDeployment) {
    add('profiles.placement', `${placementNames.length} placement groups; Akash allows at most ${AKASH_LIMITS.maxGroupsPerDeployment} per deployment`);
  }

  // Replicas of one profile in one placement are one resource unit; the chain caps its count.
  const unitCounts = new Map<string, number>();
  const profilesPerPlacement = new Map<string, Set<string>>();
  for (const [serviceName, placements] of Object.entries(deployment)) {
    const service = services[serviceName];
    if (service === undefined) add(`deployment.${serviceName}`, `deploys service "${serviceName}", which services does not define`);
    for (const [placementName, entry] of Object.entries(placements)) {
      const path = `deployment.${serviceName}.${placementName}`;
      const placement = profiles.placement[placementName];
      if (placement === undefined) add(path, `placement "${placementName}" is not defined in profiles.placement`);
      if (profiles.compute[entry.profile] === undefined) add(`${path}.profile`, `compute profile "${entry.profile}" is not defined in profiles.compute`);
      else if (placement !== undefined && placement.pricing[entry.profile] === undefined) {
        add(`profiles.placement.${placementName}.pricing`, `has no price for profile "${entry.profile}" (deployed by ${path})`);
      }
      if (entry.count < 1) add(`${path}.count`, 'must be at least 1');
      else if (entry.count > AKASH_LIMITS.maxCountPerUnit) add(`${path}.count`, `must be at most ${AKASH_LIMITS.maxCountPerUnit} replicas (Akash limit)`);
      const unitKey = `${placementName}\u0000${entry.profile}`;
      unitCounts.set(unitKey, (unitCounts.get(unitKey) ?? 0) + entry.count);
      const inPlacement = profilesPerPlacement.get(placementName) ?? new Set<string>();
      inPlacement.add(entry.profile);
      profilesPerPlacement.set(placementName, inPlacement);
    }
  }
  for (const [key, count] of unitCounts) {
    const [placementName, profile] = key.split('\u0000') as [string, string];
    if (count > AKASH_LIMITS.maxCountPerUnit) {
      add(`profiles.placement.${placementName}`, `profile "${profile}" is deployed ${count} times in this placement; Akash allows at most ${AKASH_LIMITS.maxCountPerUnit} replicas of one resource unit`);
    }
  }
  for (const [placementName, inPlacement] of profilesPerPlacement) {
    if (inPlacement.size > AKASH_LIMITS.maxUnitsPerGroup) {
      add(`profiles.placement.${placementName}`, `uses ${inPlacement.size} compute profiles; Akash allows at most ${AKASH_LIMITS.maxUnitsPerGroup} resource units per group`);
    }
  }

  for (const [profileName, profile] of Object.entries(profiles.compute)) {
    checkComputeProfile(`profiles.compute.${profileName}.resources`, profile.resources, add);
  }

  const denoms = new Map<string, string>();
  for (const [placementName, placement] of Object.entries(profiles.placement)) {
    for (const [profileName, price] of Object.entries(placement.pricing)) {
      const path = `profiles.placement.${placementName}.pricing.${profileName}`;
      if (profiles.compute[profileName] === undefined) add(path, `prices profile "${profileName}", which profiles.compute does not define`);
      if (!PRICE_DENOM_PATTERN.test(price.denom)) add(`${path}.denom`, `"${price.denom}" is not a pricing denomination; use uact, uakt or the network's USDC ibc/ denom`);
      denoms.set(path, price.denom);
      if (Number(price.amount) > AKASH_LIMITS.maxPricePerUnit) {
        add(`${path}.amount`, `must be at most ${AKASH_LIMITS.maxPricePerUnit} per replica per block (Akash limit)`);
      }
    }
  }
  const distinctDenoms = [...new Set(denoms.values())];
  if (distinctDenoms.length > 1) {
    const [firstPath] = [...denoms.keys()];
    for (const [path, denom] of denoms) {
      if (denom !== denoms.get(firstPath!)) add(`${path}.denom`, `is ${denom} but ${firstPath} is ${denoms.get(firstPath!)}; one deployment pays in one denomination`);
    }
  }

  for (const [serviceName, service] of Object.entries(services)) {
    service.expose?.forEach((expose, exposeIndex) => {
      expose.to?.forEach((to, toIndex) => {
        if (to.service !== undefined && services[to.service] === undefined) {
          add(`services.${serviceName}.expose[${exposeIndex}].to[${toIndex}].service`, `names service "${to.service}", which services does not define`);
        }
      });
    });
    checkServiceStorage(sdl, serviceName, add);
  }
  return issues;
}

type Resources = SdlDocument['profiles']['compute'][string]['resources'];

function checkComputeProfile(path: string, resources: Resources, add: (path: string, message: string) => void): void {
  const cpuMillis = parseCpuMillis(resources.cpu.units);
  if (cpuMillis === undefined) add(`${path}.cpu.units`, `"${resources.cpu.units}" is not a CPU amount; write e.g. 8, 0.5 or "500m"`);
  else if (cpuMillis < AKASH_LIMITS.minCpuMillisPerUnit || cpuMillis > AKASH_LIMITS.maxCpuMillisPerUnit) {
    add(`${path}.cpu.units`, `must be between 0.01 and ${AKASH_LIMITS.maxCpuMillisPerUnit / 1000} cores per replica (Akash limit)`);
  }

  const memoryBytes = parseSize(resources.memory.size);
  if (memoryBytes === undefined) add(`${path}.memory.size`, `"${resources.memory.size}" is not a size; write e.g. 512Mi, 24Gi`);
  else if (memoryBytes > AKASH_LIMITS.maxMemoryBytesPerUnit) add(`${path}.memory.size`, 'must be at most 2Ti per replica (Akash limit)');
  else if (memoryBytes < AKASH_LIMITS.minMemoryBytesPerUnit) add(`${path}.memory.size`, 'must be at least 1Mi (Akash limit)');

  const volumes = castArray(resources.storage);
  const storagePath = (index: number) => (Array.isArray(resources.storage) ? `${path}.storage[${index}]` : `${path}.storage`);
  const names = new Set<string>();
  volumes.forEach((volume, index) => {
    const name = volume.name ?? 'default';
    if (names.has(name)) add(`${storagePath(index)}.name`, `volume "${name}" is declared twice${volume.name === undefined ? ' (an unnamed volume is "default")' : ''}`);
    names.add(name);
    const bytes = parseSize(volume.size);
    if (bytes === undefined) add(`${storagePath(index)}.size`, `"${volume.size}" is not a size; write e.g. 100Gi`);
    else if (bytes > AKASH_LIMITS.maxStorageBytesPerVolume) add(`${storagePath(index)}.size`, 'must be at most 32Ti per volume (Akash limit)');
    else if (bytes < AKASH_LIMITS.minStorageBytesPerVolume) add(`${storagePath(index)}.size`, 'must be at least 5Mi per volume (Akash limit)');
    const persistent = isTrue(volume.attributes?.persistent);
    if (volume.attributes?.class === 'ram' && persistent) {
      add(`${storagePath(index)}.attributes.persistent`, 'a ram-class volume cannot be persistent; set persistent: false');
    }
    if (volume.attributes?.class !== undefined && volume.attributes.class !== 'ram' && !persistent) {
      add(`${storagePath(index)}.attributes.persistent`, `class ${volume.attributes.class} is for persistent volumes; set persistent: true (or drop the class)`);
    }
  });

  const gpu = resources.gpu;
  if (gpu === undefined) return;
  const units = typeof gpu.units === 'string' ? Number(gpu.units) : gpu.units;
  if (!Number.isInteger(units) || units < 0) {
    add(`${path}.gpu.units`, `must be a whole number of GPUs, not "${gpu.units}"`);
    return;
  }
  if (units > AKASH_LIMITS.maxGpusPerUnit) {
    add(`${path}.gpu.units`, `must be at most ${AKASH_LIMITS.maxGpusPerUnit} GPUs per replica (Akash limit); use more replicas instead`);
  }
  if (units === 0 && gpu.attributes !== undefined) add(`${path}.gpu.attributes`, 'must be absent when gpu.units is 0');
  if (units > 0 && gpu.attributes?.vendor === undefined) {
    add(`${path}.gpu.attributes.vendor`, 'is required when gpu.units is above 0; e.g. vendor: { nvidia: [{ model: a100 }] }');
  }
  gpu.attributes?.vendor?.nvidia?.forEach((entry, index) => {
    const entryPath = `${path}.gpu.attributes.vendor.nvidia[${index}]`;
    if (entry.model === undefined) return;
    if (!isKnownGpuSlug(entry.model)) {
      const suggestion = normalizedSlug(entry.model) ?? closestGpuSlug(entry.model);
      const hint = suggestion === undefined ? '' : `; did you mean "${suggestion}"?`;
      add(`${entryPath}.model`, `"${entry.model}" is not a GPU slug providers publish, so no provider will bid${hint}`);
      return;
    }
    if (entry.ram !== undefined && !/^\d+(Gi|Mi)$/.test(entry.ram)) {
      add(`${entryPath}.ram`, `"${entry.ram}" is not how providers publish GPU memory; write e.g. 80Gi`);
      return;
    }
    const unknownVariant = describeUnknownGpuVariant(entry.model, entry.ram, entry.interface);
    if (unknownVariant !== undefined) add(entryPath, unknownVariant);
  });
}

function checkServiceStorage(sdl: SdlDocument, serviceName: string, add: (path: string, message: string) => void): void {
  const service = sdl.services[serviceName]!;
  const mounts = service.params?.storage ?? {};
  const seenMounts = new Map<string, string>();
  for (const [volumeName, params] of Object.entries(mounts)) {
    if (params.mount === undefined) continue;
    const other = seenMounts.get(params.mount);
    if (other !== undefined) add(`services.${serviceName}.params.storage.${volumeName}.mount`, `${params.mount} is already mounted by volume "${other}"`);
    seenMounts.set(params.mount, volumeName);
  }
  for (const [placementName, entry] of Object.entries(sdl.deployment[serviceName] ?? {})) {
    const profile = sdl.profiles.compute[entry.profile];
    if (profile === undefined) continue;
    const volumes = castArray(profile.resources.storage);
    for (const volumeName of Object.keys(mounts)) {
      if (!volumes.some((v) => (v.name ?? 'default') === volumeName)) {
        add(`services.${serviceName}.params.storage.${volumeName}`, `mounts volume "${volumeName}", which profile "${entry.profile}" (deployment.${serviceName}.${placementName}) does not declare`);
      }
    }
    volumes.forEach((volume) => {
      const name = volume.name ?? 'default';
      const mount = mounts[name]?.mount;
      if (volume.attributes?.class === 'ram' && mount === undefined) {
        add(`services.${serviceName}.params.storage.${name}.mount`, `ram volume "${name}" of profile "${entry.profile}" is never mounted; mount it at /dev/shm`);
      }
      if (isTrue(volume.attributes?.persistent) && mount === undefined) {
        add(`services.${serviceName}.params.storage.${name}.mount`, `persistent volume "${name}" of profile "${entry.profile}" needs a mount path`);
      }
    });
  }
}

/** The slug an alias stands for ("nvidia-a100" -> "a100"), if it is one. */
function normalizedSlug(model: string): string | undefined {
  try {
    return normalizeGpuModel(model).model;
  } catch {
    return undefined;
  }
}

function isTrue(value: boolean | string | undefined): boolean {
  if (typeof value === 'boolean') return value;
  if (value === undefined) return false;
  return !['false', 'no', '0', ''].includes(value.toLowerCase());
}
