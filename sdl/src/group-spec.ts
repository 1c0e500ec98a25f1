// One Akash worker group as a user writes it in a cluster spec (`akash.groups[]`), and the
// compiled form with every default filled, every size in bytes and every GPU model
// normalized to its provider slug. The orchestrator embeds `akashGroupSchema` in its own
// cluster-spec schema; `parseAkashGroup` is for callers that hold a single group.

import { z } from 'zod';

import { AKASH_LIMITS, PRICE_DENOM_PATTERN } from './akash-limits.js';
import { GroupSpecError, UnknownGpuModelError, type SdlIssue } from './errors.js';
import { describeUnknownGpuVariant, normalizeGpuModel, type GpuInterface, type NormalizedGpuModel } from './gpu-catalog.js';
import { GIBIBYTE, MEBIBYTE, parseCpuMillis, parseSize } from './quantity.js';

/**
 * The pricing denomination when a group names none. Since the BME upgrade Akash mainnet
 * (akashnet-2) funds deployments in ACT (`uact`, minted from AKT); chain-sdk's SDL schema
 * accepts `uakt`, `uact` and the network's USDC IBC denom (USDC_IBC_DENOMS), and the chain
 * requires every group of one deployment to use the same denomination.
 */
export const DEFAULT_PRICE_DENOM = 'uact';

/** The worker agent's gRPC port, exposed globally so group leaders can reach each other. */
export const DEFAULT_WORKER_GRPC_PORT = 7077;

/** Default /dev/shm: this fraction of the group's memory (see sdl/README.md, "Shared memory"). */
export const DEFAULT_SHM_FRACTION_OF_MEMORY = 0.25;

/** Below this, shm would be no better than the container runtime's own 64MB default. */
export const MIN_SHM_BYTES = 64 * MEBIBYTE;

/** Ephemeral root disk per node when the group names none. */
export const DEFAULT_EPHEMERAL_STORAGE = '100Gi';

// Group names become SDL service names with a "-leader"/"-worker" suffix and, after a
// split, a "-p<N>" part suffix; services are DNS labels (63 characters).
const MAX_GROUP_NAME_LENGTH = 48;
const groupNamePattern = /^[a-z]([-a-z0-9]*[a-z0-9])?$/;
const akashAddressPattern = /^akash1[02-9ac-hj-np-z]{38}$/;
const envNamePattern = /^[A-Za-z_][A-Za-z0-9_]*$/;
const decimalAmountPattern = /^\d+(\.\d+)?$/;

/** Env names Drover sets itself on every node from the group; a user value would be overwritten. */
export const RESERVED_ENV_NAMES: readonly string[] = ['DROVER_GROUP', 'DROVER_GROUP_ROLE'];

const sizeInput = z.union([z.number().int().positive(), z.string().min(1)]);

const gpuModelName = z.union([z.string().min(1), z.number().transform(String)]);

const gpuInterfaceSchema = z.enum(['pcie', 'sxm']);

const gpuSchema = z.strictObject({
  /** One model or a list of acceptable models; slugs or aliases ("A100-80GB", "4090"). */
  // Numbers too: an unquoted `4090` in YAML is one.
  model: z.union([gpuModelName, z.array(gpuModelName).min(1)]),
  /** GPU memory, e.g. "80Gi"; applies to every listed model that names none itself. */
  ram: z.string().optional(),
  interface: gpuInterfaceSchema.optional(),
  perNode: z
    .number()
    .int()
    .min(1, 'must be at least 1')
    .max(AKASH_LIMITS.maxGpusPerUnit, `must be at most ${AKASH_LIMITS.maxGpusPerUnit} GPUs per node (Akash limit)`)
    .prefault(1),
});

const portSchema = z
  .strictObject({
    port: z.number().int().min(1).max(65535),
    /** Service port; defaults to `port`. Global ports get a provider-assigned external port. */
    as: z.number().int().min(1).max(65535).optional(),
    global: z.boolean().prefault(true),
    proto: z.enum(['tcp', 'udp']).prefault('tcp'),
  })
  .transform((p) => ({ port: p.port, as: p.as ?? p.port, global: p.global, proto: p.proto }));

const priceSchema = z.strictObject({
  /** Per node (replica) per block, in `denom`; decimals allowed (the chain keeps DecCoins). */
  amount: z.union([z.number().nonnegative(), z.string().regex(decimalAmountPattern, 'must be a non-negative decimal')]),
  denom: z.string().regex(PRICE_DENOM_PATTERN, 'must be uakt, uact or an ibc/<hash> denom').prefault(DEFAULT_PRICE_DENOM),
});

const addressList = z.array(z.string().regex(akashAddressPattern, 'must be an akash1... bech32 address')).prefault([]);

export const akashGroupSchema = z
  .strictObject({
    name: z
      .string()
      .max(MAX_GROUP_NAME_LENGTH)
      .regex(groupNamePattern, 'must be lower case letters, digits and dashes, starting with a letter'),
    nodes: z
      .number()
      .int()
      .min(1, 'must be at least 1')
      .max(AKASH_LIMITS.maxCountPerUnit, `must be at most ${AKASH_LIMITS.maxCountPerUnit} nodes per group (Akash replica limit); split the group`),
    gpu: gpuSchema,
    /** CPU cores per node: 32, 0.5 or "500m". */
    cpu: z.union([z.number().positive(), z.string().min(1)]),
    memory: sizeInput,
    ephemeralStorage: sizeInput.prefault(DEFAULT_EPHEMERAL_STORAGE),
    /** /dev/shm per node; defaults to a quarter of `memory`. */
    shm: sizeInput.optional(),
    image: z.string().min(1),
    command: z.array(z.string()).optional(),
    args: z.array(z.string()).optional(),
    env: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).prefault({}),
    ports: z.array(portSchema).prefault([{ port: DEFAULT_WORKER_GRPC_PORT }]),
    maxPrice: priceSchema,
    /** Bid filters, applied when choosing bids: SDL 2.0 cannot name provider addresses. */
    providers: z.strictObject({ allow: addressList, deny: addressList }).prefault({}),
    /** Only providers audited by one of these (placement signedBy.anyOf). */
    auditors: addressList,
    /** Placement attributes the provider must publish, e.g. { region: us-west }. */
    attributes: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).prefault({}),
  })
  .transform((group, ctx) => compileGroup(group, ctx));

export type AkashGroupInput = z.input<typeof akashGroupSchema>;
export type AkashGroup = z.output<typeof akashGroupSchema>;

type RawGroup = {
  name: string;
  nodes: number;
  gpu: { model: string | string[]; ram?: string | undefined; interface?: GpuInterface | undefined; perNode: number };
  cpu: number | string;
  memory: number | string;
  ephemeralStorage: number | string;
  shm?: number | string | undefined;
  image: string;
  command?: string[] | undefined;
  args?: string[] | undefined;
  env: Record<string, string | number | boolean>;
  ports: Array<{ port: number; as: number; global: boolean; proto: 'tcp' | 'udp' }>;
  maxPrice: { amount: number | string; denom: string };
  providers: { allow: string[]; deny: string[] };
  auditors: string[];
  attributes: Record<string, string | number | boolean>;
};

/** The compiled group: what renderers and the bid strategy work from. */
export interface CompiledAkashGroup {
  readonly name: string;
  readonly nodes: number;
  readonly gpu: { readonly models: readonly NormalizedGpuModel[]; readonly perNode: number };
  readonly cpuMillis: number;
  readonly memoryBytes: number;
  readonly ephemeralStorageBytes: number;
  readonly shmBytes: number;
  readonly image: string;
  readonly command?: readonly string[];
  readonly args?: readonly string[];
  readonly env: Readonly<Record<string, string>>;
  readonly ports: ReadonlyArray<{ readonly port: number; readonly as: number; readonly global: boolean; readonly proto: 'tcp' | 'udp' }>;
  /** `amount` is a decimal string so that 0.0001 survives the trip to the chain exactly. */
  readonly maxPrice: { readonly amount: string; readonly denom: string };
  readonly providers: { readonly allow: readonly string[]; readonly deny: readonly string[] };
  readonly auditors: readonly string[];
  readonly attributes: Readonly<Record<string, string>>;
}

function compileGroup(group: RawGroup, ctx: z.RefinementCtx): CompiledAkashGroup {
  const issue = (path: PropertyKey[], message: string) => ctx.addIssue({ code: 'custom', path, message });

  const cpuMillis = parseCpuMillis(group.cpu);
  if (cpuMillis === undefined) issue(['cpu'], `"${group.cpu}" is not a CPU amount; write e.g. 32, 0.5 or "500m"`);
  else if (cpuMillis < AKASH_LIMITS.minCpuMillisPerUnit || cpuMillis > AKASH_LIMITS.maxCpuMillisPerUnit) {
    issue(['cpu'], `must be between 0.01 and ${AKASH_LIMITS.maxCpuMillisPerUnit / 1000} cores per node (Akash limit)`);
  }

  const memoryBytes = bytesAt(group.memory, ['memory'], issue);
  if (memoryBytes !== undefined && memoryBytes > AKASH_LIMITS.maxMemoryBytesPerUnit) {
    issue(['memory'], 'must be at most 2Ti per node (Akash limit)');
  } else if (memoryBytes !== undefined && memoryBytes < AKASH_LIMITS.minMemoryBytesPerUnit) {
    issue(['memory'], 'must be at least 1Mi (Akash limit)');
  }

  const ephemeralStorageBytes = bytesAt(group.ephemeralStorage, ['ephemeralStorage'], issue);
  if (ephemeralStorageBytes !== undefined) checkVolumeBounds(ephemeralStorageBytes, ['ephemeralStorage'], issue);

  let shmBytes = group.shm === undefined ? undefined : bytesAt(group.shm, ['shm'], issue);
  if (group.shm === undefined && memoryBytes !== undefined) shmBytes = defaultShmBytes(memoryBytes);
  if (shmBytes !== undefined && group.shm !== undefined) {
    if (shmBytes < MIN_SHM_BYTES) {
      issue(['shm'], 'must be at least 64Mi: less is no better than the container default that starves PyTorch dataloaders');
    } else if (memoryBytes !== undefined && shmBytes > memoryBytes) {
      issue(['shm'], 'must not exceed memory: /dev/shm is RAM, and pages written there count against the node');
    } else {
      checkVolumeBounds(shmBytes, ['shm'], issue);
    }
  }

  const models = compileGpuModels(group.gpu, issue);

  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(group.env)) {
    if (!envNamePattern.test(key)) issue(['env', key], 'is not a valid environment variable name');
    else if (RESERVED_ENV_NAMES.includes(key)) issue(['env', key], 'is set by drover from the group; remove it');
    else env[key] = String(value);
  }

  const servicePorts = new Set<string>();
  group.ports.forEach((port, index) => {
    const key = `${port.as}/${port.proto}`;
    if (servicePorts.has(key)) issue(['ports', index, 'as'], `port ${port.as}/${port.proto} is exposed twice`);
    servicePorts.add(key);
  });

  const amount = typeof group.maxPrice.amount === 'number' ? numberToDecimal(group.maxPrice.amount) : group.maxPrice.amount;
  if (Number(amount) > AKASH_LIMITS.maxPricePerUnit) {
    issue(['maxPrice', 'amount'], `must be at most ${AKASH_LIMITS.maxPricePerUnit} per node per block (Akash limit)`);
  }

  const allowed = new Set(group.providers.allow);
  group.providers.deny.forEach((address, index) => {
    if (allowed.has(address)) issue(['providers', 'deny', index], 'is also in providers.allow');
  });

  const attributes: Record<string, string> = {};
  for (const [key, value] of Object.entries(group.attributes)) attributes[key] = String(value);

  return {
    name: group.name,
    nodes: group.nodes,
    gpu: { models, perNode: group.gpu.perNode },
    cpuMillis: cpuMillis ?? 0,
    memoryBytes: memoryBytes ?? 0,
    ephemeralStorageBytes: ephemeralStorageBytes ?? 0,
    shmBytes: shmBytes ?? 0,
    image: group.image,
    ...(group.command === undefined ? {} : { command: group.command }),
    ...(group.args === undefined ? {} : { args: group.args }),
    env,
    ports: group.ports,
    maxPrice: { amount, denom: group.maxPrice.denom },
    providers: { allow: group.providers.allow, deny: group.providers.deny },
    auditors: group.auditors,
    attributes,
  };
}

type IssueSink = (path: PropertyKey[], message: string) => void;

function bytesAt(value: number | string, path: PropertyKey[], issue: IssueSink): number | undefined {
  if (typeof value === 'number') return value;
  const bytes = parseSize(value);
  if (bytes === undefined) issue(path, `"${value}" is not a size; write e.g. 512Mi, 80Gi, 1Ti (or a number of bytes)`);
  return bytes;
}

function checkVolumeBounds(bytes: number, path: PropertyKey[], issue: IssueSink): void {
  if (bytes > AKASH_LIMITS.maxStorageBytesPerVolume) issue(path, 'must be at most 32Ti per volume (Akash limit)');
  if (bytes < AKASH_LIMITS.minStorageBytesPerVolume) issue(path, 'must be at least 5Mi per volume (Akash limit)');
}

/**
 * A quarter of memory, rounded down to a whole GiB once there is more than one, never
 * under 64Mi. A quarter covers PyTorch dataloader workers passing batches through shared
 * memory and the 20-30% of RAM Ray's object store wants (AT-1 learnings) without starving
 * the process heap.
 */
export function defaultShmBytes(memoryBytes: number): number {
  const quarter = Math.floor(memoryBytes * DEFAULT_SHM_FRACTION_OF_MEMORY);
  const rounded = quarter >= GIBIBYTE ? Math.floor(quarter / GIBIBYTE) * GIBIBYTE : Math.floor(quarter / MEBIBYTE) * MEBIBYTE;
  return Math.min(Math.max(rounded, MIN_SHM_BYTES), memoryBytes);
}

function compileGpuModels(gpu: RawGroup['gpu'], issue: IssueSink): NormalizedGpuModel[] {
  const typed = Array.isArray(gpu.model) ? gpu.model : [gpu.model];
  const pathOf = (index: number): PropertyKey[] => (Array.isArray(gpu.model) ? ['gpu', 'model', index] : ['gpu', 'model']);
  let groupRam: string | undefined;
  if (gpu.ram !== undefined) {
    const bytes = parseSize(gpu.ram);
    if (bytes === undefined || bytes % GIBIBYTE !== 0) issue(['gpu', 'ram'], `"${gpu.ram}" is not a GPU memory size; write e.g. 80Gi`);
    else groupRam = `${bytes / GIBIBYTE}Gi`;
  }
  const models: NormalizedGpuModel[] = [];
  const seen = new Set<string>();
  typed.forEach((text, index) => {
    let normalized: NormalizedGpuModel;
    try {
      normalized = normalizeGpuModel(text);
    } catch (error) {
      if (!(error instanceof UnknownGpuModelError)) throw error;
      const hint = error.suggestion === undefined ? '' : `; did you mean "${error.suggestion}"?`;
      issue(pathOf(index), `unknown GPU model "${text}"${hint}`);
      return;
    }
    if (normalized.ram !== undefined && groupRam !== undefined && normalized.ram !== groupRam) {
      issue(pathOf(index), `"${text}" names ${normalized.ram} of GPU memory but gpu.ram is ${groupRam}`);
      return;
    }
    if (normalized.interface !== undefined && gpu.interface !== undefined && normalized.interface !== gpu.interface) {
      issue(pathOf(index), `"${text}" names interface ${normalized.interface} but gpu.interface is ${gpu.interface}`);
      return;
    }
    const ram = normalized.ram ?? groupRam;
    const gpuInterface = normalized.interface ?? gpu.interface;
    const unknownVariant = describeUnknownGpuVariant(normalized.model, ram, gpuInterface);
    if (unknownVariant !== undefined) {
      const blame = normalized.ram === undefined && groupRam !== undefined ? ['gpu', 'ram'] : pathOf(index);
      issue(blame, unknownVariant);
      return;
    }
    const model: NormalizedGpuModel = {
      model: normalized.model,
      ...(ram === undefined ? {} : { ram }),
      ...(gpuInterface === undefined ? {} : { interface: gpuInterface }),
    };
    const key = `${model.model}/${model.ram ?? ''}/${model.interface ?? ''}`;
    if (!seen.has(key)) models.push(model);
    seen.add(key);
  });
  return models;
}

function numberToDecimal(value: number): string {
  // toString would write 1e-7 for tiny prices; the chain wants plain decimals.
  return value.toLocaleString('en-US', { useGrouping: false, maximumFractionDigits: 18 });
}

/** `['groups', 1, 'gpu', 'model']` -> `groups[1].gpu.model`. */
export function formatIssuePath(path: readonly PropertyKey[]): string {
  return path.reduce<string>((text, segment) => {
    if (typeof segment === 'number') return `${text}[${segment}]`;
    const name = String(segment);
    return text === '' ? name : `${text}.${name}`;
  }, '');
}

/** zod issues as SdlIssues, each path prefixed with `pathPrefix` (e.g. `akash.groups[1]`). */
export function zodIssuesToSdlIssues(error: z.ZodError, pathPrefix = ''): SdlIssue[] {
  return error.issues.map((zodIssue) => {
    const path = formatIssuePath(zodIssue.path);
    const joined = pathPrefix === '' ? path : path === '' ? pathPrefix : path.startsWith('[') ? `${pathPrefix}${path}` : `${pathPrefix}.${path}`;
    return { path: joined, message: zodIssue.message };
  });
}

/** Parses one group; throws GroupSpecError naming every bad field (`pathPrefix` leads each path). */
export function parseAkashGroup(input: unknown, pathPrefix = ''): CompiledAkashGroup {
  const result = akashGroupSchema.safeParse(input);
  if (!result.success) throw new GroupSpecError(zodIssuesToSdlIssues(result.error, pathPrefix), { pathPrefix });
  return result.data;
}

/** Parses a list of groups (`akash.groups`), checking what only the list can break: duplicate names, mixed denoms. */
export function parseAkashGroups(input: unknown, pathPrefix = 'groups'): CompiledAkashGroup[] {
  const result = akashGroupListSchema.safeParse(input);
  if (!result.success) throw new GroupSpecError(zodIssuesToSdlIssues(result.error, pathPrefix), { pathPrefix });
  return result.data;
}

/** `akash.groups` as a whole; the orchestrator may embed this instead of `z.array(akashGroupSchema)`. */
export const akashGroupListSchema = z
  .array(akashGroupSchema)
  .min(1)
  .max(AKASH_LIMITS.maxGroupsPerDeployment)
  .superRefine((groups, ctx) => {
    const names = new Set<string>();
    groups.forEach((group, index) => {
      if (names.has(group.name)) ctx.addIssue({ code: 'custom', path: [index, 'name'], message: `duplicate group name "${group.name}"` });
      names.add(group.name);
      const firstDenom = groups[0]!.maxPrice.denom;
      if (group.maxPrice.denom !== firstDenom) {
        ctx.addIssue({
          code: 'custom',
          path: [index, 'maxPrice', 'denom'],
          message: `is ${group.maxPrice.denom} but groups[0] pays in ${firstDenom}; one deployment pays in one denomination`,
        });
      }
    });
  });
