// Compiled groups -> Akash SDL 2.0. One group is one placement (one order, one lease, one
// provider); its nodes are two services, each with its own compute profile of the same
// resources:
//
//   <group>-leader  count 1          ports exposed globally (other groups dial it) and to
//                                    the workers of its own group
//   <group>-worker  count nodes - 1  ports exposed to the leader only
//
// The split gives the leader a stable service name inside the group and a global endpoint
// of its own, which one service of N replicas behind a load-balanced port cannot give.
// Each service gets its own profile, rather than both sharing one, because chain-sdk's two
// manifest builders disagree on resource ids when services share a profile in a placement
// (generateManifest folds them into one unit, the SDL class does not); with one profile
// per service every implementation, the provider's Go parser included, builds the same
// manifest and hash.

import type { SDLInput } from '@akashnetwork/chain-sdk';
import { stringify } from 'yaml';

import { AKASH_LIMITS } from './akash-limits.js';
import { GroupSpecError } from './errors.js';
import type { CompiledAkashGroup } from './group-spec.js';
import { formatSize } from './quantity.js';

/** Where the ram-class volume is mounted: PyTorch and Ray look for shared memory here. */
export const SHM_MOUNT_PATH = '/dev/shm';
/** Name of the ram-class volume in the compute profile. */
export const SHM_VOLUME_NAME = 'shm';

/** The port every worker agent's cross-group bridge listens on inside its container (DROVER_BRIDGE_PORT). */
export const BRIDGE_PORT = 7447;

export type GroupRole = 'leader' | 'worker';

export function serviceName(groupName: string, role: GroupRole): string {
  return `${groupName}-${role}`;
}

export interface RenderSdlOptions {
  /**
   * Env added to every node of every group (head address, join token...). It is part of
   * the manifest, hence of the manifest hash, but not of anything written on chain.
   */
  readonly extraEnv?: Readonly<Record<string, string>>;
  /** Env added to one role's service only, after extraEnv (each role's join tokens). */
  readonly roleEnv?: Readonly<Partial<Record<GroupRole, Readonly<Record<string, string>>>>>;
}

type Service = SDLInput['services'][string];
type ComputeProfile = SDLInput['profiles']['compute'][string];
type Placement = SDLInput['profiles']['placement'][string];

/** One deployment holding every group as its own placement. */
export function renderSdlDocument(groups: readonly CompiledAkashGroup[], options: RenderSdlOptions = {}): SDLInput {
  if (groups.length === 0) throw new GroupSpecError([{ path: 'groups', message: 'at least one group is needed' }]);
  if (groups.length > AKASH_LIMITS.maxGroupsPerDeployment) {
    throw new GroupSpecError([{ path: 'groups', message: `at most ${AKASH_LIMITS.maxGroupsPerDeployment} groups fit one deployment (Akash limit); split into several deployments` }]);
  }
  const denoms = new Set(groups.map((g) => g.maxPrice.denom));
  if (denoms.size > 1) {
    throw new GroupSpecError([{ path: 'groups', message: `one deployment pays in one denomination, got ${[...denoms].join(', ')}` }]);
  }
  const names = new Set<string>();
  const services: Record<string, Service> = {};
  const compute: Record<string, ComputeProfile> = {};
  const placement: Record<string, Placement> = {};
  const deployment: SDLInput['deployment'] = {};
  // Groups in name order: chain-sdk's generateManifest (and the provider) sort groups by
  // name anyway, and chain-sdk's older SDL class pairs placements with groups by position,
  // so any other order breaks its manifest() for multi-group SDLs.
  const byName = groups.map((group, index) => ({ group, index })).sort((a, b) => a.group.name.localeCompare(b.group.name));
  byName.forEach(({ group, index }) => {
    if (names.has(group.name)) throw new GroupSpecError([{ path: `groups[${index}].name`, message: `duplicate group name "${group.name}"` }]);
    names.add(group.name);
    const roles: GroupRole[] = group.nodes > 1 ? ['leader', 'worker'] : ['leader'];
    for (const role of roles) {
      const name = serviceName(group.name, role);
      services[name] = renderService(group, role, options);
      deployment[name] = { [group.name]: { profile: name, count: role === 'leader' ? 1 : group.nodes - 1 } };
      compute[name] = renderComputeProfile(group);
    }
    placement[group.name] = renderPlacement(group, roles.map((role) => serviceName(group.name, role)));
  });
  return { version: '2.0', services, profiles: { compute, placement }, deployment };
}

/** The SDL of a single group as its own deployment. */
export function renderGroupSdlDocument(group: CompiledAkashGroup, options: RenderSdlOptions = {}): SDLInput {
  return renderSdlDocument([group], options);
}

/** YAML text for an SDL document, keys in the order written, `version` quoted. */
export function sdlToYaml(document: SDLInput): string {
  return `---\n${stringify(document, { lineWidth: 0, defaultStringType: 'PLAIN', defaultKeyType: 'PLAIN' })}`;
}

export function renderSdlYaml(groups: readonly CompiledAkashGroup[], options: RenderSdlOptions = {}): string {
  return sdlToYaml(renderSdlDocument(groups, options));
}

export function renderGroupSdlYaml(group: CompiledAkashGroup, options: RenderSdlOptions = {}): string {
  return sdlToYaml(renderGroupSdlDocument(group, options));
}

function renderService(group: CompiledAkashGroup, role: GroupRole, options: RenderSdlOptions): Service {
  const peer = serviceName(group.name, role === 'leader' ? 'worker' : 'leader');
  const hasPeer = group.nodes > 1;
  const expose: NonNullable<Service['expose']> = [];
  for (const port of group.ports) {
    const to: Array<{ global?: boolean; service?: string }> = [];
    if (role === 'leader' && port.global) to.push({ global: true });
    if (hasPeer) to.push({ service: peer });
    if (to.length === 0) continue;
    expose.push({ port: port.port, as: port.as, proto: port.proto, to });
  }
  // The cross-group bridge: the leader's agent listens on BRIDGE_PORT, exposed globally
  // (the provider forwards a random external port to it, read from the lease status).
  if (role === 'leader' && !group.ports.some((port) => port.port === BRIDGE_PORT)) {
    expose.push({ port: BRIDGE_PORT, as: BRIDGE_PORT, proto: 'tcp', to: [{ global: true }] });
  }
  const env = {
    ...group.env,
    ...options.extraEnv,
    ...options.roleEnv?.[role],
    DROVER_GROUP: group.name,
    DROVER_GROUP_ROLE: role,
    DROVER_BRIDGE_PORT: String(BRIDGE_PORT),
  };
  return {
    image: group.image,
    ...(group.command === undefined ? {} : { command: [...group.command] }),
    ...(group.args === undefined ? {} : { args: [...group.args] }),
    env: Object.entries(env).map(([key, value]) => `${key}=${value}`),
    ...(expose.length === 0 ? {} : { expose }),
    params: { storage: { [SHM_VOLUME_NAME]: { mount: SHM_MOUNT_PATH, readOnly: false } } },
  };
}

function renderComputeProfile(group: CompiledAkashGroup): ComputeProfile {
  const cpuUnits = group.cpuMillis % 1000 === 0 ? group.cpuMillis / 1000 : `${group.cpuMillis}m`;
  return {
    resources: {
      cpu: { units: cpuUnits },
      memory: { size: formatSize(group.memoryBytes) },
      storage: [
        { size: formatSize(group.ephemeralStorageBytes) },
        // Never the container runtime's 64MB default: see sdl/README.md, "Shared memory".
        { name: SHM_VOLUME_NAME, size: formatSize(group.shmBytes), attributes: { class: 'ram', persistent: false } },
      ],
      gpu: {
        units: group.gpu.perNode,
        attributes: {
          vendor: {
            nvidia: group.gpu.models.map((m) => ({
              model: m.model,
              ...(m.ram === undefined ? {} : { ram: m.ram }),
              ...(m.interface === undefined ? {} : { interface: m.interface }),
            })),
          },
        },
      },
    },
  };
}

function renderPlacement(group: CompiledAkashGroup, profileNames: readonly string[]): Placement {
  const amount = group.maxPrice.amount;
  // Whole amounts stay numbers (as hand-written SDLs have them); fractions stay exact strings.
  const renderedAmount = /^\d+$/.test(amount) && Number.isSafeInteger(Number(amount)) ? Number(amount) : amount;
  return {
    ...(Object.keys(group.attributes).length === 0 ? {} : { attributes: { ...group.attributes } }),
    ...(group.auditors.length === 0 ? {} : { signedBy: { anyOf: [...group.auditors] } }),
    pricing: Object.fromEntries(profileNames.map((profile) => [profile, { denom: group.maxPrice.denom, amount: renderedAmount }])),
  };
}
